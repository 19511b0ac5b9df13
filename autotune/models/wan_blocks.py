"""The Wan transformer cut into three compile units, and where each layer's weights come from.

    prologue   patch embedding, time / text / image condition embedders, rotary tables
    block      one WanTransformerBlock: compiled and tuned once, run once per layer
    epilogue   output norm and modulation, projection, unpatchify

Chained, prologue -> num_layers x block -> epilogue is `WanTransformer3DModel.forward` (I2V, one
timestep per sample). The units are built on the meta device and filled from a `WeightSource`
(a diffusers checkpoint read tensor by tensor, or a model in memory): building them never needs
more than one layer's weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from autotune.support.errors import InputError

from .wan import check_text_tokens

UNITS = ("prologue", "block", "epilogue")
BLOCK_PREFIX = "block."


class WanPrologue(torch.nn.Module):
    """forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image) ->
    (tokens, context, timestep_proj, temb, rotary_cos, rotary_sin): what every block and the
    epilogue read. Parameter names are the checkpoint's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.rope = model.rope
        self.patch_embedding = model.patch_embedding
        self.condition_embedder = model.condition_embedder

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image):
        check_text_tokens(encoder_hidden_states)
        rotary_cos, rotary_sin = self.rope(hidden_states)
        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        temb, timestep_proj, context, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=None
        )
        context = torch.concat([image, context], dim=1)
        return tokens, context, timestep_proj.unflatten(1, (6, -1)), temb, rotary_cos, rotary_sin


class WanBlock(torch.nn.Module):
    """forward(tokens, context, timestep_proj, rotary_cos, rotary_sin) -> tokens: one layer.
    Parameter `block.X` is layer i's `blocks.i.X` in the checkpoint."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, tokens, context, timestep_proj, rotary_cos, rotary_sin):
        return self.block(tokens, context, timestep_proj, (rotary_cos, rotary_sin))


class WanEpilogue(torch.nn.Module):
    """forward(tokens, temb) -> noise_pred (1, out_channels, T, H, W).

    The tail of diffusers' `WanTransformer3DModel.forward` for one timestep per sample (it is not
    a module of its own there); checked against the whole model by the tests."""

    def __init__(self, model: torch.nn.Module, token_grid: tuple[int, int, int]):
        super().__init__()
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.scale_shift_table = model.scale_shift_table
        self.token_grid = tuple(token_grid)
        self.patch_size = tuple(model.config.patch_size)

    def forward(self, tokens, temb):
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        x = self.proj_out(x)
        (t, h, w), (pt, ph, pw) = self.token_grid, self.patch_size
        x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _meta_model(config: dict, num_layers: int) -> torch.nn.Module:
    """WanTransformer3DModel with `num_layers` blocks on the meta device; rotary tables computed."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**{**config, "num_layers": num_layers})
    # non-persistent buffers (not in checkpoints): computed on the CPU, a few kB
    model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
    return model


def load_whole_model(config: dict, source: "WeightSource") -> torch.nn.Module:
    """The whole WanTransformer3DModel with `source`'s weights and layer count (float32, in memory:
    a torch reference for small models)."""
    model = _meta_model(config, source.num_layers)
    state = {name: torch.from_numpy(source.get(name)) for name in model.state_dict()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def make_units(config: dict, token_grid) -> dict[str, torch.nn.Module]:
    """The three units on the meta device (no memory), rotary tables excepted (computed, small).

    Fill them with `fill_unit` before use."""
    model = _meta_model(config, 1)
    return {
        "prologue": WanPrologue(model).eval(),
        "block": WanBlock(model.blocks[0]).eval(),
        "epilogue": WanEpilogue(model, token_grid).eval(),
    }


def checkpoint_name(unit: str, name: str, layer: int = 0) -> str:
    """The checkpoint's name of a unit's parameter (`block.X` of layer i is `blocks.i.X`)."""
    if unit == "block":
        return f"blocks.{layer}.{name[len(BLOCK_PREFIX):]}"
    return name


def fill_unit(unit_name: str, unit: torch.nn.Module, source: "WeightSource", layer: int = 0) -> torch.nn.Module:
    """Give a meta-device unit its float32 weights from `source` (layer `layer` for the block)."""
    state = {
        name: torch.from_numpy(source.get(checkpoint_name(unit_name, name, layer)))
        for name in unit.state_dict()
    }
    unit.load_state_dict(state, assign=True, strict=True)
    left = [n for n, t in [*unit.named_parameters(), *unit.named_buffers()] if t.is_meta]
    if left:
        raise InputError(f"{unit_name}: no weights for {left[:5]} in {source.describe()}")
    return unit


class WeightSource:
    """Float32 numpy weights by checkpoint name, one tensor at a time."""

    num_layers: int
    config: dict  # the transformer's configuration, num_layers as the weights have it

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class ModuleWeights(WeightSource):
    """The weights of a model in memory (the seeded random model of a small configuration)."""

    def __init__(self, model: torch.nn.Module, config: dict, label: str):
        self.state = model.state_dict()
        self.num_layers = len(model.blocks)
        self.config = {**config, "num_layers": self.num_layers}
        self.label = label

    def get(self, name: str) -> np.ndarray:
        if name not in self.state:
            raise InputError(f"{self.label} has no tensor {name!r}")
        return self.state[name].detach().float().numpy()

    def describe(self) -> str:
        return self.label


class CheckpointWeights(WeightSource):
    """A diffusers transformer checkpoint (`DIR/transformer/`: config.json and one or several
    safetensors files) read tensor by tensor from memory-mapped files: never loaded whole.

    Every configuration field of `expected` must match the checkpoint's, except `num_layers`:
    a checkpoint with fewer or more layers is honoured."""

    INDEX = "diffusion_pytorch_model.safetensors.index.json"
    SINGLE = "diffusion_pytorch_model.safetensors"

    def __init__(self, weights_dir: str | Path, expected: dict, model_name: str):
        self.directory = Path(weights_dir) / "transformer"
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            from .wan import CHECKPOINT_HINT

            raise InputError(f"{config_path} not found: {CHECKPOINT_HINT}")
        config = json.loads(config_path.read_text())
        bad = [f"{k}={config.get(k)!r} (expected {_plain(v)!r})" for k, v in expected.items()
               if k != "num_layers" and _plain(config.get(k)) != _plain(v)]
        if bad:
            raise InputError(
                f"{self.directory} is not a {model_name!r} transformer: {', '.join(bad)}; pick the model whose "
                "configuration matches the checkpoint"
            )
        self.num_layers = int(config["num_layers"])
        self.config = {**expected, "num_layers": self.num_layers}
        self.files = self._weight_map()
        self._open: dict[str, object] = {}

    def _weight_map(self) -> dict[str, Path]:
        index = self.directory / self.INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.directory / file for name, file in weight_map.items()}
        single = self.directory / self.SINGLE
        if not single.is_file():
            raise InputError(f"{self.directory}: neither {self.INDEX} nor {self.SINGLE}; save the model with save_pretrained")
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise InputError(f"{self.directory}: the checkpoint has no tensor {name!r} (a partial or foreign checkpoint?)")
        key = os.fspath(path)
        if key not in self._open:
            self._open[key] = safe_open(key, framework="pt")  # memory-mapped; pages read on use
        return self._open[key].get_tensor(name).float().numpy()

    def describe(self) -> str:
        return str(self.directory)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
