"""`autotune bench`."""

from __future__ import annotations

import sys
from pathlib import Path

from autotune.support import defaults
from autotune.support.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="torch eager / torch.compile / ONNX Runtime / OpenVINO / TVM untuned / TVM tuned (+quantized) side by side",
        description="Measure every engine at every --precision on the same inputs and threads, interleaved, in one run; "
        "report median latency, ratio to torch eager at the same precision, GFLOP/s, fraction of the GEMM peak at the "
        "row's precision measured in the same run, and fidelity against float32 torch eager. OpenVINO is optional "
        "(pip install openvino); without it its rows say so. Writes OUT/bench.md, bench.json and bench.png.",
    )
    p.add_argument("--workloads", default=defaults.BENCH_WORKLOADS,
                   help="comma-separated: tiny-transformer, tiny-vae-decoder, tiny-image-encoder, dit-block, vae-up-block")
    p.add_argument("--log", help="a tuning log for the tuned builds, beside the shipped one for x86 (schedules/x86), "
                   "which they always apply")
    p.add_argument("--precision", default=defaults.BENCH_PRECISION,
                   help=f"comma-separated precisions, every engine measured at each (default {defaults.BENCH_PRECISION}): "
                   "fp32, bf16, int8. Inputs and outputs stay float32. At bf16, torch eager and torch.compile run a bfloat16 copy "
                   "of the module (inputs cast in, output cast back), ONNX Runtime runs its export (its CPU provider has no "
                   "bf16 kernels: the row says why it has no time), OpenVINO compiles with INFERENCE_PRECISION_HINT bf16 "
                   "and TVM builds with --quantize bf16. At int8 each engine quantizes the linears its own way: torch "
                   "quantize_dynamic, ONNX Runtime quantize_dynamic, OpenVINO int8 weights from NNCF (pip install nncf), "
                   "TVM --quantize w8a8. Each row's ratio is to torch eager at its precision, its %% of "
                   "peak to the GEMM peak at its precision, its fidelity to float32 torch eager")
    p.add_argument("--quantize", action="append", help="also measure TVM tuned + this mode (repeatable), beside the "
                   "fp32 rows: ratio to float32 torch eager, %% of the SGEMM peak")
    p.add_argument("--rounds", type=int, default=defaults.BENCH_ROUNDS, help=f"interleaved timing rounds (default {defaults.BENCH_ROUNDS})")
    p.add_argument("--min-seconds", type=float, default=defaults.BENCH_MIN_SECONDS, metavar="S",
                   help="after --rounds, go on with rounds until each workload's have taken S seconds, so that a burst of "
                   "other work on a shared machine hits a minority of a fast model's rounds (at most "
                   f"{defaults.BENCH_MAX_ROUNDS} rounds; default {defaults.BENCH_MIN_SECONDS:g}; 0: exactly --rounds)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes on big workloads)")
    p.add_argument("-o", "--output", default=defaults.BENCH_OUT_DIR, help=f"directory for bench.md/json/png (default {defaults.BENCH_OUT_DIR})")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.bench.harness import (
        TVM,
        OnnxRuntime,
        OpenVINO,
        TorchCompile,
        TorchEager,
        parse_precisions,
        run_bench,
        write_results,
    )

    precisions = parse_precisions(args.precision)
    if args.quantize and "fp32" not in precisions:
        raise InputError("--quantize rows are measured beside the fp32 rows: add fp32 to --precision (e.g. --precision fp32,bf16)")

    engines = [TorchEager()]
    if not args.no_compile:
        engines.append(TorchCompile())
    if args.log and not Path(args.log).is_dir():
        raise InputError(f"--log {args.log}: no such tuning log directory")
    engines += [OnnxRuntime(), OpenVINO(), TVM(), TVM(log=args.log, tuned=True)]
    for mode in args.quantize or []:
        engines.append(TVM(log=args.log, quantize=mode, tuned=True, label=f"TVM tuned + {mode}"))
    rows, peak = run_bench(args.workloads.split(","), engines, rounds=args.rounds, precisions=precisions, min_seconds=args.min_seconds)
    command = "autotune bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "autotune bench"
    path = write_results(rows, peak, Path(args.output), command)
    print(f"results: {path} (+ bench.json, bench.png)")
    return 0
