"""Drop the kernel taps of a 3-D convolution that only ever see causal zero padding.

The Wan VAE's causal convolutions pad time with zeros in front (`F.pad(x, (.., 2, 0))`, then a
3×3×3 conv). On a single frame with no cache (the first latent frame, and the VAE benchmarks
at 480p) the output has one frame and two of the three time taps multiply zeros: torch does
3× the useful work. Here such a `conv3d(pad(x))` becomes a convolution over the taps that see
data — a conv2d when one tap is left — with the spatial padding folded into the convolution.
The result is the same sum without its zero terms (exact up to float summation order).

The rewritten convolution reads `W[:, :, first:last]`, a weight-only slice: build-time weight
precompute (weight_transforms.py) turns it into a weight of its own.

`pads_into_convolutions` (for the convolutions computed as GEMMs, conv_gemm.py) makes any such zero
padding the convolution's own.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.frontend.importer import ImportedModel


def _const_int_list(values) -> list[int]:
    return [int(v) for v in values]


def _reduced_conv(conv: relax.Call, pad: relax.Call, cast: relax.Call | None = None):
    """The replacement for conv3d(pad(x)) (or conv3d(astype(pad(x))), as mixed precision writes
    it), or None when the pattern does not apply."""
    attrs, pattrs = conv.attrs, pad.attrs
    if attrs.data_layout != "NCDHW" or attrs.kernel_layout != "OIDHW" or attrs.out_layout != "NCDHW":
        return None
    if pattrs.pad_mode != "constant" or float(pattrs.pad_value) != 0.0:
        return None
    widths = _const_int_list(pattrs.pad_width)  # (before, after) per axis, N C D H W
    if any(widths[:4]):
        return None
    x, weight = pad.args[0], conv.args[1]
    if cast is not None:
        x = relax.op.astype(x, cast.attrs.dtype)
    try:
        x_depth = int(pad.args[0].ty.shape[2])
        k_depth = int(weight.ty.shape[2])
        out_depth = int(conv.ty.shape[2])
    except (TypeError, AttributeError):  # symbolic shapes: leave it alone
        return None
    conv_pad = _const_int_list(attrs.padding)  # d_front, h_front, w_front, d_back, h_back, w_back
    front, back = widths[4] + conv_pad[0], widths[5] + conv_pad[3]
    if out_depth != 1 or _const_int_list(attrs.dilation)[0] != 1 or front + x_depth + back != k_depth:
        return None
    if front == 0 and back == 0:
        return None  # every tap sees data
    # With one output frame, tap k reads padded frame k: taps front .. front+x_depth-1 see x.
    taps = relax.op.strided_slice(weight, axes=[2], begin=[front], end=[front + x_depth])
    spatial = [
        widths[6] + conv_pad[1], widths[8] + conv_pad[2], widths[7] + conv_pad[4], widths[9] + conv_pad[5]
    ]  # h_front, w_front, h_back, w_back
    strides, dilation = _const_int_list(attrs.strides), _const_int_list(attrs.dilation)
    if x_depth == 1:
        out_shape = [int(s) for s in conv.ty.shape]
        y = relax.op.nn.conv2d(
            relax.op.squeeze(x, axis=[2]),
            relax.op.squeeze(taps, axis=[2]),
            strides=strides[1:],
            padding=spatial,
            dilation=dilation[1:],
            groups=int(attrs.groups),
            out_dtype=attrs.out_dtype,
        )
        return relax.op.reshape(y, out_shape)
    return relax.op.nn.conv3d(
        x,
        taps,
        strides=strides,
        padding=[0, spatial[0], spatial[1], 0, spatial[2], spatial[3]],
        dilation=dilation,
        groups=int(attrs.groups),
        out_dtype=attrs.out_dtype,
    )


def _rewrite_padded_convs(func: relax.Function, ops: list[str], replacement) -> tuple[relax.Function, int]:
    """Rewrite each op(pad(x), w) or op(astype(pad(x)), w), op one of `ops`, into
    `replacement(conv, pad, cast or None)` where that is not None. Returns (func, count)."""
    padded = is_op("relax.nn.pad")(wildcard())
    cast = is_op("relax.astype")(padded)
    convolution = is_op(ops[0])
    for op in ops[1:]:
        convolution = convolution | is_op(op)
    count = 0

    def rewriter(expr, matches):
        nonlocal count
        new = replacement(expr, matches[padded], matches.get(cast))
        if new is None:
            return expr
        count += 1
        return new

    return rewrite_call(convolution(padded | cast, wildcard()), rewriter, func), count


def drop_causal_padding(func: relax.Function) -> tuple[relax.Function, int]:
    """Rewrite every conv3d(pad(x)) (also with a cast between them) whose single output frame sees
    zero padding. Returns (func, count)."""
    return _rewrite_padded_convs(func, ["relax.nn.conv3d"], _reduced_conv)


def convolution_like(conv: relax.Call, data, weight, **changes) -> relax.Call:
    """A convolution of `data` and `weight` with `conv`'s attributes, but for `changes` (its output
    layout is its data layout)."""
    a = conv.attrs
    attrs = dict(strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                 data_layout=a.data_layout, kernel_layout=a.kernel_layout, out_dtype=a.out_dtype)
    attrs.update(changes)
    dims = len(str(attrs["data_layout"])) - 2
    return getattr(relax.op.nn, f"conv{dims}d")(data, weight, out_layout=attrs["data_layout"], **attrs)


def _conv_with_pad(conv: relax.Call, pad: relax.Call, cast: relax.Call | None = None):
    """conv(pad(x)) -> conv(x) with the zero padding its own (channels-first, spatial axes only)."""
    attrs, pattrs = conv.attrs, pad.attrs
    dims = len(str(attrs.data_layout)) - 2
    if not str(attrs.data_layout).startswith("NC") or attrs.out_layout != attrs.data_layout:
        return None
    if pattrs.pad_mode != "constant" or float(pattrs.pad_value) != 0.0:
        return None
    widths = _const_int_list(pattrs.pad_width)  # (before, after) per axis, N C *spatial
    if any(widths[:4]):
        return None
    conv_pad = _const_int_list(attrs.padding)  # all befores, then all afters
    padding = [conv_pad[i] + widths[4 + 2 * i] for i in range(dims)] + [
        conv_pad[dims + i] + widths[5 + 2 * i] for i in range(dims)]
    x = pad.args[0] if cast is None else relax.op.astype(pad.args[0], cast.attrs.dtype)
    return convolution_like(conv, x, conv.args[1], padding=padding)


def pads_into_convolutions(func: relax.Function, only) -> tuple[relax.Function, int]:
    """conv(pad(x)) -> conv(x) padding by itself, where `only(conv)`: for the convolutions computed
    as GEMMs, whose im2col gathers zeros where a row reaches into the padding, so the padded copy
    of x (the Wan VAE's causal padding, `F.pad` before every 3-D convolution) is never written, and
    a channels-last model needs no transposes around it (ConvertLayout does not carry a layout
    through nn.pad). Returns (func, count)."""
    return _rewrite_padded_convs(func, ["relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d"],
                                 lambda conv, pad, cast: _conv_with_pad(conv, pad, cast) if only(conv) else None)


def drop_causal_padding_in(imported: ImportedModel) -> ImportedModel:
    """`drop_causal_padding` on an imported model's main, with a note when it changed anything."""
    func, count = drop_causal_padding(imported.mod["main"])
    if not count:
        return imported
    mod = tvm.IRModule({"main": func})
    note = f"{count} causal conv3d on one frame: time taps that only see zero padding dropped (conv over data only)"
    return ImportedModel(mod, imported.weights, imported.inputs, imported.outputs, imported.source, imported.notes + [note])
