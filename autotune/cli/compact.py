"""`autotune compact`."""

from __future__ import annotations

from pathlib import Path

from autotune.support import defaults
from autotune.support.errors import InputError

from .common import add_log_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compact",
        help="gzip a tuning log's lines (a tenth of the bytes; nothing changes for its readers)",
        description="Move the lines of --log's workloads.jsonl and records.jsonl, as they are, into "
        "workloads.jsonl.gz and records.jsonl.gz. Tuning, building and merging read both parts and find the "
        "same records; new records are appended to the plain files as before. Safe while the log is being "
        "tuned into (the tuner waits). The shipped logs are compacted this way.",
    )
    add_log_arg(p, f"tuning log directory to compact (default {defaults.LOG_DIR}/)")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.tuning.log import compact_log

    if not Path(args.log).is_dir():
        raise InputError(f"{args.log}: no such tuning log directory (give one with --log)")
    report = compact_log(args.log)
    print(f"{args.log}: {report.summary() or 'nothing to compact (the plain files are empty)'}")
    return 0
