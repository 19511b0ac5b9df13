"""`autotune build`."""

from __future__ import annotations

import json
from pathlib import Path

from autotune.support import defaults

from .common import (
    Steps,
    add_log_arg,
    add_model_args,
    add_pass_args,
    add_target_arg,
    build_one,
    load_model_source,
    report_fidelity,
    tune_command,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build",
        help="apply the tuning log, compile, and export NAME.so + NAME.weights.safetensors + NAME.json",
        description="Build an artifact. Kernels with a record in --log or in the log autotune ships for the target "
        "(schedules/FAMILY; --no-shipped-log to leave it out) get their best schedule; the rest get a fallback "
        "schedule. Weights are saved beside the library, never baked into it.",
    )
    add_model_args(p)
    add_target_arg(p)
    add_log_arg(p, f"tuning log directory to apply (default {defaults.LOG_DIR}/; missing: build untuned)")
    p.add_argument("-o", "--output", default=defaults.OUT_DIR, help=f"output directory (default {defaults.OUT_DIR}/); the artifact goes to OUT/MODEL-TARGET/COMPONENT.so")
    add_pass_args(p)
    p.add_argument("--no-shipped-log", action="store_true",
                   help="ignore the tuning log autotune ships for the target (schedules/FAMILY); by default its records apply, beside --log)")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.support.settings import BuildSettings
    from autotune.support.targets import resolve_target

    settings = BuildSettings(quantize=args.quantize, prune=args.prune, winograd=args.winograd,
                             shipped_log=not args.no_shipped_log)
    preset = resolve_target(args.target)  # a bad --target fails before the import
    steps = Steps(3)
    steps(f"import {args.model} ({args.component})")
    source, prune_info = load_model_source(args)
    print(source.summary())
    shipped = "the shipped log" if settings.shipped_log else "no shipped log"
    steps(f"build for {args.target} with the log {args.log} and {shipped}")
    print(settings)
    log = args.log if args.log != defaults.LOG_DIR or Path(args.log).is_dir() else None  # no logs/ yet: fine
    report = build_one(source, args.target, args.output, log, settings, {"prune": prune_info} if prune_info else None)
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    if report.tensor_cores is not None:
        print("tensor cores (SASS of the embedded fatbin):")
        print("\n".join(report.tensor_cores.lines()))
    if report.fallback_kernels:
        print(f"{report.fallback_kernels} of {report.kernels} kernels have no tuning record and run fallback schedules "
              f"(slower); tune them with:\n  {tune_command(args, report.fallback_kernels)}")
    meta = json.loads(report.paths.metadata.read_text())
    before, after = meta["weight_bytes"]["before"], meta["weight_bytes"]["after"]
    if after < before:
        change = f"{before / max(after, 1):.2f}x smaller"
    elif after > before:
        change = (f"{after / max(before, 1):.2f}x larger: copies made at build time (packed, sliced) ship beside "
                  "weights still used as they are")
    else:
        change = "unchanged"
    print(f"weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({change})")
    steps("fidelity against the fp32 torch reference on the example inputs")
    if preset.is_gpu:
        print(f"a {preset.device} artifact runs where the GPU is: measure its fidelity there "
              f"(`autotune run {report.paths.library} --device {preset.device}`)")
    elif args.quantize or args.prune:
        if report_fidelity(source, report) is None:
            print("no torch reference for a model file: fidelity not measured")
    else:
        print("no quantization or pruning: the build is fp32 (checked by the test suite, not here)")
    return 0
