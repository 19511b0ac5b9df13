"""Our fixes to TVM 0.27's torch importer, in one place.

Most are `custom_convert_map` entries: each maps an ATen op name (as the ExportedProgram translator
spells it) to a function `(node, importer) -> relax.Var`. `safe_take_modes` runs on the imported
module afterwards.

Gathers: `relax.op.take` defaults to mode="fast" (no bounds handling at all), and TVM's importers
call it without a mode (embedding, index.Tensor, select, ONNX Gather, ...). TOPI's take warns
"Fast mode segfaults when there are out-of-bounds indices" on stderr each time one is legalized,
and fast mode really does read out of bounds for a negative index, which torch allows
(x[idx] with idx = -1). So every take we emit names a safe mode, and `safe_take_modes` gives the
translator's own takes one.

Weight matmuls: torch decomposes a linear whose input is not contiguous (a transposed view) into a
batched matmul of the weight broadcast to (b, k, n); `unbroadcast_matmul_weights` gives the
matmul the 2-D weight again, the form the quantizer and the matrix engines take.
"""

from __future__ import annotations

import numpy as np

from autotune.support.tvm_compat import translator_slice_scatter


def _static_ints(values) -> list[int] | None:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):  # a symbolic dimension
        return None


def _select_int(node, importer):
    """aten.select.int with a normalised index.

    TVM 0.27 lowers select(x, dim, -1) to take(x, -1, mode="fast"): an out-of-bounds read. The Wan
    VAE decoder's causal cache uses x[:, :, -1] and came out wrong (error ~2.0) from the 3rd latent
    frame on. The normalised constant index is in bounds; mode="clip" says so to TOPI (fast mode
    would warn on every legalization).
    """
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1]
    index = node.args[2]
    shape = x.ty.shape.values
    if dim < 0:
        dim += len(shape)
    if index < 0:
        index += int(shape[dim])
    return importer.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), dim, mode="clip"))


_INT64_MAX = 2**63 - 1


