"""Benchmark workloads: the tiny Wan components, and 480p-scale slices of the real model.

Each is a torch module with named example inputs, built from the real diffusers classes:
- `tiny-transformer`, `tiny-vae-decoder`, `tiny-image-encoder`: wan-i2v-tiny end to end per component;
- `dit-block`: one Wan DiT block at Wan-1.3B width (dim 1536, 12 heads, ffn 8960) on a 480p
  single-latent-frame slice (30×52 = 1,560 tokens) with 257 image + 512 text context tokens;
- `vae-up-block`: the first up-block of the Wan VAE decoder at the 480p latent grid (60×104).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autotune.support.errors import InputError


@dataclass
class Workload:
    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    description: str

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.module(*self.inputs.values())
        return int(counter.get_total_flops())


class _DiTBlock(torch.nn.Module):
    """A WanTransformerBlock with its rotary embedding for a fixed token grid baked in."""

    def __init__(self, block, rotary_emb):
        super().__init__()
        self.block = block
        self.register_buffer("rotary_cos", rotary_emb[0], persistent=False)
        self.register_buffer("rotary_sin", rotary_emb[1], persistent=False)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return self.block(hidden_states, encoder_hidden_states, temb, (self.rotary_cos, self.rotary_sin))


def dit_block(dim: int = 1536, heads: int = 12, ffn: int = 8960, grid=(1, 30, 52), text: int = 512, image: int = 257) -> Workload:
    from diffusers.models.transformers.transformer_wan import (
        WanRotaryPosEmbed,
        WanTransformerBlock,
    )

    torch.manual_seed(0)
    block = WanTransformerBlock(dim, ffn, heads, "rms_norm_across_heads", True, 1e-6, added_kv_proj_dim=dim).eval()
    rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 1024)
    latent = torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2)
    rotary = rope(latent)
    tokens = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, tokens, dim, generator=gen),
        "encoder_hidden_states": torch.randn(1, image + text, dim, generator=gen),
        "temb": torch.randn(1, 6, dim, generator=gen) * 0.1,
    }
    return Workload(
        "dit-block",
        _DiTBlock(block, rotary).eval(),
        inputs,
        f"Wan DiT block, dim {dim}, {heads} heads, ffn {ffn}, {tokens} tokens + {image} image + {text} text",
    )


def vae_up_block(latent_hw=(60, 104)) -> Workload:
    from . import get_model_spec

    vae = get_model_spec("wan2.1-i2v-14b-480p").component("vae_decoder").build_model()
    block = vae.decoder.up_blocks[0].eval()
    channels = vae.decoder.conv_in.out_channels
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, channels, 1, *latent_hw, generator=gen)

    class UpBlock(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    return Workload("vae-up-block", UpBlock(block).eval(), {"x": x}, f"Wan VAE decoder up_blocks[0], {channels} ch, 1 frame at {latent_hw[0]}x{latent_hw[1]}")


def tiny_component(component: str) -> Workload:
    from . import get_model_spec

    comp = get_model_spec("wan-i2v-tiny").component(component)
    return Workload(f"tiny-{component.replace('_', '-')}", comp.build_module(), comp.example_inputs(), f"wan-i2v-tiny {component}")


WORKLOADS = {
    "tiny-transformer": lambda: tiny_component("transformer"),
    "tiny-vae-decoder": lambda: tiny_component("vae_decoder"),
    "tiny-image-encoder": lambda: tiny_component("image_encoder"),
    "dit-block": dit_block,
    "vae-up-block": vae_up_block,
}


def get_workload(name: str) -> Workload:
    """The workload `name` (tiny-vae-decoder or tiny_vae_decoder)."""
    name = str(name).replace("_", "-")
    if name not in WORKLOADS:
        raise InputError(f"unknown workload '{name}'; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
