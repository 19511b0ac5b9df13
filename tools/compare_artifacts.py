"""Built artifacts of one model side by side: interleaved rounds in one process, ratios to the first.

    python tools/compare_artifacts.py out/fp32/m.so out/w8a8/m.so [more.so ...] [--rounds 15]

Every artifact gets the same random inputs (from the first one's signature) through the runtime
API a user calls (`autotune.load(...)(**inputs)`). Each round runs every artifact, in a shuffled
order, for at least `--round-ms` of calls; a round's figure is its mean per call, and the table
shows the median over rounds and the ratio to the first artifact. For A/B checks of a change on a
shared, noisy machine (whole-model peers: `autotune bench`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import autotune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", help="NAME.so files built for this machine, same inputs")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--round-ms", type=float, default=50.0, help="time each artifact runs per round")
    args = parser.parse_args()
    modules = [autotune.load(path) for path in args.artifacts]
    inputs = modules[0].random_inputs()
    for module in modules:  # warm-up
        for _ in range(20):
            module(**inputs)
    per_call = {path: [] for path in args.artifacts}
    for r in range(args.rounds):
        order = list(zip(args.artifacts, modules))
        random.Random(r).shuffle(order)
        for path, module in order:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.round_ms / 1e3:
                module(**inputs)
                calls += 1
            per_call[path].append((time.perf_counter() - start) / calls * 1e3)
    base = statistics.median(per_call[args.artifacts[0]])
    print(f"{'median ms':>10}  {'ratio':>6}  artifact   ({args.rounds} interleaved rounds)")
    for path in args.artifacts:
        median = statistics.median(per_call[path])
        print(f"{median:10.4f}  {median / base:5.2f}x  {path}")


if __name__ == "__main__":
    main()
