"""Wan2.1-I2V model zoo: the 14B config on the meta device, the tiny config end to end.

Everything runs on CPU in seconds: the 14B model is only ever built on the meta device, the tiny
model has seeded random weights (or a checkpoint the test writes itself)."""

import os

import pytest
import torch

from autotune.models import ComponentSpec, ModelSpec, get_model_spec, list_models
from autotune.models.wan import TEXT_TOKENS
from autotune.support.errors import InputError

TINY = "wan-i2v-tiny"
BIG = "wan2.1-i2v-14b-480p"
COMPONENTS = ["transformer", "vae_encoder", "vae_decoder", "image_encoder"]


def run(module, inputs: dict):
    with torch.no_grad():
        return module(*inputs.values())


def meta_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- registry ------------------------------------------------------------------------------


def test_registry():
    names = [m.name for m in list_models()]
    assert names == [BIG, TINY]
    spec = get_model_spec("WAN-I2V-Tiny")
    assert isinstance(spec, ModelSpec) and spec.name == TINY and spec.description
    assert list(spec.components) == COMPONENTS
    assert all(isinstance(c, ComponentSpec) for c in spec.components.values())
    with pytest.raises(ValueError, match=f"unknown model 'wan-t2v'.*{BIG}.*{TINY}"):
        get_model_spec("wan-t2v")
    with pytest.raises(ValueError, match="no component 'text_encoder'.*transformer, vae_encoder"):
        spec.component("text_encoder")


# --- 14B config on the meta device -------------------------------------------------------------


def test_14b_param_counts():
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec = get_model_spec(BIG)
    transformer = spec.component("transformer").param_count()
    assert transformer == pytest.approx(16.4e9, rel=0.02)
    # The VAE (127M) is split between the two VAE components, with nothing counted twice.
    with torch.device("meta"):
        vae = meta_params(AutoencoderKLWan())
        clip = CLIPVisionModel(CLIPVisionConfig(**spec.image_encoder_config))
    assert vae == pytest.approx(127e6, rel=0.01)
    assert spec.component("vae_encoder").param_count() + spec.component("vae_decoder").param_count() == vae
    # The image encoder drops CLIP's last layer (its output is not used).
    last_layer = meta_params(clip.encoder.layers[-1])
    assert spec.component("image_encoder").param_count() == meta_params(clip) - last_layer
    assert meta_params(clip) == pytest.approx(632e6, rel=0.01)


def test_14b_shapes():
    spec = get_model_spec(BIG)
    s = spec.derive_shapes(480, 832, 81)
    assert s["latent_shape"] == (1, 16, 21, 60, 104)
    assert s["tokens"] == 21 * 30 * 52 == 32_760
    assert (s["text_tokens"], s["image_tokens"], s["image_dim"]) == (512, 257, 1280)
    assert spec.derive_shapes() == s  # default resolution
    assert spec.derive_shapes(720, 1280, 5)["latent_shape"] == (1, 16, 2, 90, 160)

    t = spec.component("transformer")
    assert t.input_specs == {
        "hidden_states": ((1, 36, 21, 60, 104), "float32"),
        "timestep": ((1,), "float32"),
        "encoder_hidden_states": ((1, 512, 4096), "float32"),
        "encoder_hidden_states_image": ((1, 257, 1280), "float32"),
    }
    assert t.output_names == ["noise_pred"] and t.shape_info["tokens"] == 32_760
    assert spec.component("vae_encoder").input_specs == {"video": ((1, 3, 81, 480, 832), "float32")}
    assert spec.component("vae_decoder").input_specs == {"latents": ((1, 16, 21, 60, 104), "float32")}
    assert spec.component("image_encoder").input_specs == {"pixel_values": ((1, 3, 224, 224), "float32")}
    assert spec.component("vae_decoder", 240, 416, 33).input_specs["latents"][0] == (1, 16, 9, 30, 52)


