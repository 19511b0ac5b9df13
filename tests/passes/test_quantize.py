"""Quantization modes on the tiny Wan transformer and VAE decoder: build, run, size, fidelity.

Builds are untuned (every kernel gets autotune's fallback schedule); tools/bench_quantize.py
times them.

Fidelity bounds, against the float32 torch reference (measured on this tiny model with seeded
random weights; see tools/results/quantize.md):
    transformer noise prediction, cosine:   int8-weight >= 0.9995 (measured 0.99998)
                                            w8a8        >= 0.999  (0.99996)
                                            fp16        >= 0.99999 (x86: the float32 build, weights
                                                         stored float16: 1.0000000)
                                            bf16        >= 0.9995 (0.99998)
    VAE decoder frames in [-1, 1], PSNR (peak 2.0):  int8-weight >= 40 dB (48),
                                                     w8a8 >= 40 dB (45)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ConvAndLinear

import autotune
import autotune.build.compile as build_module
from autotune.frontend.sources import load_source
from autotune.passes import quantize as quantize_pass
from autotune.passes.pipeline import fuse_for_target, prepare_model
from autotune.passes.quantize import MODES, SMALL_LAYER, quantize
from autotune.runtime.artifact import iter_weights
from autotune.support.errors import InputError
from autotune.support.fidelity import compare, format_fidelity
from autotune.support.ir import prim_funcs
from autotune.support.settings import BuildSettings
from autotune.support.targets import resolve_target

TRANSFORMER_COSINE = {"int8-weight": 0.9995, "w8a8": 0.999, "fp16": 0.99999, "bf16": 0.9995}
VAE_PSNR_DB = {"int8-weight": 40.0, "w8a8": 40.0}


@pytest.fixture(scope="module")
def transformer():
    source = load_source("wan-i2v-tiny", "transformer")
    return source, source.reference_outputs()[0]


@pytest.fixture(scope="module")
def vae():
    # One latent frame at 16x16: every conv, norm and upsampler of the decoder, fewest kernels
    # (tools/bench_quantize.py measures the default 3-latent-frame 64x64 decoder).
    source = load_source("wan-i2v-tiny", "vae_decoder", height=16, width=16, frames=1)
    return source, source.reference_outputs()[0]


def _build_and_run(source, mode, tmp_path):
    report = build_module.build(source.imported, "x86", tmp_path / "m.so", settings=BuildSettings(quantize=mode))
    module = autotune.load(report.paths.library)
    return module(**source.example_inputs), json.loads(report.paths.metadata.read_text())


# -- errors --------------------------------------------------------------------------------------


def test_unknown_mode_lists_the_modes(transformer):
    with pytest.raises(InputError, match="Known modes: fp16, bf16, int8-weight, w8a8, fp8"):
        quantize(transformer[0].imported, "int4", "x86")


def test_fp8_on_x86_is_a_clear_error(transformer):
    with pytest.raises(InputError, match=r"fp8 cannot run on target x86.*sm_89 or sm_90.*cuda-sm90"):
        quantize(transformer[0].imported, "fp8", "x86")
    with pytest.raises(InputError, match="cuda-sm80 is CUDA sm_80"):
        quantize(transformer[0].imported, "fp8", "cuda-sm80")


def test_supports_matrix():
    x86, sm90, arm = (resolve_target(n) for n in ("x86", "cuda-sm90", "aarch64-dotprod"))
    for mode in ("fp16", "bf16", "int8-weight"):
        assert MODES[mode]().supports(x86) is None and MODES[mode]().supports(arm) is None
        assert MODES[mode]().supports(sm90) is None
    assert MODES["w8a8"]().supports(x86) is None
    assert MODES["w8a8"]().supports(arm) is None  # on SDOT (tests/kernels/test_gemm_neon.py)
    assert "+dotprod" in MODES["w8a8"]().supports(resolve_target("arm")) and MODES["w8a8"]().supports(sm90) is not None
    assert MODES["fp8"]().supports(sm90) is None and MODES["fp8"]().supports(resolve_target("cuda-sm89")) is None


# -- every CPU mode on the transformer -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8-weight", "w8a8", "bf16"])  # (fp16: test_fp16_on_x86_is_the_float32_build...)
def test_transformer_mode_builds_runs_shrinks_and_is_faithful(mode, transformer, tmp_path):
    source, reference = transformer
    imported = source.imported
    out, metadata = _build_and_run(source, mode, tmp_path)
    assert out.dtype == np.float32 and out.shape == reference.shape  # external signature unchanged
    assert [s["dtype"] for s in metadata["inputs"]] == [s.dtype for s in imported.inputs]
    fid = compare(out, reference)
    assert fid["cosine"] >= TRANSFORMER_COSINE[mode], f"{mode}: {format_fidelity(fid)}"

    info = metadata["passes"][0]
    assert info["mode"] == mode
    before, after = metadata["weight_bytes"]["before"], metadata["weight_bytes"]["after"]
    assert before == imported.weight_bytes() and info["weight_bytes_after"] == after
    if mode == "bf16":
        # every matrix in half; on a matrix engine the build also pre-casts bias vectors to float32;
        # convolution weights (the patch embedding's, 5-D) stay float32 where no engine takes them
        # as im2col GEMMs (no bf16 convolution kernel on CPUs)
        conv = sum(w.nbytes for w in imported.weights.values() if w.ndim == 5) if info.get("convolutions_in_float32") else 0
        assert before / 2 + conv / 2 <= after < 0.52 * before + conv / 2
    else:
        # every linear (32 of them) and the patch-embedding convolution is int8: 4x smaller, plus
        # one float32 scale per output channel
        assert info["linear_layers"] == 32 and info["conv_layers"] == 1 and info["layers"] == 33
        # w8a8 on VNNI / AMX-INT8 also ships one int32 column-sum correction per output channel
        channels = sum(w.size for name, w in quantize(imported, mode, "x86")[0].weights.items() if name.endswith("_scale"))
        correction = 4 * channels if "matrix_engine" in info and mode == "w8a8" else 0
        assert after < 0.4 * before + correction


def test_int8_weights_are_a_quarter_of_the_float32_linears(transformer):
    imported = transformer[0].imported
    q, info = quantize(imported, "int8-weight", "x86")
    qnames = [n for n in q.weights if n.endswith("_q")]
    assert len(qnames) == info["layers"] == 33
    assert all(q.weights[n].dtype == np.int8 for n in qnames)
    assert sum(q.weights[n].nbytes for n in qnames) * 4 == sum(imported.weights[n[:-2]].nbytes for n in qnames)
    assert [s.name for s in q.inputs] == [s.name for s in imported.inputs]
    assert imported.weights is not q.weights and all(w.dtype == np.float32 for w in imported.weights.values())


# -- the dequantisation lives inside the matmul/conv kernels --------------------------------------


def _calls(fused):
    """(PrimFunc name, its input arguments) of every call_tir in main, in order."""
    for line in fused["main"].script().splitlines():
        if "R.call_tir(" not in line:
            continue
        callee, rest = line.split("R.call_tir(", 1)[1].split(",", 1)
        args = rest.split("(", 1)[1].split(")", 1)[0] if "(" in rest else ""
        yield callee.strip(), [a.strip() for a in args.split(",") if a.strip()]


def _kernels_reading(fused, suffix: str) -> dict:
    """PrimFunc name -> weights (params ending in `suffix`) it reads, from main's call_tir calls."""
    readers: dict[str, list] = {}
    for callee, args in _calls(fused):
        readers.setdefault(callee, []).extend(a for a in args if a.endswith(suffix))
    return {callee: weights for callee, weights in readers.items() if weights}


