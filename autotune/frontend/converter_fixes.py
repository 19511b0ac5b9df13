"""Our fixes to TVM 0.27's torch importer, in one place, as `custom_convert_map` entries.

Each entry maps an ATen op name (as the ExportedProgram translator spells it) to a function
`(node, importer) -> relax.Var`.
"""

from __future__ import annotations


def _select_int(node, importer):
    """aten.select.int with a normalised index.

    TVM 0.27 lowers select(x, dim, -1) to take(x, -1, mode="fast"): an out-of-bounds read. The Wan
    VAE decoder's causal cache uses x[:, :, -1] and came out wrong (error ~2.0) from the 3rd latent
    frame on.
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
    return importer.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), dim))


CUSTOM_CONVERT_MAP = {
    "select.int": _select_int,
}
