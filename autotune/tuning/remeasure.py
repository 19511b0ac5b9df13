"""Re-measure each heavy kernel's fastest schedules side by side before the log names a winner.

The search measures a candidate once (the mean of `runs_per_measurement` runs) and the build
takes the record with the lowest time. On a shared, noisy machine the lowest of hundreds of
single measurements is often a lucky one. In the VAE up-block's w8a8 build, the GEMM record that
the search timed at 21.96 ms (its default schedule: 22.18) measured 28.2 ms as the median of five
interleaved rounds, where three other records measured 22.7-24.0; its gather-and-quantize kernel's
record measured 12.2 ms against the default's 7.2. The untuned build took 0.81x the tuned
one's time; with the re-measured log it ran 0.98x the untuned one's time (`tools/compare_artifacts.py`).

So after the search, every kernel that holds at least `min_share` of the model's tuned time gets
its best schedules and its default schedule (the untuned build's) built once and measured again
in `rounds` interleaved rounds (A B C, A B C, ...: a slow minute slows all of them alike): its
`top` fastest records, or, where the kernel was re-measured before, that re-measurement's winner
and the fastest records this run's search found (none found: nothing to re-measure, unless the
kernel is hand-written and its default schedule, which changes with the code, is one no
re-measurement has measured: then that default is measured beside the winner). Each median
is appended to the log as a re-measurement, which replaces that schedule's earlier times
(tuning/log.py). A record whose search time is below the new winner's median but was not among
them is measured in a further pass beside the winner (up to MAX_PASSES passes).

A rival replaces the incumbent (the previous winner, else the search's best) only when its median
is lower by more than `margin` (3 %): a kernel timed alone is not the kernel inside the model,
and a near tie is no evidence. Each line says whether its schedule won; a build takes the winner,
whatever single times the kernel's other records have (tuning/log.py): times from another hour
or another machine do not compare with the rounds. (Before that rule, the DiT block's float32
build ran 1.16x slower once its kernels were re-measured: for 9 of the shipped log's 64
re-measured kernels, builds took records never re-measured whose search times, some from a
faster machine, were below the winners' medians.)
"""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tvm.s_tir import meta_schedule as ms

from autotune.support import defaults

from .fallback import default_schedule, has_own_default
from .log import TuningLog, record_key, record_on, structure_key

MAX_PASSES = 3  # the first candidates, then at most two passes for records found timed below the winner


@dataclass
class Candidate:
    task: str
    label: str  # "record 1" (its rank in the search's order) or "default"
    sch: object  # s_tir.Schedule
    args_info: list
    trace: object
    key: tuple  # log.record_key: which schedule this is, whatever the blocks are named
    rounds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds) if self.rounds else math.inf


@dataclass
class KernelOutcome:
    task: str
    candidates: list[Candidate]
    before: Candidate  # the search's best
    after: Candidate  # the re-measured best

    @property
    def changed(self) -> bool:
        return self.after is not self.before

    def line(self) -> str:
        times = ", ".join(f"{c.label} {c.median * 1e3:.3f}" for c in sorted(self.candidates, key=lambda c: c.median) if c.rounds)
        verdict = f"now {self.after.label}" if self.changed else "kept"
        fastest = min(self.candidates, key=lambda c: c.median)
        if fastest.median < self.after.median:  # it did not win by the margin (in its own pass)
            verdict += f" (a near tie: {fastest.label} {100 * (1 - fastest.median / self.after.median):.1f} % lower)"
        return f"{self.task}: {verdict} (medians ms: {times})"


@dataclass
class RemeasureReport:
    outcomes: list[KernelOutcome] = field(default_factory=list)
    skipped_verified: int = 0  # heavy kernels re-measured before, whose winner has no new rival
    appended: int = 0  # re-measurement lines appended to the log
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.outcomes:
            tail = f" ({self.skipped_verified} already re-measured)" if self.skipped_verified else ""
            return f"re-measured no kernel{tail}"
        changed = [o for o in self.outcomes if o.changed]
        default = sum(1 for o in changed if o.after.label.endswith("default"))
        text = f"re-measured {len(self.outcomes)} kernels' best schedules side by side: {len(changed)} changed winner"
        text += f" ({default} to the default schedule)" if default else ""
        if self.skipped_verified:
            text += f"; {self.skipped_verified} already re-measured"
        return text


