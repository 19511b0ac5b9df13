"""Per-token dynamic int8 quantization of activations (w8a8), one kernel per linear.

    SX[..., 0] = max(max_k |x[..., k]|, 1e-8) / 127                 x = X * S (SmoothQuant) or X
    XQ[..., k] = clip(round(x[..., k] / SX[..., 0]), -127, 127)      int8, + 128 as uint8, or int16

One pass per row computes its absolute maximum and quantizes it (the row stays in cache); written
as Relax ops it was three kernels and three intermediate tensors per linear (abs-max, the scale,
the division), which cost more than the int8 matmul saved on small models. The arithmetic is the
same operation for operation (a divide by the scale, round half to even), so the result is
bit-identical to that form. `values` is the dtype the matmul's engine multiplies: uint8 (+128) for
the engines that take unsigned activations x signed weights (the caller subtracts 128 x the
weight's column sums from the int32 product), int16 for AVX2's int16 multiply-add, else int8.
Marked opaque so that FuseOps keeps it whole.

`make_sample_primfunc`: the same arithmetic with one row per sample of a convolution's input, on
an int16 grid, written zero-padded (AVX2's w8a8 convolutions read in place, passes/conv_gemm.py).
"""

from __future__ import annotations

import math

import tvm
from tvm import te

INT8_MAX = 127.0
MIN_SCALE = 1e-8  # the scale of an all-zero row (its values quantize to 0)
ATTR = "autotune.token_quant"  # on the kernel: its shape and variant
PARALLEL_MIN_ELEMENTS = 1 << 16  # below this a parallel launch costs more than it saves (2-core measurements)


VALUES = {"int8": "i8", "uint8": "u8", "int16": "i16"}  # values dtype -> kernel name part


def make_primfunc(shape: tuple[int, ...], in_dtype: str = "float32", smooth: bool = False,
                  values: str = "int8") -> tvm.tirx.PrimFunc:
    """X (*lead, k) [, S (k,)] -> XQ (*lead, k) `values` (int8, uint8 shifted by 128, int16), SX (*lead, 1) float32."""
    *lead, k = shape
    X = te.placeholder(tuple(shape), in_dtype, name="X")
    S = te.placeholder((k,), "float32", name="S") if smooth else None

    def value(*index):
        v = X(*index) if in_dtype == "float32" else X(*index).astype("float32")
        return v * S[index[-1]] if smooth else v

    XQ, SX = quantized_rows(value, tuple(lead), (k,), values)
    func = te.create_prim_func([X, *([S] if smooth else []), XQ, SX]).without_attr("global_symbol")
    info = {"shape": [int(s) for s in shape], "smooth": int(smooth), "shifted": int(values == "uint8")}
    return func.with_attr(ATTR, info).with_attr("op_pattern", 8)  # opaque: FuseOps leaves it whole


def quantized_rows(value, lead: tuple[int, ...], row: tuple[int, ...], values: str,
                   levels: float = INT8_MAX) -> tuple[te.Tensor, te.Tensor]:
    """The quantizer's stages over rows given by `value(*lead_index, *row_index)` (float32): XQ
    (*lead, *row) in `values`, SX (*lead, 1), each row's values on the grid -levels..levels. A row
    may have several axes (a convolution's im2col row: taps by channels, kernels/im2col.py; a whole
    sample: `make_sample_primfunc`)."""
    axes = [te.reduce_axis((0, e), name="k" if len(row) == 1 else f"k{i}") for i, e in enumerate(row)]
    amax = te.compute((*lead, 1), lambda *i: te.max(te.abs(value(*i[:-1], *axes)), axis=axes), name="amax")
    SX = te.compute((*lead, 1), lambda *i: te.max(amax(*i), te.const(MIN_SCALE, "float32")) / te.const(levels, "float32"),
                    name="scale")

    def quantized(*i):
        q = te.min(te.max(te.round(value(*i) / SX(*i[:len(lead)], 0)), te.const(-levels, "float32")),
                   te.const(levels, "float32"))
        return (q + te.const(128.0, "float32")).astype("uint8") if values == "uint8" else q.astype(values)

    return te.compute((*lead, *row), quantized, name="quantize"), SX


