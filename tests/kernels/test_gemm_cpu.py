"""The matrix-engine GEMMs against numpy: AVX512-BF16 and AMX-BF16 (bf16 inputs, float32
accumulation, to float32 rounding; bf16 or int8 weights), AVX512-VNNI and AMX-INT8 (uint8 x int8 ->
int32, exactly), AVX2's int16 multiply-add (int16 x int8 -> int32, exactly), AVX2 FMA on bf16 (or
int8 weights) widened to float32 and on float32, on aligned and ragged shapes, and the MetaSchedule design space
replayed with
every decision it can sample. Where the CPU lacks AVX512-BF16, AMX or VNNI, those instructions are
emulated (conftest's dpbf16_target, amx_target, vnni_target), so the kernels' code runs on any x86-64."""

from __future__ import annotations

import itertools
import re

import ml_dtypes
import numpy as np
import pytest
import tvm
from conftest import im2col_rows
from tvm import s_tir

from autotune.kernels import gemm_cpu as gemm
from autotune.support.targets import resolve_target

# bf16 products are exact in float32; only the float32 summation order differs from numpy's.
RTOL = 1e-5



def _operands(m, n, k, seed=0, int8_weights=False):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    if int8_weights:
        b = rng.integers(-127, 128, (k, n), dtype=np.int8)
    else:
        b = rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)
    return a, b, a.astype(np.float32) @ b.astype(np.float32)


def _int8_operands(m, n, k, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)  # -128 too: the full signed range
    return a, b, a.astype(np.int64) @ b.astype(np.int64)


