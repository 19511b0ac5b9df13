"""`autotune demo`."""

from __future__ import annotations

import time
from pathlib import Path

from autotune.support import defaults

from .common import (
    Steps,
    add_log_arg,
    add_model_args,
    add_target_arg,
    build_one,
    load_model_source,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the embedded default: tune briefly, build, run, report speed-up and error vs torch",
    )
    add_model_args(p)
    add_target_arg(p)
    add_log_arg(p, f"tuning log directory (default {defaults.LOG_DIR}/)")
    p.add_argument("-o", "--output", default=defaults.OUT_DIR, help=f"output directory (default {defaults.OUT_DIR}/)")
    p.add_argument("--trials", type=int, default=defaults.DEMO_TRIALS, help=f"tuning trials (default {defaults.DEMO_TRIALS})")
    p.add_argument("--repeat", type=int, default=defaults.DEMO_REPEAT, help=f"timed runs per build (default {defaults.DEMO_REPEAT})")
    p.set_defaults(func=run)


def run(args) -> int:
    """Tune briefly, build untuned and tuned, compare both with torch and with each other."""
    import numpy as np

    from autotune.runtime.loader import load
    from autotune.support.settings import BuildSettings, TuneSettings
    from autotune.support.targets import resolve_target
    from autotune.tuning.tune import tune

    resolve_target(args.target)  # a bad --target fails before the import
    settings = TuneSettings(trials=args.trials)
    steps = Steps(5)
    started = time.time()
    steps(f"import {args.model} ({args.component}) from torch")
    source, _ = load_model_source(args)
    print(source.summary())
    reference = source.reference_outputs()
    steps(f"build untuned (fallback schedules, no tuning log) for {args.target}")
    untuned = build_one(source, args.target, str(Path(args.output) / "untuned"), None, BuildSettings(shipped_log=False))
    print(untuned.summary())
    steps(f"tune {args.trials} trials for {args.target} into {args.log}")
    report = tune(source.tune_units(), args.target, args.log, settings)
    for warning in report.warnings():
        print(f"warning: {warning}")
    print(report.summary())
    steps("build with the tuning logs (this run's and the shipped one)")
    tuned = build_one(source, args.target, args.output, args.log, BuildSettings())
    for note in tuned.notes:
        print(f"note: {note}")
    print(tuned.summary())
    steps("run both, compare with torch eager")
    rows = []
    for label, built in (("untuned", untuned), ("tuned", tuned)):
        module = load(built.paths.library)
        outs = module(**source.example_inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        err = max(float(np.max(np.abs(o - r))) for o, r in zip(outs, reference)) if reference else float("nan")
        timing = module.benchmark(source.example_inputs, repeat=args.repeat)
        rows.append((label, timing["median_ms"], err))
    eager_ms = torch_eager_ms(source, args.repeat) if source.reference is not None else None
    for label, ms, err in rows:
        print(f"{label:>12}: {ms:9.3f} ms   max |error| vs torch {err:.2e}")
    if eager_ms is not None:
        print(f"{'torch eager':>12}: {eager_ms:9.3f} ms   (the reference, same inputs and threads)")
    tuned_ms = rows[1][1]
    print(f"tuned vs untuned speed-up: {rows[0][1] / tuned_ms:.2f}x")
    if eager_ms is not None:
        print(f"tuned vs torch eager: {eager_ms / tuned_ms:.2f}x {'faster' if tuned_ms < eager_ms else 'slower'}")
    print(f"(artifact: {tuned.paths.library}; total {time.time() - started:.0f} s)")
    return 0


def torch_eager_ms(source, repeat: int) -> float:
    """Median milliseconds of the torch reference on the example inputs (float32, TVM's thread count)."""
    import statistics

    import torch

    from autotune.support.threads import configure_threads

    torch.set_num_threads(configure_threads())
    inputs = [torch.from_numpy(v) for v in source.example_inputs.values()]
    times = []
    with torch.no_grad():
        for i in range(repeat + 3):
            t0 = time.perf_counter()
            source.reference(*inputs)
            if i >= 3:  # warm-up calls are not counted
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
