"""After the search, a kernel's best schedules are measured again side by side: a lucky time in the
log does not pick the build's schedule, and a re-measurement replaces a schedule's earlier times."""

from __future__ import annotations

import json

import pytest
import torch
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from autotune.frontend.importer import from_torch
from autotune.support.settings import TuneSettings
from autotune.support.targets import resolve_target
from autotune.tuning.fallback import default_schedule, has_own_default
from autotune.tuning.log import (
    RECORDS_FILE,
    WORKLOADS_FILE,
    TuningLog,
    read_logs,
    record_key,
    structure_key,
)
from autotune.tuning.remeasure import Candidate, _fastest, remeasure
from autotune.tuning.tune import (
    close_runner,
    extract_tasks,
    make_builder,
    make_runner,
    unit_tasks,
)

PRESET = resolve_target("x86")
X86 = PRESET.tvm_target()


def _record_lines(log) -> list[dict]:
    return [json.loads(line) for line in (log / RECORDS_FILE).read_text().splitlines()]


def _log_with_one_record(real_log, dst, index=0, **extra):
    """A log holding record line `index` of `real_log` (and its workload), the line edited by `extra`."""
    dst.mkdir()
    line = _record_lines(real_log)[index]
    workload = next(
        w for w in map(json.loads, (real_log / WORKLOADS_FILE).read_text().splitlines()) if w["id"] == line["id"]
    )
    (dst / WORKLOADS_FILE).write_text(json.dumps(workload) + "\n")
    line["record"][1] = [extra.pop("secs")]
    (dst / RECORDS_FILE).write_text(json.dumps({**line, **extra}) + "\n")
    return dst


def _times(memory) -> list[float]:
    return sorted(float(r.run_secs[0]) for r in memory.get_all_tuning_records())


def test_newest_remeasurement_replaces_the_schedules_earlier_times_across_logs(real_log, tmp_path):
    searched = _log_with_one_record(real_log, tmp_path / "searched", secs=1e-9)  # a lucky search time
    again = _log_with_one_record(real_log, tmp_path / "again", secs=2e-3, remeasured={"at": 100.0, "rounds": [2e-3] * 3})
    memory, winners = ms.database.MemoryDatabase(), {}
    (first, _), (second, _) = read_logs([(searched, None), (again, None)], X86, memory, winners)
    assert (first.records, first.superseded, second.records, second.superseded) == (0, 1, 1, 0)
    assert _times(memory) == [2e-3]
    [record] = memory.get_all_tuning_records()
    assert [record_key(w) for w in winners.values()] == [record_key(record)]  # the one re-measured line

    # a newer re-measurement in the first log wins over the second's, whichever log is read first
    newer = json.loads((again / RECORDS_FILE).read_text())
    newer["record"][1], newer["remeasured"] = [3e-3], {"at": 200.0, "rounds": [3e-3] * 3}
    with open(searched / RECORDS_FILE, "a") as f:
        f.write(json.dumps(newer) + "\n")
    for order in ([(searched, None), (again, None)], [(again, None), (searched, None)]):
        memory = ms.database.MemoryDatabase()
        reports = read_logs(order, X86, memory)
        assert _times(memory) == [3e-3]
        assert sum(r.superseded for r, _ in reports) == 2 and sum(r.records for r, _ in reports) == 1


def test_a_near_tie_keeps_the_searchs_best():
    def candidate(label, *rounds):
        return Candidate("matmul", label, None, [], None, (label, ""), list(rounds))

    incumbent = candidate("record 1", 1.00, 1.01, 0.99)
    near, clear = candidate("record 2", 0.98, 0.98, 0.98), candidate("default", 0.90, 0.96, 0.95)
    assert _fastest([incumbent, near], incumbent, margin=0.03) is incumbent  # 2 % lower: a tie
    assert _fastest([incumbent, near, clear], incumbent, margin=0.03) is clear  # 5 % lower
    assert _fastest([incumbent, near], incumbent, margin=0.0) is near
    failed = candidate("record 1")  # its rounds failed: any measured rival wins
    assert _fastest([failed, near], failed, margin=0.03) is near


