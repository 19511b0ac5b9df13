"""Large weight matrices shipped in the layout the tuned kernel reads (CPU targets).

A matmul that reads a big weight column block by column block walks memory with a stride of a
whole row. MetaSchedule's RewriteLayout postprocessor can instead give the weight a packed layout
that the kernel's inner loop reads contiguously, but only for buffers marked layout-free (weights,
whose layout is ours to choose). It then adds a packing block in front of the kernel; MetaSchedule's
builder removes that block while measuring, so trials time the kernel on packed data.

At build time, once the log is applied, the packing blocks are split into kernels of their own
(SplitLayoutRewritePreproc), lifted into a weight-only function (LiftTransformParams) and run once:
the artifact ships packed weights, and no packing happens per call.

Only 2-D weights of at least `MIN_BYTES` are marked: packing pays where the matrix streams from
memory rather than cache. Marking changes a kernel's workload hash (its tuning records), so the
threshold is part of the contract between tune and build, like every pass in lowering.py.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

MIN_BYTES = 4 << 20
_ATTR = "layout_free_buffers"


def mark_layout_free(mod: tvm.IRModule, target: tvm.target.Target, min_bytes: int | None = None) -> tvm.IRModule:
    """Mark each kernel's large 2-D weight operands layout-free (LLVM targets only)."""
    if target.kind.name != "llvm":
        return mod
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    # The pass puts the attribute, often an empty list, on every kernel; keep it only where a
    # weight qualifies, so that other kernels keep their workload hash.
    marked = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    updates = {}
    for gv, func in marked.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or _ATTR not in func.attrs:
            continue
        infos = ArgInfo.from_prim_func(func)
        keep = [int(i) for i in func.attrs[_ATTR] if _is_large_matrix(infos[int(i)], min_bytes)]
        updates[gv] = func.with_attr(_ATTR, keep) if keep else func.without_attr(_ATTR)
    for gv, func in updates.items():
        marked[gv] = func
    return marked


def _is_large_matrix(info, min_bytes: int) -> bool:
    shape = [int(s) for s in info.shape]
    return len(shape) == 2 and int(np.prod(shape)) * tvm.DataType(info.dtype).bits // 8 >= min_bytes


def pack_weights(mod: tvm.IRModule, weights: dict[str, np.ndarray], num_input: int) -> tuple[tvm.IRModule, dict[str, np.ndarray], int]:
    """Run the tuned kernels' weight-packing blocks once, on the weights.

    `mod` is the scheduled module (log applied); returns the module whose main takes the packed
    weights, the weights to ship (in main's parameter order) and how many were packed."""
    from .weight_transforms import run_lifted_transform

    split = relax.transform.SplitLayoutRewritePreproc()(mod)
    count = _kernel_count(split) - _kernel_count(mod)  # one packing kernel split out per packed weight
    if not count:
        return mod, weights, 0
    compute, packed = run_lifted_transform(relax.transform.LiftTransformParams()(split), weights, num_input)
    return compute, packed, count


def _kernel_count(mod: tvm.IRModule) -> int:
    return sum(1 for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
