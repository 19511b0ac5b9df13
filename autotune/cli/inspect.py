"""`autotune inspect`."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show an artifact's metadata, or summarise a tuning log directory")
    p.add_argument("path", help="an artifact .so/.json, or a log directory")
    p.add_argument("--target", help="with a log directory: count only records for this target")
    p.set_defaults(func=run)


def run(args) -> int:
    path = Path(args.path)
    if path.is_dir():
        from autotune.support.targets import resolve_target
        from autotune.tuning.log import read_log

        target = resolve_target(args.target).tvm_target() if args.target else None
        report, _ = read_log(path, target)
        print(f"{path}: {report.summary()}")
        for problem in report.problems:
            print(f"  skipped {problem}")
        return 0
    from autotune.runtime.artifact import ArtifactPaths, read_metadata

    print(json.dumps(read_metadata(ArtifactPaths.for_library(path)), indent=2))
    return 0
