"""The vector engines' GEMMs alone: the weight read as Bp's rows against column panels, interleaved.

    python tools/bench_gemm.py [--shapes 1560x1536x1536,...] [--rounds 11] [-o tools/results/gemm_panels.md]

Each shape (rows x columns x reduction; default: the DiT block's GEMMs) on each vector engine this
CPU has (AVX512-VNNI int8, AVX512-BF16 bf16), default tiles, compiled as a built artifact runs it
(kernels/gemm_cpu.py: with column panels the re-layout is out of the kernel and the weight re-laid
once), on the same operands; every round times each variant in turn (3 calls), and the table shows
the medians over rounds and panels / rows. Standalone kernels run with their operands in cache;
inside a model the weights come from memory: check a change on the model too
(`tools/compare_artifacts.py`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import tvm

from autotune.kernels import gemm_cpu as gemm
from autotune.support import hardware
from autotune.support.targets import resolve_target

DIT_BLOCK = "1560x1536x1536,1560x8960x1536,1560x1536x8960,512x1536x1536"
ENGINES = {gemm.VNNI: "avx512_vnni", gemm.AVX512: "avx512_bf16"}  # ISA -> the CPU flag it needs


def _operands(m: int, n: int, k: int, isa: str, rng) -> tuple[np.ndarray, np.ndarray]:
    if gemm.PRECISION[isa] == gemm.INT8:
        return rng.integers(0, 256, (m, k), dtype=np.uint8), rng.integers(-128, 128, (k, n), dtype=np.int8)
    return (rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16),
            rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16))


def measure(m: int, n: int, k: int, isa: str, target, rounds: int) -> dict[str, float]:
    """{"rows": ms, "panels": ms}: medians over interleaved rounds; both checked equal first."""
    a, b = _operands(m, n, k, isa, np.random.default_rng(0))
    bp = gemm.pack_weight(b, gemm.group(isa))
    out = gemm.DTYPES[gemm.PRECISION[isa]][2]
    runs, results = {}, {}
    for name, panels in (("rows", False), ("panels", True)):
        lib = gemm.compile_standalone(m, n, k, isa, target, panels=panels, relaid=panels)
        args = (tvm.runtime.tensor(a), tvm.runtime.tensor(gemm.column_panels(bp, isa) if panels else bp),
                tvm.runtime.tensor(np.zeros((m, n), out)))
        lib["main"](*args)
        results[name] = args[2].numpy()
        runs[name] = (lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=1), args)
    if not np.array_equal(results["rows"], results["panels"]):  # same tiles, same sums: bit-identical
        raise SystemExit(f"{m}x{n}x{k} {isa}: the two layouts computed different products")
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (timer, args) in runs.items():
            times[name].append(timer(*args).mean * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DIT_BLOCK, help="comma-separated MxNxK (default: the DiT block's GEMMs)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("-o", "--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    flags = hardware.cpu_flags()
    isas = [isa for isa, flag in ENGINES.items() if flag in flags]
    if not isas:
        raise SystemExit("this CPU has neither AVX512-VNNI nor AVX512-BF16: no vector engine reads column panels")
    target = resolve_target("x86").tvm_target()
    lines = ["| shape (M × N × K) | engine | rows ms | panels ms | panels / rows | panels GOP/s |", "|---|---|---:|---:|---:|---:|"]
    for shape in args.shapes.split(","):
        m, n, k = (int(x) for x in shape.split("x"))
        for isa in isas:
            ms = measure(m, n, k, isa, target, args.rounds)
            lines.append(f"| {m} × {n} × {k} | {gemm.ENGINE_NAMES[isa]} | {ms['rows']:.2f} | {ms['panels']:.2f} | "
                         f"{ms['panels'] / ms['rows']:.3f} | {2 * m * n * k / ms['panels'] / 1e6:.0f} |")
            print(lines[-1], flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"# Vector-engine GEMMs: weight rows against column panels\n\n{hardware.cpu_model()}, {os.cpu_count()} cores, {args.rounds} interleaved "
                               f"rounds, default tiles.\n\n```bash\npython tools/bench_gemm.py {shlex.join(sys.argv[1:])}\n```\n\n"
                               + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
