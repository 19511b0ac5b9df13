"""Settings with named defaults, one dataclass per job; each prints itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class _Printable:
    def __str__(self) -> str:
        rows = [f"  {f.name:<24} {getattr(self, f.name)!r}" for f in fields(self)]
        return f"{type(self).__name__}:\n" + "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TuneSettings(_Printable):
    trials: int = 64  # new measured candidates this run (all tasks together)
    trials_per_task: int | None = None  # cap per task; None: 2 × an even share, at least one batch
    trials_per_iter: int = 16  # candidates per measured batch (one batch is lost at most on a crash)
    build_workers: int = 2
    build_timeout_s: float = 60.0
    run_timeout_s: float = 10.0  # bound on one candidate's measurement: a slow one costs at most this
    runs_per_measurement: int = 3
    min_repeat_ms: int = 20
    seed: int | None = 0
    light_task_share: float = 0.01  # kernels under this share of the module's FLOPs are "light":
    light_task_trials: int = 8  # they get one batch this size (when the log has none), the rest goes to the heavy ones
    quantize: str | None = None  # tune the kernels of this quantization mode (as `build --quantize` makes them)
    rpc: str | None = None  # "HOST:PORT" of a TVM RPC tracker
    rpc_key: str | None = None


@dataclass
class BuildSettings(_Printable):
    quantize: str | None = None  # see autotune.quantize.MODES
    prune: str | None = None  # recorded only: pruning happens on the torch model before import
