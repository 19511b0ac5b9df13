"""Build: apply the tuning log, schedule what it does not cover, compile, export the artifact."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from autotune import __version__
from autotune.frontend.importer import ImportedModel
from autotune.passes.pipeline import (
    fuse_for_target,
    lower,
    pack_for_target,
    prepare_model,
)
from autotune.passes.quantize import float16_storage
from autotune.runtime.artifact import ArtifactPaths, save_weights, write_metadata
from autotune.support.errors import BuildFailed
from autotune.support.hardware import required_cpu_flags
from autotune.support.ir import ATTENTION_ATTR, FLOPS_ATTR, is_scheduled, prim_funcs
from autotune.support.package_data import shipped_log_dir
from autotune.support.settings import BuildSettings
from autotune.support.targets import TargetPreset, resolve_target
from autotune.tuning.log import log_digest, read_logs, structure_key

from .export import codegen_context, export
from .fallback import schedule_untuned, unscheduled_kernels
from .sass import TensorCoreReport, check_tensor_cores


@dataclass
class BuildReport:
    paths: ArtifactPaths
    kernels: int
    tuned_kernels: int
    fallback_kernels: int
    log_records: int  # records read from the given log (the shipped log's are counted apart)
    seconds: float
    notes: list[str] = field(default_factory=list)
    naive_kernels: int = 0  # kernels no schedule could be found for: TVM's plain loop nests, slow
    tensor_cores: TensorCoreReport | None = None  # CUDA: tensor-core instructions per kernel, from the SASS

    def summary(self) -> str:
        naive = f", {self.naive_kernels} unscheduled (slow loop nests)" if self.naive_kernels else ""
        return (
            f"{self.paths.library}: {self.kernels} kernels, {self.tuned_kernels} from the tuning log, "
            f"{self.fallback_kernels} fallback-scheduled{naive}; built in {self.seconds:.1f} s"
        )


def apply_logs(fused: tvm.IRModule, target, log_dirs: list) -> tuple[tvm.IRModule, int, list[str], list[int]]:
    """Replace each fused kernel that a log has a record for by its best schedule.

    `log_dirs`: (directory, whole) pairs; a log read whole reports every line it skips, the others
    (the shipped log) are read for this module's kernels only.
    Returns (module, kernels scheduled from the logs, notes on skipped lines, records read per log)."""
    database = ms.database.MemoryDatabase(module_equality="structural")
    kernels = {structure_key(f) for f in prim_funcs(fused).values()}
    notes, counts = [], []
    sources = [(log_dir, None if whole else kernels) for log_dir, whole in log_dirs]
    reports = read_logs(sources, target, database, winners_only=True)  # a re-measured kernel: its winner
    for (log_dir, whole), (report, _) in zip(log_dirs, reports):
        counts.append(report.records + report.set_aside)  # the log's records for this target, winners or not
        notes += [f"log: {log_dir}: {line}" for line in report.problem_summary(other_targets=whole)]
    with target, database, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
    count = sum(1 for f in prim_funcs(applied).values() if is_scheduled(f))
    return applied, count, notes, counts


def tensor_core_kernels(fused: tvm.IRModule) -> dict:
    """The kernels that belong on tensor cores: GEMMs big enough for a fragment, and attention."""
    from autotune.kernels.matmul_cuda import tensor_core_gemm_dtype

    gemm, attention = {}, []
    for name, func in prim_funcs(fused).items():
        if func.attrs is not None and ATTENTION_ATTR in func.attrs:
            attention.append(name)
        elif (dtype := tensor_core_gemm_dtype(func)) is not None:
            gemm[name] = dtype
    return {"gemm_kernels": gemm, "attention_kernels": sorted(attention)}


def count_kernel_flops(mod: tvm.IRModule) -> dict[str, float]:
    """FLOPs of one call of each kernel (for the profiler's GFLOP/s); kernels it cannot count are left out."""
    from tvm.s_tir.analysis import estimate_tir_flops

    flops = {}
    for name, func in prim_funcs(mod).items():
        if func.attrs is not None and FLOPS_ATTR in func.attrs:
            flops[name] = float(func.attrs[FLOPS_ATTR])
            continue
        shape = func.attrs[ATTENTION_ATTR] if func.attrs is not None and ATTENTION_ATTR in func.attrs else {}
        if "bh" in shape:  # a CPU attention: its two GEMMs (TVM's count misses tensorized dot products)
            flops[name] = 2.0 * int(shape["bh"]) * int(shape["lq"]) * int(shape["lk"]) * (int(shape["d"]) + int(shape["dv"]))
            continue
        try:
            flops[name] = float(estimate_tir_flops(tvm.IRModule({"main": func})))
        except Exception:  # e.g. data-dependent loops: no count, the profile shows time only
            continue
    return flops


def compile_module(
    imported: ImportedModel,
    preset: TargetPreset,
    log_dir=None,
    seed: int = 0,
    shipped_log: bool = False,
    details: dict | None = None,
):
    """Fuse, apply the logs, fallback-schedule the rest, pack weights, lower.

    Returns (executable, stats, notes, weights): stats are (kernels, tuned, fallback, records read
    from `log_dir`); `weights` are what the executable's main takes after the inputs
    (imported.weights, with large matrices packed for the tuned kernels). `shipped_log` also applies
    the log autotune ships for the target's family (schedules/FAMILY). `details`, when given, is
    filled with the logs read ({"logs": {dir: records}}), CUDA's GEMM and attention kernels
    ({"gemm_kernels": {name: input dtype}, "attention_kernels": [names]}), the kernels left unscheduled
    ({"naive": [names]}), the FLOPs of one call of each kernel ({"flops": {name: flops}}) and the
    scheduled module before weight packing ({"scheduled": module}: `pack_for_target` of it packs
    other weights of the same shapes the same way)."""
    target = preset.tvm_target()
    fused = fuse_for_target(imported.mod, target)
    kernels = len(prim_funcs(fused))
    if details is not None and target.kind.name == "cuda":
        details.update(tensor_core_kernels(fused))
    notes: list[str] = []
    given = Path(log_dir).resolve() if log_dir is not None and Path(log_dir).exists() else None
    if log_dir is not None and given is None:
        notes.append(f"log directory {log_dir} does not exist: building without it")
    shipped = shipped_log_dir(preset.family) if shipped_log else None
    logs = [d for d in dict.fromkeys([shipped, given]) if d is not None]  # the shipped log once, if also given
    tuned, counts = 0, {}
    if logs:
        fused, tuned, log_notes, read = apply_logs(fused, target, [(d, d != shipped) for d in logs])
        notes += log_notes
        counts = dict(zip(map(str, logs), read))
        if sum(read) and not tuned:
            notes.append(
                f"the logs ({', '.join(counts)}) have {sum(read)} records for this target but none matches a kernel of "
                "this module: they were tuned for another model, shape or quantization mode. Nothing tuned was applied."
            )
    fused, fallback = schedule_untuned(fused, target, seed=seed)
    naive = unscheduled_kernels(fused)
    if naive:
        notes.append(
            f"{len(naive)} kernels got no schedule (no record, and no fallback schedule could be made) and run as "
            f"TVM's plain loop nests, slowly: {', '.join(naive[:8])}{' ...' if len(naive) > 8 else ''}. "
            "Tuning them (autotune tune with the same model and passes) gives them one."
        )
    scheduled = fused
    fused, weights, packed = pack_for_target(fused, imported.weights, len(imported.inputs))
    if packed:
        notes.append(f"{packed} weight matrices packed at build time into the layout their tuned kernels read")
    if details is not None:
        details.update(logs=counts, naive=naive, flops=count_kernel_flops(fused), scheduled=scheduled)
    lowered = lower(fused, target)
    with codegen_context(preset):
        executable = tvm.compile(lowered, target=target, relax_pipeline=None)
    return executable, (kernels, tuned, fallback, counts.get(str(given), 0)), notes, weights


def build(
    imported: ImportedModel,
    target: str | dict | TargetPreset,
    output: str | Path,
    log_dir: str | Path | None = None,
    settings: BuildSettings | None = None,
    extra_metadata: dict | None = None,
    details: dict | None = None,
) -> BuildReport:
    """Compile `imported` for `target` into the artifact `output` (NAME.so, NAME.weights..., NAME.json).

    `details`, when given, is filled as `compile_module` fills it."""
    settings = settings or BuildSettings()
    preset = resolve_target(target)
    started = time.time()
    paths = ArtifactPaths.for_library(output)
    passes: list[dict] = []
    weights_before = imported.weight_bytes()
    said_before = len(imported.notes)
    imported, info = prepare_model(imported, preset, settings.quantize, settings.winograd)
    if info:
        passes.append(info)
    details = {} if details is None else details
    try:
        executable, (kernels, tuned, fallback, records), notes, weights = compile_module(
            imported, preset, log_dir, shipped_log=settings.shipped_log, details=details
        )
    except Exception as exc:
        raise BuildFailed(f"compiling {imported.source} for {preset.name} failed: {type(exc).__name__}: {exc}") from exc
    notes = imported.notes[said_before:] + notes  # what the quantization and the engines did, first
    notes += export(executable, paths, preset)
    tensor_cores = None
    if preset.family == "cuda":
        tensor_cores, checked = check_tensor_cores(
            paths.library, details["gemm_kernels"], details["attention_kernels"], settings.quantize
        )
        notes += checked
    half = float16_storage(settings.quantize, preset)
    stored = save_weights(paths.weights, weights, float16=half)
    if half:
        info["weight_bytes_after"] = stored  # (the prepared model's were float32)
    metadata = {
        "name": paths.library.stem,
        "source": imported.source,
        "target": {
            "preset": preset.name,
            "family": preset.family,
            "device": preset.device,
            "tvm": str(tvm.target.Target(preset.resolved_target_dict())),
            # /proc/cpuinfo flags the library's CPU code needs: the runtime refuses a CPU without them
            "cpu_flags": required_cpu_flags(preset.tvm_target()),
        },
        "inputs": [s.to_json() for s in imported.inputs],
        "outputs": [s.to_json() for s in imported.outputs],
        "weights": list(weights),
        "weight_bytes": {"before": weights_before, "after": stored},
        "passes": passes,
        "kernels": {"total": kernels, "tuned": tuned, "fallback": fallback, "naive": details["naive"], "flops": details["flops"],
                    **({"tensor_core_instructions": tensor_cores.to_json()} if tensor_cores else {})},
        "tuning_log": {"dir": str(log_dir) if log_dir else None, "digest": log_digest(log_dir) if log_dir else None, "records": records},
        "logs_applied": [{"dir": d, "digest": log_digest(d), "records": n} for d, n in details["logs"].items()],
        "versions": {"autotune": __version__, "tvm": tvm.__version__},
        "settings": settings.to_json(),
        **(extra_metadata or {}),
    }
    write_metadata(paths, metadata)
    return BuildReport(
        paths, kernels, tuned, fallback, records, time.time() - started, notes, len(details["naive"]), tensor_cores
    )
