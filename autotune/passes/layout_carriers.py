"""Operators written so that TVM's ConvertLayout carries a layout through them.

ConvertLayout (which `conv_gemm.to_channels_last` runs) stops at an operator it has no layout rule
for, or whose operands it cannot lay out alike: it transposes the tensor back to channels-first
there, and every operator after it stays channels-first until the next convolution transposes
forth again. In the Wan VAE's RMS norm (`F.normalize(x, dim=1) * scale * gamma`) three such stops
sat in every norm:

    clip(n, eps, inf)                      -> maximum(n, eps)            (no layout rule for clip)
    divide(x, broadcast_to(n, shape(x)))   -> divide(x, n)               (nor for broadcast_to; the
                                                                          binary operator broadcasts)
    multiply(x (rank 5), gamma (C, 1, 1, 1)) -> multiply(x, reshape(gamma, (1, C, 1, 1, 1)))
                                                                         (operands of unequal rank)

Each rewrite computes the same values. The gamma reshape is weight-only work (done at build time).
On the tiny VAE decoder this took its transposes from 406 to 195.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.support import ir

BINARY = ("add", "subtract", "multiply", "divide")


def carry_layouts(func: relax.Function) -> relax.Function:
    func = rewrite_call(is_op("relax.clip")(wildcard(), wildcard(), wildcard()), _clip_as_bounds, func)
    func = _without_broadcast_to(func)
    binary = None
    for name in BINARY:
        pattern = is_op(f"relax.{name}")(wildcard(), wildcard())
        binary = pattern if binary is None else binary | pattern
    return rewrite_call(binary, _equal_ranks, func)


def _clip_as_bounds(call: relax.Call, _matches) -> relax.Expr:
    if not isinstance(call, relax.Call) or ir.tensor_dtype(call.args[0]) != "float32":
        return call  # (not float32: left as it is)
    bounded = ir.clip_as_min_max(call)
    return call if bounded is None else bounded  # (bounds given as tensors: left as they are)


def _without_broadcast_to(func: relax.Function) -> relax.Function:
    """binary(a, broadcast_to(b, S)) with a of shape S -> binary(a, b) (either side)."""
    for name in BINARY:
        for side in (0, 1):
            other, expanded = wildcard(), is_op("relax.broadcast_to")(wildcard(), wildcard())
            operands = (other, expanded) if side else (expanded, other)

            def rewrite(call, matches, other=other, expanded=expanded, side=side):
                if not isinstance(call, relax.Call):
                    return call
                shape = ir.static_shape(matches[expanded].ty)
                if shape is None or shape != ir.static_shape(matches[other].ty):
                    return call
                small = matches[expanded].args[0]
                return relax.Call(call.op, [matches[other], small] if side else [small, matches[other]], call.attrs)

            func = rewrite_call(is_op(f"relax.{name}")(*operands), rewrite, func)
    return func


def _equal_ranks(call: relax.Call, _matches) -> relax.Expr:
    """A binary operator's lower-rank (non-scalar) operand reshaped to the other's rank."""
    if not isinstance(call, relax.Call):  # (the matcher may hand over a variable bound to the call)
        return call
    a, b = call.args
    shape_a, shape_b = ir.static_shape(a.ty), ir.static_shape(b.ty)
    if shape_a is None or shape_b is None or not shape_a or not shape_b or len(shape_a) == len(shape_b):
        return call
    rank = max(len(shape_a), len(shape_b))

    def lifted(expr, shape):
        return expr if len(shape) == rank else relax.op.reshape(expr, [1] * (rank - len(shape)) + list(shape))

    return relax.Call(call.op, [lifted(a, shape_a), lifted(b, shape_b)], call.attrs)
