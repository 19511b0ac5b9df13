"""The schedule a CPU kernel gets when the tuning log has no record for it.

Hand-written kernels (fused attention, matrix-engine GEMMs, w8a8's activation quantizer, the
Winograd GEMMs) take their own default schedule; every other kernel one sample of MetaSchedule's design space
(multi-level tiling, parallel, vectorise, unroll) with the postprocessors applied, seeded so
builds are reproducible. Either way a traced `Schedule`: the build applies it to untuned kernels
(build/fallback.py), and the search measures it beside its own candidates (search.py), so that a
kernel's record is never one that measured slower than what the build would have used without it.
"""

from __future__ import annotations

import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from autotune.kernels import attention_cpu, gemm_cpu, token_quant, winograd
from autotune.passes.attention import is_attention_kernel
from autotune.support.tvm_compat import import_tensor_intrin_fast


def design_space_sample(func, target, seed: int = 0) -> s_tir.Schedule | None:
    """The first of MetaSchedule's design spaces for `func` that its postprocessors accept."""
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
        sch.enter_postproc()  # as MetaSchedule marks its candidates: a replay re-runs what follows
        if all(p.apply(sch) for p in ctx.space_generator.postprocs):
            return sch
    return None


def has_own_default(func) -> bool:
    """Whether `func` is a hand-written kernel with its own default schedule (which changes with
    this code), not a sample of MetaSchedule's design space (which changes only with TVM)."""
    return (is_attention_kernel(func) or gemm_cpu.is_gemm_kernel(func) or winograd.is_gemm_kernel(func)
            or token_quant.is_token_quant_kernel(func))


def default_schedule(func, target, seed: int = 0) -> s_tir.Schedule | None:
    """The schedule an untuned CPU build gives `func` (None: no design space passes the postprocessors)."""
    hand_written = attention_cpu if is_attention_kernel(func) else gemm_cpu if gemm_cpu.is_gemm_kernel(func) else None
    if hand_written is not None:  # their own default schedule, not a random sample of their space
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        hand_written.apply_schedule(sch)
        return sch
    if winograd.is_gemm_kernel(func):  # MetaSchedule's generic space tunes it; this is its default
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        winograd.apply_schedule(sch, sch.get_sblock(winograd.GEMM_BLOCK))
        return sch
    if token_quant.is_token_quant_kernel(func):  # MetaSchedule's generic space tunes it; this is its default
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        token_quant.apply_schedule(sch, attention_cpu.vector_lanes(target))
        return sch
    return design_space_sample(func, target, seed)
