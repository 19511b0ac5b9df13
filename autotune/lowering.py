"""The Relax passes that turn an imported module into tunable kernels, and kernels into a VM.

Tuning and building must see the *same* fused module: MetaSchedule files records under the
structural hash of each fused PrimFunc, so a build that fuses differently (or re-fuses an already
fused module) silently misses every record. `fuse_for_target` is the one place that does it.
"""

from __future__ import annotations

import tvm
from tvm import relax


def fuse_for_target(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Fuse attention into one kernel, then legalize and fuse: every operator becomes a PrimFunc
    (a tuning task). On CPUs, large weight matrices are marked for packing (weight_prepack.py)."""
    from .weight_prepack import mark_layout_free

    from .attention import fuse_attention  # also registers the attention schedule rule

    mod = fuse_attention(mod, target)
    legalize = None
    if target.kind.name == "llvm":
        from .fast_math import cpu_fast_math_legalizations

        legalize = cpu_fast_math_legalizations()
    passes = [
        relax.transform.LegalizeOps(customize_legalize_map=legalize),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with target:
        return mark_layout_free(tvm.transform.Sequential(passes)(mod), target)


def finalize_passes() -> list:
    """Lower a scheduled Relax module to VM code (the cpu_generic lowering, target-neutral)."""
    # Taken from relax.backend.cpu_generic.pipeline; the re-export in relax.pipeline raises
    # AttributeError in TVM 0.27 and callers that catch it fall back quietly.
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    return cpu_pipeline.dataflow_lower_passes(None) + cpu_pipeline.finalize_passes(None)


def prim_funcs(mod: tvm.IRModule) -> dict[str, "tvm.tirx.PrimFunc"]:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))