def make_sample_primfunc(x_shape: tuple[int, ...], pad_width: list[int], levels: int) -> tvm.tirx.PrimFunc:
    """w8a8's convolutions read in place on AVX2 (passes/conv_gemm.py): X (N, *spatial, C) float32 ->
    XQ (N, *spatial padded by `pad_width` (relax.op.nn.pad's), C) int16 on the grid -levels..levels,
    zero in the padding, SX (N, 1) float32: one scale per sample, X = XQ * SX. The same arithmetic
    as a row of `make_primfunc`, with the padding written in the same pass."""
    n, *spatial, c = x_shape
    X = te.placeholder(tuple(x_shape), "float32", name="X")
    XQ, SX = quantized_rows(lambda *i: X(*i), (n,), (*spatial, c), "int16", float(levels))
    before, after = pad_width[0::2], pad_width[1::2]
    padded = [size + b + a for size, b, a in zip(x_shape, before, after)]

    def pad(*i):
        inside = tvm.tirx.all(*[tvm.tirx.all(v >= b, v < b + size) for v, b, size in zip(i, before, x_shape)])
        return tvm.tirx.if_then_else(inside, XQ(*[v - b for v, b in zip(i, before)]), tvm.tirx.const(0, "int16"))

    XQp = te.compute(tuple(padded), pad, name="pad")
    func = te.create_prim_func([X, XQp, SX]).without_attr("global_symbol")
    info = {"shape": [int(s) for s in x_shape], "smooth": 0, "shifted": 0, "row_axes": len(x_shape) - 1, "padded": 1}
    return func.with_attr(ATTR, info).with_attr("op_pattern", 8)


def sample_kernel_name(x_shape: tuple[int, ...], pad_width: list[int], levels: int) -> str:
    return f"sample_quant_i16_{'x'.join(map(str, x_shape))}_pad{'x'.join(map(str, pad_width))}_l{levels}"


def kernel_name(shape: tuple[int, ...], in_dtype: str, smooth: bool, values: str) -> str:
    dims = "x".join(str(s) for s in shape)
    return f"token_quant_{VALUES[values]}_{dims}" + ("_smooth" if smooth else "") + (
        "" if in_dtype == "float32" else f"_{in_dtype}")


def is_token_quant_kernel(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and ATTR in func.attrs


def apply_schedule(sch, lanes: int = 8) -> None:
    """The default schedule (untuned builds): one row at a time (rows in parallel when there is
    enough work), its maximum as `lanes` partial maxima in a vector then reduced, the division
    vectorised. `lanes`: float32 lanes of the target's vectors. A row of several axes (an im2col
    row) is reduced over its taps in turn, its innermost axis (channels) in vectors: fused into one
    axis, every element's tap and channel were divisions of the fused index (3x slower on the
    tiny VAE decoder's 8-channel rows)."""
    info = sch.mod["main"].attrs[ATTR]
    shape = [int(s) for s in info["shape"]]
    row_axes = int(info["row_axes"]) if "row_axes" in info else 1
    k = shape[-1]
    width = max(w for w in range(1, lanes + 1) if k % w == 0 and (w & (w - 1)) == 0)
    _, partial = sch.split(sch.get_loops(sch.get_sblock("amax"))[-1], [None, width])
    partials = sch.rfactor(partial, 0)  # "amax_rf": `width` partial maxima per row, then "amax" of them
    loops = sch.get_loops(partials)
    lead, lane = loops[:len(shape) - row_axes], loops[-1]
    row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    sch.vectorize(lane)
    if "padded" in info:  # one row per sample: its maximum in one pass, then the padded output in parallel
        sch.reverse_compute_at(sch.get_sblock("amax"), row)
        sch.compute_inline(sch.get_sblock("quantize"))
        *outer, channels = sch.get_loops(sch.get_sblock("pad"))
        _, vector = sch.split(channels, [None, width])
        sch.vectorize(vector)
        sch.parallel(sch.fuse(*outer[:2]))
        return
    for name in ("amax", "scale", "quantize"):  # (outputs among them: consumers move to the row)
        sch.reverse_compute_at(sch.get_sblock(name), row)
    _, vector = sch.split(sch.get_loops(sch.get_sblock("quantize"))[-1], [None, width])
    sch.vectorize(vector)
    if math.prod(shape) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(row)