@pytest.mark.parametrize(
    "size, message",
    [
        ((481, 832, 81), "height=481 is not a positive integer multiple of 16"),
        ((480, 840, 81), "width=840 is not a positive integer multiple of 16"),
        ((0, 832, 81), "height=0"),
        ((480, 832, 80), "frames=80 is not of the form 4k\\+1.*use e.g. 77 or 81"),
        ((480, 832, 0), "frames=0"),
        ((16 * 1040, 832, 81), "rotary embedding covers at most 1024"),
    ],
)
def test_bad_sizes_raise(size, message):
    spec = get_model_spec(BIG)
    with pytest.raises(ValueError, match=message):
        spec.derive_shapes(*size)
    with pytest.raises(ValueError, match=message):
        spec.component("transformer", *size)


def test_14b_flops_match_closed_form():
    """FlopCounterMode on meta tensors vs 2*MACs written out by hand."""
    spec = get_model_spec(BIG)
    N, L, d, ffn, txt, img, heads_dim = 32_760, 40, 5120, 13824, 512, 257, 128
    assert heads_dim * 40 == d
    per_layer = (
        2 * N * d * d * 4  # self-attention q, k, v, out
        + 2 * 2 * N * N * d  # self-attention QK^T, PV
        + 2 * N * d * d * 2  # cross-attention q, out
        + 2 * (txt + img) * d * d * 2  # cross-attention k, v of text and image tokens
        + 2 * 2 * N * (txt + img) * d  # cross-attention over text and image tokens
        + 2 * N * d * ffn * 2  # feed-forward
    )
    outside = (
        2 * N * 36 * 4 * d  # patch embedding, 1x2x2 conv
        + 2 * (256 * d + d * d + d * 6 * d)  # timestep embedding and projection
        + 2 * txt * (4096 * d + d * d)  # text projection
        + 2 * img * (1280 * 1280 + 1280 * d)  # image projection
        + 2 * N * d * 16 * 4  # output projection
    )
    assert spec.component("transformer").flops() == L * per_layer + outside

    D, T, mlp, layers = 1280, 257, 5120, 31  # CLIP ViT-H/14 up to hidden_states[-2]
    clip = 2 * 256 * (3 * 14 * 14) * D + layers * (2 * T * D * D * 4 + 2 * 2 * T * T * D + 2 * T * D * mlp * 2)
    assert spec.component("image_encoder").flops() == clip


# --- tiny config, eager ----------------------------------------------------------------------


def reference_outputs(spec, inputs: dict) -> dict:
    """Each component computed with the whole, unwrapped model, called the documented way."""
    t = spec.component("transformer").build_model()
    vae = spec.component("vae_encoder").build_model()
    clip = spec.component("image_encoder").build_model()
    with torch.no_grad():
        return {
            "transformer": t(**inputs["transformer"], return_dict=True).sample,
            "vae_encoder": vae.encode(inputs["vae_encoder"]["video"]).latent_dist.mean,
            "vae_decoder": vae.decode(inputs["vae_decoder"]["latents"]).sample,
            "image_encoder": clip(
                pixel_values=inputs["image_encoder"]["pixel_values"], output_hidden_states=True
            ).hidden_states[-2],
        }


@pytest.fixture(scope="module")
def tiny():
    spec = get_model_spec(TINY)
    inputs = {name: spec.component(name).example_inputs(seed=0) for name in COMPONENTS}
    return spec, inputs, reference_outputs(spec, inputs)


EXPECTED_TINY = {
    "transformer": (1, 16, 3, 8, 8),
    "vae_encoder": (1, 16, 3, 8, 8),
    "vae_decoder": (1, 3, 9, 64, 64),
    "image_encoder": (1, 17, 32),
}


