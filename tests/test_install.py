"""A non-editable install finds its target presets and shipped log, and applies the log by default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BUILD = """
import json
import autotune
from autotune.build import build
from autotune.frontend.sources import load_source
from autotune.support.package_data import shipped_log_dir, targets_dir
source = load_source("wan-i2v-tiny", "image_encoder")  # the smallest component with shipped records
report = build(source.imported, "x86", "out/image_encoder.so")
print(json.dumps({"package": autotune.__file__, "targets": str(targets_dir()), "log": str(shipped_log_dir("x86")),
                  "tuned": report.tuned_kernels, "kernels": report.kernels}))
"""


def _shipped_log_fits_this_cpu() -> str | None:
    from autotune.support.targets import resolve_target
    from autotune.tuning.log import isa_of_target_key, record_lines, schedule_isa

    key = next(record_lines(ROOT / "schedules" / "x86"))["target"]
    here, shipped = schedule_isa(resolve_target("x86").tvm_target()), isa_of_target_key(key)
    if here.vector != shipped.vector:
        return f"the shipped x86 log is for {shipped.vector} CPUs and this one is {here.vector}"
    return None


@pytest.mark.slow
def test_non_editable_install_builds_with_the_shipped_log(tmp_path):
    reason = _shipped_log_fits_this_cpu()
    if reason:
        pytest.skip(reason)
    venv = tmp_path / "venv"
    # The venv sees this machine's packages (TVM, torch) and gets autotune itself copied in, not linked.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run([python, "-c", BUILD], cwd=work, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    installed = str(venv / "lib")
    assert info["package"].startswith(installed), info  # the copy in the venv, not this source tree
    assert info["targets"].startswith(installed) and info["log"].startswith(installed), info
    assert info["tuned"] > 0, f"no kernel came from the shipped log: {info}"
