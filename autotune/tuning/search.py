"""MetaSchedule's evolutionary search, with the build's fallback schedule measured and an early stop.

Two changes to TVM's EvolutionarySearch, which does every step of the search itself:

- On CPU the first batch of every task measures the schedule an untuned build would give the kernel
  (`fallback.default_schedule`) in place of one of the search's candidates. The log then holds
  the fallback's own time, and the build picks the fastest record: a tuned kernel is never one
  that measured slower than the untuned build's (shipped records tuned without it lost to the
  fallback on some builds: the tiny image encoder at int8 and bf16, the DiT block at bf16).
- A task ends at its first search round that finds no unmeasured candidate. TVM's search waits
  for 5 such rounds (`num_empty_iters_before_early_stop`, fixed in C++, read-only from Python),
  each sampling and evolving a whole population: seconds each, on every small kernel whose few
  schedules are all measured (the tiny Wan models have dozens).
"""

from __future__ import annotations

import logging

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .fallback import default_schedule

log = logging.getLogger(__name__)


def fallback_candidate(func, target) -> ms.MeasureCandidate | None:
    sch = default_schedule(func, target)
    if sch is None:
        return None
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))


@derived_object
class FallbackFirstSearch(ms.search_strategy.PySearchStrategy):
    """TVM's evolutionary search, plus the fallback schedule in its first batch and an early stop."""

    def __init__(self, inner: ms.search_strategy.SearchStrategy | None = None):
        self.inner = inner if inner is not None else ms.search_strategy.EvolutionarySearch()
        self.context = None
        self.fallback_due = True

    def _initialize_with_tune_context(self, context) -> None:
        self.context = context
        self.inner._initialize_with_tune_context(context)  # pylint: disable=protected-access

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.fallback_due = True
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        candidates = self.inner.generate_measure_candidates()
        if candidates is None or len(candidates) == 0:
            return None  # budget spent, or every schedule the search reached is measured
        if self.fallback_due and self.context.target.kind.name == "llvm":  # CUDA's fallback is dlight's
            self.fallback_due = False
            fallback = fallback_candidate(self.context.mod["main"], self.context.target)
            if fallback is None:
                log.warning("%s: no fallback schedule to measure", self.context.task_name)
            else:  # in place of the search's last pick: the batch keeps its size
                candidates = list(candidates)[: max(1, len(candidates) - 1)] + [fallback]
        return candidates

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return FallbackFirstSearch(self.inner.clone())