def _avx2_int8_operands(m, n, k, seed=0):
    """What w8a8's quantizer gives AVX2: int8 values held as int16 (+-128 too: the extremes' products)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k)).astype(np.int16)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    a[0, :2], b[:2, 0] = -128, -128  # a pair of 128 x 128 products: 32768 per pair, past int16
    return a, b, a.astype(np.int64) @ b.astype(np.int64)


def _run(lib, a, b, out_shape):
    dev = tvm.cpu()
    if a.dtype in (np.uint8, np.int16):
        c = tvm.runtime.tensor(np.full(out_shape, -1, "int32"), dev)
        packed = gemm.pack_weight(b, 4 if a.dtype == np.uint8 else 2)
    else:
        c = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"), dev)
        packed = gemm.pack_weight(b)
    lib["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(packed, dev), c)
    return c.numpy()


def _replay_every_pick(func, trace, decision, target, a, b, ref, exact):
    """The trace replayed with each choice of one sampled decision: each must compute the product."""
    for pick in range(len(decision.attrs[0])):
        replayed = s_tir.Schedule(tvm.IRModule({"main": func}))
        trace.with_decision(decision, pick, remove_postproc=True).apply_to_schedule(replayed, remove_postproc=True)
        out = _run(tvm.compile(replayed.mod, target=target), a, b, ref.shape)
        if exact:
            np.testing.assert_array_equal(out, ref)
        else:
            _assert_close(out, ref)


def _assert_close(out, ref):
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"max error {err:.2e} relative to max |C|, tolerance {RTOL}"


@pytest.mark.parametrize(
    "m, n, k",
    [
        (30, 96, 96),  # aligned: 5 rows x 3 vectors register tiles
        (17, 48, 40),  # ragged: a prime number of rows (1-row tiles)
        (8, 32, 5200),  # a reduction long enough to be split into partial products
        (240, 16, 216),  # one column panel: int8 weights converted per block of rows
    ],
)
@pytest.mark.parametrize("isa", [gemm.AVX512, gemm.AVX512_W8])
def test_avx512_bf16_gemm_matches_numpy(dpbf16_target, m, n, k, isa):
    """bf16 weights, or int8 weights converted to bf16 in the kernel (exactly: |q| <= 127); the
    instruction emulated in FMAs where the CPU has no AVX512-BF16 (conftest.dpbf16_target)."""
    target, emulated = dpbf16_target
    a, b, ref = _operands(m, n, k, int8_weights=isa == gemm.AVX512_W8)
    lib = gemm.compile_standalone(m, n, k, isa, target)
    if not emulated:
        assert "vdpbf16ps" in lib.mod.inspect_source("asm")
    _assert_close(_run(lib, a, b, (m, n)), ref)


@pytest.mark.parametrize(
    "m, n, k",
    [
        (30, 96, 128),  # aligned: 5 rows x 3 vectors register tiles
        (17, 48, 44),  # ragged: a prime number of rows (1-row tiles), k not a multiple of 64
        (8, 32, 10400),  # a reduction long enough to be split into partial products
    ],
)
def test_vnni_int8_gemm_equals_numpy_exactly(vnni_target, m, n, k):
    """uint8 x int8 -> int32 on vpdpbusd (its arithmetic in plain TIR where the CPU has no VNNI)."""
    target, emulated = vnni_target
    a, b, ref = _int8_operands(m, n, k)
    lib = gemm.compile_standalone(m, n, k, gemm.VNNI, target)
    assert ("vpdpbusd" in lib.mod.inspect_source("asm")) != emulated
    np.testing.assert_array_equal(_run(lib, a, b, (m, n)), ref)


@pytest.mark.parametrize(
    "m, n, k",
    [
        (12, 48, 64),  # aligned: 4 rows x 3 vectors register tiles
        (17, 24, 38),  # ragged: a prime number of rows (1-row tiles), 3 vectors of 8
        (8, 16, 5200),  # a reduction long enough to be split into partial products
    ],
)
def test_avx2_int8_gemm_equals_numpy_exactly(m, n, k):
    """int16 x int8 -> int32 on vpmaddwd (every x86-64 CI machine has AVX2), bit for bit."""
    target = resolve_target("x86-avx2").tvm_target()
    a, b, ref = _avx2_int8_operands(m, n, k)
    lib = gemm.compile_standalone(m, n, k, gemm.AVX2_INT8, target)
    assert "vpmaddwd" in lib.mod.inspect_source("asm")
    np.testing.assert_array_equal(_run(lib, a, b, (m, n)), ref)


@pytest.mark.parametrize(
    "m, n, k",
    [
        (12, 48, 64),  # aligned: 4 rows x 3 vectors register tiles
        (17, 24, 38),  # ragged: a prime number of rows (1-row tiles), 3 vectors of 8
        (8, 16, 5200),  # a reduction long enough to be split into partial products
        (240, 16, 216),  # two column panels: weights converted per block of rows
    ],
)
@pytest.mark.parametrize("isa", [gemm.AVX2_BF16, gemm.AVX2_W8, gemm.AVX2_F32])
def test_avx2_fma_gemm_matches_numpy(m, n, k, isa):
    """bf16 activations (given as float32) times bf16 (or int8) weights widened to float32 in the
    kernel, on vfmadd (every x86-64 CI machine has AVX2 and FMA): products exact in float32, only
    the summation order differs. Float32 x float32: float32 products, against numpy in float64."""
    target = resolve_target("x86-avx2").tvm_target()
    if isa == gemm.AVX2_F32:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        ref = a.astype(np.float64) @ b.astype(np.float64)
    else:
        a, b, ref = _operands(m, n, k, int8_weights=isa == gemm.AVX2_W8)
    lib = gemm.compile_standalone(m, n, k, isa, target)
    assert "vfmadd" in lib.mod.inspect_source("asm")
    _assert_close(_run(lib, a.astype(np.float32), b, (m, n)), ref)


@pytest.mark.parametrize(
    "isa, m, n, k",
    [
        (gemm.AVX512, 30, 48, 96),  # aligned register tiles
        (gemm.AVX512_W8, 17, 16, 40),  # ragged rows; one column panel converted per task
        (gemm.AVX512, 8, 32, 5200),  # a reduction split into partial products
        (gemm.VNNI, 30, 32, 128),
        (gemm.AVX2_BF16, 17, 24, 38),
        (gemm.AVX2_W16, 18, 24, 38),  # int16 weights (Winograd's U): rows padded to fours by callers, not here
        (gemm.AMX, 64, 64, 96),
    ],
)
def test_batched_gemm_multiplies_each_batch_by_its_own_weight(request, isa, m, n, k):
    """`batch` independent products, each with its own weight (the Winograd points' GEMMs), against
    numpy per batch (int8: exactly; bf16: to float32 rounding; float32 x int16 times a scale per
    column: numpy in float64)."""
    batch = 3
    if isa in gemm.AVX2:
        target = resolve_target("x86-avx2").tvm_target()
    else:
        fixture = {gemm.VNNI: "vnni_target", gemm.AMX: "amx_target"}.get(isa, "dpbf16_target")
        target = request.getfixturevalue(fixture)[0]
    if gemm.PRECISION[isa] == gemm.INT8:
        operands = [_int8_operands(m, n, k, seed) for seed in range(batch)]
    elif isa == gemm.AVX2_W16:  # the full int16 range, float32 activations, a scale per (batch, column)
        rng = np.random.default_rng(0)
        scales = rng.uniform(1e-5, 1e-3, (batch, n)).astype(np.float32)
        pairs = [(rng.standard_normal((m, k), dtype=np.float32), rng.integers(-32767, 32768, (k, n), dtype=np.int16))
                 for _ in range(batch)]
        operands = [(a, b, a.astype(np.float64) @ (b.astype(np.float64) * s)) for (a, b), s in zip(pairs, scales)]
    else:
        operands = [_operands(m, n, k, seed, int8_weights=isa == gemm.AVX512_W8) for seed in range(batch)]
    a = np.stack([op[0] for op in operands])
    if gemm.activation_dtype(isa) == "float32":  # the FMA engine: bf16 values held in float32
        a = a.astype(np.float32)
    packed = np.stack([gemm.pack_weight(op[1], gemm.group(isa)) for op in operands])
    ref = np.stack([op[2] for op in operands])
    lib = gemm.compile_standalone(m, n, k, isa, target, batch=batch)
    dev = tvm.cpu()
    fill = (-1, "int32") if gemm.PRECISION[isa] == gemm.INT8 else (np.nan, "float32")
    c = tvm.runtime.tensor(np.full((batch, m, n), *fill), dev)
    column_scales = [tvm.runtime.tensor(scales, dev)] if isa in gemm.COLUMN_SCALED else []
    lib["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(packed, dev), *column_scales, c)
    if gemm.PRECISION[isa] == gemm.INT8:
        np.testing.assert_array_equal(c.numpy(), ref)
    else:
        _assert_close(c.numpy(), ref)


def test_kernels_keep_the_structure_the_shipped_records_are_filed_under():
    """The shipped log (schedules/x86) files the bench workloads' engine GEMMs under each kernel's
    structural hash, attributes included: a change to the PrimFunc the kernels of those shapes
    have always had (a new attribute key, say) leaves every shipped record unused, silently."""
    from pathlib import Path

    from autotune.tuning.log import structure_key, workload_lines

    shipped = {line["workload"][0] for line in workload_lines(Path(__file__).resolve().parents[2] / "schedules" / "x86")}
    for m, n, k, isa in [(6240, 384, 3456, gemm.AVX512), (6240, 384, 3456, gemm.VNNI), (1560, 8960, 1536, gemm.AVX512_W8)]:
        assert structure_key(gemm.make_primfunc(m, n, k, isa)) in shipped, gemm.kernel_name(m, n, k, isa)


def test_a_schedule_recorded_before_column_panels_replays_on_the_weight_rows(vnni_target):
    """The vector engines' default and sampled schedules re-lay the weight in column panels (a
    layout-rewrite block the build runs once); a record tuned before that replays without it, on
    the (k/4, n, 4) rows the build then ships, and still computes the product exactly."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    target, _ = vnni_target
    m, n, k = 24, 96, 64
    func = gemm.make_primfunc(m, n, k, gemm.VNNI).with_attr("global_symbol", "main")

    def weight_shape(mod):  # what the kernel reads once the layout-rewrite block is split out (as built and measured)
        return tuple(int(d) for d in ArgInfo.from_entry_func(mod, remove_preproc=True)[1].shape)

    today = s_tir.Schedule(tvm.IRModule({"main": func}))
    gemm.apply_schedule(today)
    assert weight_shape(today.mod) == (n // 16, k // 4, 16, 4)
    before = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm.apply_schedule(before, sample=True, panels=False)
    replayed = s_tir.Schedule(tvm.IRModule({"main": func}))
    before.trace.apply_to_schedule(replayed, remove_postproc=True)
    assert weight_shape(replayed.mod) == (k // 4, n, 4)
    a, b, ref = _int8_operands(m, n, k)
    np.testing.assert_array_equal(_run(tvm.compile(replayed.mod, target=tvm.target.Target(target)), a, b, (m, n)), ref)
    # today's kernel as built (its re-layout split out) on the weight re-laid by numpy
    relaid = gemm.compile_standalone(m, n, k, gemm.VNNI, tvm.target.Target(target), relaid=True)
    c = tvm.runtime.tensor(np.full((m, n), -1, "int32"))
    relaid["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(gemm.column_panels(gemm.pack_weight(b, 4), gemm.VNNI)), c)
    np.testing.assert_array_equal(c.numpy(), ref)


def test_a_short_reductions_weight_panel_converts_in_a_loop():
    """A VAE convolution's K = 288 is under the task's auto-unroll limit: unrolled, the panel's
    conversion was 288 copies of the int8 -> float32 widening in the LLVM IR (17k lines, 2.4 s of
    LLVM per kernel); as a loop it is one (1.5k lines)."""
    target = resolve_target("x86-avx2").tvm_target()
    ir = {isa: gemm.compile_standalone(16, 32, 288, isa, target).mod.inspect_source("ll") for isa in (gemm.AVX2_W8, gemm.AVX2_BF16)}
    assert all(text.count("\n") < 4000 for text in ir.values()), {isa: text.count("\n") for isa, text in ir.items()}
    assert ir[gemm.AVX2_BF16].count(" shl ") < 64  # bf16 widening: a shift per vector of the loop body


def test_amx_kernels_compile_to_tile_instructions():
    target = resolve_target("x86-amx").tvm_target()
    for isa, product in ((gemm.AMX, "tdpbf16ps"), (gemm.AMX_W8, "tdpbf16ps"), (gemm.AMX_INT8, "tdpbusd")):
        asm = gemm.compile_standalone(64, 64, 256, isa, target).mod.inspect_source("asm")
        assert product in asm and "ldtilecfg" in asm and "tilestored" in asm, isa


# (the column-block choices on an aligned 64 x 256 x 128 product: the replay test below)
AMX_SHAPES = [
    (96, 160, 64),  # 3 row blocks, 5 column blocks, one k tile
    (32, 32, 5120),  # a reduction long enough to be split into partial products
]


@pytest.mark.parametrize("m, n, k", AMX_SHAPES)
def test_amx_int8_gemm_equals_numpy_exactly(amx_target, m, n, k):
    """On the CPU's AMX-INT8, or through the C emulation of the tile instructions (conftest.amx_target)."""
    target, _ = amx_target
    a, b, ref = _int8_operands(m, n, k)
    lib = gemm.compile_standalone(m, n, k, gemm.AMX_INT8, target)
    np.testing.assert_array_equal(_run(lib, a, b, (m, n)), ref)


@pytest.mark.parametrize("m, n, k", AMX_SHAPES)
@pytest.mark.parametrize("isa", [gemm.AMX, gemm.AMX_W8])
def test_amx_bf16_gemm_matches_numpy(amx_target, isa, m, n, k):
    """bf16 weights, or int8 weights converted to bf16 in the kernel; on the CPU's AMX-BF16 or
    through the C emulation."""
    target, _ = amx_target
    a, b, ref = _operands(m, n, k, int8_weights=isa == gemm.AMX_W8)
    lib = gemm.compile_standalone(m, n, k, isa, target)
    _assert_close(_run(lib, a, b, (m, n)), ref)


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
    assert gemm.target_isa(resolve_target("x86-avx512").tvm_target()) == gemm.AVX2_BF16  # no bf16 arithmetic: FMA
    # int8: AMX-INT8 tiles take k in 64s; VNNI quads in 4s
    assert gemm.target_isa(resolve_target("x86-amx").tvm_target(), gemm.INT8) == gemm.AMX_INT8
    assert gemm.target_isa(resolve_target("x86-avx512-vnni").tvm_target(), gemm.INT8) == gemm.VNNI
    assert gemm.target_isa(resolve_target("x86-avx2").tvm_target(), gemm.INT8) == gemm.AVX2_INT8
    assert gemm.target_isa(resolve_target("x86-avx2").tvm_target(), gemm.BF16) == gemm.AVX2_BF16
    # float32: the FMA engine on AVX2-only CPUs; with AVX-512, MetaSchedule's float32 schedules
    assert gemm.target_isa(resolve_target("x86-avx2").tvm_target(), gemm.F32) == gemm.AVX2_F32
    assert gemm.target_isa(resolve_target("x86-avx512").tvm_target(), gemm.F32) is None
    assert gemm.target_isa(resolve_target('{"kind": "llvm", "mcpu": "x86-64"}').tvm_target(), gemm.BF16) is None
    assert gemm.isa_for_shape(gemm.AVX2_BF16, 1560, 24, 1536) == gemm.AVX2_BF16
    assert gemm.isa_for_shape(gemm.AVX2_INT8, 1560, 24, 1536) == gemm.AVX2_INT8  # whole 8-lane vectors
    assert gemm.isa_for_shape(gemm.AVX2_INT8, 1560, 20, 1536) is None
    assert gemm.isa_for_shape(gemm.AVX2_INT8, 1560, 32, 15) is None  # odd reduction: no int16 pairs
    assert gemm.isa_for_shape(gemm.AMX_INT8, 1560, 1536, 1536) == gemm.AMX_INT8
    assert gemm.isa_for_shape(gemm.AMX_INT8, 1560, 1536, 1568) == gemm.VNNI  # 1568 = 24.5 tile rows
    assert gemm.isa_for_shape(gemm.VNNI, 1560, 1536, 1538) is None  # not whole quads
    assert gemm.k_split(8960, gemm.VNNI) == 4 and gemm.k_split(8960, gemm.AMX_INT8) == 4
    assert gemm.isa_for_shape(gemm.AMX_W8, 1560, 48, 1536) == gemm.AVX512_W8  # int8 weights: bf16 engines' shapes
    # too few columns for whole vectors: padded where at most half of them is padding
    assert gemm.padded_columns(gemm.AVX512, 16384, 8, 216) == 16 and gemm.padded_columns(gemm.AMX, 16384, 8, 216) == 16
    assert gemm.padded_columns(gemm.AVX512, 16384, 3, 216) is None and gemm.padded_columns(gemm.AVX512, 64, 7, 64) is None
    assert gemm.padded_columns(gemm.AVX512, 64, 32, 64) == 32 and gemm.padded_columns(gemm.VNNI, 64, 24, 64) == 32
    assert gemm.padded_columns(gemm.AVX2_INT8, 64, 4, 64) == 8 and gemm.padded_columns(gemm.AVX512, 64, 8, 15) is None
    assert gemm.padded_columns(None, 64, 8, 64) is None


# (AVX2_W8 differs from AVX2_BF16 only in the weight panel's source dtype: its kernel test covers it)
@pytest.mark.parametrize("isa", [gemm.AVX512, gemm.AVX512_W8, gemm.VNNI, gemm.AVX2_INT8, gemm.AVX2_BF16])
def test_every_sampled_register_tile_replays_and_computes_the_product(isa, request):
    """MetaSchedule re-applies a trace with other decisions; each must schedule and be right (on
    any CPU: the instructions emulated where the CPU lacks them)."""
    if isa in gemm.AVX2:
        target = resolve_target("x86-avx2").tvm_target()
    else:
        target, _ = request.getfixturevalue("vnni_target" if isa == gemm.VNNI else "dpbf16_target")
    converts = isa in (gemm.AVX512_W8, gemm.AVX2_INT8, gemm.AVX2_BF16)
    m, n, k = (128, 16, 64) if converts else (24, 96, 64)  # (one or two column panels: rows in blocks)
    func = gemm.make_primfunc(m, n, k, isa).with_attr("global_symbol", "main")
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm.apply_schedule(sampled, sample=True)
    trace = sampled.trace
    decisions = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    # register-tile rows and vectors, and rows per block: AVX512-BF16 and VNNI 12 or all 24, the
    # engines converting their weights 64 or all 128
    assert len(decisions) == 3
    exact = gemm.PRECISION[isa] == gemm.INT8
    if isa == gemm.AVX2_INT8:
        a, b, ref = _avx2_int8_operands(m, n, k)
    else:
        a, b, ref = _int8_operands(m, n, k) if exact else _operands(m, n, k, int8_weights=isa == gemm.AVX512_W8)
    if isa in gemm.FMA:
        a = a.astype(np.float32)  # the bf16 values, widened by their producer
    choices = [range(len(inst.attrs[0])) for inst in decisions]
    for picks in itertools.product(*choices):
        for inst, pick in zip(decisions, picks):
            trace = trace.with_decision(inst, pick, remove_postproc=True)
        replayed = s_tir.Schedule(tvm.IRModule({"main": func}))
        trace.apply_to_schedule(replayed, remove_postproc=True)
        lib = tvm.compile(replayed.mod, target=tvm.target.Target(target))
        out = _run(lib, a, b, (m, n))
        if exact:
            np.testing.assert_array_equal(out, ref)
        else:
            _assert_close(out, ref)


@pytest.mark.parametrize("isa", [gemm.AVX2_F32, gemm.AVX2_BF16, gemm.AVX2_W8, gemm.AVX2_W16])
def test_avx2_fma_default_tiles_leave_registers_for_the_weight_row_and_the_broadcast(isa):
    """AVX2 has 16 vector registers: an FMA tile of MR x NV accumulators also holds NV weight vectors
    and a broadcast, so 3 x 4 (17) spills and is never the default (1.5x slower on a Zen 2); rows
    come padded to fours so that the 4 x 3 tile fits them. The int16 engine keeps its measured 3 x 4."""
    for rows in (390, 392, 1560, 6240, 96):
        for n in (16, 24, 192, 384, 1536, 8960):
            mr, nv = gemm.default_avx512_tile(rows, n, isa)
            assert mr * nv + nv + 1 <= gemm.VECTOR_REGISTERS[isa] and rows % mr == 0 and (n // 8) % nv == 0
    assert gemm.default_avx512_tile(1560, 8960, isa) == (2, 5)  # 1120 vectors: 3 does not divide them
    assert gemm.default_avx512_tile(1560, 1536, isa) == (4, 3)
    assert gemm.padded_rows(isa, 390) == 392 and gemm.default_avx512_tile(392, 384, isa) == (4, 3)
    assert gemm.padded_rows(isa, 257) == 264  # (no tile height divides it: eights, as every vector engine)
    assert gemm.default_avx512_tile(390, 384, isa) == (3, 3)  # (an implicit GEMM's rows are not padded)
    assert gemm.default_avx512_tile(1560, 8960, gemm.AVX2_INT8) == (3, 4)


@pytest.mark.parametrize("isa", [gemm.AVX2_F32, gemm.AVX2_INT8])
def test_one_vector_wide_weights_sample_tiles_up_to_twelve_rows(isa):
    """A weight of 8 columns (one AVX2 vector) may take register tiles up to 12 rows high (4 rows
    leave FMA latency-bound): the default takes 8 of 96 rows, and every sampled height replays and
    computes the product."""
    m, n, k = 96, 8, 72
    assert gemm.default_avx512_tile(m, n, isa) == (12, 1) and gemm.default_avx512_tile(1560, 1536, isa) == (4, 3)
    target = resolve_target("x86-avx2").tvm_target()
    func = gemm.make_primfunc(m, n, k, isa).with_attr("global_symbol", "main")
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm.apply_schedule(sampled, sample=True)
    trace = sampled.trace
    rows = next(inst for inst in trace.insts if inst.kind.name == "SampleCategorical")
    assert [int(v) for v in rows.attrs[0]] == [1, 2, 3, 4, 6, 8, 12]
    if isa == gemm.AVX2_INT8:
        a, b, ref = _avx2_int8_operands(m, n, k)
    else:
        a, b, ref = (x.astype(np.float32) for x in _operands(m, n, k))
    _replay_every_pick(func, trace, rows, target, a, b, ref, exact=isa == gemm.AVX2_INT8)


def test_engines_converting_weights_block_rows_when_there_are_few_panels():
    """A weight of one or two column panels is converted per block of rows (so that every core
    has a task), in blocks of at least MIN_CONVERTING_BLOCK rows; with enough panels, not."""
    for rows, panels in [(16384, 1), (6240, 8), (240, 1)]:
        size = gemm.converting_row_block(rows, panels, gemm.AVX512_W8)
        assert rows % size == 0 and size >= gemm.MIN_CONVERTING_BLOCK and rows // size > 1
        assert rows // size * panels >= gemm.MIN_TASKS or size == min(
            s for s in gemm.row_block_sizes(rows, gemm.AVX512_W8) if s >= gemm.MIN_CONVERTING_BLOCK)
    assert gemm.converting_row_block(1560, 96, gemm.AVX512_W8) == 1560  # enough panels
    assert gemm.converting_row_block(30, 2, gemm.AVX2_W8) == 30  # too few rows to block
    sch = s_tir.Schedule(tvm.IRModule({"main": gemm.make_primfunc(16384, 16, 216, gemm.AVX512_W8)}))
    gemm.apply_schedule(sch)
    tasks = re.findall(r"T\.parallel\((\d+)[,)]", sch.mod["main"].script())
    assert tasks == [str(16384 // gemm.converting_row_block(16384, 1, gemm.AVX512_W8))]


def test_row_blocks_hold_every_tile_height_and_fit_l2():
    """Row blocks are drawn apart from the tile height, so each candidate block must be a multiple of
    every candidate height; the default keeps a block's activation rows within ROW_BLOCK_BYTES and
    leaves the rows unblocked where the weight has as many columns as A has rows."""
    for rows in (1560, 6240, 24960, 512, 264, 48, 7, 3):
        heights = [h for h in range(1, 6) if rows % h == 0]
        sizes = gemm.row_block_sizes(rows, gemm.VNNI)
        assert rows in sizes and all(rows % size == 0 and size % h == 0 for size in sizes for h in heights), rows
    assert gemm.row_block_sizes(1560, gemm.AVX512) == [60, 120, 1560]
    assert gemm.default_row_block(6240, 384, 1728, gemm.AVX512) == 60  # 60 rows x 1728 x 2 bytes = 207 KB
    assert gemm.default_row_block(6240, 384, 1728, gemm.VNNI) == 120  # int8: 1 byte a value
    assert gemm.default_row_block(1560, 8960, 1536, gemm.AVX512) == 1560  # the weight is the larger operand
    assert gemm.default_row_block(1560, 16, 8192, gemm.AVX512) == 60  # none fits (60 x 16 KB): the smallest


@pytest.mark.parametrize("isa", [gemm.AMX, gemm.AMX_W8, gemm.AMX_INT8])
def test_every_sampled_amx_column_blocking_replays_and_computes_the_product(amx_target, isa):
    """The AMX kernels' one decision (32-column blocks per task), every choice replayed and run."""
    target, _ = amx_target
    m, n, k = 64, 256, 128
    func = gemm.make_primfunc(m, n, k, isa).with_attr("global_symbol", "main")
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm.apply_schedule(sampled, sample=True)
    trace = sampled.trace
    (decision,) = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(decision.attrs[0]) == 4  # 1, 2, 4 or 8 blocks of the 8
    a, b, ref = _int8_operands(m, n, k) if isa == gemm.AMX_INT8 else _operands(m, n, k, int8_weights=isa == gemm.AMX_W8)
    _replay_every_pick(func, trace, decision, target, a, b, ref, exact=isa == gemm.AMX_INT8)


IMPLICIT_CASES = {  # (input N, *spatial, C), kernel, strides, padding before, dilation
    "causal3d": ((1, 4, 6, 10, 8), (3, 3, 3), (1, 1, 1), (2, 1, 1), (1, 1, 1)),  # the VAE's: time padding in front only
    "strided2d": ((2, 9, 12, 6), (3, 3), (2, 1), (1, 2), (1, 2)),  # strides, dilation, batch 2, 3 k pairs a tap
    "conv1d": ((1, 30, 4), (5,), (1,), (2,), (1,)),
}


@pytest.mark.parametrize("case", list(IMPLICIT_CASES))
@pytest.mark.parametrize("isa", gemm.IMPLICIT_ISAS)
def test_implicit_convolution_gemm_matches_numpy_im2col(case, isa):
    """A convolution's GEMM reading its rows in place from the zero-padded input equals the GEMM of
    numpy's im2col rows (float32 summation order aside; exactly in int32), for every engine that
    takes it (float32; bf16 or int8 weights widened in the kernel; int16 activations x int8 weights),
    and every register-tile height tuning samples replays and computes it."""
    from autotune.kernels import im2col

    x_shape, kernel, strides, pad, dilation = IMPLICIT_CASES[case]
    out = tuple(im2col.output_size(size, t, s, p, p, d) for size, t, s, p, d in zip(x_shape[1:-1], kernel, strides, pad, dilation))
    geometry = im2col.Geometry(x_shape, kernel, strides, pad, dilation, out)
    m, n, k = geometry.rows, 16, geometry.taps * x_shape[-1]
    assert gemm.reads_rows_in_place(isa, geometry, n)
    rng = np.random.default_rng(0)
    if isa == gemm.AVX2_INT8:  # int16 activations on the grid the int32 sums allow, int8 weights: exact
        x = rng.integers(-gemm.int16_levels(k), gemm.int16_levels(k) + 1, x_shape).astype(np.int16)
    else:
        x = rng.standard_normal(x_shape).astype(ml_dtypes.bfloat16).astype(np.float32)  # bf16 values: exact products
    if isa in (gemm.AVX2_W8, gemm.AVX2_INT8):
        b = rng.integers(-127, 128, (k, n), dtype=np.int8)
    else:
        b = rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16 if isa == gemm.AVX2_BF16 else np.float32)
    xp = np.pad(x, [(0, 0), *zip(geometry.pad_before, geometry.pad_after()), (0, 0)])
    assert xp.shape == geometry.padded_shape()
    ref = im2col_rows(x, kernel, strides, pad, dilation, out).reshape(m, k).astype(np.float64) @ b.astype(np.float64)
    target = resolve_target("x86-avx2").tvm_target()
    func = gemm.make_primfunc(m, n, k, isa, rows_from=geometry).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    gemm.apply_schedule(sch)
    lib = tvm.compile(sch.mod, target=target)
    exact = isa == gemm.AVX2_INT8
    assert ("vpmaddwd" if exact else "vfmadd") in lib.mod.inspect_source("asm")
    out = _run(lib, xp, b, (m, n))
    if exact:
        np.testing.assert_array_equal(out, ref)
        # every product at the grid's extreme (padding included): the largest sum, still exact in int32
        largest = np.full(xp.shape, gemm.int16_levels(k), np.int16)
        np.testing.assert_array_equal(_run(lib, largest, np.full((k, n), -127, np.int8), (m, n)),
                                      np.full((m, n), -127 * gemm.int16_levels(k) * k))
    else:
        _assert_close(out, ref)
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm.apply_schedule(sampled, sample=True)
    rows = next(inst for inst in sampled.trace.insts if inst.kind.name == "SampleCategorical")
    _replay_every_pick(func, sampled.trace, rows, target, xp, b, ref, exact=exact)


def test_only_the_avx2_engines_read_rows_in_place_of_single_pass_reductions():
    """Implicit GEMMs are for the AVX2 engines (measured there), a reduction of one pass, whole k
    pairs of channels and rows in whole register tiles; anything else gathers im2col rows."""
    from autotune.kernels import im2col

    def geometry(channels, out=(4, 64, 64), taps=(3, 3, 3)):
        return im2col.Geometry((1, 6, *out[1:], channels), taps, (1, 1, 1), (2, 1, 1), (1, 1, 1), out)

    assert gemm.reads_rows_in_place(gemm.AVX2_F32, geometry(8), 8)
    assert not gemm.reads_rows_in_place(gemm.AVX512, geometry(8), 16)  # AVX512-BF16: not measured yet
    assert gemm.reads_rows_in_place(gemm.AVX2_INT8, geometry(8), 8)  # int16 activations quantized per sample
    assert not gemm.reads_rows_in_place(gemm.VNNI, geometry(8), 16)  # its rows quantized per row as gathered
    assert not gemm.reads_rows_in_place(gemm.AVX2_F32, geometry(7), 8)  # a k pair would straddle two taps
    assert not gemm.reads_rows_in_place(gemm.AVX2_F32, geometry(128), 8)  # 3456 long: split into partial products
    assert not gemm.reads_rows_in_place(gemm.AVX2_F32, geometry(8, out=(1, 1, 7)), 8)  # 7 rows: padded to 8
    with pytest.raises(ValueError, match="no implicit"):
        gemm.make_primfunc(16384, 8, 216, gemm.AVX512, rows_from=geometry(8))


@pytest.mark.parametrize("rows", [320, 5120, 20480])
def test_one_vector_wide_weights_get_row_blocks_their_tall_tiles_divide(rows):
    """A weight one AVX2 vector wide may take tiles up to 12 rows high, so its converting engines'
    row blocks are multiples of every such height (a 10-row tile in a 64-row block was a split TVM
    could not tensorize: such builds failed); the default schedule applies and, on the smallest,
    computes the product."""
    isa, k = gemm.AVX2_F32, 72
    heights = gemm._divisors(rows, 1, gemm.MAX_ONE_VECTOR_ROWS[isa])
    block = gemm.converting_row_block(rows, 1, isa, 1)
    assert 10 in heights and all(block % h == 0 for h in heights) and rows // block > 1
    func = gemm.make_primfunc(rows, 8, k, isa).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    gemm.apply_schedule(sch)
    if rows == 320:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((rows, k), dtype=np.float32), rng.standard_normal((k, 8), dtype=np.float32)
        lib = tvm.compile(sch.mod, target=resolve_target("x86-avx2").tvm_target())
        _assert_close(_run(lib, a, b, (rows, 8)), a.astype(np.float64) @ b.astype(np.float64))
