"""The Wan transformer built block-wise: prologue, one block for every layer, epilogue.

Checkpoints are written by the tests (save_pretrained, tools/synthetic_checkpoint.py); the torch
reference is diffusers' own WanTransformer3DModel loaded from the same checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_abs_diff, run_fresh

import autotune
from autotune.build.blockwise import build_blockwise
from autotune.frontend.blockwise import load_blockwise_source
from autotune.models import get_model_spec
from autotune.models.wan import TINY_TRANSFORMER, WanTransformerStep
from autotune.support.errors import ArtifactError, InputError
from autotune.support.resources import available_bytes

TOL = 1e-4  # float32, as the whole-graph build
ROOT = Path(__file__).resolve().parents[2]


def write_checkpoint(directory: Path, config: dict, layers: int, seed: int = 0) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**config, "num_layers": layers}).eval()
    model.save_pretrained(str(directory / "transformer"))
    return model


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    """A 3-layer wan-i2v-tiny checkpoint (the spec says 2: a checkpoint's layer count is honoured),
    built block-wise for x86 with the shipped log."""
    root = tmp_path_factory.mktemp("blockwise")
    write_checkpoint(root / "ckpt", TINY_TRANSFORMER, layers=3)
    source = load_blockwise_source("wan-i2v-tiny", weights=str(root / "ckpt"))
    report = build_blockwise(source, "x86", root / "out" / "transformer.so", progress=lambda _: None)
    return root, source, report


def test_checkpoint_builds_blockwise_and_matches_diffusers(three_layers):
    from diffusers import WanTransformer3DModel

    root, source, report = three_layers
    assert source.num_layers == 3
    manifest = json.loads(report.paths.metadata.read_text())
    assert manifest["kind"] == "blockwise" and len(manifest["layers"]) == 3
    assert sorted(p.name for p in (root / "out" / "transformer").glob("*.so")) == ["block.so", "epilogue.so", "prologue.so"]
    reference = WanTransformer3DModel.from_pretrained(str(root / "ckpt"), subfolder="transformer", local_files_only=True)
    with torch.no_grad():
        expected = WanTransformerStep(reference.eval())(*[torch.from_numpy(v) for v in source.example_inputs.values()]).numpy()
    for layers in ("resident", "stream"):
        module = autotune.load(report.paths.library, layers=layers)
        out = module(**source.example_inputs)
        assert out.shape == expected.shape
        assert max_abs_diff(out, expected) <= TOL, layers
    torch_out = module(**{k: torch.from_numpy(v) for k, v in source.example_inputs.items()})
    assert isinstance(torch_out, torch.Tensor) and max_abs_diff(torch_out, expected) <= TOL


def test_block_is_one_set_of_tuning_tasks_whose_records_serve_every_layer(three_layers):
    from autotune.passes.pipeline import fuse_for_target
    from autotune.support.ir import prim_funcs
    from autotune.support.targets import resolve_target
    from autotune.tuning.log import structure_key
    from autotune.tuning.tune import unit_tasks

    _, source, report = three_layers
    preset = resolve_target("x86")
    tasks = unit_tasks(source.tune_units(), preset, None)
    block = fuse_for_target(source.units["block"].mod, preset.tvm_target())
    block_keys = {structure_key(f) for f in prim_funcs(block).values()}
    keys = [structure_key(t.dispatched[0]["main"]) for t in tasks]
    assert len(keys) == len(set(keys))  # a kernel shared by units is one task
    # each block kernel is one task (not one per layer), weighted by the 3 layers that run it
    block_tasks = [t for t, k in zip(tasks, keys) if k in block_keys]
    assert 0 < len(block_tasks) <= len(block_keys)
    assert all(int(t.weight) >= 3 for t in block_tasks)
    assert all(int(t.weight) < 3 for t, k in zip(tasks, keys) if k not in block_keys)


def test_shipped_records_serve_every_layer_of_the_block(three_layers):
    """One block library, 3 weight files: the shipped log's records for the block tune all three."""
    from autotune.support.package_data import shipped_log_dir
    from autotune.support.targets import resolve_target
    from autotune.tuning.log import (
        record_fits_target,
        record_lines,
        schedule_isa,
        target_key,
    )

    host = resolve_target("x86").tvm_target()
    key, isa = target_key(host), schedule_isa(host)
    # (the lines alone: reading the log's workloads takes a minute)
    fits = any(record_fits_target(line, key, isa) for line in record_lines(shipped_log_dir("x86")))
    if not fits:
        pytest.skip(f"the shipped x86 log has no records for this CPU's vector ISA ({isa.vector})")
    report = three_layers[2]
    assert report.units["block"].tuned_kernels == report.units["block"].kernels > 0


def test_fp16_on_x86_ships_every_layer_in_float16_and_computes_as_float32(three_layers):
    """--quantize fp16 on x86 (the float32 build, weight matrices stored float16): every layer file
    holds its matrices in float16, the block's kernels are the float32 block's, and the output is
    the float32 build's up to the weights' rounding (cosine >= 0.99999; measured 1.000000)."""
    from safetensors import safe_open

    from autotune.build.blockwise import build_blockwise
    from autotune.support.fidelity import compare
    from autotune.support.settings import BuildSettings

    root, source, float32 = three_layers
    report = build_blockwise(source, "x86", root / "fp16" / "transformer.so", settings=BuildSettings(quantize="fp16"),
                             progress=lambda _: None)
    manifest = json.loads(report.paths.metadata.read_text())
    for layer in manifest["layers"]:
        with safe_open(str(report.paths.metadata.parent / layer["name"]), framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        half = {name for name, t in tensors.items() if t.dtype == np.float16}
        matrices = {name for name, t in tensors.items() if t.ndim >= 2 and t.dtype in (np.float16, np.float32)}
        assert half and half == matrices, layer["name"]
    assert report.units["block"].kernels == float32.units["block"].kernels
    assert report.units["block"].tuned_kernels == float32.units["block"].tuned_kernels
    before = sum(entry["bytes"] for entry in json.loads(float32.paths.metadata.read_text())["layers"])
    assert sum(entry["bytes"] for entry in manifest["layers"]) < 0.55 * before
    out = autotune.load(report.paths.library)(**source.example_inputs)
    assert compare(out, autotune.load(float32.paths.library)(**source.example_inputs))["cosine"] >= 0.99999


def test_checkpoint_errors_are_plain(tmp_path, three_layers):
    root, _, _ = three_layers
    bad = tmp_path / "bad"
    shutil.copytree(root / "ckpt", bad)
    config = json.loads((bad / "transformer" / "config.json").read_text())
    config["num_attention_heads"] = 4
    (bad / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"num_attention_heads=4 \(expected 2\)"):
        load_blockwise_source("wan-i2v-tiny", weights=str(bad))
    with pytest.raises(InputError, match="transformer/config.json not found"):
        load_blockwise_source("wan-i2v-tiny", weights=str(tmp_path))
    # the 14B model has no embedded weights: a checkpoint is asked for, and how to make one
    spec = get_model_spec("wan2.1-i2v-14b-480p")
    if spec.component("transformer").param_count() * 8 < available_bytes():
        pytest.skip("this machine could hold the 14B model's random weights")
    with pytest.raises(InputError, match="synthetic_checkpoint.py"):
        load_blockwise_source("wan2.1-i2v-14b-480p")


def test_damaged_layer_file_is_refused(tmp_path, three_layers):
    root, _, report = three_layers
    copy = tmp_path / "out"
    shutil.copytree(root / "out", copy)
    layer = copy / "transformer" / "layers" / "001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="001.safetensors: layer weights file is .* truncated"):
        autotune.load(copy / "transformer.so")


def test_synthetic_checkpoint_is_a_diffusers_checkpoint(tmp_path, monkeypatch, capsys):
    """tools/synthetic_checkpoint.py: sharded, indexed, loadable by diffusers, equal to what autotune reads."""
    from diffusers import WanTransformer3DModel

    from autotune.models.wan_blocks import CheckpointWeights

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import synthetic_checkpoint

    out = tmp_path / "synthetic"
    argv = ["--model", "wan-i2v-tiny", "--layers", "3", "--components", "transformer", "--shard-gib", "0.00005", "-o", str(out)]
    assert synthetic_checkpoint.main(argv) == 0
    shards = sorted((out / "transformer").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    capsys.readouterr()
    assert synthetic_checkpoint.main(argv) == 0  # complete shards are kept
    assert capsys.readouterr().out.count("complete, kept") == len(shards)
    model = WanTransformer3DModel.from_pretrained(str(out), subfolder="transformer", local_files_only=True)
    assert len(model.blocks) == 3
    spec = get_model_spec("wan-i2v-tiny")
    weights = CheckpointWeights(out, spec.transformer_config, spec.name)
    state = model.state_dict()
    assert weights.num_layers == 3
    for name in ("blocks.2.ffn.net.0.proj.weight", "condition_embedder.text_embedder.linear_1.weight", "proj_out.bias"):
        np.testing.assert_array_equal(weights.get(name), state[name].float().numpy())
    assert float(state["blocks.2.ffn.net.0.proj.weight"].float().std()) == pytest.approx(32**-0.5, rel=0.1)


# A width at which one layer's weights (19 MB in float32) stand out of a process's RSS noise.
WIDE = dict(TINY_TRANSFORMER, num_attention_heads=4, attention_head_dim=128, ffn_dim=2048, added_kv_proj_dim=512, image_dim=512)


def test_streamed_layers_keep_peak_memory_flat(tmp_path, monkeypatch):
    """Doubling the layers grows a streamed run's peak RSS by less than 2 layers' weights, measured in
    fresh processes (measured on Zen 4: +8 MB streamed, +60 MB with resident layers, 19 MB a layer)."""
    from autotune import models
    from autotune.models.wan import TINY_CLIP, TINY_VAE, WanI2VSpec

    spec = WanI2VSpec("wan-i2v-wide-test", "test", WIDE, TINY_VAE, dict(TINY_CLIP, hidden_size=512), (64, 64, 9))
    monkeypatch.setitem(models._REGISTRY, spec.name, spec)
    write_checkpoint(tmp_path / "ckpt", WIDE, layers=6)
    source = load_blockwise_source(spec.name, weights=str(tmp_path / "ckpt"))
    report = build_blockwise(source, "x86", tmp_path / "out6" / "transformer.so", progress=lambda _: None)
    manifest = json.loads(report.paths.metadata.read_text())
    layer_bytes = manifest["layers"][0]["bytes"]
    assert layer_bytes > 15e6
    # the same block library, the first 3 layers: a 3-layer model
    half = dict(manifest, layers=manifest["layers"][:3])
    (tmp_path / "out6" / "transformer3.json").write_text(json.dumps(half))
    np.savez(tmp_path / "inputs.npz", **source.example_inputs)

    def peak_rss(manifest_path: Path) -> int:
        # Peak RSS (VmHWM) from after the imports (which peak higher than any run of this model):
        # writing 5 to clear_refs resets it to the current RSS.
        done = run_fresh(f"""
            import numpy as np, autotune, autotune.runtime.blockwise, tvm
            inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
            open("/proc/self/clear_refs", "w").write("5")
            m = autotune.load({str(manifest_path)!r}, layers="stream")
            m(**inputs); m(**inputs)
            print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
        """)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1]) * 1024

    three, six = peak_rss(tmp_path / "out6" / "transformer3.json"), peak_rss(report.paths.metadata)
    assert six - three < 2 * layer_bytes, f"peak RSS {three / 2**20:.0f} MiB (3 layers) -> {six / 2**20:.0f} MiB (6 layers)"