@pytest.mark.parametrize("name", COMPONENTS)
def test_tiny_component_runs(tiny, name):
    spec, inputs, ref = tiny
    comp = spec.component(name)
    assert list(inputs[name]) == list(comp.input_specs)
    for x, (shape, dtype) in zip(inputs[name].values(), comp.input_specs.values()):
        assert tuple(x.shape) == shape and str(x.dtype) == f"torch.{dtype}"
    module = comp.build_module()
    assert not module.training
    out = run(module, inputs[name])
    assert tuple(out.shape) == EXPECTED_TINY[name]
    assert torch.equal(out, ref[name])
    assert comp.param_count() == sum(p.numel() for p in module.parameters())


def test_tiny_example_inputs():
    comp = get_model_spec(TINY).component("transformer")
    a, b = comp.example_inputs(seed=0), comp.example_inputs(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.values(), comp.example_inputs(seed=0).values()))
    assert not torch.equal(a["hidden_states"], b["hidden_states"])
    t = a["timestep"]
    assert t.shape == (1,) and t.dtype == torch.float32 and 0 <= t.item() < 1000 and t.item() == int(t.item())
    video = get_model_spec(TINY).component("vae_encoder").example_inputs()["video"]
    assert -1 <= video.min() and video.max() <= 1


def test_tiny_transformer_needs_512_text_tokens(tiny):
    spec, inputs, _ = tiny
    x = dict(inputs["transformer"])
    assert x["encoder_hidden_states"].shape[1] == TEXT_TOKENS
    x["encoder_hidden_states"] = x["encoder_hidden_states"][:, :100]
    with pytest.raises(ValueError, match="has 100 tokens.*needs exactly 512"):
        run(spec.component("transformer").build_module(), x)


def test_tiny_vae_decoder_is_causal(tiny):
    """Output frame 0 depends on latent frame 0 only; frames 1-4 on latent frames 0-1 only."""
    spec, inputs, ref = tiny
    z = inputs["vae_decoder"]["latents"].clone()
    z[:, :, 2] += 1.0
    out = run(spec.component("vae_decoder").build_module(), {"latents": z})
    assert torch.equal(out[:, :, :5], ref["vae_decoder"][:, :, :5])
    assert not torch.equal(out[:, :, 5:], ref["vae_decoder"][:, :, 5:])


def test_tiny_other_resolution():
    spec = get_model_spec(TINY)
    comp = spec.component("vae_decoder", height=32, width=48, frames=5)
    assert comp.input_specs == {"latents": ((1, 16, 2, 4, 6), "float32")}
    out = run(comp.build_module(), comp.example_inputs())
    assert tuple(out.shape) == (1, 3, 5, 32, 48)


# --- tiny config, local checkpoint ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A diffusers-layout checkpoint of the tiny model's random weights."""
    root = tmp_path_factory.mktemp("wan-i2v-tiny")
    spec = get_model_spec(TINY)
    for name in ("transformer", "vae_encoder", "image_encoder"):
        comp = spec.component(name)
        comp.build_model().save_pretrained(root / comp.checkpoint_subfolder)
    assert sorted(os.listdir(root)) == ["image_encoder", "transformer", "vae"]
    return root


@pytest.mark.parametrize("name", COMPONENTS)
def test_tiny_local_weights_round_trip(tiny, tiny_checkpoint, name):
    spec, inputs, ref = tiny
    loaded = spec.component(name).build_module(weights_dir=str(tiny_checkpoint))
    assert not loaded.training
    # The round trip is exact in the weights. The outputs are compared to 1e-6: with equal weights
    # in other memory, oneDNN/MKL can take another code path (seen on AMD Zen 4: 6e-7 apart).
    seeded = spec.component(name).build_module()
    ours, theirs = seeded.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(run(loaded, inputs[name]), ref[name], rtol=0, atol=1e-6)


def test_tiny_local_weights_bfloat16(tiny_checkpoint):
    """Loaded and random bfloat16 builds agree, keeping the same modules in float32."""
    comp = get_model_spec(TINY).component("transformer")
    a = comp.build_module(dtype=torch.bfloat16)
    b = comp.build_module(weights_dir=tiny_checkpoint, dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in a.state_dict().items()}
    assert dtypes == {k: v.dtype for k, v in b.state_dict().items()}
    assert dtypes["transformer.proj_out.weight"] == torch.bfloat16
    assert dtypes["transformer.blocks.0.scale_shift_table"] == torch.float32
    x = comp.example_inputs(dtype=torch.bfloat16)
    assert torch.equal(run(a, x), run(b, x))


