"""`autotune bench` end to end on the smallest workload: torch eager, ONNX Runtime, OpenVINO and TVM
untuned, each at fp32, bf16 and int8, two rounds, run once for the whole module (about 25 s)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pytest

from autotune.bench.harness import (
    TVM,
    EngineUnavailable,
    OnnxRuntime,
    OpenVINO,
    TorchEager,
    _interleave,
    parse_precisions,
    run_bench,
    write_results,
)
from autotune.support.errors import InputError

ENGINES = ("torch eager", "ONNX Runtime", "OpenVINO", "TVM untuned")
# bf16 keeps 8 significant bits: on this encoder its outputs are ~1e-2 off float32 torch eager
# (cosine ~0.99999 measured for eager, OpenVINO and TVM). 0.999 leaves two orders of magnitude of
# 1 - cosine for other CPUs' kernels while failing a wrong cast or a broken bf16 build.
BF16_MIN_COSINE = 0.999
# int8 linears (per-channel weights, torch per-tensor; dynamic activations for torch, ORT and TVM): cosine
# 0.99996-0.999994 measured on this encoder (AMD Zen 4); 0.995 fails a wrong scale or a lost shift.
INT8_MIN_COSINE = 0.995
PRECISIONS = ("fp32", "bf16", "int8")


@pytest.fixture(scope="module")
def bench():
    rows, peak = run_bench(
        ["tiny-image-encoder"], [TorchEager(), OnnxRuntime(), OpenVINO(), TVM()], rounds=2,
        log=lambda *a: None, precisions=parse_precisions("fp32,bf16,int8"),
    )
    return rows, peak, {(r.engine, r.precision): r for r in rows}


def test_every_engine_has_a_row_at_each_precision_grouped_fp32_first(bench):
    rows, _, by_key = bench
    assert len(rows) == len(by_key) == len(PRECISIONS) * len(ENGINES)
    assert [(r.engine, r.precision) for r in rows] == [(e, p) for p in PRECISIONS for e in ENGINES]
    for precision in PRECISIONS:
        assert by_key[("torch eager", precision)].ratio_vs_eager == 1.0  # its own reference at its precision


def test_rounds_go_on_until_the_minimum_time_has_passed(bench):
    _, _, by_key = bench
    assert {r.rounds for r in by_key.values() if r.median_ms is not None} == {2}  # min_seconds 0: exactly --rounds
    calls = {"a": 0, "b": 0}

    class Counted:
        def __init__(self, name):
            self.name = name

        def run(self, inputs):
            calls[self.name] += 1

    times = _interleave({"a": Counted("a"), "b": Counted("b")}, {}, rounds=1, min_seconds=0.3)
    # each engine runs >= 50 ms a round: 0.3 s takes at least 3 rounds, each a median of many calls
    assert len(times["a"]) == len(times["b"]) >= 3 and calls["a"] > 10 * len(times["a"])
    assert len(_interleave({"a": Counted("a")}, {}, rounds=2)["a"]) == 2


def test_fp32_rows_match_float32_eager(bench):
    _, _, by_key = bench
    for engine in ENGINES:
        row = by_key[(engine, "fp32")]
        assert row.median_ms > 0 and row.fidelity["max_abs"] < 1e-4, (engine, row.fidelity)
    assert by_key[("torch eager", "fp32")].fidelity["max_abs"] == 0.0  # the reference itself
    assert by_key[("OpenVINO", "fp32")].note.startswith("hint f32")  # asked explicitly: bf16 CPUs default to bf16


def _openvino_cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_bf16_rows_run_in_bf16_close_to_float32_eager(bench):
    _, _, by_key = bench
    fp32_error = max(by_key[(e, "fp32")].fidelity["max_abs"] for e in ENGINES)
    in_bf16 = ["torch eager", "TVM untuned"]
    if _openvino_cpu_has_bf16():  # AVX512-BF16 or AMX; elsewhere OpenVINO runs the bf16 hint in f32
        in_bf16.append("OpenVINO")
        assert by_key[("OpenVINO", "bf16")].note.startswith("hint bf16; matmul/conv layers run:")
    else:
        assert by_key[("OpenVINO", "bf16")].note.startswith("hint f32")
    for engine in ("torch eager", "OpenVINO", "TVM untuned"):
        row = by_key[(engine, "bf16")]
        assert row.median_ms > 0 and row.fidelity["cosine"] >= BF16_MIN_COSINE, (engine, row.fidelity)
    for engine in in_bf16:  # really computed in bf16: far from float32 eager next to the fp32 rows (~1e-6 here)
        assert by_key[(engine, "bf16")].fidelity["max_abs"] > max(1e-3, 100 * fp32_error), engine


def test_int8_rows_run_each_engines_own_int8_close_to_float32_eager(bench):
    _, _, by_key = bench
    fp32_error = max(by_key[(e, "fp32")].fidelity["max_abs"] for e in ENGINES)
    assert by_key[("torch eager", "int8")].note.startswith("quantize_dynamic")
    assert by_key[("ONNX Runtime", "int8")].note.startswith("quantize_dynamic")
    openvino = by_key[("OpenVINO", "int8")]
    assert openvino.median_ms is not None or "pip install nncf" in openvino.note
    for engine in ENGINES:
        row = by_key[(engine, "int8")]
        if row.median_ms is None:
            continue
        assert row.median_ms > 0 and row.fidelity["cosine"] >= INT8_MIN_COSINE, (engine, row.fidelity)
        assert row.fidelity["max_abs"] > max(1e-3, 100 * fp32_error), f"{engine} at int8 computed like float32"


def test_onnx_runtime_bf16_row_has_a_time_or_a_reason(bench):
    _, _, by_key = bench
    row = by_key[("ONNX Runtime", "bf16")]
    if row.median_ms is None:  # ORT 1.32's CPU provider: no bf16 Conv kernel
        assert row.note.startswith("ONNX Runtime CPU has no bf16 kernel") and "bfloat16" in row.note
        assert row.fidelity is None and row.ratio_vs_eager is None
    else:
        assert row.median_ms > 0 and row.fidelity["cosine"] >= BF16_MIN_COSINE


def test_largest_kernel_against_the_peak_of_its_precision(bench):
    _, peak, by_key = bench
    keys = {"fp32": "sgemm_gflops", "bf16": "bf16_gemm_gflops", "int8": "int8_gemm_gops"}
    assert all(peak[key] > 0 for key in keys.values())
    for precision in PRECISIONS:
        kernel = by_key[("TVM untuned", precision)].largest_kernel
        gemm_peak = max(peak[keys[precision]], peak["sgemm_gflops"])  # never below float32's (harness.peak_gflops)
        assert kernel["gflop"] > 0 and kernel["peak_fraction"] == pytest.approx(kernel["gflops"] / gemm_peak)
        assert by_key[("torch eager", precision)].largest_kernel is None  # only TVM builds are profiled


def test_peak_probes_shrink_where_torch_is_slow(monkeypatch):
    """A GEMM probe that would take minutes at 2048³ (torch's bf16 / int8 fallbacks on CPUs without
    those instructions) runs smaller, so that the bench starts in seconds; the size is reported."""
    import time

    import torch

    from autotune.bench import harness

    def slow_int8(dtype, size):  # int8 at 1 GOP/s, the others at 2 TFLOP/s: whatever this host does
        rate = 1e9 if dtype == torch.int8 else 2e12
        return lambda: time.sleep(2 * size**3 / rate)

    monkeypatch.setattr(harness, "_gemm_call", slow_int8)
    started = time.time()
    peak = harness.measure_peak(threads=2, size=1024, repeat=1)
    assert peak["int8_gemm_size"] < 1024 and peak["int8_gemm_gops"] == pytest.approx(1.0, rel=0.2)
    assert time.time() - started < 20
    assert harness.peak_gflops(peak, "int8") == peak["sgemm_gflops"]  # 1 GOP/s is no ceiling
    md = write_results([], peak, Path(tempfile.mkdtemp()), "autotune bench --test").read_text()
    assert f"(at {peak['int8_gemm_size']}³: too slow on this CPU for 1024³)" in md


def test_results_files(bench, tmp_path):
    rows, peak, by_key = bench
    md = write_results(rows, peak, tmp_path, "autotune bench --test")
    text = md.read_text()
    kernel = by_key[("TVM untuned", "fp32")].largest_kernel["kernel"]
    assert "largest kernel" in text and kernel in text
    assert "| tiny-image-encoder | OpenVINO | " in text  # the fp32 | bf16 side-by-side table
    saved = json.loads((tmp_path / "bench.json").read_text())
    fields = {"workload", "engine", "precision", "median_ms", "ratio_vs_eager", "fidelity", "largest_kernel", "note"}
    assert all(fields <= set(r) for r in saved["rows"])
    saved_by_key = {(r["engine"], r["precision"]): r for r in saved["rows"]}
    assert saved_by_key[("TVM untuned", "fp32")]["largest_kernel"]["kernel"] == kernel
    assert saved_by_key[("OpenVINO", "bf16")]["largest_kernel"] is None
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_openvino_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(EngineUnavailable, match="not installed: pip install openvino"):
        OpenVINO().prepare(None, None, "fp32")


def test_precision_flag():
    assert parse_precisions("fp32, bf16,fp32,int8") == ["fp32", "bf16", "int8"]
    with pytest.raises(InputError, match="unknown fp16"):
        parse_precisions("fp32,fp16")
    from autotune.cli import bench as cli_bench

    parser = argparse.ArgumentParser()
    cli_bench.add_parser(parser.add_subparsers())
    assert parser.parse_args(["bench"]).precision == "fp32"
    args = parser.parse_args(["bench", "--precision", "bf16", "--quantize", "int8-weight"])
    with pytest.raises(InputError, match="add fp32 to --precision"):
        args.func(args)


def test_an_engine_slower_than_the_limit_is_timed_once_not_every_round(monkeypatch):
    """torch at bf16 on a CPU without bf16 arithmetic takes minutes a call (the VAE up-block on a
    Zen 2): such an engine is called twice (the first call may be a compile) and timed by the second."""
    from autotune.bench import harness
    from autotune.support import defaults

    calls = []

    class Slow(TorchEager):
        def prepare(self, w, workdir, precision):
            ready = super().prepare(w, workdir, precision)
            inner = ready.run
            ready.run = lambda inputs: calls.append(1) or inner(inputs)
            return ready

    monkeypatch.setattr(defaults, "BENCH_SLOW_CALL_SECONDS", 0.0)  # every call is "slow"
    rows, _ = harness.run_bench(["tiny-image-encoder"], [Slow()], rounds=3, log=lambda *a: None, min_seconds=0.0)
    (row,) = rows
    assert len(calls) == 2 and row.rounds == 1, (len(calls), row.rounds)
    assert "one call timed" in row.note and row.median_ms > 0
    assert row.fidelity["max_abs"] == 0.0  # its own float32 output, from the timed call, against the reference
    assert "tiny-image-encoder 1" in harness._rounds_note(rows)
