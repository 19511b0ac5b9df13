"""im2col for CPU convolutions computed as GEMMs: the rows a matrix-engine GEMM reads.

    A[b, o_1.., t_1.., c] = X[b, o_1*s_1 + t_1*d_1 - p_1, .., c]    (0 where that is padding)

X is channels-last (N, *spatial, C); A has one row per output position (b, o_1, ..) and, in a
row, the kernel taps (t_1, ..) by input channel, channels innermost: reshaped to
(N * positions, taps * C) it is the GEMM's left operand, whose k groups (bf16 pairs) are
consecutive channels of one tap, and the convolution is A @ W as (taps * C, C_out).

The copy runs along channels (contiguous in X and in A), so it vectorises; it is marked opaque so
that FuseOps does not pull the producer of X (an activation) into it, which would recompute it
once per tap.

w8a8 convolutions gather and quantize in one kernel (`make_quant_primfunc`): each row quantized
to int8 with its own scale, as w8a8 quantizes a linear's tokens, the float rows never written
(a quarter of the bytes of float32 rows, and one pass instead of two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import te

from . import token_quant


@dataclass(frozen=True)
class Geometry:
    """Where a convolution's im2col rows come from, read in place from its input by an implicit GEMM:

        A[(b, o_1, ..), (t_1, .., c)] = Xp[b, o_1*s_1 + t_1*d_1, .., c]

    Xp is the channels-last input padded (`pad_width`), so that no index needs a bound check."""

    x_shape: tuple[int, ...]  # the unpadded channels-last input (N, *spatial, C)
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pad_before: tuple[int, ...]
    dilation: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def channels(self) -> int:
        return self.x_shape[-1]

    @property
    def rows(self) -> int:
        return self.x_shape[0] * math.prod(self.out_spatial)

    def pad_after(self) -> tuple[int, ...]:
        """Padding after each spatial axis that the last output position's last tap reaches."""
        return tuple(max(0, (o - 1) * s + (t - 1) * d + 1 - size - p) for o, s, t, d, size, p in
                     zip(self.out_spatial, self.strides, self.kernel, self.dilation, self.x_shape[1:-1], self.pad_before))

    def pad_width(self) -> list[int]:
        """`relax.op.nn.pad`'s widths (before, after per axis) that make Xp from the input."""
        widths = [0, 0]
        for before, after in zip(self.pad_before, self.pad_after()):
            widths += [before, after]
        return widths + [0, 0]

    def padded_shape(self) -> tuple[int, ...]:
        n, *spatial, c = self.x_shape
        return (n, *[size + b + a for size, b, a in zip(spatial, self.pad_before, self.pad_after())], c)

    def reader(self, dtype: str):
        """(Xp placeholder, read(row, tap, channel) -> Xp's value there): the implicit GEMM's A."""
        Xp = te.placeholder(self.padded_shape(), dtype, name="X")

        def read(row, tap, channel):
            outs = _unravel(row, self.out_spatial)
            batch = row // math.prod(self.out_spatial)
            taps = _unravel(tap, self.kernel)
            return Xp[(batch, *[o * s + t * d for o, t, s, d in zip(outs, taps, self.strides, self.dilation)], channel)]

        return Xp, read


def _unravel(index, extents: tuple[int, ...]) -> list:
    """The row-major coordinates of a flat `index` within `extents` (the first taken modulo too)."""
    coords = []
    for extent in reversed(extents):
        coords.append(index % extent)
        index = index // extent
    return coords[::-1]


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def make_primfunc(
    x_shape: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...], pad_before: tuple[int, ...],
    dilation: tuple[int, ...], out_spatial: tuple[int, ...], dtype: str, box: tuple[int, ...] | None = None,
) -> tvm.tirx.PrimFunc:
    """X (N, *spatial, C) -> A (N, *out_spatial, *kernel, C); with `box` (sizes along N and the
    output's spatial axes), one chunk of it: A (*box, *kernel, C) from output position `first` on,
    `first` an int32 tensor (1 + spatial dims) and the kernel's second argument. Its indices are
    clamped into X whatever `first` holds (tuning measures the kernel on random inputs)."""
    inputs, lead, row = _rows(x_shape, kernel, strides, pad_before, dilation, out_spatial, dtype, box)
    A = te.compute((*lead, *kernel, x_shape[-1]), row, name="im2col")
    func = te.create_prim_func([*inputs, A]).without_attr("global_symbol")
    return func.with_attr("op_pattern", 8)  # opaque: see the module docstring


