"""Settings with named defaults (from `defaults`), one dataclass per job; each prints itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from . import defaults
from .errors import InputError


class _Printable:
    def __str__(self) -> str:
        rows = [f"  {f.name:<24} {getattr(self, f.name)!r}" for f in fields(self)]
        return f"{type(self).__name__}:\n" + "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TuneSettings(_Printable):
    trials: int = defaults.TRIALS  # new measured candidates this run (all tasks together)
    trials_per_task: int | None = None  # cap per task; None: 2 × an even share, at least one batch
    trials_per_iter: int = defaults.TRIALS_PER_ITER  # candidates per measured batch (one batch is lost at most on a crash)
    build_workers: int = defaults.BUILD_WORKERS
    build_timeout_s: float = defaults.BUILD_TIMEOUT_S
    run_timeout_s: float = defaults.RUN_TIMEOUT_S  # bound on one candidate's measurement
    runs_per_measurement: int = defaults.RUNS_PER_MEASUREMENT
    min_repeat_ms: int = defaults.MIN_REPEAT_MS
    seed: int | None = defaults.SEED
    light_task_share: float = defaults.LIGHT_TASK_SHARE  # kernels under this share of the module's FLOPs are "light":
    light_task_trials: int = defaults.LIGHT_TASK_TRIALS  # they get one batch this size (when the log has none), the rest goes to the heavy ones
    remeasure_rounds: int = defaults.REMEASURE_ROUNDS  # see tuning/remeasure.py; 0: keep the search's times
    remeasure_top: int = defaults.REMEASURE_TOP
    remeasure_min_share: float = defaults.REMEASURE_MIN_SHARE
    remeasure_margin: float = defaults.REMEASURE_MARGIN
    quantize: str | None = None  # tune the kernels of this quantization mode (as `build --quantize` makes them)
    winograd: bool = True  # 3x3 convolutions as Winograd GEMMs where the CPU pass takes them (as the build's)
    rpc: str | None = None  # "HOST:PORT" of a TVM RPC tracker
    rpc_key: str | None = None
    shipped_log: bool = True  # start the search from the records autotune ships for this target

    def __post_init__(self):
        for name in ("trials", "remeasure_rounds", "build_workers", "runs_per_measurement"):
            least = 0 if name in ("trials", "remeasure_rounds") else 1
            if getattr(self, name) < least:
                raise InputError(f"{name} must be >= {least}, got {getattr(self, name)}")
        for name in ("remeasure_min_share", "remeasure_margin"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("trials_per_iter", "trials_per_task", "light_task_trials", "remeasure_top"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1, got {value}")
        for name in ("build_timeout_s", "run_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


@dataclass
class BuildSettings(_Printable):
    quantize: str | None = None  # see autotune.passes.quantize.MODES
    winograd: bool = True  # 3x3 convolutions as Winograd GEMMs on CPUs (passes/winograd.py); False: direct / im2col
    prune: str | None = None  # recorded only: pruning happens on the torch model before import
    shipped_log: bool = True  # apply the records autotune ships for this target (beside any log given)
