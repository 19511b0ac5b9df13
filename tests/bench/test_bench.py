"""`autotune bench` end to end on the smallest workload, two engines, two rounds."""

from __future__ import annotations

import json

from autotune.bench.harness import TVM, TorchEager, run_bench, write_results


def test_bench_rows_fidelity_and_largest_kernel(tmp_path):
    rows, peak = run_bench(["tiny-image-encoder"], [TorchEager(), TVM()], rounds=2, log=lambda *a: None)
    by_engine = {r.engine: r for r in rows}
    assert set(by_engine) == {"torch eager", "TVM untuned"}
    assert by_engine["torch eager"].ratio_vs_eager == 1.0
    tvm_row = by_engine["TVM untuned"]
    assert tvm_row.median_ms > 0 and tvm_row.fidelity["max_abs"] < 1e-3  # fp32 against torch eager
    kernel = tvm_row.largest_kernel
    assert kernel and kernel["gflop"] > 0 and 0 < kernel["peak_fraction"] and peak["sgemm_gflops"] > 0
    assert not by_engine["torch eager"].largest_kernel  # only TVM builds are profiled
    md = write_results(rows, peak, tmp_path, "autotune bench --test")
    text = md.read_text()
    assert "largest kernel" in text and kernel["kernel"] in text
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"][1]["largest_kernel"]["kernel"] == kernel["kernel"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
