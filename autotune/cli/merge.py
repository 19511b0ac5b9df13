"""`autotune merge`."""

from __future__ import annotations

from pathlib import Path

from autotune.support import defaults
from autotune.support.errors import InputError

from .common import add_log_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="append the records of other tuning logs to a log",
        description="Copy into --log the records (and workloads) of each SRC log that it lacks, e.g. logs tuned "
        "on separate machines of one kind, or a kernel tuned alone. Safe while --log is being tuned into.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="tuning log directories to read")
    add_log_arg(p, f"tuning log directory to append to (default {defaults.LOG_DIR}/)")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.tuning.log import merge_log

    for src in args.sources:
        if not Path(src).is_dir():
            raise InputError(f"{src}: not a tuning log directory (expected workloads.jsonl and records.jsonl in it)")
        report = merge_log(src, args.log)
        print(f"{src} -> {args.log}: {report.summary()}")
        for problem in report.problems:
            print(f"  skipped {problem}")
    return 0