def test_a_remeasured_kernels_winner_is_the_builds_pick(real_log, tmp_path):
    """Whatever single times the kernel's other records have: a near tie gave the loser a lower
    median, and a record never re-measured (a search time from another hour) is lower still."""
    lines = _record_lines(real_log)
    index, base = next(  # a kernel with three schedules
        (i, line) for i, line in enumerate(lines)
        if len({json.dumps(other["record"][0]) for other in lines if other["id"] == line["id"]}) >= 3
    )
    loser, unverified = [
        line for line in lines if line["id"] == base["id"] and line["record"][0] != base["record"][0]
    ][:2]
    log = _log_with_one_record(real_log, tmp_path / "log", index, secs=3e-3, remeasured={"at": 1.0, "rounds": [3e-3], "won": True})
    loser["record"][1], loser["remeasured"] = [2.9e-3], {"at": 1.0, "rounds": [2.9e-3], "won": False}
    unverified["record"][1] = [1e-9]
    unverified.pop("remeasured", None)
    with open(log / RECORDS_FILE, "a") as f:
        f.write(json.dumps(loser) + "\n" + json.dumps(unverified) + "\n")

    memory, winners = ms.database.MemoryDatabase(), {}
    [(report, _)] = read_logs([(log, None)], X86, memory, winners_only=True)  # as a build reads
    assert (report.records, report.set_aside, report.good_lines) == (1, 2, 3)
    assert _times(memory) == [3e-3]
    assert "2 not used: their kernel's re-measurement picked another schedule" in report.summary()
    memory = ms.database.MemoryDatabase()
    [(report, _)] = read_logs([(log, None)], X86, memory, winners)  # as tuning reads: every record
    assert (report.records, report.set_aside) == (3, 0) and _times(memory) == [1e-9, 2.9e-3, 3e-3]
    [winner] = winners.values()
    assert float(winner.run_secs[0]) == 3e-3

    # lines from before "won" existed: their lowest median wins; a line that says "won" beats them
    loser["remeasured"].pop("won")
    legacy = _log_with_one_record(real_log, tmp_path / "legacy", index, secs=3e-3, remeasured={"at": 1.0, "rounds": [3e-3]})
    with open(legacy / RECORDS_FILE, "a") as f:
        f.write(json.dumps(loser) + "\n")
    memory = ms.database.MemoryDatabase()
    read_logs([(legacy, None)], X86, memory, winners_only=True)
    assert _times(memory) == [2.9e-3]
    unverified["remeasured"] = {"at": 0.5, "rounds": [4e-3], "won": True}
    unverified["record"][1] = [4e-3]
    with open(legacy / RECORDS_FILE, "a") as f:
        f.write(json.dumps(unverified) + "\n")
    memory = ms.database.MemoryDatabase()
    read_logs([(legacy, None)], X86, memory, winners_only=True)
    assert _times(memory) == [4e-3]


def _remeasure_once(log, task):
    settings = TuneSettings(runs_per_measurement=1, min_repeat_ms=5)
    runner = make_runner(settings, PRESET)
    try:
        return remeasure(log, [task], X86, make_builder(settings), runner, rounds=3, top=3, min_share=0.0, on_line=lambda _: None)
    finally:
        close_runner(runner, drop_queued=False)


