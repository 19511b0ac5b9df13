"""Schedules for kernels the tuning log has no record for.

CPU: `tuning.fallback.default_schedule`: hand-written kernels' own default schedules, else one
sample of MetaSchedule's design space (3-4× faster than TVM's naive loop nest on a 256×512×384
matmul here). The search measures the same schedule beside its candidates.
GPU: dlight's default rules (every GPU kernel needs thread binding to run at all), after
autotune's tensor-core rule for bf16/fp16 GEMMs (kernels/matmul_cuda.py).
"""

from __future__ import annotations

import tvm

from autotune.support.ir import is_scheduled, mark_scheduled, prim_funcs
from autotune.tuning.fallback import default_schedule


def _cpu_schedule(func, target, seed: int):
    sch = default_schedule(func, target, seed)
    return None if sch is None else sch.mod["main"]


def schedule_untuned(mod: tvm.IRModule, target: tvm.target.Target, seed: int = 0) -> tuple[tvm.IRModule, int]:
    """Give every unscheduled PrimFunc a fallback schedule. Returns (module, how many)."""
    if target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        from autotune.kernels.matmul_cuda import TensorCoreMatmul

        before = sum(1 for f in prim_funcs(mod).values() if not is_scheduled(f))
        with target:
            mod = dl.ApplyDefaultSchedule(
                TensorCoreMatmul(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )(mod)
        return mod, before
    count = 0
    for name, func in prim_funcs(mod).items():
        if is_scheduled(func):
            continue
        scheduled = _cpu_schedule(func, target, seed)
        if scheduled is not None:
            mod[name] = mark_scheduled(scheduled)
            count += 1
    return mod, count


def unscheduled_kernels(mod: tvm.IRModule) -> list[str]:
    """Kernels still without a schedule (after the log and the fallback): they run as plain loop nests."""
    return sorted(name for name, func in prim_funcs(mod).items() if not is_scheduled(func))
