"""The task scheduler measures each batch before it builds the next (on the CPU it compiles on), so no
candidate is timed beside the tuner's own compilation, and each batch's records are on disk early."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

import autotune.tuning.tune as tuning
from autotune.frontend.importer import from_torch
from autotune.support.settings import TuneSettings
from autotune.tuning.log import RECORDS_FILE
from autotune.tuning.scheduler import FAILED_MS, MeasuredInTurn


def _watched(events: list, log_dir):
    """A builder and runner that note what happens, in order: builds (with the log's records at
    that moment), batches handed to the runner, and batches the tuner waited for."""

    def records_on_disk() -> int:
        path = log_dir / RECORDS_FILE
        return sum(1 for _ in path.open()) if path.exists() else 0

    @derived_object
    class Builder(ms.builder.PyBuilder):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def build(self, build_inputs):
            events.append(("build", len(build_inputs), records_on_disk()))
            return self.inner.build(build_inputs)

    @derived_object
    class Future(ms.runner.PyRunnerFuture):
        def __init__(self, inner, batch: int):
            super().__init__()
            self.inner, self.batch = inner, batch

        def done(self):
            return self.inner.done()

        def result(self):
            events.append(("join", self.batch))
            return self.inner.result()

    @derived_object
    class Runner(ms.runner.PyRunner):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def run(self, runner_inputs):
            batch = sum(1 for e in events if e[0] == "run") + 1  # (numbered across the runs' runners)
            events.append(("run", batch))
            return [Future(f, batch) for f in self.inner.run(runner_inputs)]

    return Builder, Runner


def test_batches_are_measured_in_turn_and_logged_before_the_next_is_built(tmp_path, monkeypatch):
    """A real tune on this CPU: no batch is measured while the next is built, and each build sees
    every measured record on disk. (TVM's own scheduler fails this: it builds every task's first
    batch before it waits for any.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    log_dir = tmp_path / "log"
    events: list = []
    Builder, Runner = _watched(events, log_dir)
    make_builder, make_runner = tuning.make_builder, tuning.make_runner
    monkeypatch.setattr(tuning, "make_builder", lambda settings: Builder(make_builder(settings)))
    monkeypatch.setattr(tuning, "make_runner", lambda settings, preset: Runner(make_runner(settings, preset)))
    settings = TuneSettings(trials=8, trials_per_iter=2, light_task_trials=2, runs_per_measurement=1,
                            min_repeat_ms=0, shipped_log=False, remeasure_rounds=0)
    report = tuning.tune(from_torch(model.eval(), {"x": torch.randn(1, 16, 64)}), "x86", log_dir, settings, progress=False)

    assert report.failures == 0, report.first_error
    sizes, joined = {}, {}
    last_build = None
    for event in events:
        if event[0] == "build":
            last_build = event[1]
            logged = sum(sizes[b] for b in sizes if joined.get(b, 0) == sizes[b])
            in_flight = [b for b in sizes if joined.get(b, 0) < sizes[b]]
            assert not in_flight, f"a build beside {len(in_flight)} batches in flight: {events}"
            assert event[2] == logged, f"built with {event[2]} records on disk, {logged} measured: {events}"
        elif event[0] == "run":
            sizes[event[1]] = last_build
        else:
            joined[event[1]] = joined.get(event[1], 0) + 1
    assert len(sizes) >= 3 and sum(1 for s in report.tasks if s.trials) >= 3, events
    assert sum(sizes.values()) == report.trials == report.records_after


@pytest.mark.parametrize("overlap", [False, True], ids=["this-cpu", "measured-elsewhere"])
def test_at_most_one_batch_measures_while_the_next_is_built_where_candidates_run_elsewhere(overlap):
    """TVM's tuning loop played against the scheduler: pick a task, build its batch, send it to the
    runner. With `overlap` (RPC, a GPU) one batch may still be measuring when the next is built,
    never two; a task's batch is always in before it gets another; without, none is in flight."""
    tasks = [SimpleNamespace(is_terminated=False, task_weight=1.0, runner_futures=None) for _ in range(4)]  # TaskRecords
    joined = []

    def join(task_id):
        joined.append(task_id)
        tasks[task_id].runner_futures = None
        return [SimpleNamespace(run_secs=[1e-3 * (task_id + 1)], error_msg=None)]

    scheduler = MeasuredInTurn._cls(seed=0, overlap=overlap)  # the Python class inside TVM's object
    scheduler._outer = lambda: SimpleNamespace(tasks_=tasks)
    scheduler.join_running_task = join
    most_in_flight = 0
    for _ in range(12):
        task_id = scheduler.next_task_id()
        assert tasks[task_id].runner_futures is None, "a task got a batch while its last one was measuring"
        most_in_flight = max(most_in_flight, sum(t.runner_futures is not None for t in tasks))  # while this one builds
        tasks[task_id].runner_futures = ["batch"]
    assert most_in_flight == int(overlap)
    assert sorted(set(joined)) == [0, 1, 2, 3] and len(joined) == 12 - 1 - int(overlap)


def test_gradient_is_tvms():
    """gradient_based.cc: alpha * (best `window` batches ago - best) / window + (1 - alpha) * best / batches,
    times the task's weight; a task with nothing measured comes last."""
    scheduler = MeasuredInTurn(alpha=0.2, window=3)
    scheduler.best_ms = {0: [10.0, 8.0, 6.0, 5.0], 1: [4.0, 4.0], 2: [FAILED_MS]}
    assert abs(scheduler._gradient(0, 2.0) - 2 * (0.2 * (10 - 5) / 3 + 0.8 * 5 / 4)) < 1e-12
    assert abs(scheduler._gradient(1, 1.0) - 0.8 * 4 / 2) < 1e-12  # fewer batches than the window: no trend term
    assert scheduler._gradient(2, 100.0) == scheduler._gradient(3, 1.0) == -1e9
