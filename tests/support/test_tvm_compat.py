"""Each shim in autotune.support.tvm_compat against the pinned TVM: if an upgrade moves a private
API, the shim's test fails here, by name."""

from __future__ import annotations

import inspect
import sys
import time

import tvm
import tvm_ffi
from tvm import te
from tvm.script import tirx as T

from autotune.support import tvm_compat


def _add_one() -> tvm.IRModule:
    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: a[i] + 1.0, name="b")
    return tvm.IRModule({"main": te.create_prim_func([a, b])})


def test_import_tensor_intrin_fast_registers_the_intrinsics_and_restores_inspect():
    stack = inspect.stack
    tvm_compat.import_tensor_intrin_fast()
    assert "tvm.s_tir.tensor_intrin" in sys.modules
    assert inspect.stack is stack, "inspect.stack must be restored"
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN

    assert TensorIntrin.get(VNNI_DOT_16x4_INTRIN) is not None


def test_tuning_record_json_matches_as_json():
    from tvm.s_tir import meta_schedule as ms

    mod = _add_one()
    sch = tvm.s_tir.Schedule(mod)
    block = sch.get_sblock("b")
    (i,) = sch.get_loops(block)
    sch.split(i, factors=[None, 16])
    record = ms.database.TuningRecord(sch.trace, ms.database.Workload(mod), [1e-3], tvm.target.Target("llvm"), None)
    from autotune.tuning.log import record_to_json

    raw = tvm_compat.tuning_record_json(record)
    assert len(raw) == len(record.as_json())
    assert record_to_json(record) == record.as_json()


def test_xgb_model_class_is_the_class_behind_xgbmodel():
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    cls = tvm_compat.xgb_model_class()
    assert isinstance(cls, type) and hasattr(cls, "_train") and hasattr(cls, "predict")
    model = XGBModel(num_tuning_cores=1)
    assert isinstance(model, cls) or isinstance(getattr(model, "_inst", None), cls)


def test_xgb_training_callback_is_an_xgboost_callback():
    import xgboost as xgb

    callback = tvm_compat.xgb_training_callback(
        early_stopping_rounds=5, verbose_eval=0, fevals=[], evals=[], cvfolds=None
    )
    assert isinstance(callback, xgb.callback.TrainingCallback)


def test_cancel_queued_measurements_drops_work_not_started():
    from tvm.support.popen_pool import (
        PopenPoolExecutor as Pool,  # the pool MetaSchedule's LocalRunner uses
    )

    pool = Pool(max_workers=1, timeout=30)
    try:
        first = pool.submit(time.sleep, 2)
        queued = [pool.submit(time.sleep, 2) for _ in range(3)]
        time.sleep(0.3)
        tvm_compat.cancel_queued_measurements(pool)
        assert all(f.cancelled() for f in queued), "queued measurements must be dropped"
        first.result(timeout=30)  # the one already running finishes
    finally:
        pool.shutdown(wait=False)


def test_pack_imports_blob_serializes_the_import_tree():
    module = tvm.compile(_add_one(), target="llvm").mod
    blob, symbol = tvm_compat.pack_imports_blob(module)
    assert isinstance(blob, bytes) and len(blob) > 8
    assert isinstance(symbol, str) and symbol


def test_attention_sequence_prefill_builds_a_scheduled_cuda_kernel():
    prefill = tvm_compat.attention_sequence_prefill()
    func = prefill(1, 1, 64, "float16", tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), causal=0, sm_scale=0.125)
    assert isinstance(func, tvm.tirx.PrimFunc)
    assert len(func.params) >= 4


def test_normalize_workload_gives_the_module_records_are_filed_under():
    func = _add_one()["main"]
    normalized = tvm_compat.normalize_workload(func)
    assert isinstance(normalized, tvm.IRModule) and "main" in [gv.name_hint for gv in normalized.functions]


def test_translator_slice_scatter_is_the_translators_converter():
    from tvm.relax.frontend.torch.exported_program_translator import (
        ExportedProgramImporter,
    )

    assert callable(getattr(ExportedProgramImporter, "_slice_scatter", None))
    calls = []

    class Translator:
        def _slice_scatter(self, node):
            calls.append(node)
            return "converted"

    assert tvm_compat.translator_slice_scatter(Translator(), "node") == "converted" and calls == ["node"]


def test_dlight_wmma_tensorization_uses_the_given_intrinsic_group():
    """bf16 names through dlight's float16 rule: the schedule holds the bf16 wmma intrinsics, and
    TVM's own group function is back in place afterwards."""
    from autotune.kernels.matmul_cuda import wmma_intrin_group

    cuda_intrin = sys.modules["tvm.s_tir.tensor_intrin.cuda"]  # imported (fast) by matmul_cuda

    a = te.placeholder((128, 64), "bfloat16", name="a")
    w = te.placeholder((64, 96), "bfloat16", name="w")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((128, 96), lambda i, j: te.sum(a[i, k].astype("float32") * w[k, j].astype("float32"), axis=k), name="c")
    func = te.create_prim_func([a, w, c])
    original = cuda_intrin.get_wmma_intrin_group
    asked = []

    def group(load_scope, store_scope, in_dtype, out_dtype, trans_b):
        asked.append(in_dtype)
        return wmma_intrin_group(load_scope, store_scope, "bfloat16", out_dtype, trans_b)

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    sch = tvm_compat.dlight_wmma_tensorization(func, target, group)
    assert cuda_intrin.get_wmma_intrin_group is original
    assert asked and sch is not None
    script = sch.mod.script()
    assert "wmma.matrix_a" in script and "tvm_mma_sync" in script and "bfloat16" in script


def _scale(n: int, dtype: str, fast: bool):
    """b = 2a as TVMScript, a closure whose buffer shapes come from the enclosing function (string
    annotations under PEP 563, which TVMScript resolves through the caller's frames)."""
    if fast:

        @tvm_compat.prim_func(s_tir=True)
        def scale(a: T.Buffer((n,), dtype), b: T.Buffer((n,), dtype)) -> None:
            for i in range(n):
                b[i] = a[i] * T.Cast(dtype, 2)

    else:

        @T.prim_func(s_tir=True)
        def scale(a: T.Buffer((n,), dtype), b: T.Buffer((n,), dtype)) -> None:
            for i in range(n):
                b[i] = a[i] * T.Cast(dtype, 2)

    return scale


def test_prim_func_parses_like_tvmscript_and_restores_inspect():
    stack = inspect.stack
    fast = _scale(48, "float16", fast=True)
    assert inspect.stack is stack, "inspect.stack must be restored"
    assert tvm_ffi.structural_equal(fast, _scale(48, "float16", fast=False))
    assert "float16" in fast.script() and "48" in fast.script()