def test_tiny_clip_checkpoint_with_legacy_keys(tiny, tmp_path):
    """The Wan checkpoint's image_encoder was saved by transformers 4 (keys 'vision_model.*')."""
    from safetensors.torch import save_file

    spec, inputs, ref = tiny
    model = spec.component("image_encoder").build_model()
    model.save_pretrained(tmp_path / "image_encoder")
    state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "image_encoder" / "model.safetensors", metadata={"format": "pt"})
    loaded = spec.component("image_encoder").build_module(weights_dir=tmp_path)
    assert torch.equal(run(loaded, inputs["image_encoder"]), ref["image_encoder"])


def test_bad_weights_dir(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="transformer/config.json not found.*transformer/, vae/ and image_encoder/"):
        get_model_spec(TINY).component("transformer").build_module(weights_dir=tmp_path)
    with pytest.raises(ValueError, match="is not a 'wan2.1-i2v-14b-480p' checkpoint: .*num_layers=2 \\(expected 40\\)"):
        get_model_spec(BIG).component("transformer").build_module(weights_dir=tiny_checkpoint)


# --- tiny config, torch.export ---------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPONENTS)
def test_tiny_torch_export(tiny, name):
    """torch.export.export (what the TVM importer uses) traces each component; the exported
    program reproduces eager on inputs it was not traced with, and carries only the weights the
    component uses."""
    spec, inputs, _ = tiny
    comp = spec.component(name)
    module = comp.build_module()
    ep = torch.export.export(module, tuple(comp.example_inputs(seed=0).values()))
    params = sum(ep.state_dict[n].numel() for n in ep.graph_signature.parameters)
    assert params == comp.param_count()
    other = comp.example_inputs(seed=1)
    assert torch.equal(ep.module()(*other.values()), run(module, other))


def test_tiny_transformer_import_and_fuse_print_no_warnings():
    """Importing and fusing the tiny transformer (what `autotune demo` does first) is quiet: no
    TOPI "Fast mode segfaults ..." lines (every gather the importer emits names a safe take mode;
    the rotary embedding's slice_scatter gathers in bounds) and no torch pytree FutureWarning."""
    import subprocess
    import sys

    code = (
        "from autotune.frontend.sources import load_source\n"
        "from autotune.support.targets import resolve_target\n"
        "from autotune.passes.pipeline import prepare_model, fuse_for_target\n"
        "s = load_source('wan-i2v-tiny', 'transformer')\n"
        "p = resolve_target('x86')\n"
        "m, _ = prepare_model(s.imported, p, None)\n"
        "fuse_for_target(m.mod, p.tvm_target())\n"
        "print('fused')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-W", "default::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "fused" in proc.stdout, output[-3000:]
    assert "Fast mode segfaults" not in output, output[-3000:]
    assert "FutureWarning" not in output, output[-3000:]


def test_benchmark_workloads_are_models_for_every_command():
    """`--model dit-block` etc.: a bench workload imports like a zoo model, with its torch reference."""
    from autotune.frontend.sources import load_source
    from autotune.models.workloads import get_workload

    source = load_source("tiny-image-encoder")
    workload = get_workload("tiny-image-encoder")
    assert source.name == "tiny-image-encoder" and [s.name for s in source.imported.inputs] == list(workload.inputs)
    with torch.no_grad():
        expected = workload.module(*workload.inputs.values())
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    got = source.reference_outputs()[0]
    assert got.shape == tuple(expected.shape) and float(abs(got - expected.numpy()).max()) == 0.0  # same seeded module
    with pytest.raises(InputError, match="unknown"):
        load_source("no-such-model")
