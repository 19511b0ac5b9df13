"""`autotune tune`."""

from __future__ import annotations

from autotune.support import defaults

from .common import (
    Steps,
    add_log_arg,
    add_model_args,
    add_pass_args,
    add_target_arg,
    load_model_source,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search schedules with MetaSchedule; records are appended to the log as measured (Ctrl-C safe, resumable)",
        description="Tune every kernel of the model for a target. Each measured candidate is appended to LOG at once; "
        "an interrupted run loses at most the batch in flight, and re-running the same command resumes from the log, "
        "spending only the new --trials.",
    )
    add_model_args(p)
    add_target_arg(p)
    add_log_arg(p, f"tuning log directory, created if missing and appended to (default {defaults.LOG_DIR}/)")
    add_pass_args(p)
    p.add_argument("--no-shipped-log", action="store_true",
                   help="ignore the tuning log autotune ships for the target (schedules/FAMILY); by default its records start the search)")
    p.add_argument("--trials", type=int, default=defaults.TRIALS, help=f"new measured candidates in this run, all kernels together (default {defaults.TRIALS}; 0: only re-measure the log's best schedules)")
    p.add_argument("--trials-per-task", type=int, help="cap per kernel (default: twice an even share)")
    p.add_argument("--trials-per-iter", type=int, default=defaults.TRIALS_PER_ITER, help=f"candidates measured per batch (default {defaults.TRIALS_PER_ITER})")
    p.add_argument("--run-timeout", type=float, default=defaults.RUN_TIMEOUT_S, help=f"seconds one candidate's measurement may take (default {defaults.RUN_TIMEOUT_S:g})")
    p.add_argument("--build-timeout", type=float, default=defaults.BUILD_TIMEOUT_S, help=f"seconds one candidate's compilation may take (default {defaults.BUILD_TIMEOUT_S:g})")
    p.add_argument("--remeasure-rounds", type=int, default=defaults.REMEASURE_ROUNDS, metavar="N",
                   help="after the search, measure again the fastest schedules of each kernel holding "
                   f"{defaults.REMEASURE_MIN_SHARE * 100:g} %% or more of the model's time, beside its default schedule, in N interleaved "
                   "rounds; their medians replace the search's single times in the log, so the build does not pick a "
                   f"lucky measurement; a rival replaces the search's best only if its median is more than {defaults.REMEASURE_MARGIN * 100:g} %% "
                   f"lower (default {defaults.REMEASURE_ROUNDS}; 0: off)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on devices registered with this TVM RPC tracker")
    p.add_argument("--key", help="device key on the RPC tracker (with --rpc)")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.support.settings import TuneSettings
    from autotune.support.targets import resolve_target
    from autotune.tuning.tune import check_can_tune, tune

    settings = TuneSettings(
        trials=args.trials,
        trials_per_task=args.trials_per_task,
        trials_per_iter=args.trials_per_iter,
        run_timeout_s=args.run_timeout,
        build_timeout_s=args.build_timeout,
        remeasure_rounds=args.remeasure_rounds,
        quantize=args.quantize,
        winograd=args.winograd,
        rpc=args.rpc,
        rpc_key=args.key,
        shipped_log=not args.no_shipped_log,
    )
    check_can_tune(resolve_target(args.target), settings)  # bad settings, target or device: said before the import
    steps = Steps(2)
    steps(f"import {args.model} ({args.component})")
    source, _ = load_model_source(args)
    print(source.summary())
    steps(f"tune for {args.target}: {args.trials} new trials into {args.log}")
    print(settings)
    try:
        report = tune(source.tune_units(), args.target, args.log, settings)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every record measured so far is in {args.log}; run the same command to resume")
        return 130
    for warning in report.warnings():
        print(f"warning: {warning}")
    print(report.summary())
    return 0
