"""Structured pruning (FFN channels, attention heads) on the torch module, then import and build."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import autotune
import autotune.build.compile as build_module
from autotune.frontend.prune import find_units, parse_spec, prune
from autotune.frontend.sources import load_source
from autotune.support.errors import InputError
from autotune.support.fidelity import compare, format_fidelity
from autotune.support.settings import BuildSettings


@pytest.fixture(scope="module")
def transformer():
    source = load_source("wan-i2v-tiny", "transformer")
    return source, source.reference_outputs()[0]


def _torch_out(module, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return module(*[torch.from_numpy(v) for v in inputs.values()]).numpy()


# -- the spec -------------------------------------------------------------------------------------


def test_spec_parsing():
    spec = parse_spec("ffn=0.5, heads=0.75")
    assert (spec.ffn, spec.heads) == (0.5, 0.75) and str(spec) == "ffn=0.5,heads=0.75"
    assert parse_spec({"ffn": 0.25}).heads == 1.0
    for bad, message in [
        ("ffn=0", "kept fraction"),
        ("ffn=1.5", "kept fraction"),
        ("mlp=0.5", "unknown kind 'mlp'"),
        ("ffn", "not KIND=FRACTION"),
        ("ffn=half", "not a number"),
        ("", "nothing to prune"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_spec(bad)


def test_imported_model_and_unprunable_module_are_clear_errors(transformer):
    with pytest.raises(InputError, match="before import"):
        prune(transformer[0].imported, "ffn=0.5")
    with pytest.raises(InputError, match="no feed-forward block"):
        prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), "ffn=0.5")
    with pytest.raises(InputError, match="no attention layer"):
        prune(torch.nn.Sequential(torch.nn.Linear(4, 4)), "heads=0.5")


# -- exactness: pruning units that contribute nothing changes nothing -----------------------------


def test_pruning_dead_ffn_channels_is_exact(transformer):
    source, _ = transformer
    module = source.reference
    original = _torch_out(module, source.example_inputs)
    dead = copy.deepcopy(module)
    ffns, _ = find_units(dead)
    assert len(ffns) == 3  # the image embedder's FFN and one per block
    with torch.no_grad():
        for _, ffn in ffns:
            up, down = ffn.net[0].proj, ffn.net[2]
            half = down.in_features // 2
            up.weight[half:] = 0
            up.bias[half:] = 0
            down.weight[:, half:] = 0
    reference = _torch_out(dead, source.example_inputs)
    pruned, info = prune(dead, "ffn=0.5")
    assert [layer["after"] for layer in info["layers"]] == [16, 32, 32]
    assert np.allclose(_torch_out(pruned, source.example_inputs), reference, atol=1e-6)
    assert info["params_after"] < info["params_before"]
    assert np.array_equal(_torch_out(module, source.example_inputs), original), "prune() must not modify its argument"


class _TinyAttention(torch.nn.Module):
    """Multi-head self-attention with the diffusers attribute names (to_q/k/v, to_out, heads)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).unflatten(2, (self.heads, -1)).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](a.transpose(1, 2).flatten(2))


def test_pruning_dead_heads_is_exact():
    torch.manual_seed(0)
    attn = _TinyAttention().eval()
    with torch.no_grad():  # heads 1 and 3 write nothing
        for h in (1, 3):
            attn.to_out[0].weight[:, h * 8 : (h + 1) * 8] = 0
            attn.to_v.weight[h * 8 : (h + 1) * 8] = 0
            attn.to_v.bias[h * 8 : (h + 1) * 8] = 0
    x = torch.randn(1, 10, 32)
    with torch.no_grad():
        reference = attn(x)
    pruned, info = prune(attn, "heads=0.5")
    assert pruned.heads == 2 and info["layers"][0]["kept"] == [0, 2]
    with torch.no_grad():
        assert torch.allclose(pruned(x), reference, atol=1e-6)


def test_activation_score_uses_calibration_inputs(transformer):
    source, reference = transformer
    with pytest.raises(InputError, match="calibration_inputs"):
        prune(source.reference, "ffn=0.5", score="activation")
    pruned, info = prune(source.reference, "ffn=0.75", score="activation", calibration_inputs=source.example_inputs)
    assert info["score"] == "activation"
    # measured: cosine 0.995 (activation score) vs 0.976 (magnitude) on the tiny model's random weights
    assert compare(_torch_out(pruned, source.example_inputs), reference)["cosine"] >= 0.99


# -- the Wan transformer: prune heads and FFN, re-import, build, run ------------------------------


def test_pruned_wan_transformer_builds_and_matches_pruned_torch(transformer, tmp_path):
    source, reference = transformer
    pruned, info = prune(source, "ffn=0.5,heads=0.5")
    assert info["ffn_layers"] == 3 and info["attention_layers"] == 4
    assert all(layer["after"] == 1 for layer in info["layers"] if layer["kind"] == "heads")
    assert info["weight_bytes_after"] < 0.75 * info["weight_bytes_before"]
    assert [s.name for s in pruned.imported.inputs] == [s.name for s in source.imported.inputs]
    assert [s.name for s in pruned.imported.outputs] == [s.name for s in source.imported.outputs]
    attn = pruned.reference.transformer.blocks[0].attn2
    assert attn.heads == 1 and attn.norm_q.weight.shape == (16,) and attn.add_k_proj.out_features == 16

    report = build_module.build(
        pruned.imported, "x86", tmp_path / "pruned.so", settings=BuildSettings(quantize="int8-weight", prune=info["spec"])
    )
    out = autotune.load(report.paths.library)(**source.example_inputs)
    compiled = compare(out, pruned.reference_outputs()[0])  # the compile (int8) against pruned torch
    assert compiled["cosine"] >= 0.9995, format_fidelity(compiled)
    metadata = json.loads(report.paths.metadata.read_text())
    assert metadata["settings"]["prune"] == "ffn=0.5,heads=0.5"
    # what pruning half of everything costs on random weights: honest, not small
    assert compare(out, reference)["cosine"] > 0.8
