"""Schedules for kernels the tuning log has no record for.

CPU: one sample of MetaSchedule's own design space (multi-level tiling, parallel, vectorise,
unroll), with the postprocessors applied, seeded so builds are reproducible. Not measured, so
not tuned, but far from TVM's naive loop nest (3-4× faster on a 256×512×384 matmul here).
GPU: dlight's default rules (every GPU kernel needs thread binding to run at all), after
autotune's tensor-core rule for bf16/fp16 GEMMs (kernels/matmul_cuda.py).
"""

from __future__ import annotations

import tvm
from tvm.s_tir import meta_schedule as ms

from autotune.support.ir import is_scheduled, mark_scheduled, prim_funcs
from autotune.support.tvm_compat import import_tensor_intrin_fast


def _cpu_schedule(func, target, seed: int):
    import_tensor_intrin_fast()  # MetaSchedule's design space imports it; ~75 s otherwise
    ctx = ms.TuneContext(
        mod=tvm.IRModule({"main": func}),
        target=target,
        space_generator="post-order-apply",
        search_strategy="replay-trace",
        task_name="fallback",
        rand_state=seed,
        num_threads=1,
    )
    for sch in ctx.generate_design_space():
        if all(p.apply(sch) for p in ctx.space_generator.postprocs):
            return sch.mod["main"]
    return None


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
    from autotune.passes.attention import schedule_attention
    from autotune.passes.matrix_engine import schedule_engine_gemms

    mod, count = schedule_attention(mod, target)  # hand-written kernels: their own default schedules,
    mod, gemms = schedule_engine_gemms(mod)  # not a random sample of their design space
    count += gemms
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
