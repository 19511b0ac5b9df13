"""Named, shaped, typed tensor specs: what a compiled module takes and returns."""

from __future__ import annotations

from dataclasses import dataclass

from .ir import static_shape


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(obj: dict) -> "TensorSpec":
        return TensorSpec(obj["name"], tuple(int(d) for d in obj["shape"]), obj["dtype"])

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def format_signature(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    args = ", ".join(str(s) for s in inputs)
    outs = ", ".join(str(s) for s in outputs)
    return f"({args}) -> ({outs})"


def specs_from_relax_type(ty, prefix: str = "output") -> list[TensorSpec]:
    """Flatten a Relax return type (a tensor or a tuple of tensors) into TensorSpecs."""
    fields = getattr(ty, "fields", None)
    if fields is not None:
        specs = []
        for i, field in enumerate(fields):
            specs += specs_from_relax_type(field, f"{prefix}{i}")
        return specs
    shape = static_shape(ty)
    if shape is None:
        raise TypeError(f"cannot describe output of type {ty}: expected tensors of static shape")
    return [TensorSpec(prefix, shape, str(ty.dtype))]
