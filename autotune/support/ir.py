"""Facts about Relax and TIR modules that several stages ask for, each defined once."""

from __future__ import annotations

import tvm

SCHEDULED_ATTR = "tirx.is_scheduled"  # TVM's mark on a PrimFunc that needs no (more) scheduling
NUM_INPUT_ATTR = "num_input"  # on `main`: its parameters before this index are inputs, the rest weights
ATTENTION_ATTR = "autotune.attention"  # on our fused attention kernels: their shape and tiles
FLOPS_ATTR = "autotune.flops"  # on hand-written kernels whose FLOPs TVM's estimator cannot count
GEMM_ATTR = "autotune.gemm_bf16"  # on our matrix-engine GEMM kernels (bf16 and int8; the name predates int8): engine and shape
LAYOUT_FREE_ATTR = "layout_free_buffers"  # on a kernel: operand indices whose layout MetaSchedule may choose


def replace_main(mod: tvm.IRModule, main) -> tvm.IRModule:
    """A copy of `mod` with `main` replaced (`mod` itself is left as it was)."""
    new_mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}, attrs=mod.attrs)
    new_mod["main"] = main
    for key, value in mod.global_infos.items():
        new_mod.update_global_info(key, value)
    return new_mod


def prim_funcs(mod: tvm.IRModule) -> dict[str, "tvm.tirx.PrimFunc"]:
    """The module's kernels by name."""
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False))


def mark_scheduled(func):
    return func.with_attr(SCHEDULED_ATTR, True)


def num_input(func) -> int:
    """How many of a Relax function's parameters are inputs (the rest are weights)."""
    attrs = func.attrs
    return int(attrs[NUM_INPUT_ATTR]) if attrs is not None and NUM_INPUT_ATTR in attrs else len(func.params)


def static_shape(ty) -> tuple[int, ...] | None:
    """The static shape of a Relax tensor type, or None when it is unknown or symbolic."""
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, ValueError):
        return None


def tensor_dtype(expr) -> str | None:
    """The dtype of a Relax tensor expression, or None when it is not a tensor."""
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, tvm.relax.TensorType) else None


def clip_as_min_max(call, emit=lambda expr: expr):
    """clip(x, low, high) with scalar bounds -> minimum(maximum(x, low), high) on tensor constants of
    x's dtype (an infinite bound: no op), or None where a bound is not a scalar or x not a tensor.
    `emit` binds the inner maximum (a mutator's `builder_.emit`). TVM's layout conversion has no rule
    for clip, and its ToMixedPrecision fails on clip's PrimValue bounds; maximum / minimum pass both."""
    x, *bounds = call.args
    dtype = tensor_dtype(x)
    values = [getattr(b, "value", None) for b in bounds]  # a scalar bound is a FloatImm / IntImm
    if dtype is None or any(not isinstance(v, (int, float)) or isinstance(getattr(b, "ty", None), tvm.relax.TensorType)
                            for v, b in zip(values, bounds)):
        return None
    low, high = map(float, values)
    y = x if low == float("-inf") else emit(tvm.relax.op.maximum(x, tvm.relax.const(low, dtype)))
    return y if high == float("inf") else tvm.relax.op.minimum(y, tvm.relax.const(high, dtype))


def weight_only_vars(main) -> set:
    """`main`'s weight parameters and every binding computed from them (and constants) alone."""
    weights = set(main.params[num_input(main) :])
    for block in main.body.blocks:
        for binding in block.bindings:
            used = tvm.relax.analysis.free_vars(binding.value)
            if used and all(v in weights for v in used):
                weights.add(binding.var)
    return weights


def exported_name(torch_name: str, prefix: str = "p_") -> str:
    """torch.export's name for a module's parameter `a.b.c` (`p_a_b_c`; buffers `b_`, constants `c_`),
    which the imported model's weights keep."""
    return prefix + torch_name.replace(".", "_")
