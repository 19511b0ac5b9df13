"""`autotune bench`."""

from __future__ import annotations

import sys
from pathlib import Path

from autotune.support import defaults
from autotune.support.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="torch eager / torch.compile / ONNX Runtime / TVM untuned / TVM tuned (+quantized) side by side",
        description="Measure every engine on the same inputs and threads, interleaved, in one run; report median "
        "latency, ratio to torch eager, GFLOP/s, fraction of the SGEMM peak measured in the same run, and fidelity. "
        "Writes OUT/bench.md, bench.json and bench.png.",
    )
    p.add_argument("--workloads", default=defaults.BENCH_WORKLOADS,
                   help="comma-separated: tiny-transformer, tiny-vae-decoder, tiny-image-encoder, dit-block, vae-up-block")
    p.add_argument("--log", help="a tuning log for the tuned builds, beside the shipped one for x86 (schedules/x86), "
                   "which they always apply")
    p.add_argument("--quantize", action="append", help="also measure TVM tuned + this mode (repeatable)")
    p.add_argument("--rounds", type=int, default=defaults.BENCH_ROUNDS, help=f"interleaved timing rounds (default {defaults.BENCH_ROUNDS})")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes on big workloads)")
    p.add_argument("-o", "--output", default=defaults.BENCH_OUT_DIR, help=f"directory for bench.md/json/png (default {defaults.BENCH_OUT_DIR})")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.bench.harness import (
        TVM,
        OnnxRuntime,
        TorchCompile,
        TorchEager,
        run_bench,
        write_results,
    )

    engines = [TorchEager()]
    if not args.no_compile:
        engines.append(TorchCompile())
    if args.log and not Path(args.log).is_dir():
        raise InputError(f"--log {args.log}: no such tuning log directory")
    engines += [OnnxRuntime(), TVM(), TVM(log=args.log, tuned=True)]
    for mode in args.quantize or []:
        engines.append(TVM(log=args.log, quantize=mode, tuned=True, label=f"TVM tuned + {mode}"))
    rows, peak = run_bench(args.workloads.split(","), engines, rounds=args.rounds)
    command = "autotune bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "autotune bench"
    path = write_results(rows, peak, Path(args.output), command)
    print(f"results: {path} (+ bench.json, bench.png)")
    return 0
