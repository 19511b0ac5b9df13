"""Tuning notices other work on the CPU (tuning/cpu_watch.py): a process outside the tuner's tree
counts, the tuner's own workers do not, and a tuning run beside a busy process warns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from autotune.frontend.importer import from_torch
from autotune.support.settings import TuneSettings
from autotune.tuning.cpu_watch import CpuWatch
from autotune.tuning.tune import tune

pytestmark = [
    pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the CPU watch reads Linux's /proc"),
    pytest.mark.serial,  # another pytest worker would be the "other work" these tests measure
]

BUSY = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nend = time.time() + 120\nwhile time.time() < end: pass\n"


@contextmanager
def busy_process(tmp_path: Path, foreign: bool):
    """A busy loop on one core: `foreign` ones are orphaned at once (not the test's descendants)."""
    script, pid_file = tmp_path / "busy.py", tmp_path / f"busy-{foreign}.pid"
    script.write_text(BUSY)
    command = [sys.executable, str(script), str(pid_file)]
    child = subprocess.Popen(["sh", "-c", f'"{command[0]}" "{command[1]}" "{command[2]}" &']) if foreign else subprocess.Popen(command)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    try:
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        child.wait()


def _lap_beside(tmp_path, foreign: bool) -> float:
    with busy_process(tmp_path, foreign):
        watch = CpuWatch()
        time.sleep(1.5)
        return watch.lap()


def test_other_processes_count_and_the_tuners_own_do_not(tmp_path):
    foreign = _lap_beside(tmp_path, foreign=True)
    own = _lap_beside(tmp_path, foreign=False)
    assert foreign >= 0.7, f"a busy process outside the tree measured as {foreign:.2f} cores"
    assert own <= foreign - 0.5, f"the watcher's own busy child counted as {own:.2f} cores of other work"


def test_tuning_beside_a_busy_process_warns(tmp_path):
    relu = from_torch(torch.nn.Sequential(torch.nn.ReLU()).eval(), {"x": torch.randn(4, 16)})
    settings = TuneSettings(trials=64, trials_per_iter=8, runs_per_measurement=1, min_repeat_ms=0, shipped_log=False, remeasure_rounds=0)
    with busy_process(tmp_path, foreign=True):
        report = tune(relu, "x86", tmp_path / "log", settings, progress=False)
    assert report.disturbed is not None and report.disturbed in report.warnings(), report.warnings()
    assert "other work used the CPU" in report.disturbed