def _slice_scatter(node, importer):
    """aten.slice_scatter.default as where(mask, take(src, in-bounds constant indices), input).

    TVM 0.27's TOPI slice_scatter gathers `src` with take(mode="fast") at indices clipped to the
    *input's* extent, not src's: for a strided or partial slice (the Wan rotary embedding's
    `out[..., 0::2] = ...; out[..., 1::2] = ...`) the masked-off positions read past the end of
    `src` (the result is discarded by the where, the read happens), and every legalization warns
    "Fast mode segfaults ...". Same computation, with indices clipped to src's extent. Shapes and
    bounds must be static; anything else goes to the translator's own converter. The scatter that
    completes a set of strided parts (0::2 then 1::2) is the parts interleaved instead.
    """
    from tvm import relax

    def arg(i, name, default):
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    x = importer.env[node.args[0]]
    src = importer.env[node.args[1]]
    dim, start, end, step = arg(2, "dim", 0), arg(3, "start", None), arg(4, "end", None), arg(5, "step", 1)
    x_shape = _static_ints(x.ty.shape.values)
    src_shape = _static_ints(src.ty.shape.values)
    plain = all(v is None or isinstance(v, int) for v in (dim, start, end, step))
    if x_shape is None or src_shape is None or not plain or len(x_shape) != len(src_shape):
        return translator_slice_scatter(importer, node)
    rank = len(x_shape)
    axis = dim + rank if dim < 0 else dim
    n = x_shape[axis]
    # torch's slice bounds: None/INT64_MAX = the end, negative counts from the end, clamp to [0, n]
    start = 0 if start is None else start
    end = n if end is None or end >= _INT64_MAX else end
    start = min(max(start + n if start < 0 else start, 0), n)
    end = min(max(end + n if end < 0 else end, start), n)
    positions = np.arange(start, end, step)
    if step < 1 or len(positions) != src_shape[axis]:
        return translator_slice_scatter(importer, node)
    if len(positions) == n:  # the slice is the whole axis
        return src
    bb = importer.block_builder
    parts = _strided_parts(importer, x, src, axis, start, step, n, len(positions))
    if parts is not None and len(parts) == step and all(str(p.ty.dtype) == str(x.ty.dtype) for p in parts.values()):
        # every position is a part's now: the parts interleaved, one injective op that fuses with
        # their producers (the Wan rotary embedding's `out[..., 0::2] = ...; out[..., 1::2] = ...`
        # was two gathers and two selects, 4 of the DiT block's kernels)
        stacked = bb.emit(relax.op.stack([parts[i] for i in range(step)], axis + 1))
        return bb.emit(relax.op.reshape(stacked, x.ty.shape))
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    # output position i < n takes src[(i - start) // step] where the mask is set; elsewhere any
    # in-bounds index will do (clipped)
    gather = np.clip((np.arange(n) - start) // step, 0, len(positions) - 1).astype("int64")
    mask_shape = [1] * rank
    mask_shape[axis] = n
    taken = bb.emit(relax.op.take(src, relax.const(gather, "int64"), axis, mode="clip"))
    out = bb.emit(relax.op.where(relax.const(mask.reshape(mask_shape), "bool"), taken, x))
    if parts is not None:
        _strided_scatters(importer)[out] = (axis, step, parts)
    return out


def _strided_scatters(importer) -> dict:
    """The importer's strided scatters so far: output var -> (axis, step, {start: src} it holds)."""
    if not hasattr(importer, "_autotune_strided_scatters"):
        importer._autotune_strided_scatters = {}
    return importer._autotune_strided_scatters


def _strided_parts(importer, x, src, axis: int, start: int, step: int, n: int, count: int) -> dict | None:
    """The strided parts (start -> src) the scatter `x[axis, start::step] = src` leaves written: its
    own and those of the scatters that made `x` on the same axis and step. None where the scatter is
    not one part of `step` (a part: `n // step` positions from a start below `step`)."""
    if n % step or count != n // step or start >= step:
        return None
    earlier = _strided_scatters(importer).get(x)
    if earlier is None or earlier[:2] != (axis, step) or start in earlier[2]:
        return {start: src}
    return {**earlier[2], start: src}


CUSTOM_CONVERT_MAP = {
    "select.int": _select_int,
    "slice_scatter.default": _slice_scatter,
}


def _safe_take(call):
    """The take `call` with a safe mode instead of "fast" (None when it has one already).

    A constant index is normalised (negative counts from the end, as in torch and ONNX) and
    clipped: in bounds, checked here. Otherwise "wrap": torch's and ONNX's meaning of an index in
    [-n, n), and never out of bounds for any other value.
    """
    import tvm
    from tvm import relax

    if str(call.attrs.mode) != "fast":
        return None
    x, indices = call.args
    axis = call.attrs.axis
    if isinstance(indices, tvm.ir.expr.Constant) and isinstance(x.ty, relax.TensorType):
        dims = _static_ints(x.ty.shape.values) if x.ty.shape is not None else None
        if dims is not None:
            n = dims[0 if axis is None else int(axis)]
            values = indices.value.numpy()
            if np.all((values >= -n) & (values < n)):
                values = np.where(values < 0, values + n, values).astype(values.dtype)
                return relax.op.take(x, relax.const(values, str(values.dtype)), axis, mode="clip")
    return relax.op.take(x, indices, axis, mode="wrap")


def safe_take_modes(mod):
    """Every relax.take in `mod` with mode="fast" given a safe mode (see `_safe_take`)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.take")(wildcard(), wildcard())

    def rewriter(expr, _matches):
        new = _safe_take(expr)
        return expr if new is None else new

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = rewrite_call(pattern, rewriter, func)
    return mod


def unbroadcast_matmul_weights(mod):
    """matmul(x, broadcast_to(w, (*batch, k, n))) -> matmul(x, w), for a 2-D `w` where x's own batch
    dimensions already give the product's (each of `batch` is 1 or x's): matmul broadcasts a 2-D
    operand itself, so the result and its shape are the same."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    from autotune.support.ir import static_shape

    weight, shape = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(wildcard(), is_op("relax.broadcast_to")(weight, shape))

    def rewriter(call, matches):
        x, w = call.args[0], matches[weight]
        batch = _static_ints(matches[shape].values[:-2]) if isinstance(matches[shape], relax.ShapeExpr) else None
        x_shape, w_shape = static_shape(x.ty), static_shape(w.ty)
        if batch is None or x_shape is None or w_shape is None or len(w_shape) != 2:
            return call
        x_batch = x_shape[:-2]
        if len(batch) > len(x_batch) or any(d not in (1, mine) for d, mine in zip(reversed(batch), reversed(x_batch))):
            return call
        return relax.op.matmul(x, w, out_dtype=call.attrs.out_dtype)

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = rewrite_call(pattern, rewriter, func)
    return mod
