"""Model-zoo specs: what one compile unit takes and returns, and how to build it in PyTorch.

A `ModelSpec` is a model (e.g. Wan2.1-I2V-14B-480P) made of named components; a `ComponentSpec`
is one compile unit (e.g. its transformer) at one resolution. It knows its named, shaped, typed
inputs and builds a `torch.nn.Module` whose `forward` takes those inputs positionally, in
`input_specs` order, with seeded random weights or weights loaded from a local checkpoint.

Model families (see `wan.py`) fill these in; nothing here knows about a particular model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from autotune.support.errors import InputError

# One input: (shape, dtype name as in torch, e.g. "float32").
InputSpec = tuple[tuple[int, ...], str]

# How `example_inputs` fills an input: standard normal, uniform in [-1, 1] (pixels), or a diffusion
# timestep (integer-valued float in [0, 1000)).
FILLS = ("normal", "uniform", "timestep")


@dataclass(frozen=True)
class ComponentSpec:
    """One compile unit of a model at one resolution.

    name:          component name ("transformer", "vae_encoder", ...)
    model_name:    the ModelSpec it belongs to
    input_specs:   input name -> (shape, dtype), in the order `forward` takes them
    output_names:  names of the outputs, in the order `forward` returns them
    shape_info:    derived sizes worth reporting (latent shape, token counts, ...)
    seed:          torch seed for the random weights when no checkpoint is given
    checkpoint_subfolder: where its weights live in a checkpoint directory ("transformer", "vae", ...)
    """

    name: str
    model_name: str
    input_specs: dict[str, InputSpec]
    output_names: list[str]
    shape_info: dict
    seed: int
    checkpoint_subfolder: str
    # make_model(): the underlying model (diffusers / transformers class) with random weights,
    # created on the current default device (the meta device for counting).
    make_model: Callable[[], torch.nn.Module] = field(repr=False)
    # load_model(weights_dir, dtype): the underlying model loaded from a local checkpoint, on CPU.
    # Raises InputError when the checkpoint is missing or is not this model's.
    load_model: Callable[[str, torch.dtype], torch.nn.Module] = field(repr=False)
    # wrap(model): the module to compile, forward(*inputs in input_specs order). It takes
    # ownership of `model` and may drop parts the compile unit never uses.
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = field(repr=False)
    # input name -> one of FILLS
    fills: dict[str, str] = field(repr=False, default_factory=dict)

    def build_module(
        self, weights_dir: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """The module to compile, in eval mode, on `device`, with parameters in `dtype`.

        Its forward takes the inputs of `input_specs` positionally, in that order, and returns
        the outputs of `output_names` (one tensor, or a tuple). Weights: see `build_model`.
        """
        return self.wrap(self.build_model(weights_dir, device, dtype)).eval()

    def build_model(
        self, weights_dir: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """The underlying model (the diffusers / transformers class, whole, unwrapped) in eval mode.

        weights_dir=None: random weights from `torch.manual_seed(self.seed)`, created on CPU
        (the global RNG is left as it was). Otherwise the weights are loaded from `weights_dir`, a
        local diffusers-format directory (transformer/, vae/, image_encoder/ as in
        Wan-AI/Wan2.1-I2V-14B-480P-Diffusers) with `from_pretrained(local_files_only=True)`.
        Loading creates the model on the meta device and reads the checkpoint once, straight into
        `dtype` (low_cpu_mem_usage), on CPU, then moves it to `device`: the weights are never held
        twice in the same memory (the 14B transformer needs ~33 GB of RAM in bfloat16, ~66 GB in
        float32). Modules the class keeps in float32 (`_keep_in_fp32_modules`) stay float32 either way.
        Save one with `save_pretrained(dir/<subfolder>)` to make a local checkpoint.
        """
        if weights_dir is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                with torch.device("cpu"):
                    model = self.make_model()
            _cast_like_from_pretrained(model, dtype)
        else:
            model = self.load_model(str(weights_dir), dtype)
        return model.to(device).eval()

    def example_inputs(self, seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Random inputs matching `input_specs` (CPU tensors; `dtype` overrides the spec's dtype)."""
        gen = torch.Generator().manual_seed(seed)
        inputs = {}
        for name, (shape, dtype_name) in self.input_specs.items():
            fill = self.fills.get(name, "normal")
            if fill == "timestep":
                x = torch.randint(0, 1000, shape, generator=gen).float()
            elif fill == "uniform":
                x = torch.rand(shape, generator=gen) * 2 - 1
            else:
                x = torch.randn(shape, generator=gen)
            inputs[name] = x.to(dtype or getattr(torch, dtype_name))
        return inputs

    def meta_module(self) -> torch.nn.Module:
        """The module to compile on the meta device: shapes only, no memory, no weights."""
        with torch.device("meta"):
            return self.wrap(self.make_model()).eval()

    def param_count(self) -> int:
        """Parameters of the module `build_module` returns (counted on the meta device).

        Only what the compile unit uses is counted: e.g. vae_encoder excludes the VAE decoder.
        """
        return sum(p.numel() for p in self.meta_module().parameters())

    def flops(self) -> int:
        """FLOPs of one forward call, counted from shapes on the meta device.

        The module runs on meta tensors under `torch.utils.flop_counter.FlopCounterMode`, which
        adds 2*MACs of every matmul (mm/addmm/bmm/linear), convolution and attention
        (scaled_dot_product_attention: QK^T and PV) from the operand shapes. Elementwise work
        (norms, activations, softmax, rotary embedding) is not counted. No memory, seconds on CPU.
        """
        from torch.utils.flop_counter import FlopCounterMode

        module = self.meta_module()
        args = [torch.empty(shape, dtype=getattr(torch, dt), device="meta") for shape, dt in self.input_specs.values()]
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(*args)
        return int(counter.get_total_flops())


class ModelSpec:
    """A model made of named components. Subclasses define `component_names`,
    `default_resolution`, `derive_shapes` and `_component`."""

    name: str
    description: str
    component_names: tuple[str, ...]
    default_resolution: tuple[int, int, int]  # (height, width, frames)

    def derive_shapes(self, height: int | None = None, width: int | None = None, frames: int | None = None) -> dict:
        raise NotImplementedError

    def _component(self, name: str, height: int, width: int, frames: int) -> ComponentSpec:
        raise NotImplementedError

    def component(
        self, name: str, height: int | None = None, width: int | None = None, frames: int | None = None
    ) -> ComponentSpec:
        """The component `name` (vae_decoder or vae-decoder) at (height, width, frames); None -> the
        model's default resolution."""
        name = str(name).replace("-", "_")
        if name not in self.component_names:
            raise InputError(
                f"model {self.name!r} has no component {name!r}; "
                f"expected one of: {', '.join(self.component_names)}"
            )
        h, w, f = self._resolve(height, width, frames)
        return self._component(name, h, w, f)

    @property
    def components(self) -> dict[str, ComponentSpec]:
        """Every component at the default resolution."""
        return {name: self.component(name) for name in self.component_names}

    def _resolve(self, height, width, frames) -> tuple[int, int, int]:
        dh, dw, df = self.default_resolution
        return (dh if height is None else height, dw if width is None else width, df if frames is None else frames)

    def __repr__(self) -> str:
        return f"ModelSpec({self.name!r}, components={list(self.component_names)})"


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast `model` to `dtype` in place the way `from_pretrained(torch_dtype=dtype)` does:
    parameters and buffers of the class's `_keep_in_fp32_modules` stay float32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for tensors in (model.named_parameters(), model.named_buffers()):
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            if t.dtype != target:
                t.data = t.data.to(target)
