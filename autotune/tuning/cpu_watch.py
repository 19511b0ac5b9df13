"""Whether anything else used the CPU while tuning measured: other processes, or the hypervisor.

A schedule measured while another process (a test run, a second tuning job) or a noisy
neighbour on the same host (the VM's "steal" time) takes CPU time measures slow, and can lose to
a worse schedule for good; the log keeps it. Nothing in MetaSchedule's numbers shows this, so the
tuner watches the machine instead: between two measured batches it takes the CPU time the whole
machine spent busy (/proc/stat, steal included) minus the CPU time of the tuning process and its
descendants (the builder and runner workers), in cores. Linux only; elsewhere it watches nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

DISTURBED_CORES = 0.5  # other work above this (in cores, averaged over a batch) marks the batch disturbed
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent on anything but idle and I/O wait (steal counts as busy)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def _tree_seconds(root: int) -> float:
    """CPU seconds of process `root` and its descendants: each living one's user + system time,
    plus that of the children it has reaped (so a worker that exits keeps counting)."""
    parents, times = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        rest = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        pid = int(entry.name)
        parents[pid] = int(rest[1])
        times[pid] = sum(int(x) for x in rest[11:15]) / _CLOCK_TICKS  # utime, stime, cutime, cstime
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


@dataclass
class CpuWatch:
    """Laps of other work, in cores: `lap()` after each measured batch."""

    root: int = field(default_factory=os.getpid)
    laps: list[float] = field(default_factory=list)  # other work per lap, in cores

    def __post_init__(self):
        self._last = self._sample()

    def _sample(self):
        busy = _machine_busy_seconds()
        return None if busy is None else (time.monotonic(), busy, _tree_seconds(self.root))

    def lap(self) -> float | None:
        """Cores of other work since the previous lap (None where the machine cannot be read)."""
        now = self._sample()
        if now is None or self._last is None:
            return None
        (t0, busy0, ours0), (t1, busy1, ours1) = self._last, now
        self._last = now
        if t1 - t0 <= 0:
            return None
        other = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)
        self.laps.append(other)
        return other

    def disturbed(self) -> list[float]:
        return [cores for cores in self.laps if cores > DISTURBED_CORES]

    def warning(self) -> str | None:
        """What to tell the user when measurements were disturbed, else None."""
        hit = self.disturbed()
        if not hit:
            return None
        return (
            f"other work used the CPU while tuning measured: {len(hit)} of {len(self.laps)} measured batches ran beside "
            f"{sum(hit) / len(hit):.1f} cores of other processes or hypervisor steal on average (at most {max(hit):.1f}). "
            "Kernels measured then may have kept a slower schedule. Tune on a quiet machine; running the same "
            "command again adds new measurements, and each kernel's fastest record is the one used."
        )
