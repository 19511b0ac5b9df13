"""Graph and math rewrites that make CPU kernels cheaper, each checked against torch eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_abs_diff

import autotune
from autotune.build.compile import build, compile_module
from autotune.frontend.importer import from_torch
from autotune.passes.causal_padding import drop_causal_padding
from autotune.passes.pipeline import prepare_model
from autotune.support import hardware
from autotune.support.fidelity import compare
from autotune.support.ir import LAYOUT_FREE_ATTR, prim_funcs
from autotune.support.settings import BuildSettings
from autotune.support.targets import resolve_target

TOL = 1e-4  # fp32 against torch eager


def _causal_conv(frames: int):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    torch.manual_seed(0)
    module = WanCausalConv3d(8, 16, 3, padding=1).eval()
    x = torch.randn(1, 8, frames, 6, 10)
    with torch.no_grad():
        ref = module(x).numpy()
    return module, {"x": x}, ref


def test_single_frame_causal_conv_becomes_conv2d_and_matches_torch(tmp_path):
    module, inputs, ref = _causal_conv(frames=1)
    imported = from_torch(module, inputs)
    func, count = drop_causal_padding(imported.mod["main"])
    assert count == 1
    text = func.script()
    assert "conv2d" in text and "conv3d" not in text
    report = build(imported, "x86", tmp_path / "conv.so")
    out = autotune.load(report.paths.library)(**{k: v.numpy() for k, v in inputs.items()})
    assert max_abs_diff(out, ref) < TOL
    # the sliced weight was computed at build time: one weight of 16×8×3×3 ships, not 16×8×3×3×3
    # (for an AVX-512 CPU: an AVX2-only one ships it packed for its float32 engine, (36, 16, 2))
    shapes = [w.shape for w in prepare_model(imported, resolve_target("x86-avx512"), None)[0].weights.values()]
    assert (16, 8, 3, 3) in shapes and (16, 8, 3, 3, 3) not in shapes


def test_causal_padding_is_dropped_behind_bf16_casts(tmp_path):
    """Mixed precision casts the padded input (conv3d(astype(pad(x)))): the taps still go."""
    from autotune.support.fidelity import compare
    from autotune.support.settings import BuildSettings

    module, inputs, ref = _causal_conv(frames=1)
    # x86-64 before AVX2: no bf16 engine to turn the convolution into an im2col GEMM
    no_engine = resolve_target('{"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}')
    prepared, _ = prepare_model(from_torch(module, inputs), no_engine, "bf16")
    text = prepared.mod["main"].script()
    assert "R.nn.conv2d" in text and "R.nn.conv3d" not in text
    settings = BuildSettings(quantize="bf16", shipped_log=False)
    report = build(from_torch(module, inputs), "x86-avx2", tmp_path / "conv.so", settings=settings)
    out = autotune.load(report.paths.library)(**{k: v.numpy() for k, v in inputs.items()})
    assert compare(np.asarray(out, dtype=np.float32), ref)["cosine"] >= 0.9999  # bf16 rounding


def test_multi_frame_causal_conv_is_left_alone():
    module, inputs, _ = _causal_conv(frames=3)
    func, count = drop_causal_padding(from_torch(module, inputs).mod["main"])
    assert count == 0 and "conv3d" in func.script()


class Activations(torch.nn.Module):
    def forward(self, x):
        a = torch.nn.functional.gelu(x, approximate="tanh") + torch.nn.functional.gelu(x)
        b = torch.sigmoid(x) + torch.nn.functional.silu(x) + torch.tanh(x) + torch.exp(x.clamp(max=10))
        return a + b + x.pow(2) + x.abs().pow(0.5) + x.abs().pow(3)


def test_fast_math_matches_torch_and_calls_no_scalar_libm():
    torch.manual_seed(0)
    x = torch.randn(4, 1000) * 4
    imported = from_torch(Activations(), {"x": x})
    executable, _, _, _ = compile_module(imported, resolve_target("x86"))
    source = executable.mod.imports[0].inspect_source("ll") if executable.mod.imports else ""
    assert "define" in source  # the kernels' LLVM IR was found
    for libm in ("@tanhf", "@expf", "@erff", "@llvm.exp.", "@llvm.tanh."):  # pow(x, 3) keeps its powf
        assert libm not in source, f"{libm} is still called: the fast-math legalization did not apply"
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    ref = Activations()(x).numpy()
    # relative: exp(10) is 2.2e4, whose float32 ulp is 2e-3
    assert np.max(np.abs(out - ref) / np.maximum(np.abs(ref), 1.0)) < 1e-5


class Bf16Activations(torch.nn.Module):
    """A linear (so that bf16's mixed precision puts what follows in bf16), its activations and an
    RMSNorm's `x.pow(2)`."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = self.linear(x)
        a = torch.nn.functional.gelu(h, approximate="tanh") + torch.sigmoid(h) + torch.nn.functional.silu(h) + torch.tanh(h)
        return a * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_fast_math_applies_to_bf16_kernels():
    """bf16 activations compute in float32 inside their kernels, on the same polynomials: no libm call
    per element (a bf16 tanh-GELU was the slowest kernel of the DiT block's bf16 build), and the
    RMSNorm's exponent, which mixed precision casts to bf16 and back, is folded so that `x**2` is x*x.
    Within bf16's cosine (0.9999) of float32 torch."""
    torch.manual_seed(0)
    module, x = Bf16Activations().eval(), torch.randn(2, 40, 64)
    preset = resolve_target("x86-avx2")
    prepared, _ = prepare_model(from_torch(module, {"x": x}), preset, "bf16")
    executable, _, _, _ = compile_module(prepared, preset)
    source = executable.mod.imports[0].inspect_source("ll")
    assert "bfloat" in source or "i16" in source  # the bf16 kernels were found
    for libm in ("@tanhf", "@expf", "@powf", "@llvm.exp.", "@llvm.tanh.", "@llvm.pow."):
        assert libm not in source, f"{libm} is still called: the fast-math legalization did not apply to bf16"
    import tvm
    from tvm import relax

    from autotune.support.fidelity import compare

    vm = relax.VirtualMachine(executable, tvm.cpu())
    weights = [tvm.runtime.tensor(prepared.weights[p.name]) for p in prepared.mod["main"].params[1:]]
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *weights).numpy()
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= 0.9999