def heavy_tasks(database: TuningLog, tasks: list, min_share: float) -> list[tuple[int, object, object]]:
    """(index, workload, its re-measurement's winner or None) of the tasks whose best record (the
    winner where re-measured) holds at least `min_share` of the summed tuned time (record time ×
    calls), heaviest first."""
    timed = []
    for index, task in enumerate(tasks):
        workload = database.known_workload(task.dispatched[0])
        winner = database.winners.get(structure_key(task.dispatched[0]["main"]))
        best = winner or next(iter(database.get_top_k(workload, 1)), None)
        if best is not None:
            timed.append((_secs(best) * float(task.weight), index, workload, winner))
    total = sum(t[0] for t in timed)
    return [t[1:] for t in sorted(timed, key=lambda t: -t[0]) if t[0] >= min_share * total]


def remeasure(
    database: TuningLog, tasks: list, target, builder, runner, rounds: int, top: int, min_share: float,
    margin: float = defaults.REMEASURE_MARGIN, on_line=print, check_interrupt=None,
) -> RemeasureReport:
    """Re-measure the heavy tasks' best schedules (see the module's docstring) and append the medians
    to the log. The in-memory database keeps the times it had: `database.reload()` reads the new ones."""
    report = RemeasureReport()
    plans = []
    for index, workload, winner in heavy_tasks(database, tasks, min_share):
        task = tasks[index]
        records, pool = _rivals(database, workload, winner, top)
        if records:
            plans.append((task, pool, _first_candidates(task, records, target)))
        elif candidates := _against_todays_default(database, task, winner, target):
            plans.append((task, pool, candidates))
        else:
            report.skipped_verified += 1
    built = _Built(target, builder, report.failures)
    try:
        built.add([c for _, _, candidates in plans for c in candidates])  # one build for all: its workers start once
        for task, pool, candidates in plans:
            if check_interrupt is not None:
                check_interrupt()
            outcome = _remeasure_task(database, task, pool, candidates, built, runner, rounds, top, margin, report)
            if outcome is not None:
                report.outcomes.append(outcome)
                on_line(outcome.line())
    finally:
        built.remove()
    return report


def _rivals(database: TuningLog, workload, winner, top: int) -> tuple[list, list]:
    """(the records to re-measure, the incumbent first; the records a further pass may draw from).
    No records: the kernel's winner has no new rival."""
    if winner is None:
        return database.get_top_k(workload, top), database.get_top_k(workload, top * (MAX_PASSES + 1))
    new = sorted((r for r in database.new_records if r.workload.same_as(workload)), key=_secs)
    won = record_key(winner)
    new = [r for r in new if record_key(r) != won]
    return ([winner] + new[:top] if new else []), new


def _first_candidates(task, records: list, target) -> list[Candidate]:
    """The task's best records, and its default schedule where that is not one of them."""
    mod = task.dispatched[0]
    candidates = [_from_record(r, task, f"record {i + 1}") for i, r in enumerate(records)]
    fallback = default_schedule(mod["main"], target) if target.kind.name == "llvm" else None
    if fallback is not None:  # (CUDA's fallback is dlight's, outside the search space: not a rival here)
        key = record_key(ms.database.TuningRecord(fallback.trace, ms.database.Workload(mod), None, target, None))
        same = [c for c in candidates if c.key == key]
        for candidate in same:
            candidate.label += " = default"
        if not same:
            args = ms.arg_info.ArgInfo.from_entry_func(fallback.mod, remove_preproc=True)
            candidates.append(Candidate(task.task_name, "default", fallback, args, fallback.trace, key))
    return candidates


def _against_todays_default(database: TuningLog, task, winner, target) -> list[Candidate]:
    """[the winner, the kernel's default schedule] where the kernel is hand-written and no
    re-measurement has measured that default: its default changes with the code, so a winner
    re-measured against an older one has not met today's. Else []. (A sample of MetaSchedule's
    space changes only with TVM, and may be far slower: the DiT block's float32 FFN matmul's ran
    past the runner's 10 s timeout in every round.)"""
    if not has_own_default(task.dispatched[0]["main"]):
        return []
    candidates = _first_candidates(task, [winner], target)
    return candidates if any(c.label == "default" and c.key not in database.remeasured for c in candidates) else []


