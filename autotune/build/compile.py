"""Build: apply the tuning log, schedule what it does not cover, compile, export the artifact."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from autotune import __version__
from autotune.frontend.importer import ImportedModel
from autotune.passes.pipeline import (
    fuse_for_target,
    lower,
    pack_for_target,
    prepare_model,
)
from autotune.runtime.artifact import ArtifactPaths, save_weights, write_metadata
from autotune.support.errors import BuildFailed
from autotune.support.ir import is_scheduled, prim_funcs
from autotune.support.settings import BuildSettings
from autotune.support.targets import TargetPreset, resolve_target
from autotune.tuning.log import TuningLog, log_digest

from .export import codegen_context, export
from .fallback import schedule_untuned


@dataclass
class BuildReport:
    paths: ArtifactPaths
    kernels: int
    tuned_kernels: int
    fallback_kernels: int
    log_records: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.paths.library}: {self.kernels} kernels, {self.tuned_kernels} from the tuning log, "
            f"{self.fallback_kernels} fallback-scheduled; built in {self.seconds:.1f} s"
        )


def apply_log(fused: tvm.IRModule, target, log_dir: str | Path) -> tuple[tvm.IRModule, int, TuningLog]:
    """Replace each fused kernel that the log has a record for by its best schedule."""
    database = TuningLog(log_dir, target)
    with target, database, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
    count = sum(1 for f in prim_funcs(applied).values() if is_scheduled(f))
    return applied, count, database


def count_kernel_flops(mod: tvm.IRModule) -> dict[str, float]:
    """FLOPs of one call of each kernel (for the profiler's GFLOP/s); kernels it cannot count are left out."""
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = {}
    for name, func in prim_funcs(mod).items():
        try:
            flops[name] = float(estimate_tir_flops(tvm.IRModule({"main": func})))
        except Exception:  # e.g. data-dependent loops: no count, the profile shows time only
            continue
    return flops


def compile_module(imported: ImportedModel, preset: TargetPreset, log_dir=None, seed: int = 0, kernel_flops: dict | None = None):
    """Fuse, apply the log, fallback-schedule the rest, pack weights, lower.

    Returns (executable, stats, notes, weights): `weights` are what the executable's main takes
    after the inputs (imported.weights, with large matrices packed for the tuned kernels).
    `kernel_flops`, when given, is filled with the FLOPs of one call of each kernel."""
    target = preset.tvm_target()
    fused = fuse_for_target(imported.mod, target)
    kernels = len(prim_funcs(fused))
    notes: list[str] = []
    tuned = records = 0
    if log_dir is not None and Path(log_dir).exists():
        fused, tuned, database = apply_log(fused, target, log_dir)
        records = database.report.records
        notes += [f"log: {p}" for p in database.report.problems]
        if records and not tuned:
            notes.append(
                f"the log {log_dir} has {records} records for this target but none matches a kernel of this "
                "module: it was tuned for another model, shape or quantization mode. Nothing tuned was applied."
            )
    elif log_dir is not None:
        notes.append(f"log directory {log_dir} does not exist: building untuned")
    fused, fallback = schedule_untuned(fused, target, seed=seed)
    fused, weights, packed = pack_for_target(fused, imported.weights, len(imported.inputs))
    if packed:
        notes.append(f"{packed} weight matrices packed at build time into the layout their tuned kernels read")
    if kernel_flops is not None:
        kernel_flops.update(count_kernel_flops(fused))
    lowered = lower(fused, target)
    with codegen_context(preset):
        executable = tvm.compile(lowered, target=target, relax_pipeline=None)
    return executable, (kernels, tuned, fallback, records), notes, weights


def build(
    imported: ImportedModel,
    target: str | dict | TargetPreset,
    output: str | Path,
    log_dir: str | Path | None = None,
    settings: BuildSettings | None = None,
    extra_metadata: dict | None = None,
) -> BuildReport:
    """Compile `imported` for `target` into the artifact `output` (NAME.so, NAME.weights..., NAME.json)."""
    settings = settings or BuildSettings()
    preset = resolve_target(target)
    started = time.time()
    paths = ArtifactPaths.for_library(output)
    passes: list[dict] = []
    weights_before = imported.weight_bytes()
    imported, info = prepare_model(imported, preset, settings.quantize)
    if info:
        passes.append(info)
    try:
        kernel_flops: dict[str, float] = {}
        executable, (kernels, tuned, fallback, records), notes, weights = compile_module(imported, preset, log_dir, kernel_flops=kernel_flops)
    except Exception as exc:
        raise BuildFailed(f"compiling {imported.source} for {preset.name} failed: {type(exc).__name__}: {exc}") from exc
    notes += export(executable, paths, preset)
    save_weights(paths.weights, weights)
    metadata = {
        "name": paths.library.stem,
        "source": imported.source,
        "target": {"preset": preset.name, "family": preset.family, "device": preset.device, "tvm": str(tvm.target.Target(preset.resolved_target_dict()))},
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": [s.to_json() for s in imported.outputs],
        "weights": list(weights),
        "weight_bytes": {"before": weights_before, "after": sum(int(w.nbytes) for w in weights.values())},
        "passes": passes,
        "kernels": {"total": kernels, "tuned": tuned, "fallback": fallback, "flops": kernel_flops},
        "tuning_log": {"dir": str(log_dir) if log_dir else None, "digest": log_digest(log_dir) if log_dir else None, "records": records},
        "versions": {"autotune": __version__, "tvm": tvm.__version__},
        "settings": settings.to_json(),
        **(extra_metadata or {}),
    }
    write_metadata(paths, metadata)
    return BuildReport(paths, kernels, tuned, fallback, records, time.time() - started, notes)
