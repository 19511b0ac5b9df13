"""Import a model into TVM Relax: torch nn.Module, a saved ExportedProgram, or an ONNX file.

The result is an `ImportedModel`: a Relax IRModule whose `main` takes the named user inputs
first and the weights after them (weights are never baked into the module, so a 16 B-param
model can be compiled), the weights themselves, and the input/output specs.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from autotune.support.errors import ImportFailed
from autotune.support.ir import num_input, static_shape
from autotune.support.signature import TensorSpec, specs_from_relax_type

from .calibration import linear_input_ranges
from .converter_fixes import (
    CUSTOM_CONVERT_MAP,
    safe_take_modes,
    unbroadcast_matmul_weights,
)


@dataclass
class ImportedModel:
    mod: "object"  # tvm.IRModule, `main(*inputs, *weights)` with attr num_input
    weights: dict[str, np.ndarray]  # in the order `main` takes them after the inputs
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # Models imported from torch: runs the module once on its example inputs and returns each
    # linear's input range per channel, by weight name (frontend/calibration.py), for SmoothQuant.
    calibration: Callable[[], dict[str, np.ndarray]] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self):  # pickling keeps the model, not the torch module behind `calibration`
        return {**self.__dict__, "calibration": None}

    def weight_bytes(self) -> int:
        return int(sum(w.nbytes for w in self.weights.values()))

    def summary(self) -> str:
        from autotune.support.signature import format_signature

        return (
            f"{self.source}: {format_signature(self.inputs, self.outputs)}; "
            f"{len(self.weights)} weight tensors, {self.weight_bytes() / 2**20:.1f} MiB"
        )


def _tensor_to_numpy(t) -> np.ndarray:
    if hasattr(t, "numpy"):
        return t.numpy()
    return np.asarray(t)


def _finish(mod, source: str) -> ImportedModel:
    """Split weights off `main` and describe its signature."""
    from tvm import relax

    mod, params = relax.frontend.detach_params(unbroadcast_matmul_weights(safe_take_modes(mod)))
    main = mod["main"]
    n_inputs = num_input(main)
    user_params = main.params[:n_inputs]
    weight_params = main.params[n_inputs:]
    weight_values = list(params.get("main", []))
    if len(weight_values) != len(weight_params):
        raise ImportFailed(f"{source}: expected {len(weight_params)} weights, found {len(weight_values)}")
    weights: dict[str, np.ndarray] = {}
    for var, value in zip(weight_params, weight_values):
        weights[var.name] = _tensor_to_numpy(value)
    inputs = []
    for var in user_params:
        shape = static_shape(var.ty)
        if shape is None:
            raise ImportFailed(
                f"{source}: input '{var.name}' has a dynamic shape {var.ty}; autotune compiles "
                "static shapes. Export with concrete example inputs."
            )
        inputs.append(TensorSpec(var.name, shape, str(var.ty.dtype)))
    outputs = specs_from_relax_type(main.ret_ty)
    return ImportedModel(mod=mod, weights=weights, inputs=inputs, outputs=outputs, source=source)


_LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def from_exported_program(program, source: str = "ExportedProgram") -> ImportedModel:
    """Import a `torch.export.ExportedProgram` (weights kept as inputs, our converter fixes on)."""
    from tvm.relax.frontend.torch import from_exported_program as _from_ep

    try:
        with warnings.catch_warnings():
            # torch 2.13's ExportedProgram.run_decompositions (TVM calls it for
            # run_ep_decomposition) deep-copies the module call graph, whose pytree specs include
            # torch's own deprecated LeafSpec: copy re-creates each one through LeafSpec.__new__,
            # which warns. Nothing of ours uses LeafSpec; this is torch warning about itself.
            warnings.filterwarnings("ignore", message=_LEAFSPEC_DEPRECATION, category=FutureWarning)
            mod = _from_ep(
                program,
                keep_params_as_input=True,
                unwrap_unit_return_tuple=True,
                custom_convert_map=CUSTOM_CONVERT_MAP,
                run_ep_decomposition=True,  # needed: rms_norm is only supported decomposed
            )
    except Exception as exc:  # the translator raises bare asserts/KeyErrors
        raise ImportFailed(f"{source}: TVM could not import the program: {type(exc).__name__}: {exc}") from exc
    return _finish(mod, source)


def from_torch(module, example_inputs: dict, source: str | None = None) -> ImportedModel:
    """Import a torch `nn.Module` by `torch.export` with named example inputs.

    `example_inputs` maps the forward's argument names to tensors, in the forward's order; the
    compiled module takes exactly these names, shapes and dtypes.
    """
    import torch

    if not isinstance(example_inputs, dict) or not example_inputs:
        raise ImportFailed("example_inputs must be a non-empty dict {input name: torch.Tensor}")
    source = source or type(module).__name__
    module = module.eval()
    args = tuple(example_inputs.values())
    try:
        with torch.no_grad():
            program = torch.export.export(module, args)
    except Exception as exc:
        raise ImportFailed(f"{source}: torch.export failed: {type(exc).__name__}: {exc}") from exc
    imported = from_exported_program(program, source=source)
    # torch.export names placeholders after the forward's parameters; use the caller's names.
    if len(imported.inputs) != len(example_inputs):
        raise ImportFailed(
            f"{source}: the exported program takes {len(imported.inputs)} inputs, "
            f"{len(example_inputs)} example inputs were given"
        )
    imported.inputs = [TensorSpec(n, s.shape, s.dtype) for n, s in zip(example_inputs, imported.inputs)]
    # Once per import: a block-wise build converts every layer's weights through the same model.
    imported.calibration = functools.cache(lambda: linear_input_ranges(module, example_inputs))
    return imported


def from_exported_program_file(path: str | Path) -> ImportedModel:
    """Load a `torch.export.save`d `.pt2` file and import it.

    An ExportedProgram file is code: loading it runs what its author wrote. Only load files you trust.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise ImportFailed(f"{path}: no such file")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ImportFailed(f"{path}: not a torch.export program file ({type(exc).__name__}: {exc})") from exc
    return from_exported_program(program, source=path.name)


def from_onnx(path: str | Path, shape_dict: dict | None = None) -> ImportedModel:
    """Import an ONNX file (static shapes; pass `shape_dict` to pin dynamic input dimensions)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx as _from_onnx

    path = Path(path)
    if not path.exists():
        raise ImportFailed(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ImportFailed(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    try:
        mod = _from_onnx(model, shape_dict=shape_dict, keep_params_in_input=True)
    except Exception as exc:
        raise ImportFailed(f"{path}: TVM could not import the ONNX graph: {type(exc).__name__}: {exc}") from exc
    return _finish(mod, source=path.name)


def import_model(source, example_inputs: dict | None = None, shape_dict: dict | None = None) -> ImportedModel:
    """Dispatch on what `source` is: an nn.Module, an ExportedProgram, a `.pt2` or `.onnx` path."""
    import torch

    if isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise ImportFailed("importing an nn.Module needs example_inputs={name: tensor}")
        return from_torch(source, example_inputs)
    if isinstance(source, torch.export.ExportedProgram):
        return from_exported_program(source)
    path = Path(source)
    if path.suffix == ".onnx":
        return from_onnx(path, shape_dict)
    if path.suffix in (".pt2", ".ep"):
        return from_exported_program_file(path)
    raise ImportFailed(f"{source}: unknown model source; expected an nn.Module, an ExportedProgram, a .pt2 or an .onnx file")
