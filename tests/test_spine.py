"""import → tune → build → .so → load in a fresh process, from torch and from ONNX."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import max_abs_diff, run_cli, run_fresh

from autotune.build.compile import build
from autotune.frontend.importer import from_onnx
from autotune.support.settings import TuneSettings
from autotune.tuning.log import read_log
from autotune.tuning.tune import tune

TOL = 1e-4  # fp32 against torch eager


def _run_in_fresh_process(library, inputs: dict, tmp_path) -> np.ndarray:
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = run_fresh(
        f"""
        import numpy as np, autotune
        m = autotune.load({str(library)!r})
        inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
        out = m(**inputs)
        np.save({str(tmp_path / 'out.npy')!r}, out)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "out.npy")


def _interleaved_medians(library_a, library_b, tmp_path) -> tuple[float, float]:
    """Both libraries in one fresh process, timed in alternating rounds so that a shared
    machine's load hits both alike; the best round median of each."""
    result = run_fresh(
        f"""
        import numpy as np, autotune
        inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
        a, b = autotune.load({str(library_a)!r}), autotune.load({str(library_b)!r})
        ta, tb = [], []
        for _ in range(7):
            ta.append(a.benchmark(inputs, repeat=10, warmup=2)["median_ms"])
            tb.append(b.benchmark(inputs, repeat=10, warmup=2)["median_ms"])
        print(min(ta), min(tb))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = result.stdout.split()[-2:]
    return float(a), float(b)


@pytest.mark.serial  # it asserts that the tuned build runs faster than the untuned one
def test_torch_block_tune_build_load_in_fresh_process(tmp_path, mlp_block, tuned_mlp):
    module, inputs, ref = mlp_block
    imported, log, report = tuned_mlp
    assert report.trials >= 16 and report.failures < report.trials
    tuned = build(imported, "x86", tmp_path / "tuned.so", log_dir=log)
    untuned = build(imported, "x86", tmp_path / "untuned.so")
    assert tuned.tuned_kernels >= 2, "the matmul kernels must come from the log"
    assert untuned.tuned_kernels == 0
    np_inputs = {k: v.numpy() for k, v in inputs.items()}
    out_tuned = _run_in_fresh_process(tuned.paths.library, np_inputs, tmp_path)
    assert max_abs_diff(out_tuned, ref) <= TOL
    out_untuned = _run_in_fresh_process(untuned.paths.library, np_inputs, tmp_path)
    assert max_abs_diff(out_untuned, ref) <= TOL
    ms_tuned, ms_untuned = _interleaved_medians(tuned.paths.library, untuned.paths.library, tmp_path)
    assert ms_tuned < ms_untuned, f"tuned {ms_tuned:.3f} ms is not faster than untuned {ms_untuned:.3f} ms"


def test_metadata_records_the_build(tmp_path, tuned_mlp):
    imported, log, _ = tuned_mlp
    report = build(imported, "x86", tmp_path / "m.so", log_dir=log)
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["inputs"] == [{"name": "x", "shape": [1, 128, 256], "dtype": "float32"}]
    assert meta["outputs"][0]["shape"] == [1, 128, 256]
    assert meta["target"]["preset"] == "x86"
    assert meta["tuning_log"]["records"] == read_log(log)[0].records
    assert len(meta["tuning_log"]["digest"]) == 64
    assert meta["kernels"]["tuned"] == report.tuned_kernels
    assert meta["weight_bytes"]["before"] == sum(w.nbytes for w in imported.weights.values())
    # weights are not baked into the library: the .so is smaller than the weights file
    assert report.paths.library.stat().st_size < report.paths.weights.stat().st_size + 2_000_000


def test_resumed_tune_spends_only_its_new_budget(tmp_path, tuned_mlp):
    imported, tuned_log, first = tuned_mlp
    log = shutil.copytree(tuned_log, tmp_path / "log")
    def lines_read(log):  # records, and the lines that re-measurements replaced or left out
        return read_log(log)[0].good_lines

    on_disk = lines_read(log)
    assert first.records_after == on_disk > 0
    second = tune(imported, "x86", log, TuneSettings(trials=8, trials_per_iter=4, remeasure_rounds=0), progress=False)
    assert second.records_before == on_disk, "the second run must start from the first run's records"
    assert 0 < second.trials <= 8 + 4  # its own budget (one batch of slack), not the first run's again
    assert lines_read(log) == on_disk + (second.records_after - second.records_before)


def test_onnx_block_tune_build_load_in_fresh_process(tmp_path, onnx_attention_block):
    path, inputs, ref = onnx_attention_block
    imported = from_onnx(path)
    assert [s.name for s in imported.inputs] == ["x"]
    # one pool of 8 trials per kernel (no light-kernel phase), so the fused attention kernel is
    # reached in the first round: MetaSchedule tunes it like any task and the build applies it
    settings = TuneSettings(trials=16, trials_per_iter=8, trials_per_task=8, light_task_share=0.0, remeasure_rounds=0)
    tuned = tune(imported, "x86", tmp_path / "log", settings, progress=False)
    attention = [t for t in tuned.tasks if t.name.startswith("fused_attention")]
    assert len(attention) == 1 and attention[0].trials > 0 and attention[0].failures == 0, tuned.summary()
    report = build(imported, "x86", tmp_path / "onnx.so", log_dir=tmp_path / "log")
    assert report.tuned_kernels >= 2
    out = _run_in_fresh_process(report.paths.library, {"x": inputs["x"].numpy()}, tmp_path)
    assert max_abs_diff(out, ref) <= TOL


def test_cli_tune_where_every_build_fails_exits_nonzero(tmp_path, onnx_attention_block):
    """TuningFailed ("candidates failed") raised by tune() reaches the user as a non-zero exit."""
    result = run_cli(
        "tune", "--model", str(onnx_attention_block[0]), "--log", str(tmp_path),
        "--trials", "4", "--trials-per-iter", "4", "--build-timeout", "0.001",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    if "start-up check" not in result.stderr:  # (on a busy machine the build worker's check times out first)
        assert "candidates failed to build or run" in result.stderr
        assert "Timeout" in result.stderr  # the first failure's own message is shown


def test_a_worker_slower_than_its_timeout_at_start_up_is_a_clear_error(monkeypatch):
    """MetaSchedule checks its build and measuring workers when they are made, under the candidates'
    timeout; on a busy machine a short timeout ran out there, and a bare TimeoutError reached the user."""
    from tvm.s_tir import meta_schedule as ms

    from autotune.support.errors import TuningFailed
    from autotune.support.targets import resolve_target
    from autotune.tuning.tune import make_builder, make_runner

    def too_slow(self):
        raise TimeoutError()

    monkeypatch.setattr(ms.builder.LocalBuilder._cls, "_sanity_check", too_slow)  # (_cls: the class behind TVM's wrapper)
    monkeypatch.setattr(ms.runner.LocalRunner._cls, "_sanity_check", too_slow)
    with pytest.raises(TuningFailed, match=r"build worker .* within --build-timeout 0.001 s .* give a longer --build-timeout"):
        make_builder(TuneSettings(build_timeout_s=0.001))
    with pytest.raises(TuningFailed, match=r"measuring worker .* within --run-timeout 2 s"):
        make_runner(TuneSettings(run_timeout_s=2), resolve_target("x86"))


def test_trials_go_where_the_flops_are(tuned_mlp):
    """Kernels under 1% of the FLOPs get one small batch; the matmuls share the rest."""
    from autotune.passes.pipeline import prepare_model
    from autotune.support.targets import resolve_target
    from autotune.tuning.tune import extract_tasks, split_by_flops, task_flops

    imported, _, report = tuned_mlp
    preset = resolve_target("x86")
    _, tasks = extract_tasks(prepare_model(imported, preset, None)[0], preset.tvm_target())
    light, heavy = split_by_flops(tasks, TuneSettings().light_task_share)
    names = {i: tasks[i].task_name for i in range(len(tasks))}
    # (an AVX2-only host runs the two matmuls on its float32 FMA kernel: gemm_f32_...)
    is_matmul = {i: "matmul" in name or name.startswith("gemm_") for i, name in names.items()}
    assert light and not any(is_matmul[i] for i in light)
    assert sum(is_matmul[i] for i in heavy) == 2
    total = sum(task_flops(t) for t in tasks)
    assert all(task_flops(tasks[i]) < 0.01 * total for i in light)
    trials = {s.name: s.trials for s in report.tasks}
    assert all(trials[names[i]] <= TuneSettings().light_task_trials for i in light)
    assert sum(trials[names[i]] for i in heavy) >= report.trials / 2


def test_a_resumed_run_reaches_kernels_without_records_first():
    """MetaSchedule's scheduler gives one batch per task in list order before it weighs them: the
    heavy kernels an earlier run never measured go first (each group keeps its order)."""
    from autotune.tuning.tune import unrecorded_first

    assert unrecorded_first([4, 7, 9, 12], recorded={4, 9}) == [7, 12, 4, 9]
    assert unrecorded_first([3, 5], recorded=set()) == [3, 5]
    assert unrecorded_first([], recorded={1}) == []
