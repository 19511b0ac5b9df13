"""w8a8's per-token activation quantizer (kernels/token_quant.py) and its convolution form, the
im2col rows quantized as they are gathered (kernels/im2col.py): bit-exact against numpy, under
the default schedule and under MetaSchedule's generic design space (what tuning searches)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from conftest import im2col_rows
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

import autotune  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
from autotune.kernels import im2col, token_quant
from autotune.support.tvm_compat import import_tensor_intrin_fast
from autotune.tuning.fallback import default_schedule

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


def reference(x: np.ndarray, smooth: np.ndarray | None, values: str):
    """w8a8's quantization in numpy, float32 throughout as the kernel computes it."""
    v = x.astype(np.float32) * smooth if smooth is not None else x.astype(np.float32)
    scale = np.maximum(np.abs(v).max(-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
    q = np.clip(np.rint(v / scale), -127, 127)
    return (q + 128).astype(np.uint8) if values == "uint8" else q.astype(values), scale


def run(lib, x, smooth, values):
    xq = tvm.runtime.empty(x.shape, values)
    sx = tvm.runtime.empty(x.shape[:-1] + (1,), "float32")
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *(() if smooth is None else (smooth,)))], xq, sx)
    return xq.numpy(), sx.numpy()


def operands(shape, smooth: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10, shape[:-1] + (1,)).astype(np.float32)
    x[(0,) * (len(shape) - 1)] = 0  # an all-zero row: scale 1e-8 / 127, every value 0
    return x, (rng.uniform(0.2, 5, shape[-1]).astype(np.float32) if smooth else None)


@pytest.mark.parametrize("shape, smooth, values", [
    ((48, 32), False, "int8"),  # the tiny transformer's rows
    ((2, 17, 40), True, "uint8"),  # 3-D activations, SmoothQuant's factor, the engines' uint8; 40 = 8 x 5 lanes
    ((5, 36), False, "uint8"),  # k with no power-of-two divisor above 4
    ((24, 48), True, "int16"),  # AVX2's int16 values
])
def test_default_schedule_is_bit_exact(shape, smooth, values):
    func = token_quant.make_primfunc(shape, "float32", smooth, values).with_attr("global_symbol", "main")
    sch = default_schedule(func, TARGET)
    x, s = operands(shape, smooth)
    xq, sx = run(tvm.compile(sch.mod, target=TARGET), x, s, values)
    want_q, want_s = reference(x, s, values)
    np.testing.assert_array_equal(sx, want_s)
    np.testing.assert_array_equal(xq, want_q)


def test_large_rows_run_in_parallel_and_stay_exact():
    shape = (600, 256)  # 153,600 values: over PARALLEL_MIN_ELEMENTS
    func = token_quant.make_primfunc(shape).with_attr("global_symbol", "main")
    sch = default_schedule(func, TARGET)
    assert "T.parallel" in sch.mod.script()
    x, _ = operands(shape, False, seed=1)
    xq, sx = run(tvm.compile(sch.mod, target=TARGET), x, None, "int8")
    np.testing.assert_array_equal(xq, reference(x, None, "int8")[0])


def design_space_sample(func):
    """The kernel compiled under a schedule from MetaSchedule's generic design space (what tuning searches)."""
    import_tensor_intrin_fast()  # (what the fallback does too: MetaSchedule's own import takes ~30 s more)
    func = func.with_attr("global_symbol", "main")
    ctx = ms.TuneContext(mod=tvm.IRModule({"main": func}), target=TARGET, space_generator="post-order-apply",
                         search_strategy="replay-trace", task_name="quantizer", rand_state=3, num_threads=1)
    spaces = ctx.generate_design_space()
    assert spaces
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    spaces[-1].trace.apply_to_schedule(sch, remove_postproc=True)
    assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
    return tvm.compile(sch.mod, target=TARGET)


def test_metaschedule_design_space_compiles_and_is_exact():
    """Tuning searches MetaSchedule's generic space for the kernel: a sample of it is still exact."""
    shape = (48, 64)
    lib = design_space_sample(token_quant.make_primfunc(shape, "float32", False, "uint8"))
    x, _ = operands(shape, False, seed=2)
    xq, _ = run(lib, x, None, "uint8")
    np.testing.assert_array_equal(xq, reference(x, None, "uint8")[0])


CONV_GEOMETRIES = [  # (channels-last input, kernel, strides, padding before, dilation, output), values
    (((1, 3, 6, 10, 16), (3, 3, 3), (1, 1, 1), (2, 1, 1), (1, 1, 1), (3, 6, 10)), "uint8"),  # causal time padding
    (((2, 9, 11, 24), (3, 3), (2, 2), (1, 1), (1, 1), (5, 6)), "int16"),  # strided, AVX2's values, batch 2
    (((1, 8, 10, 12), (3, 3), (1, 1), (2, 2), (2, 2), (8, 10)), "int8"),  # dilated; 12 channels: 4-lane vectors
]


