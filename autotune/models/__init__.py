"""The model zoo: torch definitions of the models autotune compiles (one compile unit per
component) and the bench workloads cut from them. May import: support.

    from autotune.models import get_model_spec
    spec = get_model_spec("wan-i2v-tiny")
    comp = spec.component("transformer")            # default resolution
    module = comp.build_module()                     # seeded random weights, eval mode
    out = module(*comp.example_inputs().values())    # inputs positionally, in input_specs order

Importing this package is cheap: diffusers / transformers are imported when a module is built.
"""

from autotune.support.errors import InputError

from .spec import ComponentSpec, ModelSpec
from .wan import MODELS as _WAN_MODELS

_REGISTRY: dict[str, ModelSpec] = {m.name: m for m in _WAN_MODELS}


def list_models() -> list[ModelSpec]:
    """Every known model spec."""
    return list(_REGISTRY.values())


def get_model_spec(name: str) -> ModelSpec:
    """The model spec called `name` (case-insensitive); InputError (a ValueError) if unknown."""
    spec = _REGISTRY.get(str(name).lower())
    if spec is None:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    return spec


__all__ = ["ComponentSpec", "ModelSpec", "get_model_spec", "list_models"]