@pytest.mark.parametrize("mode", ["int8-weight", "w8a8"])
def test_quantized_weights_are_read_only_by_fused_matmul_kernels(mode, transformer):
    q, info = quantize(transformer[0].imported, mode, "x86")
    target = resolve_target("x86").tvm_target()
    fused = fuse_for_target(q.mod, target)
    readers = _kernels_reading(fused, "_q")
    if mode == "w8a8":  # the uint8 engines (VNNI, AMX-INT8) compute (x + 128).W - 128 * column sums of W:
        # the sums read the weight alone (a real build precomputes them), each sum kernel only weights
        sums = {n: v for n, v in readers.items() if "sum" in n and "matmul" not in n}
        calls = [(callee, args) for callee, args in _calls(fused) if callee in sums]
        assert len(calls) == sum(len(v) for v in sums.values()), calls
        assert all(a.endswith("_q") for _, args in calls for a in args), calls
        readers = {n: v for n, v in readers.items() if n not in sums}
        built, _ = prepare_model(transformer[0].imported, resolve_target("x86"), mode)
        assert not [n for n in prim_funcs(fuse_for_target(built.mod, target)) if "sum" in n and "matmul" not in n]
    assert sum(len(v) for v in readers.values()) == info["layers"]
    funcs = prim_funcs(fused)
    for name in readers:
        assert "matmul" in name or "conv" in name, f"{name} reads an int8 weight but is no matmul/conv kernel"
        script = funcs[name].script()
        assert '"int8"' in script  # the kernel takes the int8 buffer itself: no float copy of the weight
        if mode == "int8-weight" or "conv" in name:  # (w8a8's convolutions take int8 rows in conv_gemm, on x86 engines)
            assert "multiply" in name  # the per-channel scale is the kernel's epilogue
        else:
            assert 'T.Cast("int32"' in script or "int32" in script
    if mode == "w8a8":  # activations quantized by one kernel each, no abs / max / divide kernels
        calls = fused["main"].script().count("token_quant_")  # (i8, u8 or i16: what the host CPU's int8 engine reads)
        # once per activation: per block, q/k/v read one (2 calls saved), so do the cross-attention's
        # k/v and its image k/v (1 each); 2 blocks
        assert calls == info["linear_layers"] - 2 * 4, calls
        assert not [n for n in funcs if "abs" in n or "round" in n], sorted(funcs)


