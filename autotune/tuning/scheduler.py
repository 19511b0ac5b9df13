"""MetaSchedule's gradient-based task scheduler, with every batch measured before the next is built.

TVM's scheduler hands a batch to the runner and goes on at once: it searches and compiles the
next task's candidates while the runner's process times this one's, and in its first round (one
batch per task) it joins nothing until every task's batch has been built. On the CPU that also
compiles, each candidate was timed beside the search and the compiler on the same cores; and no
record reached the log, no progress showed and Ctrl-C was not heard until the whole first round
had been built (a model of 200 kernels: minutes). Here the scheduler joins the batch in flight
before it picks the next task: the runner measures while the tuner waits, the measure callbacks
(log records, progress, Ctrl-C) run after every batch, and the choice of task is TVM's own (one
batch each in list order, then the largest weighted gradient of the best latency), ported from
`gradient_based.cc`.

Where the candidates run elsewhere (a GPU, an RPC device), building the next batch beside a
measurement disturbs nothing: `overlap` keeps one batch measuring while the next is built (the
records of a batch are on disk before the one after it is built).
"""

from __future__ import annotations

import random
import statistics

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

FAILED_MS = 1e9  # TVM's latency for a candidate that failed to build or run


@derived_object
class MeasuredInTurn(ms.task_scheduler.PyTaskScheduler):
    """Gradient-based task selection (TVM's alpha and window); one batch in flight at a time, or
    with `overlap` one measuring while the next is built."""

    def __init__(self, alpha: float = 0.2, window: int = 3, seed: int = 0, overlap: bool = False):
        super().__init__()
        self.alpha = alpha
        self.window = window
        self.rng = random.Random(seed)
        self.overlap = overlap
        self.best_ms: dict[int, list[float]] = {}  # task -> its best latency after each of its batches
        self.started = 0  # tasks given their first batch
        self.in_flight: list[int] = []  # tasks whose batch went to the runner, oldest first

    def next_task_id(self) -> int:
        while len(self.in_flight) > (1 if self.overlap else 0):
            self._join(self.in_flight.pop(0))
        chosen = self._choose(self._outer().tasks_)
        if chosen in self.in_flight:  # (overlap: its last batch must be in before it gets another)
            self.in_flight.remove(chosen)
            self._join(chosen)
        if chosen >= 0:
            self.in_flight.append(chosen)
        return chosen

    def _choose(self, tasks) -> int:
        if self.started < len(tasks):  # first one batch each, in list order
            self.started += 1
            return self.started - 1
        alive = [i for i, t in enumerate(tasks) if not t.is_terminated]
        if not alive:
            return -1
        grads = [self._gradient(i, float(tasks[i].task_weight)) for i in alive]
        if max(grads) == min(grads):
            return alive[self.rng.randrange(len(alive))]
        return alive[grads.index(max(grads))]

    def _join(self, task_id: int) -> None:
        """Waits for the task's batch; TVM then runs the measure callbacks (records, progress)."""
        if self._outer().tasks_[task_id].runner_futures is None:  # (terminated before it was sent)
            return
        results = self.join_running_task(task_id)
        batch = [statistics.median(float(s) for s in r.run_secs) * 1e3 if r.run_secs and not r.error_msg else FAILED_MS
                 for r in results]
        history = self.best_ms.setdefault(task_id, [])
        history.append(min([*batch, *history[-1:]]))

    def _gradient(self, task_id: int, weight: float) -> float:
        """TVM's: the weighted recent improvement of the task's best latency, and its best over its batch count."""
        history = self.best_ms.get(task_id, [])
        n = len(history)
        if n == 0 or history[-1] >= FAILED_MS:
            return -1e9  # nothing valid measured yet: last
        best = history[-1]
        recent = (history[n - 1 - self.window] - best) / self.window if n >= 1 + self.window else 0.0
        return (self.alpha * recent + (1 - self.alpha) * best / n) * weight
