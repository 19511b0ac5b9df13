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

The matrix-engine GEMMs (kernels/gemm_cpu.py) add such a block in their own schedule, unmarked:
their weights are packed the same way, here.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from autotune.kernels import gemm_cpu
from autotune.support import ir

from .weight_transforms import run_lifted_transform

MIN_BYTES = 4 << 20
PACKER_SUFFIX = "_weight_prepack"  # what SplitLayoutRewritePreproc names the packing kernel it splits out


def mark_layout_free(mod: tvm.IRModule, target: tvm.target.Target, min_bytes: int | None = None) -> tvm.IRModule:
    """Mark each kernel's large 2-D weight operands layout-free (LLVM targets only).

    Relax's AttachAttrLayoutFreeBuffers does the same for every weight, but it also puts an
    (often empty) attribute on every kernel and renames some: other kernels' workload hashes and
    names must stay as they are, so the weight operands are found here."""
    if target.kind.name != "llvm" or "main" not in [gv.name_hint for gv in mod.functions]:
        return mod
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    updates = {}
    for gv, indices in _weight_operands(mod["main"]).items():
        infos = ArgInfo.from_prim_func(mod[gv])
        keep = sorted(i for i in indices if _is_large_matrix(infos[i], min_bytes))
        if keep:
            updates[gv] = mod[gv].with_attr(ir.LAYOUT_FREE_ATTR, keep)
    if not updates:
        return mod
    return tvm.IRModule({**dict(mod.functions.items()), **updates}, attrs=mod.attrs)


def _weight_operands(main: relax.Function) -> dict:
    """{kernel: indices of its operands that are weights (main's parameters after its inputs) in every call}."""
    if main.attrs is None or ir.NUM_INPUT_ATTR not in main.attrs:
        return {}
    weights = main.params[ir.num_input(main):]
    found: dict = {}
    for kernel, operands in _kernel_calls(main):
        here = {i for i, a in enumerate(operands) if any(a.same_as(w) for w in weights)}
        found[kernel] = found[kernel] & here if kernel in found else here
    return found


def _kernel_calls(main: relax.Function):
    """(kernel GlobalVar, operands) of each call_tir in main, in order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                args = value.args[1]
                yield value.args[0], list(args.fields) if isinstance(args, relax.Tuple) else [args]


def _is_large_matrix(info, min_bytes: int) -> bool:
    shape = [int(s) for s in info.shape]
    return len(shape) == 2 and int(np.prod(shape)) * tvm.DataType(info.dtype).bits // 8 >= min_bytes


def pack_weights(mod: tvm.IRModule, weights: dict[str, np.ndarray], num_input: int) -> tuple[tvm.IRModule, dict[str, np.ndarray], int]:
    """Run the tuned kernels' weight-packing blocks once, on the weights.

    `mod` is the scheduled module (log applied); returns the module whose main takes the packed
    weights, the weights to ship (in main's parameter order) and how many were packed."""
    if not any(_may_rewrite_a_layout(f) for f in ir.prim_funcs(mod).values()):
        return mod, weights, 0  # (e.g. GPU targets: the pass fails on their kernels, which hold no such block)
    split = relax.transform.SplitLayoutRewritePreproc()(mod)
    count = sum(kernel.name_hint.endswith(PACKER_SUFFIX) for kernel, _ in _kernel_calls(split["main"]))  # a call: a weight
    if not count:
        return mod, weights, 0
    compute, packed = run_lifted_transform(relax.transform.LiftTransformParams()(split), weights, num_input)
    return compute, packed, count


def _may_rewrite_a_layout(func) -> bool:
    """A kernel marked layout-free, or a matrix-engine GEMM on an ISA whose schedules re-lay the weight."""
    return (func.attrs is not None and ir.LAYOUT_FREE_ATTR in func.attrs) or gemm_cpu.reads_column_panels(func)