@pytest.mark.parametrize("geometry, values", CONV_GEOMETRIES)
def test_im2col_quantizer_equals_im2col_then_the_token_quantizer(geometry, values):
    """A w8a8 convolution's rows, quantized while gathered, equal numpy's im2col rows quantized row
    by row (one scale per output position over its taps x channels), bit for bit; zero padding
    counts as zeros in a row."""
    x_shape, *_, out_spatial = geometry
    func = im2col.make_quant_primfunc(*geometry, "float32", values).with_attr("global_symbol", "main")
    sch = default_schedule(func, TARGET)
    x, _ = operands(x_shape, False, seed=4)
    rows = im2col_rows(x, *geometry[1:])
    xq = tvm.runtime.empty(rows.shape, values)
    sx = tvm.runtime.empty((x_shape[0], *out_spatial, 1), "float32")
    tvm.compile(sch.mod, target=TARGET)["main"](tvm.runtime.tensor(x), xq, sx)
    flat = rows.reshape(-1, math.prod(rows.shape[1 + len(out_spatial):]))
    want_q, want_s = reference(flat, None, values)
    np.testing.assert_array_equal(sx.numpy().reshape(-1, 1), want_s)
    np.testing.assert_array_equal(xq.numpy().reshape(flat.shape), want_q)


def test_im2col_quantizer_chunk_quantizes_the_rows_from_its_first_position():
    """A chunk of the output (MAX_IM2COL_BYTES exceeded): the rows from `first` on, as in the whole."""
    geometry = ((1, 3, 6, 10, 16), (3, 3, 3), (1, 1, 1), (2, 1, 1), (1, 1, 1), (3, 6, 10))
    box, first = (1, 1, 2, 10), np.array([0, 1, 3, 0], dtype="int32")
    func = im2col.make_quant_primfunc(*geometry, "float32", "uint8", box=box).with_attr("global_symbol", "main")
    sch = default_schedule(func, TARGET)
    x, _ = operands(geometry[0], False, seed=5)
    rows = im2col_rows(x, *geometry[1:])[:, 1:2, 3:5]
    xq, sx = tvm.runtime.empty(rows.shape, "uint8"), tvm.runtime.empty((*box, 1), "float32")
    tvm.compile(sch.mod, target=TARGET)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(first), xq, sx)
    want_q, want_s = reference(rows.reshape(20, -1), None, "uint8")
    np.testing.assert_array_equal(sx.numpy().reshape(-1, 1), want_s)
    np.testing.assert_array_equal(xq.numpy().reshape(20, -1), want_q)


def test_im2col_quantizer_design_space_compiles_and_is_exact():
    """What tuning searches for a w8a8 convolution's quantizer: a sample of MetaSchedule's space is exact."""
    geometry, values = CONV_GEOMETRIES[0]
    lib = design_space_sample(im2col.make_quant_primfunc(*geometry, "float32", values))
    x, _ = operands(geometry[0], False, seed=6)
    rows = im2col_rows(x, *geometry[1:])
    xq, sx = tvm.runtime.empty(rows.shape, values), tvm.runtime.empty((*rows.shape[:4], 1), "float32")
    lib["main"](tvm.runtime.tensor(x), xq, sx)
    np.testing.assert_array_equal(xq.numpy().reshape(180, -1), reference(rows.reshape(180, -1), None, values)[0])


SAMPLE_CASES = [  # (x shape, relax pad widths, levels)
    ((1, 5, 16, 12, 8), [0, 0, 2, 0, 1, 1, 1, 1, 0, 0], 32767),  # the VAE's causal 3x3x3: time padded in front only
    ((2, 7, 9, 6), [0, 0, 1, 2, 0, 3, 0, 0], 6605),  # 2 samples, each its own scale; the coarsest grid (k 2560)
]


def sample_reference(x: np.ndarray, pad_width: list[int], levels: int):
    """Each sample quantized with one scale to -levels..levels in float32, then zero-padded."""
    axes = tuple(range(1, x.ndim))
    scale = np.maximum(np.abs(x).max(axis=axes, keepdims=True), np.float32(1e-8)) / np.float32(levels)
    q = np.clip(np.rint(x / scale), -levels, levels).astype(np.int16)
    return np.pad(q, list(zip(pad_width[0::2], pad_width[1::2]))), scale.reshape(-1, 1)


@pytest.mark.parametrize("x_shape, pad_width, levels", SAMPLE_CASES)
@pytest.mark.parametrize("space", ["default", "design space"])
def test_sample_quantizer_is_bit_exact_and_writes_the_padding(x_shape, pad_width, levels, space):
    """AVX2's w8a8 convolutions read in place: their input quantized per sample to int16 and zero-padded
    in one kernel equals numpy bit for bit, under the default schedule and a sample of what tuning searches."""
    func = token_quant.make_sample_primfunc(x_shape, pad_width, levels)
    if space == "default":
        lib = tvm.compile(default_schedule(func.with_attr("global_symbol", "main"), TARGET).mod, target=TARGET)
    else:
        lib = design_space_sample(func)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape).astype(np.float32) * np.float32(10) ** rng.uniform(-2, 1, (x_shape[0],) + (1,) * (len(x_shape) - 1)).astype(np.float32)
    want_q, want_s = sample_reference(x, pad_width, levels)
    xq = tvm.runtime.tensor(np.full(want_q.shape, 99, np.int16))  # the padding must be written, not left
    sx = tvm.runtime.empty((x_shape[0], 1), "float32")
    lib["main"](tvm.runtime.tensor(x), xq, sx)
    np.testing.assert_array_equal(sx.numpy(), want_s)
    np.testing.assert_array_equal(xq.numpy(), want_q)
