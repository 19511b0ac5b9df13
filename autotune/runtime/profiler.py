"""Per-kernel times of a compiled module: where a call's time goes.

The Relax VM calls an instrument before and after each kernel; we time each call (synchronising
the device on a GPU) and, with the per-kernel FLOP counts the build stored in the metadata,
report GFLOP/s and the share of the whole call. Timing each kernel apart adds a few
microseconds per kernel, so the sum is a little above the module's plain latency.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass
class KernelTime:
    name: str
    calls: int  # per module call
    ms: float  # per module call, all calls of this kernel together (median over runs)
    gflop: float | None  # per module call, all calls together; None when the build did not count it

    @property
    def gflops(self) -> float | None:
        return self.gflop / self.ms * 1e3 if self.gflop and self.ms > 0 else None


@dataclass
class Profile:
    kernels: list[KernelTime]  # slowest first
    total_ms: float

    def largest(self) -> KernelTime | None:
        """The kernel whose single call does the most floating-point work (e.g. a block's FFN matmul)."""
        counted = [k for k in self.kernels if k.gflop and k.calls]
        return max(counted, key=lambda k: k.gflop / k.calls) if counted else None

    def format(self, top: int = 15, peak_gflops: float | None = None) -> str:
        head = f"{'kernel':<56} {'calls':>5} {'ms':>9} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8}"
        if peak_gflops:
            head += f" {'% peak':>6}"
        lines = [head]
        for k in self.kernels[:top]:
            rate = k.gflops
            row = (
                f"{k.name[:56]:<56} {k.calls:>5} {k.ms:>9.3f} {k.ms / self.total_ms:>6.1%} "
                f"{(f'{k.gflop:.2f}' if k.gflop else '-'):>8} {(f'{rate:.1f}' if rate else '-'):>8}"
            )
            if peak_gflops:
                row += f" {(f'{rate / peak_gflops:.0%}' if rate else '-'):>6}"
            lines.append(row)
        rest = self.kernels[top:]
        if rest:
            lines.append(f"{f'({len(rest)} more)':<56} {sum(k.calls for k in rest):>5} {sum(k.ms for k in rest):>9.3f}")
        lines.append(f"{'total (kernels timed one by one)':<56} {'':>5} {self.total_ms:>9.3f}")
        return "\n".join(lines)


def profile_vm(vm, main_args: list, device, kernel_flops: dict[str, float], repeat: int = 5) -> Profile:
    """Run vm["main"](*main_args) once to warm up, then `repeat` times with every kernel timed."""
    runs: list[dict[str, float]] = []
    counts: dict[str, int] = defaultdict(int)
    started: list[float] = []
    current: dict[str, float] = defaultdict(float)

    def instrument(func, name, before_run, ret_value, *args):
        device.sync()
        if before_run:
            started.append(time.perf_counter())
        else:
            current[name] += time.perf_counter() - started.pop()
            counts[name] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: go on as usual

    main = vm["main"]
    main(*main_args)  # warm-up, untimed
    vm.set_instrument(instrument)
    try:
        for _ in range(repeat):
            current.clear()
            main(*main_args)
            runs.append(dict(current))
    finally:
        vm.set_instrument(None)
    kernels = []
    for name in runs[0]:
        ms = statistics.median(r.get(name, 0.0) for r in runs) * 1e3
        calls = counts[name] // repeat
        flops = kernel_flops.get(name)
        kernels.append(KernelTime(name, calls, ms, flops * calls / 1e9 if flops else None))
    kernels.sort(key=lambda k: -k.ms)
    return Profile(kernels, float(np.sum([k.ms for k in kernels])))

