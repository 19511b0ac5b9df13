"""Where a model comes from: a zoo name (+ component and resolution) or a model file.

`load_source` returns the imported Relax model together with what checks it: the torch module
it came from (when there is one) and example inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.support.errors import InputError
from autotune.support.resources import check_fits_in_memory
from autotune.support.signature import TensorSpec

from .importer import ImportedModel, from_torch, import_model


@dataclass
class ModelSource:
    name: str  # the artifact's file stem, e.g. "transformer"
    label: str  # for humans, e.g. "wan-i2v-tiny/transformer"
    imported: ImportedModel
    example_inputs: dict[str, np.ndarray]
    reference: object | None = None  # a torch module taking the inputs positionally, or None
    model_name: str = ""

    def reference_outputs(self) -> list[np.ndarray] | None:
        return run_reference(self.reference, self.example_inputs)

    def summary(self) -> str:
        return self.imported.summary()

    def tune_units(self) -> list[tuple[ImportedModel, int]]:
        """What `tuning.tune` searches: (compile unit, calls per model call)."""
        return [(self.imported, 1)]


def run_reference(reference, example_inputs: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The torch reference's outputs on the example inputs (None without a reference)."""
    if reference is None:
        return None
    import torch

    with torch.no_grad():
        out = reference(*[torch.from_numpy(v) for v in example_inputs.values()])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() for o in outs]


def is_model_file(model: str) -> bool:
    return Path(model).suffix in (".onnx", ".pt2", ".ep")


def load_source(
    model: str,
    component: str = "transformer",
    weights: str | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    seed: int = 0,
) -> ModelSource:
    """Import `model` (a zoo name, a benchmark workload name, or an .onnx/.pt2 path) and return it with its reference."""
    if is_model_file(model):
        path = Path(model)
        imported = import_model(path)
        rng = np.random.default_rng(seed)
        inputs = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in imported.inputs}
        return ModelSource(path.stem, path.name, imported, inputs, None, model_name=path.stem)
    from autotune.models.workloads import WORKLOADS, get_workload

    if model.replace("_", "-") in WORKLOADS:  # a benchmark workload (e.g. the 480p DiT block): tune/build/run it like a model
        w = get_workload(model)
        imported = from_torch(w.module, w.inputs, source=w.name)
        inputs = {k: v.numpy() for k, v in w.inputs.items()}
        return ModelSource(w.name, w.name, imported, inputs, w.module, model_name=w.name)
    from autotune.models import get_model_spec

    spec = get_model_spec(model)
    comp = spec.component(component, height=height, width=width, frames=frames)
    check_fits_in_memory(comp, weights_given=weights is not None)
    if weights is not None and not Path(weights).is_dir():
        raise InputError(f"--weights {weights}: not a directory; expected a local diffusers-format checkpoint")
    module = comp.build_module(weights_dir=weights)
    example = comp.example_inputs(seed=seed)
    imported = from_torch(module, example, source=f"{spec.name}/{comp.name}")
    if len(comp.output_names) == len(imported.outputs):
        imported.outputs = [TensorSpec(n, o.shape, o.dtype) for n, o in zip(comp.output_names, imported.outputs)]
    inputs = {k: v.numpy() for k, v in example.items()}
    return ModelSource(comp.name, f"{spec.name}/{comp.name}", imported, inputs, module, model_name=spec.name)
