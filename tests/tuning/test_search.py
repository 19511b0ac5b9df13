"""The search measures the build's fallback schedule of every kernel, and stops a kernel whose
design space is used up at its first empty round."""

from __future__ import annotations

import torch
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from autotune.frontend.importer import from_torch
from autotune.support.settings import TuneSettings
from autotune.support.targets import resolve_target
from autotune.tuning.fallback import default_schedule
from autotune.tuning.log import read_log
from autotune.tuning.tune import tune

EMPTY_ROUND = "Sending 0 candidates(s) for measurement"  # MetaSchedule's per-task log line


def test_every_tuned_kernel_has_its_fallback_schedule_measured(tuned_mlp):
    _, log, report = tuned_mlp
    target = resolve_target("x86").tvm_target()
    memory = ms.database.MemoryDatabase()
    read_log(log, target, memory)
    by_kernel = {}
    for record in memory.get_all_tuning_records():
        by_kernel.setdefault(record.workload, []).append(record)
    assert len(by_kernel) == sum(1 for s in report.tasks if s.trials > 0) > 0
    for workload, records in by_kernel.items():
        fallback = default_schedule(workload.mod["main"], target).mod
        replayed = [r.as_measure_candidate().sch.mod for r in records]
        assert sum(tvm_ffi.structural_equal(m, fallback) for m in replayed) >= 1, f"{len(records)} records"


def test_exhausted_kernel_stops_after_one_empty_round(tmp_path):
    # A ReLU of 64 floats has one schedule: measured in the first round (once as the search's
    # pick, once as the fallback), nothing new after it. TVM's evolutionary search alone would run
    # 5 empty rounds (a population sampled and evolved each time) before ending the task.
    relu = from_torch(torch.nn.Sequential(torch.nn.ReLU()).eval(), {"x": torch.randn(4, 16)})
    settings = TuneSettings(trials=64, trials_per_iter=8, runs_per_measurement=1, min_repeat_ms=0, shipped_log=False, remeasure_rounds=0)
    report = tune(relu, "x86", tmp_path / "log", settings, progress=False)
    assert report.trials == 2 and report.failures == 0, report.summary()
    task_logs = list((tmp_path / "log" / "ms_logs" / "logs").glob("*task_0*.log"))
    assert len(task_logs) == 1, task_logs
    assert task_logs[0].read_text().count(EMPTY_ROUND) == 1