def test_fallback_schedules_the_quantized_matmuls(transformer):
    """The untuned build path (a MetaSchedule design-space sample) handles each mode's matmul.

    """
    from autotune.build.fallback import _cpu_schedule

    target = resolve_target("x86").tvm_target()
    for mode in ("int8-weight", "w8a8", "bf16"):  # (fp16 on x86 is the float32 build)
        q, _ = quantize(transformer[0].imported, mode, "x86")
        fused = fuse_for_target(q.mod, target)
        funcs = prim_funcs(fused)
        if mode in ("int8-weight", "w8a8"):
            names = [n for n in _kernels_reading(fused, "_q") if "matmul" in n]
        else:
            names = [n for n, f in funcs.items() if "matmul" in n and '"bfloat16"' in f.script()]
        assert names, mode
        assert _cpu_schedule(funcs[sorted(names)[0]], target, seed=0) is not None, mode


# -- VAE decoder frames -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8-weight", "w8a8"])  # (fp16 on x86: the float32 build, its weights stored float16)
def test_vae_decoder_mode_psnr(mode, vae, tmp_path):
    source, reference = vae
    out, metadata = _build_and_run(source, mode, tmp_path)
    fid = compare(out, reference, peak=2.0)
    assert fid["psnr_db"] >= VAE_PSNR_DB[mode], f"{mode}: {format_fidelity(fid)}"
    before, after = metadata["weight_bytes"]["before"], metadata["weight_bytes"]["after"]
    assert metadata["passes"][0]["conv_layers"] >= 30 and after < 0.3 * before


