"""Drop the kernel taps of a 3-D convolution that only ever see causal zero padding.

The Wan VAE's causal convolutions pad time with zeros in front (`F.pad(x, (.., 2, 0))`, then a
3×3×3 conv). On a single frame with no cache (the first latent frame, and the VAE benchmarks
at 480p) the output has one frame and two of the three time taps multiply zeros: torch does
3× the useful work. Here such a `conv3d(pad(x))` becomes a convolution over the taps that see
data — a conv2d when one tap is left — with the spatial padding folded into the convolution.
The result is the same sum without its zero terms (exact up to float summation order).

The rewritten convolution reads `W[:, :, first:last]`, a weight-only slice: build-time weight
precompute (weight_transforms.py) turns it into a weight of its own.
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


def drop_causal_padding(func: relax.Function) -> tuple[relax.Function, int]:
    """Rewrite every conv3d(pad(x)) (also with a cast between them) whose single output frame sees
    zero padding. Returns (func, count)."""
    padded = is_op("relax.nn.pad")(wildcard())
    cast = is_op("relax.astype")(padded)
    pattern = is_op("relax.nn.conv3d")(padded | cast, wildcard())
    count = 0

    def rewriter(expr, matches):
        nonlocal count
        new = _reduced_conv(expr, matches[padded], matches.get(cast))
        if new is None:
            return expr
        count += 1
        return new

    return rewrite_call(pattern, rewriter, func), count


def drop_causal_padding_in(imported: ImportedModel) -> ImportedModel:
    """`drop_causal_padding` on an imported model's main, with a note when it changed anything."""
    func, count = drop_causal_padding(imported.mod["main"])
    if not count:
        return imported
    mod = tvm.IRModule({"main": func})
    note = f"{count} causal conv3d on one frame: time taps that only see zero padding dropped (conv over data only)"
    return ImportedModel(mod, imported.weights, imported.inputs, imported.outputs, imported.source, imported.notes + [note])