class TwoLinears(torch.nn.Module):
    """On 32 rows both products are under gemm_cpu.MIN_F32_FLOPS: MetaSchedule schedules them on any
    x86 host (an AVX2-only CPU moves larger float32 matmuls onto its FMA engine)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(256, 512), torch.nn.Linear(512, 128)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _layout_free(mod) -> dict[str, list[int]]:
    from autotune.support.ir import prim_funcs

    return {n: [int(i) for i in f.attrs[LAYOUT_FREE_ATTR]] for n, f in prim_funcs(mod).items() if f.attrs and LAYOUT_FREE_ATTR in f.attrs}


def test_large_weights_are_marked_for_packing_on_cpus_only(monkeypatch):
    from autotune.passes import weight_prepack
    from autotune.passes.pipeline import fuse_for_target

    monkeypatch.setattr(weight_prepack, "MIN_BYTES", 256 * 512 * 4)  # `up` qualifies, `down` (512×128) does not
    imported = prepare_model(from_torch(TwoLinears().eval(), {"x": torch.randn(32, 256)}), resolve_target("x86"), None)[0]
    marked = _layout_free(fuse_for_target(imported.mod, resolve_target("x86").tvm_target()))
    assert list(marked.values()) == [[1]], marked  # the weight of `up` only: not its bias, not `down`
    assert _layout_free(fuse_for_target(imported.mod, resolve_target("cuda-sm90").tvm_target())) == {}


def test_packed_weights_tune_build_and_match_torch(tmp_path, monkeypatch):
    """Tuned kernels read their weights in a layout MetaSchedule chose: the records (whose traces
    hold a TransformLayout) are saved and applied, and the build ships the packed weights."""
    from autotune.passes import weight_prepack
    from autotune.support.settings import TuneSettings
    from autotune.tuning.tune import tune

    monkeypatch.setattr(weight_prepack, "MIN_BYTES", 64 << 10)
    torch.manual_seed(0)
    model, x = TwoLinears().eval(), torch.randn(32, 256)
    imported = from_torch(model, {"x": x})
    tune(imported, "x86", tmp_path / "log", TuneSettings(trials=16, trials_per_iter=8, remeasure_rounds=0), progress=False)
    report = build(imported, "x86", tmp_path / "out" / "m.so", log_dir=tmp_path / "log")
    assert not [n for n in report.notes if n.startswith("log:")], report.notes  # every record read back
    assert report.tuned_kernels == report.kernels == 2
    assert "2 weight matrices packed" in " ".join(report.notes)
    from autotune.runtime.artifact import load_weights, read_metadata

    shipped = load_weights(report.paths.weights, read_metadata(report.paths)["weights"])
    packed = [w.shape for w in shipped.values() if w.ndim != 1]
    assert len(packed) == 2 and not set(packed) & {(256, 512), (512, 128)}, packed  # tiled, not (K, N)
    out = autotune.load(report.paths.library)(x=x.numpy())
    with torch.no_grad():
        assert max_abs_diff(out, model(x).numpy()) < TOL


class VaeLikeConvolutions(torch.nn.Module):
    """3x3 convolutions as a VAE stacks them: 32 -> 48 channels, a norm and SiLU between, a Wan
    causal video convolution (F.pad of 2 zero frames in front), and a 3-channel output conv (too
    few channels for Winograd: left direct)."""

    def __init__(self, channels: int = 32, hidden: int = 48):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        super().__init__()
        self.first = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, hidden)
        self.video = WanCausalConv3d(hidden, channels, 3, padding=1)
        self.out = torch.nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x):  # x: (1, 32, frames, H, W)
        frames = x.shape[2]
        flat = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
        y = torch.nn.functional.silu(self.norm(self.first(flat)))
        y = self.video(y.unflatten(0, (1, frames)).permute(0, 2, 1, 3, 4))
        return self.out(y.permute(0, 2, 1, 3, 4).flatten(0, 1))


def test_float32_3x3_convolutions_become_winograd_gemms_and_match_torch(tmp_path):
    """A float32 build for an AVX-512 CPU (no float32 engine takes its convolutions): the two
    with 32 or more channels each way become input transform, batched GEMM and output transform,
    their weights transformed at build time; the 3-channel one stays a direct convolution. The
    artifact, built for this host, matches torch eager within TOL (ragged 4x4 tiles: 11 x 13)."""
    torch.manual_seed(0)
    module, x = VaeLikeConvolutions().eval(), torch.randn(1, 32, 3, 11, 13)
    imported = from_torch(module, {"x": x})
    prepared, _ = prepare_model(imported, resolve_target("x86-avx512"), None)
    script = prepared.mod["main"].script()
    assert any("2 3x3 convolutions as Winograd" in note for note in prepared.notes)
    assert script.count("R.nn.conv") == 1
    assert sum(name.startswith("winograd_input") for name in prim_funcs(prepared.mod)) == 2  # conv2d x1, conv3d x1
    # the video conv's U, packed in panels of 16 output channels: 36 x (C_out / 16) x (kt C_in) x 16
    assert any(w.shape == (36, 2, 3 * 48, 16) for w in prepared.weights.values())
    report = build(imported, "x86", tmp_path / "wino.so")
    out = autotune.load(report.paths.library)(x=x.numpy())
    with torch.no_grad():
        ref = module(x).numpy()
    assert max_abs_diff(out, ref) < TOL * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("mode", [None, "bf16", "w8a8"])
def test_no_winograd_keeps_the_convolutions_and_their_weight_size(mode):
    """`--no-winograd` (prepare_model's winograd=False): no Winograd kernel at any precision; the
    float32 convolutions stay direct with their weights as they were (Winograd's U: 4x), bf16 and w8a8
    ones go to conv_gemm's im2col GEMMs on the engines. The settings carry it from the command line."""
    from autotune.cli.main import build_parser

    torch.manual_seed(0)
    module, x = VaeLikeConvolutions().eval(), torch.randn(1, 32, 3, 11, 13)
    imported = from_torch(module, {"x": x})
    preset = resolve_target("x86-avx512-bf16")
    winograd, _ = prepare_model(imported, preset, mode)
    direct, info = prepare_model(imported, preset, mode, winograd=False)
    assert any(name.startswith("winograd_") for name in prim_funcs(winograd.mod))
    assert not any(name.startswith("winograd_") for name in prim_funcs(direct.mod))
    assert "winograd" not in (info or {}) and not any("Winograd" in note for note in direct.notes)
    if mode is None:
        assert direct.mod["main"].script().count("R.nn.conv") == 3
        assert direct.weight_bytes() == imported.weight_bytes() < winograd.weight_bytes()
    else:
        assert info["convolutions_as_gemm"] >= 2
    args = build_parser().parse_args(["build", "--model", "tiny-vae-decoder", "--no-winograd"])
    assert args.winograd is False and build_parser().parse_args(["tune", "--model", "m"]).winograd is True


# Against the float32 model, VaeLikeConvolutions' Winograd builds agree to a cosine of 0.99998
# (bf16), 0.99996 (int8-weight) and 0.99982 (w8a8) on a Zen 4.
WINOGRAD_MIN_COSINE = {"bf16": 0.9998, "int8-weight": 0.9995, "w8a8": 0.999}


@pytest.mark.parametrize("mode", ["bf16", "int8-weight"])
def test_bf16_engine_3x3_convolutions_become_winograd_gemms_on_the_engine(mode):
    """bf16 and int8-weight for a CPU with AVX512-BF16: the two 3x3 convolutions with 32 or more
    channels each way become F(2x2, 3x3) transforms around gemm_cpu's batched bf16 kernel (16
    points), U packed at build time in bf16 (int8-weight: from the int8 weight's values, quantized
    to int8 again per (point, output channel), the kernel's int8-weight variant converting it); the
    3-channel one is left to the other rewrites."""
    torch.manual_seed(0)
    module, x = VaeLikeConvolutions().eval(), torch.randn(1, 32, 3, 11, 13)
    prepared, info = prepare_model(from_torch(module, {"x": x}), resolve_target("x86-avx512-bf16"), mode)
    assert info["winograd"] == 2
    assert any("2 3x3 convolutions as Winograd F(2x2, 3x3)" in note and "on AVX512-BF16" in note for note in prepared.notes)
    names = prim_funcs(prepared.mod)
    assert sum(name.startswith("winograd_input") and name.endswith("_m2") for name in names) == 2
    # the video conv (3 frames, 11 x 13 -> 6 x 7 tiles: 126 rows): 16 points x 126 x 32 x (3 x 48)
    kernel = "w8_avx512bf16w8" if mode == "int8-weight" else "bf16_avx512bf16"  # (gemm_cpu.kernel_name)
    assert f"gemm_{kernel}_16x126x32x144" in names
    # its U in gemm_cpu's packed layout: (16 points, kt C_in / 2, C_out, 2), bf16 (int8-weight: int8)
    dtype = "int8" if mode == "int8-weight" else "bfloat16"
    assert any(w.shape == (16, 72, 32, 2) and str(w.dtype) == dtype for w in prepared.weights.values())


def test_w8a8_3x3_convolutions_become_winograd_gemms_on_the_int8_engine():
    """w8a8 for a CPU with VNNI: the same two convolutions on gemm_cpu's batched VNNI kernel, V
    quantized per (point, tile) by the input transform, U per (point, output channel) at build time
    (int8, packed in k quads), the product dequantized by the output transform."""
    torch.manual_seed(0)
    module, x = VaeLikeConvolutions().eval(), torch.randn(1, 32, 3, 11, 13)
    prepared, info = prepare_model(from_torch(module, {"x": x}), resolve_target("x86-avx512-bf16"), "w8a8")
    assert info["winograd"] == 2
    assert any("(2 on AVX512-VNNI)" in note for note in prepared.notes), prepared.notes
    names = prim_funcs(prepared.mod)
    assert "gemm_int8_avx512vnni_16x126x32x144" in names
    assert any(w.shape == (16, 36, 32, 4) and str(w.dtype) == "int8" for w in prepared.weights.values())
    assert "R.nn.conv3d" not in prepared.mod["main"].script()


@pytest.mark.skipif(bool(hardware.missing_cpu_flags(["avx512_bf16", "avx512_vnni"])),
                    reason="CPU has no AVX512-BF16 and VNNI to run the engines on")
@pytest.mark.parametrize("mode", ["bf16", "int8-weight", "w8a8"])
def test_bf16_engine_winograd_build_matches_torch(tmp_path, mode):
    """The same builds (and w8a8's), run (the GroupNorm between them in float32 between casts at bf16)."""
    torch.manual_seed(0)
    module, x = VaeLikeConvolutions().eval(), torch.randn(1, 32, 3, 11, 13)
    report = build(from_torch(module, {"x": x}), "x86-avx512-bf16", tmp_path / "w.so",
                   settings=BuildSettings(quantize=mode, shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x=x.numpy()), dtype=np.float32)
    with torch.no_grad():
        cosine = compare(out, module(x).numpy())["cosine"]
    assert cosine >= WINOGRAD_MIN_COSINE[mode], cosine


# VaeLikeConvolutions(64, 96)'s AVX2 builds against the float32 model on a Zen 2: cosine 0.9999915
# (bf16, F(4x4) with U in float32), 0.9999779 (int8-weight and w8a8, F(4x4) with U in int16; the
# F(2x2) with U in int8 it replaced: 0.9998972)
AVX2_WINOGRAD_MIN_COSINE = {"bf16": 0.99998, "int8-weight": 0.99995, "w8a8": 0.99995}


@pytest.mark.parametrize("mode", [None, "bf16", "int8-weight", "w8a8"])
def test_avx2_3x3_convolutions_of_64_channels_become_winograd_gemms_on_the_fma_engine(tmp_path, mode):
    """On AVX2 (no bf16 arithmetic, no VNNI) 3x3 convolutions of 64 or more channels each way are
    Winograd F(4x4) GEMMs on the FMA engine: on the float32 engine for float32 and bf16 (whose FMA
    engine multiplies float32 anyway: U in float32), with U quantized again to int16 where the
    weights are int8 (int8-weight, and w8a8, which has no int8 engine that takes them here); 32
    channels stay implicit GEMMs. Built for AVX2 and run here, each matches torch (float32 within
    TOL, the others to a cosine)."""
    torch.manual_seed(0)
    module, x = VaeLikeConvolutions(64, 96).eval(), torch.randn(1, 64, 3, 11, 13)
    imported = from_torch(module, {"x": x})
    prepared, _ = prepare_model(imported, resolve_target("x86-avx2"), mode)
    int8_weights = mode in ("int8-weight", "w8a8")
    assert any("2 3x3 convolutions as Winograd F(4x4, 3x3)" in note and "on AVX2 FMA" in note
               and ("quantized to int16 again" in note) == int8_weights for note in prepared.notes), prepared.notes
    names = prim_funcs(prepared.mod)
    assert sum(name.startswith("winograd_input") and name.endswith("_m4") for name in names) == 2
    # the video conv (3 frames; 11 x 13 -> 3 x 4 tiles of 4): points x rows x 64 x (3 x 96)
    isa = "w16_avx2fmaw16" if int8_weights else "f32_avx2fmaf32"  # (bf16: on the float32 engine, U float32)
    assert f"gemm_{isa}_36x36x64x288" in names, sorted(names)
    assert "R.nn.conv3d" not in prepared.mod["main"].script()
    small, _ = prepare_model(from_torch(VaeLikeConvolutions().eval(), {"x": x[:, :32]}), resolve_target("x86-avx2"), mode)
    assert not any(name.startswith("winograd") for name in prim_funcs(small.mod))

    report = build(imported, "x86-avx2", tmp_path / "w.so", settings=BuildSettings(quantize=mode, shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x=x.numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(x).numpy()
    if mode is None:
        assert max_abs_diff(out, ref) < TOL * max(1.0, float(np.abs(ref).max()))
    else:
        cosine = compare(out, ref)["cosine"]
        assert cosine >= AVX2_WINOGRAD_MIN_COSINE[mode], cosine


class WinogradAndIm2col(torch.nn.Module):
    """One 3x3 convolution the engines' Winograd takes (32 channels each way), three that conv_gemm
    takes (1x1, and a 3x3 of 16 channels)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(16, 32, 1)
        self.b = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.c = torch.nn.Conv2d(32, 16, 1)
        self.d = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = self.b(torch.nn.functional.silu(self.a(x)))
        return self.d(torch.nn.functional.silu(self.c(y)))


def test_winograd_and_im2col_convolutions_share_one_channels_last_layout():
    """The engines' Winograd pass and conv_gemm decide the layout once, together: the model goes
    channels-last once (one transpose in, one out) and conv_gemm takes the other three as they are
    (decided apart, each left convolution was wrapped in transposes back to channels-first and the
    model converted twice: 11 transposes)."""
    torch.manual_seed(0)
    module, x = WinogradAndIm2col().eval(), torch.randn(1, 16, 12, 12)
    prepared, info = prepare_model(from_torch(module, {"x": x}), resolve_target("x86-avx512-bf16"), "bf16")
    assert info["winograd"] == 1 and info["convolutions_as_gemm"] == 3
    assert prepared.mod["main"].script().count("R.permute_dims") == 2

