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


# Hand-written kernels and their default schedules: (is this kind, schedule(sch, target)). The
# Winograd GEMMs and the token quantizer are searched in MetaSchedule's generic space; these are
# their defaults.
_OWN_DEFAULTS = (
    (is_attention_kernel, lambda sch, target: attention_cpu.apply_schedule(sch)),
    (gemm_cpu.is_gemm_kernel, lambda sch, target: gemm_cpu.apply_schedule(sch)),
    (winograd.is_gemm_kernel, lambda sch, target: winograd.apply_schedule(sch, sch.get_sblock(winograd.GEMM_BLOCK))),
    (token_quant.is_token_quant_kernel, lambda sch, target: token_quant.apply_schedule(sch, attention_cpu.vector_lanes(target))),
)


def _own_default(func):
    return next((schedule for is_kind, schedule in _OWN_DEFAULTS if is_kind(func)), None)


def has_own_default(func) -> bool:
    """Whether `func` is a hand-written kernel with its own default schedule (which changes with
    this code), not a sample of MetaSchedule's design space (which changes only with TVM)."""
    return _own_default(func) is not None


def default_schedule(func, target, seed: int = 0) -> s_tir.Schedule | None:
    """The schedule an untuned CPU build gives `func` (None: no design space passes the postprocessors)."""
    schedule = _own_default(func)
    if schedule is None:
        return design_space_sample(func, target, seed)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    schedule(sch, target)
    return sch