def _remeasure_task(database, task, pool, candidates, built, runner, rounds, top, margin, report) -> KernelOutcome | None:
    before = winner = candidates[0]
    batch = candidates
    for _ in range(MAX_PASSES):
        _run(batch, built, runner, rounds, report.failures)
        winner = _fastest(batch, winner, margin)  # within one pass's rounds: they compare with each other
        if not math.isfinite(winner.median):
            return None  # every candidate failed to run: the failures are reported, the log keeps its times
        seen = {c.key for c in candidates}
        lucky = [r for r in pool if _secs(r) < winner.median and record_key(r) not in seen][:top]
        if not lucky:
            break
        batch = [_from_record(r, task, f"record {len(candidates) + i + 1}") for i, r in enumerate(lucky)]
        candidates += batch
        built.add(batch)
        batch = batch + [winner]  # measured again beside them
    known = database.commit_workload(task.dispatched[0])  # filed under the task's module, whose blocks they name
    for candidate in candidates:
        if candidate.rounds:
            record = ms.database.TuningRecord(candidate.trace, known, [candidate.median], built.target, candidate.args_info)
            database.commit_remeasurement(record, candidate.rounds, won=candidate is winner)
            report.appended += 1
    return KernelOutcome(task.task_name, candidates, before, winner)


def _fastest(candidates: list[Candidate], incumbent: Candidate, margin: float) -> Candidate:
    """The candidate with the lowest median where it beats the incumbent's by more than `margin`
    (a fraction); else the incumbent."""
    best = min(candidates, key=lambda c: c.median)
    return best if best.median < incumbent.median * (1 - margin) else incumbent


class _Built:
    """Candidates built once into the builder's artifacts, removed at the end."""

    def __init__(self, target, builder, failures: list):
        self.target, self.builder, self.failures = target, builder, failures
        self.paths: dict[int, str] = {}  # id(candidate) -> artifact path

    def add(self, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        results = self.builder.build([ms.builder.BuilderInput(c.sch.mod, self.target) for c in candidates])
        for candidate, result in zip(candidates, results):
            if result.error_msg:
                self.failures.append(f"{candidate.task} {candidate.label}: build failed: {result.error_msg.strip()[:500]}")
            else:
                self.paths[id(candidate)] = result.artifact_path

    def remove(self) -> None:
        for path in self.paths.values():
            shutil.rmtree(Path(path).parent, ignore_errors=True)


def _run(batch: list[Candidate], built: _Built, runner, rounds: int, failures: list) -> None:
    """Run the built candidates `rounds` times, interleaved; append each one's times to its rounds."""
    ready = [c for c in batch if id(c) in built.paths]
    device = "cpu" if built.target.kind.name == "llvm" else built.target.kind.name  # as `tvm.runtime.device` names it
    inputs = [ms.runner.RunnerInput(built.paths[id(c)], device, c.args_info) for c in ready] * rounds
    results = [future.result() for future in runner.run(inputs)]
    times: dict[int, list[float]] = {id(c): [] for c in ready}
    for candidate, result in zip(ready * rounds, results):
        if result.error_msg:
            failures.append(f"{candidate.task} {candidate.label}: run failed: {result.error_msg.strip()[:500]}")
        else:
            times[id(candidate)].append(sum(float(s) for s in result.run_secs) / len(result.run_secs))
    for candidate in ready:  # a round that failed makes the others' median meaningless: all or nothing
        candidate.rounds = times[id(candidate)] if len(times[id(candidate)]) == rounds else []


def _from_record(record, task, label: str) -> Candidate:
    replayed = record_on(record, task.dispatched[0])  # run as the task's own module, as in the search
    candidate = replayed.as_measure_candidate()
    return Candidate(task.task_name, label, candidate.sch, list(candidate.args_info), replayed.trace, record_key(record))


def _secs(record) -> float:
    secs = [float(s) for s in record.run_secs or []]
    return sum(secs) / len(secs) if secs else math.inf