def test_fp16_on_x86_is_the_float32_build_with_its_matrices_stored_float16(transformer, tmp_path):
    """x86 has no float16 arithmetic: fp16 prepares exactly the float32 module (the tiny transformer:
    same kernels, so the float32 records apply). Built (a convolution and a linear), it ships every
    weight matrix float16 (the vectors beside them float32) and loads it back float32, equal to the
    float32 build's weights rounded once, its outputs within TRANSFORMER_COSINE of torch; the note
    says so and points to bf16. The same on an ARM target is the float16 build (ToMixedPrecision)."""
    import tvm_ffi
    from safetensors import safe_open

    from autotune.frontend.importer import from_torch

    source = transformer[0]
    preset = resolve_target("x86")
    fp16, info = prepare_model(source.imported, preset, "fp16")
    fp32, _ = prepare_model(source.imported, preset, None)
    assert tvm_ffi.structural_equal(fp16.mod, fp32.mod) and info["weight_storage"] == "float16"
    assert any("computes in float32" in n and "--precision bf16" in n for n in fp16.notes)
    arm, arm_info = prepare_model(source.imported, resolve_target("aarch64-dotprod"), "fp16")
    assert "weight_storage" not in arm_info and any(w.dtype == np.float16 for w in arm.weights.values())

    torch.manual_seed(0)
    module = ConvAndLinear().eval()
    inputs = {"x": torch.randn(1, 16, 16, 16), "tokens": torch.randn(1, 64, 32)}
    imported = from_torch(module, inputs)
    built = {mode: build_module.build(imported, preset, tmp_path / f"{mode}.so", settings=BuildSettings(quantize=mode))
             for mode in (None, "fp16")}
    names = json.loads(built["fp16"].paths.metadata.read_text())["weights"]
    assert names == json.loads(built[None].paths.metadata.read_text())["weights"]
    float32 = dict(iter_weights(built[None].paths.weights, names))
    with safe_open(str(built["fp16"].paths.weights), framework="numpy") as f:
        in_file = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert {n for n, d in in_file.items() if d == np.float16} == {n for n, w in float32.items() if w.ndim >= 2} != set()
    for name, w in iter_weights(built["fp16"].paths.weights, names):
        assert w.dtype == np.float32, name
        rounded = float32[name].astype(np.float16).astype(np.float32) if in_file[name] == np.float16 else float32[name]
        np.testing.assert_array_equal(w, rounded, err_msg=name)
    metadata = json.loads(built["fp16"].paths.metadata.read_text())
    before, after = metadata["weight_bytes"]["before"], metadata["weight_bytes"]["after"]
    assert metadata["passes"][0]["weight_bytes_after"] == after and 0.5 * before < after < 0.55 * before
    with torch.no_grad():
        expected = [t.numpy() for t in module(**inputs)]
    for out, want in zip(autotune.load(built["fp16"].paths.library)(**{k: v.numpy() for k, v in inputs.items()}), expected, strict=True):
        fid = compare(out, want)
        assert fid["cosine"] >= TRANSFORMER_COSINE["fp16"], format_fidelity(fid)


