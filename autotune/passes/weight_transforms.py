"""Do once, at build time, the work that depends on weights only.

The torch importer turns every linear into `matmul(x, permute_dims(W))`: without this pass the
compiled module transposes every weight on every call (a kernel per linear). Relax's
LiftTransformParams splits such weight-only computations into a function of their own; we run
it once here and ship its results as the weights.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from autotune.frontend.importer import ImportedModel


def precompute_weight_transforms(imported: ImportedModel) -> ImportedModel:
    lifted = relax.transform.LiftTransformParams()(imported.mod)
    if "main_transform_params" not in [gv.name_hint for gv in lifted.functions]:
        return imported
    mod, weights = run_lifted_transform(lifted, imported.weights, len(imported.inputs))
    return ImportedModel(
        mod=mod,
        weights=weights,
        inputs=imported.inputs,
        outputs=imported.outputs,
        source=imported.source,
        notes=imported.notes + ["weight-only computations (transposes) done at build time"],
    )


def run_lifted_transform(lifted: tvm.IRModule, weights: dict[str, np.ndarray], num_input: int) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Run a LiftTransformParams result's `main_transform_params` once, on the build machine.

    Returns the module without it, whose main takes the results after its `num_input` inputs,
    and the results, named after main's parameters."""
    transform = tvm.IRModule({gv: f for gv, f in lifted.functions.items() if gv.name_hint not in ("main", "main_transform_params")})
    transform["main"] = lifted["main_transform_params"].with_attr("global_symbol", "main")
    transform = relax.transform.DeadCodeElimination(["main"])(transform)  # only the kernels it calls
    vm = relax.VirtualMachine(tvm.compile(transform, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    outputs = vm["main"]([tvm.runtime.tensor(w) for w in weights.values()])
    main = lifted["main"]
    results: dict[str, np.ndarray] = {}
    for i, (var, value) in enumerate(zip(main.params[num_input:], outputs)):
        results[var.name if var.name not in results else f"{var.name}.{i}"] = value.numpy()
    compute = tvm.IRModule({gv: f for gv, f in lifted.functions.items() if gv.name_hint != "main_transform_params"}, attrs=lifted.attrs)
    return relax.transform.DeadCodeElimination(["main"])(compute), results
