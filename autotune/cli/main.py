"""The `autotune` command line: the parser made of each command's module, and error rendering."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from autotune.support.errors import AutotuneError

from . import (
    bench,
    build,
    compact,
    demo,
    generate,
    import_model,
    inspect,
    merge,
    models,
    rpc,
    run,
    targets,
    tune,
)

# In the order `autotune --help` lists them.
COMMANDS = [models, targets, import_model, tune, build, run, merge, compact, inspect, bench, rpc, generate, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotune",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hardware-aware auto-tuning for image-to-video diffusion models: import a model into TVM Relax, "
        "tune it with MetaSchedule (XGBoost cost model) for a target, build a shippable .so, run it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time: a live progress bar (rich) redirects it to print
    lines above the bar."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def show_library_logs() -> None:
    """Print what the library logs at INFO and above (progress notes, warnings) as plain lines."""
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("autotune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        # Engines take turns in one process: an OpenMP pool that spins after its call (torch's
        # default) steals the cores from the next engine. Make every pool sleep when idle.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    show_library_logs()
    try:
        return args.func(args)
    except AutotuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `autotune targets | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
