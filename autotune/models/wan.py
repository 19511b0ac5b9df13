"""Wan2.1 image-to-video: the 14B-480P model and a tiny model of the same architecture.

The components are the real classes, with seeded random weights or weights from a local
diffusers-format checkpoint (the layout of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers):

  transformer    diffusers.WanTransformer3DModel, one denoising step
  vae_encoder    diffusers.AutoencoderKLWan.encode -> posterior mean (its decoder is dropped)
  vae_decoder    diffusers.AutoencoderKLWan.decode (its encoder is dropped)
  image_encoder  transformers.CLIPVisionModel -> hidden_states[-2] (its last layer is dropped)

Shapes, for height H, width W, frames F (F = 4k+1; H, W multiples of 16):
  latent frames T = (F-1)//4 + 1, latent (1, 16, T, H/8, W/8)
  transformer input (1, 36, T, H/8, W/8): 16 noise + 4 mask + 16 image-latent channels
  transformer tokens T * (H/16) * (W/16) (patch 1x2x2); 480x832x81 -> 21*30*52 = 32,760

Text context: always 512 tokens. diffusers' WanAttnProcessor hard-codes it: the I2V cross-attention
receives cat(image tokens, text tokens) and takes the LAST 512 as text, the rest as image. Any
other text length silently mixes image and text tokens, so the tiny model keeps 512 text tokens
(of a narrow text_dim) and the transformer module refuses another length.
"""

from __future__ import annotations

import os

import torch

from autotune.support.errors import InputError

from .spec import ComponentSpec, ModelSpec

TEXT_TOKENS = 512  # hard-coded in diffusers.models.transformers.transformer_wan.WanAttnProcessor
COMPONENTS = ("transformer", "vae_encoder", "vae_decoder", "image_encoder")
SEEDS = {"transformer": 0, "vae": 1, "image_encoder": 2}  # vae_encoder/vae_decoder share one VAE
SUBFOLDERS = {"transformer": "transformer", "vae_encoder": "vae", "vae_decoder": "vae", "image_encoder": "image_encoder"}
CHECKPOINT_HINT = (
    "expected a local diffusers-format Wan2.1-I2V checkpoint directory with transformer/, vae/ and "
    "image_encoder/ subfolders (e.g. `huggingface-cli download Wan-AI/Wan2.1-I2V-14B-480P-Diffusers "
    "--local-dir DIR`)"
)

# transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (16.4B parameters)
WAN_14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
# vae/config.json: AutoencoderKLWan's defaults (127M parameters)
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
# image_encoder/config.json: CLIP ViT-H/14 vision tower (632M parameters)
WAN_CLIP_VIT_H14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)

# Same architecture, tiny widths; runs in well under a second on a 2-core CPU.
TINY_TRANSFORMER = dict(
    WAN_14B_TRANSFORMER,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    image_dim=32,
    added_kv_proj_dim=32,
)
# z_dim stays 16 (transformer in_channels 36 = 16 + 4 + 16); all 3 down/up-sampling stages and
# both temporal ones kept, so the causal feature-cache path is exercised.
TINY_VAE = dict(WAN_VAE, base_dim=8)
TINY_CLIP = dict(
    WAN_CLIP_VIT_H14,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)


def check_text_tokens(encoder_hidden_states) -> None:
    if encoder_hidden_states.shape[1] != TEXT_TOKENS:
        raise InputError(
            f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens; the Wan I2V transformer "
            f"needs exactly {TEXT_TOKENS} (diffusers splits image from text tokens assuming {TEXT_TOKENS}); "
            f"pad or truncate the text embeddings to {TEXT_TOKENS} tokens"
        )


class WanTransformerStep(torch.nn.Module):
    """One denoising step: forward(hidden_states, timestep, encoder_hidden_states,
    encoder_hidden_states_image) -> noise_pred."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image):
        check_text_tokens(encoder_hidden_states)
        return self.transformer(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict=False
        )[0]


class WanVaeEncode(torch.nn.Module):
    """forward(video) -> posterior mean: vae.encode(video).latent_dist.mode().

    Takes ownership of `vae` and drops its decoder and post_quant_conv, which encode never uses
    (torch.export would otherwise carry their weights). The Wan pipeline then normalizes the
    latent with vae.config.latents_mean/latents_std; that is left to the caller."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        vae.decoder = None
        vae.post_quant_conv = None
        self.vae = vae

    def forward(self, video):
        return self.vae.encode(video).latent_dist.mode()


class WanVaeDecode(torch.nn.Module):
    """forward(latents) -> video in [-1, 1]: vae.decode(latents, return_dict=False)[0].

    The decoder runs latent frame by latent frame with a causal feature cache (a Python list
    held by the VAE); torch.export unrolls that loop into one static graph. Takes ownership of
    `vae` and drops its encoder and quant_conv."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        vae.encoder = None
        vae.quant_conv = None
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class ClipPenultimate(torch.nn.Module):
    """forward(pixel_values) -> hidden_states[-2] of CLIPVisionModel (what Wan I2V conditions on).

    hidden_states[-2] is the output of the second-to-last encoder layer, so the last layer is
    dropped and last_hidden_state returned: same values, without computing (or exporting the
    weights of) a layer whose output is thrown away."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        clip.encoder.layers = clip.encoder.layers[:-1]
        self.image_encoder = clip

    def forward(self, pixel_values):
        return self.image_encoder(pixel_values=pixel_values).last_hidden_state


