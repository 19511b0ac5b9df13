"""After the search, a kernel's best schedules are measured again side by side: a lucky time in the
log does not pick the build's schedule, and a re-measurement replaces a schedule's earlier times."""

from __future__ import annotations

import json

import torch
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from autotune.frontend.importer import from_torch
from autotune.support.settings import TuneSettings
from autotune.support.targets import resolve_target
from autotune.tuning.fallback import default_schedule
from autotune.tuning.log import (
    RECORDS_FILE,
    WORKLOADS_FILE,
    TuningLog,
    read_logs,
    record_key,
)
from autotune.tuning.remeasure import remeasure
from autotune.tuning.tune import close_runner, extract_tasks, make_builder, make_runner

PRESET = resolve_target("x86")
X86 = PRESET.tvm_target()


def _record_lines(log) -> list[dict]:
    return [json.loads(line) for line in (log / RECORDS_FILE).read_text().splitlines()]


def _log_with_one_record(real_log, dst, **extra):
    """A log holding the first record of `real_log` (and its workload), the record line edited by `extra`."""
    dst.mkdir()
    line = _record_lines(real_log)[0]
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
    memory, remeasured = ms.database.MemoryDatabase(), set()
    (first, _), (second, _) = read_logs([(searched, None), (again, None)], X86, memory, remeasured)
    assert (first.records, first.superseded, second.records, second.superseded) == (0, 1, 1, 0)
    assert _times(memory) == [2e-3]
    [record] = memory.get_all_tuning_records()
    assert remeasured == {record_key(record)}

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

    settings = TuneSettings(runs_per_measurement=1, min_repeat_ms=5)
    runner = make_runner(settings, PRESET)
    try:
        report = remeasure(log, [task], X86, make_builder(settings), runner, rounds=3, top=3, min_share=0.0, on_line=lambda _: None)
    finally:
        close_runner(runner, drop_queued=False)
    assert report.failures == []
    [outcome] = report.outcomes
    assert (outcome.before.label, outcome.after.label, outcome.changed) == ("record 1", "default", True)
    assert all(len(c.rounds) == 3 for c in outcome.candidates)
    assert outcome.after.median < outcome.before.median

    lines = _record_lines(tmp_path / "log")
    assert len(lines) == 3 and [len(line["remeasured"]["rounds"]) for line in lines[1:]] == [3, 3]
    # read back, the build's choice is the default schedule at its median; the naive one lost its 1e-9
    log.reload()
    [best] = log.get_top_k(log.known_workload(task.dispatched[0]), 1)
    default = default_schedule(func, X86)
    assert record_key(best) == record_key(ms.database.TuningRecord(default.trace, best.workload, None, X86, None))
    assert float(best.run_secs[0]) == outcome.after.median
    assert min(_times(log._memory)) == outcome.after.median

    # the winner is a re-measurement now: a second pass re-measures nothing
    runner = make_runner(settings, PRESET)
    try:
        second = remeasure(log, [task], X86, make_builder(settings), runner, rounds=3, top=3, min_share=0.0, on_line=lambda _: None)
    finally:
        close_runner(runner, drop_queued=False)
    assert (second.outcomes, second.skipped_verified) == ([], 1)
    assert len(_record_lines(tmp_path / "log")) == 3