@pytest.mark.serial  # its outcome is a speed measured on this machine
def test_a_winner_meets_a_default_schedule_it_was_never_measured_against(tmp_path):
    """A hand-written kernel's default changes with the code: its winner, re-measured before against
    another default (here: none), is measured again beside today's, which takes its place when
    faster; once measured, nothing is left to re-measure. (The kernel: the bf16 engine's GEMM.)"""
    module = torch.nn.Sequential(torch.nn.Linear(256, 256)).eval()
    tasks = unit_tasks([(from_torch(module, {"x": torch.randn(64, 256)}), 1)], PRESET, "bf16")
    [task] = [t for t in tasks if t.task_name.startswith("gemm_")]
    assert has_own_default(task.dispatched[0]["main"])
    log = TuningLog(tmp_path / "log", X86)
    workload = log.commit_workload(task.dispatched[0])
    naive = s_tir.Schedule(task.dispatched[0])  # the plain loop nest: far slower than the default
    naive.get_loops(naive.get_sblock("gemm"))
    args = ms.arg_info.ArgInfo.from_entry_func(naive.mod, remove_preproc=True)
    log.commit_remeasurement(ms.database.TuningRecord(naive.trace, workload, [1e-9], X86, args), [1e-9] * 3, won=True)
    log.reload()
    assert record_key(log.winners[structure_key(task.dispatched[0]["main"])]) == record_key(log.get_all_tuning_records()[0])

    report = _remeasure_once(log, task)
    assert report.failures == [] and report.skipped_verified == 0
    [outcome] = report.outcomes
    assert [c.label for c in outcome.candidates] == ["record 1", "default"]
    assert (outcome.after.label, outcome.changed) == ("default", True)
    assert outcome.after.median < outcome.before.median

    log.reload()  # the default has a re-measurement now: nothing left to measure
    second = _remeasure_once(log, task)
    assert (second.outcomes, second.skipped_verified) == ([], 1)


@pytest.mark.serial  # its outcome is a speed measured on this machine
def test_a_lucky_naive_record_loses_its_place_to_the_default_schedule(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(256, 256)).eval()
    imported = from_torch(module, {"x": torch.randn(64, 256)})
    _, tasks = extract_tasks(imported, X86)
    [task] = [t for t in tasks if "matmul" in t.task_name]
    func = task.dispatched[0]["main"]
    log = TuningLog(tmp_path / "log", X86)
    workload = log.commit_workload(task.dispatched[0])
    naive = s_tir.Schedule(task.dispatched[0])  # TVM's plain loop nest, unchanged: far slower ...
    naive.get_loops(naive.get_sblock("matmul"))  # (a trace needs an instruction to count as a record)
    args = ms.arg_info.ArgInfo.from_entry_func(naive.mod, remove_preproc=True)
    log.commit_tuning_record(ms.database.TuningRecord(naive.trace, workload, [1e-9], X86, args))  # ... with a lucky time

    report = _remeasure_once(log, task)
    assert report.failures == []
    [outcome] = report.outcomes
    assert (outcome.before.label, outcome.after.label, outcome.changed) == ("record 1", "default", True)
    assert all(len(c.rounds) == 3 for c in outcome.candidates)
    assert outcome.after.median < outcome.before.median

    lines = _record_lines(tmp_path / "log")
    assert len(lines) == 3 and [len(line["remeasured"]["rounds"]) for line in lines[1:]] == [3, 3]
    assert [line["remeasured"]["won"] for line in lines[1:]] == [False, True]  # the naive record, the default
    # read back, the build's choice is the default schedule at its median; the naive one lost its 1e-9
    log.reload()
    [best] = log.get_top_k(log.known_workload(task.dispatched[0]), 1)
    default = default_schedule(func, X86)
    assert record_key(best) == record_key(ms.database.TuningRecord(default.trace, best.workload, None, X86, None))
    assert float(best.run_secs[0]) == outcome.after.median
    assert min(_times(log)) == outcome.after.median
    assert log.report.superseded == 1  # the naive schedule's search line
    assert record_key(log.winners[structure_key(func)]) == record_key(best)

    # the winner is a re-measurement now: a second pass re-measures nothing
    second = _remeasure_once(log, task)
    assert (second.outcomes, second.skipped_verified) == ([], 1)
    assert len(_record_lines(tmp_path / "log")) == 3

    # a record the search finds later challenges the winner: measured beside it, it must beat it
    workload = log.commit_workload(task.dispatched[0])  # as MetaSchedule's search files its records
    log.commit_tuning_record(ms.database.TuningRecord(naive.trace, workload, [1e-9], X86, args))
    third = _remeasure_once(log, task)
    [outcome] = third.outcomes
    assert (outcome.before.label, outcome.changed, len(outcome.candidates)) == ("record 1 = default", False, 2)
    assert [line["remeasured"]["won"] for line in _record_lines(tmp_path / "log")[4:]] == [True, False]