class WanI2VSpec(ModelSpec):
    """A Wan2.1 I2V model: transformer + VAE + CLIP image encoder configs and a default resolution."""

    component_names = COMPONENTS

    def __init__(
        self,
        name: str,
        description: str,
        transformer: dict,
        vae: dict,
        image_encoder: dict,
        default_resolution: tuple[int, int, int],
    ):
        self.name = name
        self.description = description
        self.transformer_config = transformer
        self.vae_config = vae
        self.image_encoder_config = image_encoder
        self.default_resolution = default_resolution
        self._check_consistent()

    # --- sizes -----------------------------------------------------------------------------
    @property
    def vae_spatial_factor(self) -> int:
        return 2 ** (len(self.vae_config["dim_mult"]) - 1)

    @property
    def vae_temporal_factor(self) -> int:
        return 2 ** sum(self.vae_config["temperal_downsample"])

    @property
    def image_tokens(self) -> int:
        c = self.image_encoder_config
        return (c["image_size"] // c["patch_size"]) ** 2 + 1

    def _check_consistent(self) -> None:
        t, z = self.transformer_config, self.vae_config["z_dim"]
        expected = {
            "in_channels": 2 * z + self.vae_temporal_factor,  # noise + mask + image latent
            "out_channels": z,
            "image_dim": self.image_encoder_config["hidden_size"],
            "added_kv_proj_dim": t["num_attention_heads"] * t["attention_head_dim"],
        }
        bad = {k: (t[k], v) for k, v in expected.items() if t[k] != v}
        if bad:
            mismatches = ", ".join(f"transformer {k}={got}, expected {want}" for k, (got, want) in bad.items())
            raise ValueError(f"inconsistent Wan config {self.name!r}: {mismatches}")

    def derive_shapes(self, height: int | None = None, width: int | None = None, frames: int | None = None) -> dict:
        """Latent shape, token counts, etc. for a video of (height, width, frames); None -> default.

        Raises InputError (a ValueError) unless height and width are positive multiples of 16 and
        frames is 4k+1."""
        height, width, frames = self._resolve(height, width, frames)
        s, ft = self.vae_spatial_factor, self.vae_temporal_factor
        pt, ph, pw = self.transformer_config["patch_size"]
        for label, v, m in (("height", height, s * ph), ("width", width, s * pw)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise InputError(
                    f"{label}={v!r} is not a positive integer multiple of {m} (the VAE downsamples by {s}, the "
                    f"transformer patchifies by {m // s}); use e.g. {_nearest_multiple(v, m)}"
                )
        if not isinstance(frames, int) or frames <= 0 or (frames - 1) % ft:
            near = max(1, ((frames - 1) // ft) * ft + 1) if isinstance(frames, int) and frames > 0 else 81
            raise InputError(
                f"frames={frames!r} is not of the form {ft}k+1 (the Wan VAE encodes the first frame alone, then "
                f"{ft} frames per latent frame); use e.g. {near} or {near + ft}"
            )
        z = self.vae_config["z_dim"]
        t, h, w = (frames - 1) // ft + 1, height // s, width // s
        grid = (t // pt, h // ph, w // pw)
        rope = self.transformer_config["rope_max_seq_len"]
        if max(grid) > rope:
            raise InputError(
                f"{height}x{width}x{frames} gives a token grid {grid}; the transformer's rotary embedding "
                f"covers at most {rope} positions per axis; use a smaller resolution"
            )
        return {
            "height": height,
            "width": width,
            "frames": frames,
            "video_shape": (1, 3, frames, height, width),
            "latent_frames": t,
            "latent_height": h,
            "latent_width": w,
            "latent_shape": (1, z, t, h, w),
            "transformer_input_shape": (1, self.transformer_config["in_channels"], t, h, w),
            "token_grid": grid,
            "tokens": grid[0] * grid[1] * grid[2],
            "text_tokens": TEXT_TOKENS,
            "text_dim": self.transformer_config["text_dim"],
            "image_size": self.image_encoder_config["image_size"],
            "image_tokens": self.image_tokens,
            "image_dim": self.image_encoder_config["hidden_size"],
        }

    # --- components ------------------------------------------------------------------------
    def _component(self, name: str, height: int, width: int, frames: int) -> ComponentSpec:
        """The image encoder's input is always image_size x image_size (the CLIP processor resizes);
        height/width/frames only matter to the other components."""
        if name == "image_encoder":
            size = self.image_encoder_config["image_size"]
            info = {
                "image_size": size,
                "image_tokens": self.image_tokens,
                "image_dim": self.image_encoder_config["hidden_size"],
            }
            inputs = {"pixel_values": ((1, 3, size, size), "float32")}
            return self._spec(name, inputs, ["image_embeds"], info, self._make_clip, self._load_clip, ClipPenultimate)
        info = self.derive_shapes(height, width, frames)
        if name == "transformer":
            inputs = {
                "hidden_states": (info["transformer_input_shape"], "float32"),
                "timestep": ((1,), "float32"),
                "encoder_hidden_states": ((1, TEXT_TOKENS, info["text_dim"]), "float32"),
                "encoder_hidden_states_image": ((1, info["image_tokens"], info["image_dim"]), "float32"),
            }
            return self._spec(
                name, inputs, ["noise_pred"], info, self._make_transformer, self._load_transformer,
                WanTransformerStep, {"timestep": "timestep"},
            )
        if name == "vae_encoder":
            inputs = {"video": (info["video_shape"], "float32")}
            return self._spec(
                name, inputs, ["latent_mean"], info, self._make_vae, self._load_vae, WanVaeEncode, {"video": "uniform"}
            )
        inputs = {"latents": (info["latent_shape"], "float32")}  # vae_decoder
        return self._spec(name, inputs, ["video"], info, self._make_vae, self._load_vae, WanVaeDecode)

    def _spec(self, name, inputs, outputs, info, make, load, wrap, fills=None) -> ComponentSpec:
        return ComponentSpec(
            name=name,
            model_name=self.name,
            input_specs=inputs,
            output_names=outputs,
            shape_info=info,
            seed=SEEDS[SUBFOLDERS[name]],
            checkpoint_subfolder=SUBFOLDERS[name],
            make_model=make,
            load_model=load,
            wrap=wrap,
            fills=fills or {},
        )

    # --- the real classes --------------------------------------------------------------------
    def _make_transformer(self):
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**self.transformer_config)

    def _make_vae(self):
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan(**self.vae_config)

    def _clip_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**self.image_encoder_config)

    def _make_clip(self):
        from transformers import CLIPVisionModel

        return CLIPVisionModel(self._clip_config())

    def _load_transformer(self, weights_dir: str, dtype: torch.dtype):
        from diffusers import WanTransformer3DModel

        _require_subfolder(weights_dir, "transformer")
        model = WanTransformer3DModel.from_pretrained(
            weights_dir, subfolder="transformer", torch_dtype=dtype, low_cpu_mem_usage=True, local_files_only=True
        )
        self._check_loaded("transformer", weights_dir, self.transformer_config, dict(model.config))
        return model

    def _load_vae(self, weights_dir: str, dtype: torch.dtype):
        from diffusers import AutoencoderKLWan

        _require_subfolder(weights_dir, "vae")
        model = AutoencoderKLWan.from_pretrained(
            weights_dir, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=True, local_files_only=True
        )
        self._check_loaded("vae", weights_dir, self.vae_config, dict(model.config))
        return model

    def _load_clip(self, weights_dir: str, dtype: torch.dtype):
        from transformers import CLIPVisionModel

        _require_subfolder(weights_dir, "image_encoder")
        # transformers 5 always loads onto the meta device first, then the weights (no second copy).
        model = CLIPVisionModel.from_pretrained(
            weights_dir, subfolder="image_encoder", dtype=dtype, local_files_only=True
        )
        self._check_loaded("image_encoder", weights_dir, self.image_encoder_config, model.config.to_dict())
        return model

    def _check_loaded(self, sub: str, weights_dir: str, expected: dict, actual: dict) -> None:
        def norm(v):
            return list(v) if isinstance(v, (list, tuple)) else v

        bad = [f"{k}={norm(actual.get(k))!r} (expected {norm(v)!r})" for k, v in expected.items()
               if norm(actual.get(k)) != norm(v)]
        if bad:
            others = [m.name for m in MODELS if m is not self]
            raise InputError(
                f"{os.path.join(weights_dir, sub)} is not a {self.name!r} checkpoint: {', '.join(bad)}; "
                f"pick the model spec that matches the checkpoint (other known models: {', '.join(others)})"
            )


def _nearest_multiple(v, m: int) -> int:
    return max(m, round(v / m) * m) if isinstance(v, (int, float)) else 30 * m


def _require_subfolder(weights_dir: str, sub: str) -> None:
    config = os.path.join(weights_dir, sub, "config.json")
    if not os.path.isfile(config):
        raise InputError(f"{config} not found: {CHECKPOINT_HINT}")


MODELS = [
    WanI2VSpec(
        "wan2.1-i2v-14b-480p",
        "Wan2.1 image-to-video 14B, 480P (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers): 40-layer 5120-wide "
        "DiT, Wan VAE, CLIP ViT-H/14 image encoder; default 480x832, 81 frames",
        WAN_14B_TRANSFORMER,
        WAN_VAE,
        WAN_CLIP_VIT_H14,
        (480, 832, 81),
    ),
    WanI2VSpec(
        "wan-i2v-tiny",
        "Wan2.1 I2V architecture at toy width (2 layers, dim 32; VAE base_dim 8; CLIP 2 layers, 32x32 "
        "images) for tests; default 64x64, 9 frames",
        TINY_TRANSFORMER,
        TINY_VAE,
        TINY_CLIP,
        (64, 64, 9),
    ),
]
