"""The bf16 matrix-engine GEMM: the AVX512-BF16 and AMX-BF16 kernels against a numpy reference
(bf16 inputs, float32 accumulation), on aligned and ragged shapes, and the MetaSchedule design
space replayed with every decision it can sample."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import s_tir

from autotune.kernels import gemm_bf16_cpu as gemm
from autotune.support import hardware
from autotune.support.targets import resolve_target

# bf16 products are exact in float32; only the float32 summation order differs from numpy's.
RTOL = 1e-5

needs_avx512_bf16 = pytest.mark.skipif(
    "avx512_bf16" not in hardware.cpu_flags(),
    reason=f"CPU has no AVX512-BF16 (flags: {' '.join(sorted(hardware.cpu_flags() & {'avx512f', 'avx2', 'amx_bf16'}))})",
)
AVX512_BF16_TARGET = {"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2}


def _operands(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)
    return a, b, a.astype(np.float32) @ b.astype(np.float32)


def _run(lib, a, b, out_shape):
    dev = tvm.cpu()
    c = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"), dev)
    lib["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(gemm.pack_weight(b), dev), c)
    return c.numpy()


def _assert_close(out, ref):
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"max error {err:.2e} relative to max |C|, tolerance {RTOL}"


@needs_avx512_bf16
@pytest.mark.parametrize(
    "m, n, k",
    [
        (30, 96, 96),  # aligned: 5 rows x 3 vectors register tiles
        (17, 48, 40),  # ragged: a prime number of rows (1-row tiles)
        (8, 32, 5200),  # a reduction long enough to be split into partial products
    ],
)
def test_avx512_bf16_gemm_matches_numpy(m, n, k):
    a, b, ref = _operands(m, n, k)
    lib = gemm.compile_standalone(m, n, k, gemm.AVX512, tvm.target.Target(AVX512_BF16_TARGET))
    assert "vdpbf16ps" in lib.mod.inspect_source("asm")
    _assert_close(_run(lib, a, b, (m, n)), ref)


def test_amx_gemm_compiles_to_tile_instructions_and_matches_numpy_where_the_cpu_has_amx():
    target = resolve_target("x86-amx").tvm_target()
    lib = gemm.compile_standalone(64, 64, 128, gemm.AMX, target)
    asm = lib.mod.inspect_source("asm")
    assert "tdpbf16ps" in asm and "ldtilecfg" in asm and "tilestored" in asm
    if hardware.missing_cpu_flags(["amx_tile", "amx_bf16"]):
        pytest.skip(f"CPU has no AMX-BF16 to run the kernel on ({hardware.cpu_model()}): codegen checked only")
    hardware.request_amx_permission()
    a, b, ref = _operands(64, 64, 128)
    _assert_close(_run(lib, a, b, (64, 64)), ref)


def test_shapes_each_engine_takes():
    assert gemm.isa_for_shape(gemm.AMX, 1560, 1536, 1536) == gemm.AMX
    assert gemm.padded_rows(gemm.AMX, 1560) == 1568  # AMX works on 32-row blocks
    assert gemm.isa_for_shape(gemm.AMX, 1560, 48, 1536) == gemm.AVX512  # 48 columns: not whole AMX tiles
    assert gemm.isa_for_shape(gemm.AVX512, 1560, 24, 1536) is None  # not whole 16-lane vectors
    assert gemm.isa_for_shape(gemm.AVX512, 1560, 32, 15) is None  # odd reduction: no bf16 pairs
    assert gemm.padded_rows(gemm.AVX512, 1560) == 1560 and gemm.padded_rows(gemm.AVX512, 257) == 264
    assert gemm.k_split(8960, gemm.AVX512) == 4 and gemm.k_split(1536, gemm.AVX512) == 1
    assert gemm.target_isa(resolve_target("x86-amx").tvm_target()) == gemm.AMX
    assert gemm.target_isa(resolve_target("x86-avx512-bf16").tvm_target()) == gemm.AVX512
    assert gemm.target_isa(resolve_target("x86-avx512").tvm_target()) is None


@needs_avx512_bf16
def test_every_sampled_register_tile_replays_and_computes_the_product():
    """MetaSchedule re-applies a trace with other decisions; each must schedule and be right."""
    m, n, k = 12, 96, 64
    func = gemm.make_primfunc(m, n, k, gemm.AVX512).with_attr("global_symbol", "main")
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm.apply_schedule(sampled, sample=True)
    trace = sampled.trace
    decisions = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(decisions) == 2  # register-tile rows and vectors
    a, b, ref = _operands(m, n, k)
    choices = [range(len(inst.attrs[0])) for inst in decisions]
    for picks in itertools.product(*choices):
        for inst, pick in zip(decisions, picks):
            trace = trace.with_decision(inst, pick, remove_postproc=True)
        replayed = s_tir.Schedule(tvm.IRModule({"main": func}))
        trace.apply_to_schedule(replayed, remove_postproc=True)
        lib = tvm.compile(replayed.mod, target=tvm.target.Target(AVX512_BF16_TARGET))
        _assert_close(_run(lib, a, b, (m, n)), ref)