def make_quant_primfunc(
    x_shape: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...], pad_before: tuple[int, ...],
    dilation: tuple[int, ...], out_spatial: tuple[int, ...], dtype: str, values: str, box: tuple[int, ...] | None = None,
) -> tvm.tirx.PrimFunc:
    """w8a8's convolutions: the im2col rows quantized per row as w8a8 quantizes a linear's tokens
    (kernels/token_quant.py, same arithmetic), in one pass that never writes the float rows:
    X (N, *spatial, C) [, first] -> XQ (N, *out_spatial, *kernel, C) in `values`, SX (N, *out_spatial, 1)
    float32 (`box`: one chunk, as in `make_primfunc`). A row is one output position's taps by
    input channels, so a scale covers one position's receptive field."""
    inputs, lead, row = _rows(x_shape, kernel, strides, pad_before, dilation, out_spatial, dtype, box)

    def value(*index):
        v = row(*index)
        return v if dtype == "float32" else v.astype("float32")

    XQ, SX = token_quant.quantized_rows(value, tuple(lead), (*kernel, x_shape[-1]), values)
    func = te.create_prim_func([*inputs, XQ, SX]).without_attr("global_symbol")
    info = {"shape": [*map(int, lead), *kernel, int(x_shape[-1])], "smooth": 0, "shifted": int(values == "uint8"),
            "row_axes": len(kernel) + 1}
    return func.with_attr(token_quant.ATTR, info).with_attr("op_pattern", 8)


def _rows(x_shape, kernel, strides, pad_before, dilation, out_spatial, dtype, box):
    """(the kernel's inputs: X [, first], the row axes' extents, row(*position, *taps, channel) -> the value)."""
    n, *spatial, c = x_shape
    dims = len(spatial)
    if not (len(kernel) == len(strides) == len(pad_before) == len(dilation) == len(out_spatial) == dims):
        raise ValueError(f"im2col: {dims} spatial dims but kernel {kernel}, strides {strides}, padding {pad_before}, "
                         f"dilation {dilation}, output {out_spatial}")
    X = te.placeholder(tuple(x_shape), dtype, name="X")

    def gather(b, outs, taps, ch):
        index = [o * s + t * d - p for o, t, s, d, p in zip(outs, taps, strides, dilation, pad_before)]
        inside = tvm.tirx.all(*[tvm.tirx.all(i >= 0, i < size) for i, size in zip(index, spatial)])
        clamped = [tvm.tirx.Max(tvm.tirx.Min(i, size - 1), 0) for i, size in zip(index, spatial)]
        return tvm.tirx.if_then_else(inside, X[(b, *clamped, ch)], tvm.tirx.const(0, dtype))

    if box is None:
        return [X], (n, *out_spatial), lambda b, *axes: gather(b, axes[:dims], axes[dims:-1], axes[-1])
    first = te.placeholder((dims + 1,), "int32", name="first")

    def chunk(b, *axes):
        batch = tvm.tirx.Max(tvm.tirx.Min(first[0] + b, n - 1), 0)
        return gather(batch, [first[1 + i] + o for i, o in enumerate(axes[:dims])], axes[dims:-1], axes[-1])

    return [X, first], tuple(box), chunk


def is_im2col_call(expr) -> bool:
    """Whether a Relax expression calls an im2col kernel (by the name `kernel_name` gives it)."""
    from tvm import relax

    return (isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            and expr.args[0].name_hint.startswith("im2col_"))


def kernel_name(x_shape, kernel, strides, out_spatial, box=None) -> str:
    shape = "x".join(str(s) for s in x_shape)
    chunk = f"_chunk{'x'.join(map(str, box))}" if box is not None else ""
    return f"im2col_{shape}_k{'x'.join(map(str, kernel))}_s{'x'.join(map(str, strides))}_o{math.prod(out_spatial)}{chunk}"


def quant_kernel_name(x_shape, kernel, strides, out_spatial, values: str, box=None) -> str:
    return "im2col_quant_" + token_quant.VALUES[values] + kernel_name(x_shape, kernel, strides, out_spatial, box)[len("im2col"):]
