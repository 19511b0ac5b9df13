"""Every use of a private TVM (or tvm-ffi) API, in one place, each with a test against the pinned TVM
(tests/test_tvm_compat.py): an upgrade that moves one breaks here, loudly, not somewhere deep.

    import_tensor_intrin_fast   tvm.s_tir.tensor_intrin imported with a fast inspect.stack
    prim_func                   @T.prim_func with the same fast inspect.stack
    tuning_record_json          meta_schedule._ffi_api.TuningRecordAsJSON (as_json raises on IndexMap)
    xgb_model_class             XGBModel._cls, the class behind MetaSchedule's derived XGBModel
    xgb_training_callback       xgb_model._get_custom_call_back, TVM's early-stopping callback
    cancel_queued_measurements  PopenPoolExecutor._threadpool (no public way to drop queued work)
    pack_imports_blob           runtime._ffi_api.ModulePackImportsToTensor + ModuleImportsBlobName
    attention_sequence_prefill  relax.frontend.nn.llm._prefill_kernels._attention_sequence_prefill
    normalize_workload          meta_schedule.tune_context._normalize_mod (the module a record is filed under)
    translator_slice_scatter    the torch ExportedProgram translator's own _slice_scatter converter
    load_cuda_runtime           tvm/lib/libtvm_runtime_cuda.so loaded as tvm.backend.cuda does (a
                                runtime-only TVM, TVM_USE_RUNTIME_LIB=1, never loads it)
    dlight_wmma_tensorization   dlight.gpu.MatmulTensorization with another wmma intrinsic group
                                (it imports tensor_intrin.cuda.get_wmma_intrin_group at call time)
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import sys


@contextlib.contextmanager
def fast_tvmscript():
    """Parse TVMScript (`@T.prim_func`) in milliseconds, not seconds.

    TVMScript's @T.prim_func calls inspect.stack(), whose inspect.getmodule scans all of
    sys.modules for every "<frozen importlib>" frame; with torch and diffusers loaded that made
    the import of tvm.s_tir.tensor_intrin's ~250 intrinsics take ~75 s here (26 s in a bare
    process). While active, the same frames come back, with source lines from linecache."""

    def fast_stack(context=1):
        frame, out = sys._getframe(1), []
        while frame is not None:
            fn = frame.f_code.co_filename
            line = linecache.getline(fn, frame.f_lineno) if context and not fn.startswith("<") else ""
            out.append(
                inspect.FrameInfo(frame, fn, frame.f_lineno, frame.f_code.co_name, [line] if line else None, 0 if line else None)
            )
            frame = frame.f_back
        return out

    original, inspect.stack = inspect.stack, fast_stack
    try:
        yield
    finally:
        inspect.stack = original


def load_cuda_runtime() -> str | None:
    """Load TVM's CUDA runtime sidecar if it is not loaded; None when CUDA is enabled, else why not."""
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    if tvm.runtime.enabled("cuda"):
        return None
    try:
        load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=tvm.libinfo.package_lib_paths())
    except (OSError, RuntimeError) as exc:
        return f"TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load; is the NVIDIA driver installed? ({exc})"
    return None if tvm.runtime.enabled("cuda") else "TVM's CUDA runtime loaded but does not register CUDA"


def dlight_wmma_tensorization(func, target, intrin_group):
    """dlight's wmma matmul schedule of `func`, its intrinsics named by `intrin_group(load_scope,
    store_scope, in_dtype, out_dtype, trans_b)` instead of TVM's float16/int8-only group."""
    from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization
    from tvm.s_tir.tensor_intrin import cuda as cuda_intrin

    original, cuda_intrin.get_wmma_intrin_group = cuda_intrin.get_wmma_intrin_group, intrin_group
    try:
        return MatmulTensorization().apply(func, target, False)
    finally:
        cuda_intrin.get_wmma_intrin_group = original


def prim_func(**options):
    """`@T.prim_func(**options)`, parsed under fast_tvmscript: autotune's kernels and intrinsics
    (gemm_cpu's took ~5 s to import with torch loaded, in every process that builds). Write it
    `@tvm_compat.prim_func(...)`: the parser reads the options off an attribute named prim_func."""
    from tvm.script import tirx as T

    def parse(func):
        with fast_tvmscript():
            return T.prim_func(**options)(func)

    parse.dispatch_token = "tirx"  # what the parser reads off the decorator it finds in the source
    return parse


def import_tensor_intrin_fast() -> None:
    """Import tvm.s_tir.tensor_intrin (MetaSchedule imports it on first use) in ~3 s, not ~75 s."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with fast_tvmscript():
        import tvm.s_tir.tensor_intrin  # noqa: F401


def tuning_record_json(record):
    """A TuningRecord as TVM's JSON containers, without the Python-side conversion that raises."""
    from tvm.s_tir.meta_schedule import _ffi_api

    return _ffi_api.TuningRecordAsJSON(record)


def xgb_model_class():
    """The plain Python class of MetaSchedule's XGBModel (the public name is a derived object)."""
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBModel

    return XGBModel._cls


def xgb_training_callback(**kwargs):
    """TVM's xgboost callback: early stopping on its pack-sum metrics, as XGBModel trains with."""
    from tvm.s_tir.meta_schedule.cost_model import xgb_model

    return xgb_model._get_custom_call_back(**kwargs)


def cancel_queued_measurements(pool) -> None:
    """Drop the work queued on a MetaSchedule PopenPoolExecutor that has not started yet."""
    pool._threadpool.shutdown(wait=False, cancel_futures=True)


def pack_imports_blob(module) -> tuple[bytes, str]:
    """(the serialized import tree of `module`, the C symbol export_library stores it under)."""
    import tvm_ffi
    from tvm.runtime import _ffi_api

    blob = bytes(_ffi_api.ModulePackImportsToTensor(module).numpy().tobytes())
    return blob, str(tvm_ffi.get_global_func("runtime.ModuleImportsBlobName")())


def attention_sequence_prefill():
    """TVM's scheduled CUDA flash-attention (sequence prefill) kernel builder, or an ImportError."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_sequence_prefill

    return _attention_sequence_prefill


def normalize_workload(func):
    """The IRModule MetaSchedule files a kernel's records under (its tasks and ApplyDatabase use it)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def translator_slice_scatter(translator, node):
    """TVM's own conversion of aten.slice_scatter (our converter falls back to it on dynamic shapes)."""
    return translator._slice_scatter(node)
