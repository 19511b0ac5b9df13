"""The Wan transformer imported as three compile units (prologue, one block, epilogue).

Each unit is traced from modules built on the meta device and given one layer's weights, so
importing the 14B transformer costs one block, not 40 (and never the whole checkpoint in memory).
`layer_weights(i)` then reads layer i's block weights, named as the imported block takes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autotune.support.errors import ImportFailed, InputError
from autotune.support.ir import exported_name
from autotune.support.signature import TensorSpec

from .importer import ImportedModel, from_torch
from .sources import load_source, run_reference

# What the units pass on, in order (the prologue takes the transformer's own inputs).
PROLOGUE_OUTPUTS = ("tokens", "context", "timestep_proj", "temb", "rotary_cos", "rotary_sin")
BLOCK_INPUTS = ("tokens", "context", "timestep_proj", "rotary_cos", "rotary_sin")
EPILOGUE_INPUTS = ("tokens", "temb")


@dataclass
class BlockwiseSource:
    name: str  # "transformer"
    label: str  # "wan-i2v-tiny/transformer"
    model_name: str
    units: dict[str, ImportedModel]  # prologue, block (layer 0's weights), epilogue
    num_layers: int
    example_inputs: dict[str, np.ndarray]  # the transformer's inputs
    weights: object = field(repr=False)  # a models.wan_blocks.WeightSource
    block_names: dict[str, str] = field(repr=False, default_factory=dict)  # imported weight name -> unit parameter name

    def layer_weights(self, layer: int) -> dict[str, np.ndarray]:
        """Layer `layer`'s block weights (float32), in the order and names the imported block takes."""
        from autotune.models.wan_blocks import checkpoint_name

        return {name: self.weights.get(checkpoint_name("block", self.block_names[name], layer))
                for name in self.units["block"].weights}

    @functools.cached_property
    def reference(self):
        """The whole torch transformer step with these weights; None when its float32 weights would
        take more than a quarter of the memory available (compare layer by layer then)."""
        from autotune.models import get_model_spec
        from autotune.models.wan_blocks import load_whole_model
        from autotune.support.resources import available_bytes

        comp = get_model_spec(self.model_name).component("transformer")
        if self.units["block"].weight_bytes() * self.num_layers > available_bytes() // 4:  # float32 as imported
            return None
        return comp.wrap(load_whole_model(self.weights.config, self.weights)).eval()

    def reference_outputs(self) -> list[np.ndarray] | None:
        return run_reference(self.reference, self.example_inputs)

    def summary(self) -> str:
        units = ", ".join(f"{name} {len(u.weights)} weights {u.weight_bytes() / 2**20:.1f} MiB" for name, u in self.units.items())
        return (f"{self.label}: block-wise, {self.num_layers} layers over one block ({units}; weights from "
                f"{self.weights.describe()})")

    def tune_units(self) -> list[tuple[ImportedModel, int]]:
        """What `tuning.tune` searches: the block's kernels weigh num_layers calls."""
        return [(self.units["prologue"], 1), (self.units["block"], self.num_layers), (self.units["epilogue"], 1)]


def builds_blockwise(model: str, component: str) -> bool:
    """Whether (model, component) builds block-wise: every Wan transformer does."""
    from autotune.frontend.sources import is_model_file
    from autotune.models import list_models

    return (not is_model_file(model) and str(component).replace("-", "_") == "transformer"
            and str(model).lower() in {m.name for m in list_models()})


def load_component(
    model: str,
    component: str = "transformer",
    weights: str | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
):
    """What `autotune build` compiles for (model, component): a BlockwiseSource for a Wan
    transformer, the whole-graph ModelSource (`sources.load_source`) for anything else."""
    if builds_blockwise(model, component):
        return load_blockwise_source(model, weights, height, width, frames)
    return load_source(model, component, weights, height, width, frames)


def load_blockwise_source(
    model: str,
    weights: str | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    seed: int = 0,
) -> BlockwiseSource:
    """Import the Wan transformer of zoo model `model` as three units at (height, width, frames).

    weights: a local diffusers checkpoint directory, read tensor by tensor (its num_layers is
    honoured); None: the model's seeded random weights (small models only)."""
    from autotune.models import get_model_spec
    from autotune.models.wan_blocks import (
        CheckpointWeights,
        ModuleWeights,
        fill_unit,
        make_units,
    )

    spec = get_model_spec(model)
    comp = spec.component("transformer", height=height, width=width, frames=frames)
    if weights is not None:
        if not Path(weights).is_dir():
            raise InputError(f"--weights {weights}: not a directory; expected a local diffusers-format checkpoint")
        source = CheckpointWeights(weights, spec.transformer_config, spec.name)
    else:
        raise_if_large(comp, spec.transformer_config["num_layers"])
        source = ModuleWeights(comp.build_model(), spec.transformer_config, f"{spec.name} seeded random weights (seed {comp.seed})")
    units = make_units(spec.transformer_config, comp.shape_info["token_grid"])
    for name, unit in units.items():
        fill_unit(name, unit, source)
    example = comp.example_inputs(seed=seed)
    with torch.no_grad():
        tokens, context, timestep_proj, temb, cos, sin = units["prologue"](*example.values())
    unit_inputs = {
        "prologue": example,
        "block": dict(zip(BLOCK_INPUTS, (tokens, context, timestep_proj, cos, sin))),
        "epilogue": dict(zip(EPILOGUE_INPUTS, (tokens, temb))),
    }
    label = f"{spec.name}/transformer"
    imported = {name: from_torch(units[name], unit_inputs[name], source=f"{label}:{name}") for name in units}
    imported["prologue"].outputs = [
        TensorSpec(n, o.shape, o.dtype)
        for n, o in zip(PROLOGUE_OUTPUTS, imported["prologue"].outputs)
    ]
    imported["epilogue"].outputs = [TensorSpec(comp.output_names[0], o.shape, o.dtype) for o in imported["epilogue"].outputs]
    block_names = _imported_names(units["block"], imported["block"], label)
    return BlockwiseSource(
        name="transformer", label=label, model_name=spec.name, units=imported, num_layers=source.num_layers,
        example_inputs={k: v.numpy() for k, v in example.items()}, weights=source, block_names=block_names,
    )


def _imported_names(unit: torch.nn.Module, imported: ImportedModel, label: str) -> dict[str, str]:
    """{imported weight name: unit parameter name}: torch.export names a parameter `a.b.c` `p_a_b_c`."""
    by_export_name = {exported_name(name): name for name in unit.state_dict()}
    unknown = [n for n in imported.weights if n not in by_export_name]
    if unknown:
        raise ImportFailed(f"{label}: imported block weights {unknown[:5]} match no parameter of the block")
    return {n: by_export_name[n] for n in imported.weights}


def raise_if_large(comp, num_layers: int) -> None:
    """A model too large for its seeded random weights in memory must be given a checkpoint."""
    from autotune.support.resources import available_bytes

    params = comp.param_count()
    if params * 4 * 2 > available_bytes():
        raise InputError(
            f"{comp.model_name}/transformer has {params / 1e9:.1f} B parameters ({num_layers} layers): its seeded random "
            f"weights alone would take {params * 4 / 2**30:.0f} GiB of memory. Give a local diffusers checkpoint with "
            "--weights DIR (read layer by layer; tools/synthetic_checkpoint.py writes one with seeded random weights), "
            "or use the tiny model (--model wan-i2v-tiny)."
        )