class _Elementwise(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2.0 + x


def test_a_model_without_linears_or_convolutions_is_the_float32_build():
    """Nothing for w8a8 to quantize: the note says so, and the build is the float32 one, kernel for
    kernel and weight for weight."""
    import tvm_ffi

    from autotune.frontend.importer import from_torch

    imported = from_torch(_Elementwise(), {"x": torch.randn(4, 32)})
    preset = resolve_target("x86")
    w8a8, info = prepare_model(imported, preset, "w8a8")
    fp32, _ = prepare_model(imported, preset, None)
    assert info["layers"] == 0 and "nothing was quantized" in info["note"]
    assert tvm_ffi.structural_equal(w8a8.mod, fp32.mod)
    assert w8a8.weights.keys() == fp32.weights.keys() and info["weight_bytes_after"] == fp32.weight_bytes()


class _ThreeLinears(torch.nn.Module):
    """A large linear (16 x 256 -> 512: 4.2 MFLOP), a small one after it (16 x 512 -> 16: 0.26 MFLOP,
    8K weights) and a one-row product with a large weight (512 -> 256: 0.26 MFLOP, 131K weights)."""

    def __init__(self):
        super().__init__()
        self.large, self.small, self.row = torch.nn.Linear(256, 512), torch.nn.Linear(512, 16), torch.nn.Linear(512, 256)

    def forward(self, x, t):
        return self.small(self.large(x)), self.row(t)


@pytest.mark.parametrize("mode", ["int8-weight", "w8a8"])
def test_layers_small_in_both_arithmetic_and_weight_stay_float32(mode, monkeypatch):
    """Under SMALL_LAYER's two bounds a layer is kept float32 (int8's extra kernels would cost more
    than it saves); a one-row product whose weight is large is quantized (its weight bytes are the cost)."""
    monkeypatch.setattr(quantize_pass, "SMALL_LAYER", SMALL_LAYER)
    from autotune.frontend.importer import from_torch

    torch.manual_seed(0)
    imported = from_torch(_ThreeLinears().eval(), {"x": torch.randn(1, 16, 256), "t": torch.randn(1, 1, 512)})
    quantized, info = quantize(imported, mode, "x86")
    assert info["layers"] == 2 and info["kept_float32_small"] == 1
    assert {n for n in quantized.weights if n.endswith("_q")} == {"p_large_weight_q", "p_row_weight_q"}
    assert quantized.weights["p_small_weight"].dtype == np.float32
    assert any("1 small linears/convolutions kept float32" in note for note in quantized.notes)


@pytest.mark.parametrize("mode,said", [("w8a8", "nothing was quantized"), ("bf16", "nothing was converted")])
def test_a_model_of_small_layers_only_is_its_float32_build(transformer, monkeypatch, mode, said):
    """The tiny transformer's linears are all small (at most 1 MFLOP, 4K weights): its int8 and CPU
    bf16 builds are its float32 build, and the note says why (measured: quantizing even its largest
    linears left it slower than float32; its bf16 build took 1.09x the float32 build's time, the
    tiny image encoder's 1.18x, Zen 4, session 31). On CUDA bf16 stays bf16 (tensor cores)."""
    import tvm_ffi

    monkeypatch.setattr(quantize_pass, "SMALL_LAYER", SMALL_LAYER)
    source, _ = transformer
    preset = resolve_target("x86")
    quantized, info = prepare_model(source.imported, preset, mode)
    fp32, _ = prepare_model(source.imported, preset, None)
    assert info["layers"] == 0 and "are small" in info["note"] and said in info["note"]
    assert tvm_ffi.structural_equal(quantized.mod, fp32.mod)
    if mode == "bf16":
        assert quantize(source.imported, "bf16", "cuda-sm80")[1]["layers"] > 0


# -- fp8 (CUDA sm_90): compiles for Hopper; numerics checked on the CPU through LLVM's fp8 emulation


def test_fp8_compiles_for_cuda_sm90_and_is_faithful(transformer):
    import tvm
    from tvm import relax

    source, reference = transformer
    q, info = quantize(source.imported, "fp8", "cuda-sm90")
    assert info["layers"] == 33 and info["weight_bytes_after"] < 0.35 * info["weight_bytes_before"]
    executable, (kernels, _, fallback, _), _, _ = build_module.compile_module(q, resolve_target("cuda-sm90"))
    # every kernel got a GPU schedule and compiled: dlight's, or the fused attention kernel's own
    assert fallback > 0 and kernels - fallback == 1
    cpu = tvm.compile(q.mod, target="llvm")
    vm = relax.VirtualMachine(cpu, tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in source.example_inputs.values()]
    out = vm["main"](*args, *[tvm.runtime.tensor(w) for w in q.weights.values()]).numpy()
    fid = compare(out, reference)
    assert fid["cosine"] >= 0.998, format_fidelity(fid)


def test_a_quantized_build_without_records_prints_the_command_that_tunes_them(tmp_path, capsys):
    import re
    import shlex

    from autotune.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["build", "--model", "tiny-image-encoder", "--quantize", "w8a8", "--no-shipped-log",
                              "--log", str(tmp_path / "logs"), "--target", "x86", "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    said = re.search(r"(\d+) of (\d+) kernels have no tuning record .*\n  (autotune tune .*)", out)
    assert said, out[-2000:]
    assert said.group(1) == said.group(2) != "0"  # no log at all: every kernel
    tune = parser.parse_args(shlex.split(said.group(3))[1:])  # the printed command is one `autotune tune` accepts
    assert (tune.command, tune.model) == ("tune", "tiny-image-encoder")
    assert (tune.quantize, tune.target, tune.log) == ("w8a8", "x86", str(tmp_path / "logs"))
    assert tune.trials == 32 * int(said.group(1))


def _outlier_linear():
    """A linear whose input has three channels 50x the others, as transformer activations have."""
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).eval()
    x = torch.randn(1, 32, 64)
    x[..., :3] *= 50
    return linear, x


def _smoothquant_reference(linear, x: np.ndarray) -> np.ndarray:
    """SmoothQuant then w8a8 in float64: s = sqrt(max|x_j| / max|W_:,j|), x / s and W * s
    quantized (per token, per output channel), int32-exact products, rescaled."""
    w = linear.weight.detach().double().numpy()  # (out, in)
    s = np.sqrt(np.abs(x).reshape(-1, 64).max(0) / np.abs(w).max(0))
    xs, ws = x / s, w * s
    sw = np.abs(ws).max(1) / 127
    wq = np.clip(np.rint(ws / sw[:, None]), -127, 127)
    sx = np.maximum(np.abs(xs).max(-1, keepdims=True), 1e-8) / 127
    xq = np.clip(np.rint(xs / sx), -127, 127)
    return (xq @ wq.T) * sx * sw + linear.bias.detach().double().numpy()


def test_smoothquant_takes_the_outliers_into_the_weights(tmp_path):
    """w8a8 measures each linear's input channels on the torch module: with outliers it smooths,
    equals SmoothQuant's arithmetic (done in float64, to float32 rounding of the scales: 1e-4 of
    max |y|), and is closer to float32 torch than the same build without smoothing."""
    import torch

    from autotune.frontend.importer import from_torch

    linear, x = _outlier_linear()
    _, info = quantize(from_torch(linear, {"x": x}), "w8a8", "x86")
    assert info["smoothing"]["linears_smoothed"] == 1 and info["smoothing"]["worst_outlier_ratio"] >= 8
    settings = BuildSettings(quantize="w8a8", shipped_log=False)
    smoothed = build_module.build(from_torch(linear, {"x": x}), "x86", tmp_path / "s", settings=settings)
    plain_model = from_torch(linear, {"x": x})
    plain_model.calibration = None  # as an ONNX import: no statistics, no smoothing
    plain = build_module.build(plain_model, "x86", tmp_path / "p", settings=settings)
    out_s = np.asarray(autotune.load(smoothed.paths.library)(x.numpy()), dtype=np.float64)
    out_p = np.asarray(autotune.load(plain.paths.library)(x.numpy()), dtype=np.float64)
    with torch.no_grad():
        ref = linear(x).double().numpy()
    assert np.abs(out_s - _smoothquant_reference(linear, x.double().numpy())).max() <= 1e-4 * np.abs(ref).max()
    err_s, err_p = compare(out_s, ref), compare(out_p, ref)
    assert err_s["max_abs"] < 0.5 * err_p["max_abs"], (err_s, err_p)
    assert err_s["cosine"] >= 0.9999


def test_w8a8_without_outliers_is_not_smoothed():
    from autotune.frontend.importer import from_torch

    linear, x = _outlier_linear()
    x[..., :3] /= 50
    quantized, info = quantize(from_torch(linear, {"x": x}), "w8a8", "x86")
    assert info["smoothing"]["linears_smoothed"] == 0 and info["smoothing"]["worst_outlier_ratio"] < 8
    assert not any(name.endswith("_smooth") for name in quantized.weights)


def test_a_pickled_model_leaves_its_calibration_behind():
    """Models travel pickled to fresh processes (builds, tests): the torch module behind
    `calibration` does not; the copy is an import without statistics."""
    import pickle

    from autotune.frontend.importer import from_torch

    linear, x = _outlier_linear()
    imported = from_torch(linear, {"x": x})
    copy = pickle.loads(pickle.dumps(imported))
    assert copy.calibration is None and set(copy.weights) == set(imported.weights)
    assert quantize(copy, "w8a8", "x86")[1]["smoothing"].startswith("no activation statistics")
    assert imported.calibration()["p_weight"].shape == (64,)


def test_a_mode_without_its_matrix_engine_says_so():
    """bf16 / int8-weight / w8a8 on a CPU target without the engine their speed needs: a build note
    that says what runs instead and which CPUs have the engine; none where the engine is there."""
    import torch

    from autotune.frontend.importer import from_torch
    from autotune.passes.pipeline import prepare_model

    torch.manual_seed(0)
    imported = from_torch(torch.nn.Linear(64, 64).eval(), {"x": torch.randn(1, 8, 64)})
    no_avx2 = '{"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}'
    cases = [("w8a8", no_avx2, "AMX-INT8, AVX512-VNNI or AVX2"), ("bf16", no_avx2, "AMX-BF16, AVX512-BF16 or AVX2 with FMA"),
             ("int8-weight", "aarch64-dotprod", None), ("w8a8", "aarch64-dotprod", None),  # (ARM: NEON FMA without +bf16)
             ("bf16", "arm", None), ("bf16", "aarch64-sve", None), ("int8-weight", "aarch64-sve", None),
             ("w8a8", "x86-avx512-vnni", None), ("w8a8", "x86-avx2", None),
             ("bf16", "x86-amx", None), ("bf16", "x86-avx2", None), ("int8-weight", "x86-avx512", None)]
    for mode, preset, said in cases:
        prepared, _ = prepare_model(imported, resolve_target(preset), mode)
        notes = [n for n in prepared.notes if "generic kernels" in n]
        if said is None:
            assert not notes, (mode, preset, notes)
        else:
            assert len(notes) == 1 and said in notes[0] and notes[0].startswith(mode), (mode, preset, notes)
