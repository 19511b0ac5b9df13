"""Block-wise build: the transformer as prologue + one block + epilogue, the block's weights per layer.

    OUT/transformer.json                     manifest: signature, units, layers (kind "blockwise")
    OUT/transformer/prologue.{so,json,weights.safetensors}
    OUT/transformer/block.{so,json}          compiled and tuned once for every layer
    OUT/transformer/epilogue.{so,json,weights.safetensors}
    OUT/transformer/layers/NNN.safetensors   layer NNN's block weights, as the block library takes them

Each layer's weights go through the same weight-side passes as the block's own at build time
(quantization, weight-only transforms, packing for the tuned kernels), one layer in memory at a time.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import tvm

from autotune import __version__
from autotune.frontend.blockwise import BlockwiseSource
from autotune.passes.pipeline import pack_for_target, prepare_model
from autotune.passes.quantize import float16_storage
from autotune.runtime.artifact import (
    FORMAT_VERSION,
    ArtifactPaths,
    file_digest,
    save_weights,
)
from autotune.support.errors import BuildFailed
from autotune.support.settings import BuildSettings
from autotune.support.targets import resolve_target

from .compile import BuildReport, build

KIND = "blockwise"


@dataclass
class BlockwiseReport:
    paths: ArtifactPaths  # the manifest is paths.metadata
    units: dict[str, BuildReport]
    layers: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        return sum(r.kernels for r in self.units.values())

    @property
    def tuned_kernels(self) -> int:
        return sum(r.tuned_kernels for r in self.units.values())

    @property
    def fallback_kernels(self) -> int:
        return sum(r.fallback_kernels for r in self.units.values())

    @property
    def tensor_cores(self):
        """The units' tensor-core reports in one, kernels named UNIT/KERNEL (None: not a CUDA build)."""
        from .sass import merge_reports

        return merge_reports({name: r.tensor_cores for name, r in self.units.items()})

    def summary(self) -> str:
        units = "; ".join(f"{name}: {r.kernels} kernels, {r.tuned_kernels} tuned" for name, r in self.units.items())
        return (f"{self.paths.metadata}: block-wise, {self.layers} layers over one compiled block ({units}); "
                f"built in {self.seconds:.1f} s")


def build_blockwise(
    source: BlockwiseSource,
    target,
    output: str | Path,
    log_dir: str | Path | None = None,
    settings: BuildSettings | None = None,
    extra_metadata: dict | None = None,
    progress=print,
) -> BlockwiseReport:
    """Build `source` into the block-wise artifact whose manifest is `output` (a .so, .json or stem)."""
    settings = settings or BuildSettings()
    preset = resolve_target(target)
    started = time.time()
    paths = ArtifactPaths.for_library(output)
    unit_dir = paths.library.with_suffix("")
    if unit_dir.exists():
        shutil.rmtree(unit_dir)  # a previous build's layers must not mix with this one's
    (unit_dir / "layers").mkdir(parents=True)
    reports, details = {}, {}
    for name, imported in source.units.items():
        details[name] = {}
        reports[name] = build(imported, preset, unit_dir / f"{name}.so", log_dir, settings,
                              {"model": f"{source.label}:{name}"}, details=details[name])
    layers = [_move_layer_zero(reports["block"].paths, unit_dir)]
    convert = _layer_converter(source, preset, settings, details["block"]["scheduled"], reports["block"].paths)
    for layer in range(1, source.num_layers):
        layer_started = time.time()
        path = unit_dir / "layers" / f"{layer:03d}.safetensors"
        save_weights(path, convert(source.layer_weights(layer)), float16=float16_storage(settings.quantize, preset))
        layers.append(path)
        progress(f"layer {layer + 1}/{source.num_layers}: weights converted in {time.time() - layer_started:.1f} s")
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "name": paths.metadata.stem,
        "model": source.label,
        "source": source.label,
        "weights_from": source.weights.describe(),
        "target": json.loads(reports["block"].paths.metadata.read_text())["target"],
        "inputs": [s.to_json() for s in source.units["prologue"].inputs],
        "outputs": [s.to_json() for s in source.units["epilogue"].outputs],
        "units": {name: str(r.paths.library.relative_to(paths.metadata.parent)) for name, r in reports.items()},
        "layers": [
            {"name": str(p.relative_to(paths.metadata.parent)), "bytes": p.stat().st_size, "sha256": file_digest(p)}
            for p in layers
        ],
        "kernels": {name: {"total": r.kernels, "tuned": r.tuned_kernels, "fallback": r.fallback_kernels}
                    for name, r in reports.items()},
        "weight_bytes": {  # as build's: float32 as imported, and as shipped
            "before": sum(u.weight_bytes() * (source.num_layers if n == "block" else 1) for n, u in source.units.items()),
            "after": sum(p.stat().st_size for p in layers)
            + sum(r.paths.weights.stat().st_size for n, r in reports.items() if n != "block"),
        },
        "versions": {"autotune": __version__, "tvm": tvm.__version__},
        "settings": settings.to_json(),
        **(extra_metadata or {}),
    }
    paths.metadata.write_text(json.dumps(manifest, indent=2) + "\n")
    notes = [f"{name}: {note}" for name, r in reports.items() for note in r.notes]
    return BlockwiseReport(paths, reports, source.num_layers, time.time() - started, notes)


def build_source(source, target, output, log_dir=None, settings: BuildSettings | None = None,
                 extra_metadata: dict | None = None, progress=print):
    """Build what `frontend.blockwise.load_component` returned: block-wise or whole."""
    if isinstance(source, BlockwiseSource):
        return build_blockwise(source, target, output, log_dir, settings, extra_metadata, progress)
    return build(source.imported, target, output, log_dir=log_dir, settings=settings, extra_metadata=extra_metadata)


def _move_layer_zero(block: ArtifactPaths, unit_dir: Path) -> Path:
    """The block library's own weights are layer 0's: they move to layers/000 and the block's
    metadata says its weights are given per call."""
    layer0 = unit_dir / "layers" / "000.safetensors"
    block.weights.rename(layer0)
    meta = json.loads(block.metadata.read_text())
    meta["files"]["weights"] = None
    meta["weights_per_call"] = "one layer's weights, from the block-wise manifest's layers"
    block.metadata.write_text(json.dumps(meta, indent=2) + "\n")
    return layer0


def _layer_converter(source: BlockwiseSource, preset, settings: BuildSettings, scheduled, block: ArtifactPaths):
    """A function: one layer's float32 block weights -> the weights the block library takes.

    It replays the build's weight side (prepare, then packing for the scheduled kernels); the
    module side is the block's, already compiled. Checks the names come out as the library's."""
    imported = source.units["block"]
    expected = json.loads(block.metadata.read_text())["weights"]

    def convert(raw: dict) -> dict:
        prepared, _ = prepare_model(replace(imported, weights=raw), preset, settings.quantize, settings.winograd)
        _, weights, _ = pack_for_target(scheduled, prepared.weights, len(prepared.inputs))
        if list(weights) != expected:
            raise BuildFailed(
                f"{source.label}: a layer's converted weights are {list(weights)[:4]}..., the block library takes "
                f"{expected[:4]}...: the weight passes are not deterministic; report this as a bug"
            )
        return weights

    return convert
