"""bf16 end to end on the matrix engine: which matmuls move onto it, that their weights ship packed,
that attention stays fused under bf16's casts, and that the built artifact matches torch."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import tvm
from conftest import AttentionBlock, im2col_rows
from tvm import relax

import autotune
from autotune.build.compile import build
from autotune.frontend.importer import from_torch
from autotune.kernels import gemm_cpu as gemm
from autotune.passes.attention import count_fused_attention
from autotune.passes.pipeline import fuse_for_target, prepare_model
from autotune.support import hardware
from autotune.support.fidelity import compare
from autotune.support.ir import prim_funcs
from autotune.support.settings import BuildSettings
from autotune.support.targets import resolve_target

PRE_AVX2 = resolve_target('{"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}')  # no engine at all
BF16_ENGINES = [  # (build target, the engine its bf16 matmuls take)
    pytest.param("x86-avx512-bf16", gemm.AVX512, marks=pytest.mark.skipif(
        "avx512_bf16" not in hardware.cpu_flags(), reason="CPU has no AVX512-BF16 to run the engine on")),
    pytest.param("x86-avx2", gemm.AVX2_BF16),
]

# bf16 keeps 8 bits of mantissa: against the float32 model, outputs of these tiny blocks agree to
# a cosine of 0.9999 (measured: 0.99998-0.999995); against torch's own bf16 run, to the same.
MIN_COSINE = 0.9999


class Projections(torch.nn.Module):
    """Two linears: 64 -> 48 (whole 16-lane vectors: the engine) and 48 -> 24 (not: left alone)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 48)
        self.down = torch.nn.Linear(48, 24)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.fixture(scope="module")
def projections():
    torch.manual_seed(0)
    module = Projections().eval()
    inputs = {"x": torch.randn(1, 7, 64)}  # 7 rows: padded to a register tile the kernel can use
    return module, inputs


def _engine_kernels(mod) -> list:
    return [f for f in prim_funcs(mod).values() if gemm.is_gemm_kernel(f)]


def _weights_in_column_panels(report, kn: tuple[int, int], g: int) -> int:
    """How many weights of a (k, n) matmul the artifact ships re-laid for the vector engines,
    (n / 16, k / g, 16, g), packed once at build time (gemm_cpu's layout-rewrite block, split out of
    the kernel: none left in the library, no per-call re-layout)."""
    from autotune.runtime.artifact import load_weights, read_metadata

    assert "weight matrices packed" in " ".join(report.notes), report.notes
    k, n = kn
    shipped = load_weights(report.paths.weights, read_metadata(report.paths)["weights"])
    assert not [w.shape for w in shipped.values() if w.shape == (k // g, n, g)], "a weight left in rows"
    return sum(w.shape == (n // 16, k // g, 16, g) for w in shipped.values())


def test_bf16_weight_matmuls_move_onto_the_engine_with_packed_weights(projections):
    module, inputs = projections
    prepared, _ = prepare_model(from_torch(module, inputs), resolve_target("x86-avx512-bf16"), "bf16")
    kernels = _engine_kernels(prepared.mod)
    assert len(kernels) == 1, "64->48 moves onto the engine; 48->24 (24 columns) stays on the generic path"
    info = kernels[0].attrs[gemm.GEMM_ATTR]
    assert (int(info["rows"]), int(info["n"]), int(info["k"])) == (8, 48, 64)  # 7 rows padded to 8
    packed = [w for w in prepared.weights.values() if w.shape == (32, 48, 2)]
    assert len(packed) == 1, "the weight ships in the pair-interleaved layout (k/2, n, 2)"
    up = module.up.weight.detach().numpy().T  # (k, n)
    np.testing.assert_array_equal(packed[0][:, :, 1].astype(np.float32), up[1::2].astype(packed[0].dtype).astype(np.float32))

    plain, _ = prepare_model(from_torch(module, inputs), PRE_AVX2, "bf16")
    assert not _engine_kernels(plain.mod), "a target without AVX2, AVX512-BF16 or AMX keeps the generic matmuls"


@pytest.mark.parametrize("target, isa", BF16_ENGINES)
def test_bf16_artifact_matches_torch(tmp_path, projections, target, isa):
    """On AVX512-BF16 the 64 -> 48 linear takes the engine; without bf16 arithmetic (AVX2: every CI
    machine) both linears run on the FMA engine (8-lane vectors take 24 columns too). Within bf16's
    cosine of float32 torch and of torch's own bf16 run."""
    module, inputs = projections
    report = build(from_torch(module, inputs), target, tmp_path / "p", settings=BuildSettings(quantize="bf16", shipped_log=False))
    meta = json.loads(report.paths.metadata.read_text())
    assert sum(name.startswith(f"gemm_bf16_{isa}_") for name in meta["kernels"]["flops"]) == (2 if isa == gemm.AVX2_BF16 else 1)
    if isa in gemm.PANEL_ISAS:  # up's weight (64, 48) ships in 16-column panels of bf16 pairs
        assert _weights_in_column_panels(report, (64, 48), 2) == 1
    out = np.asarray(autotune.load(report.paths.library)(inputs["x"].numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(inputs["x"]).numpy()
        ref_bf16 = copy.deepcopy(module).to(torch.bfloat16)(inputs["x"].to(torch.bfloat16)).float().numpy()
    assert compare(out, ref)["cosine"] >= MIN_COSINE
    assert compare(out, ref_bf16)["cosine"] >= MIN_COSINE


def test_attention_stays_fused_at_bf16_and_matches_torch_sdpa(tmp_path):
    """ToMixedPrecision wraps the attention in casts; the matcher must see through them."""
    torch.manual_seed(0)
    module = AttentionBlock().eval()
    inputs = {"x": torch.randn(1, 32, 64)}
    target = "x86-avx512-bf16" if "avx512_bf16" in hardware.cpu_flags() else "x86"
    prepared, _ = prepare_model(from_torch(module, inputs), resolve_target(target), "bf16")
    assert count_fused_attention(fuse_for_target(prepared.mod, resolve_target(target).tvm_target())) == 1
    report = build(from_torch(module, inputs), target, tmp_path / "a", settings=BuildSettings(quantize="bf16", shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(inputs["x"].numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(inputs["x"]).numpy()  # torch SDPA in float32
    assert compare(out, ref)["cosine"] >= MIN_COSINE


def test_bf16_attention_computes_in_float32_where_the_cpu_has_no_bf16_arithmetic():
    """On AVX2 TVM would widen every bf16 load in the kernel's inner loops: the attention takes its
    bf16 values as float32 there (its output cast back to bf16); AVX512-BF16 keeps the bf16 kernel,
    whose GEMMs run on vdpbf16ps. (Its arithmetic against torch: the test above, on this CPU.)"""
    module, inputs = AttentionBlock().eval(), {"x": torch.randn(1, 32, 64)}
    for target, dtype in (("x86-avx2", "float32"), ("x86-avx512-bf16", "bfloat16")):
        prepared, _ = prepare_model(from_torch(module, inputs), resolve_target(target), "bf16")
        fused = fuse_for_target(prepared.mod, resolve_target(target).tvm_target())
        names = [name for name in prim_funcs(fused) if name.startswith("fused_attention")]
        assert len(names) == 1 and f"_{dtype}_" in names[0], (target, names)


@pytest.mark.parametrize("mode", ["int8-weight", "w8a8"])
def test_quantized_modes_compute_attention_in_bf16_where_the_cpu_has_bf16_arithmetic(mode):
    """int8-weight and w8a8 quantize the linears; the float32 attention between them takes the bf16
    kernel on AVX512-BF16 and AMX (as the bf16 build's), and stays float32 on AVX2 (which widens bf16).
    Under w8a8 on AVX512-BF16 its Q.K^T goes to VNNI (int8 scores); not on AMX CPUs (this head_dim of
    16 fits no AMX tile, so the kernel there is vdpbf16ps's: AMX CPUs keep bf16 scores)."""
    module, inputs = AttentionBlock().eval(), {"x": torch.randn(1, 32, 64)}
    int8_scores = "_int8qk" if mode == "w8a8" else "_vdpbf16ps"
    for target, dtype, kernel in (("x86-avx2", "float32", "_k_s0p25"), ("x86-avx512-bf16", "bfloat16", int8_scores),
                                  ("x86-amx", "bfloat16", "_vdpbf16ps")):
        prepared, info = prepare_model(from_torch(module, inputs), resolve_target(target), mode)
        fused = fuse_for_target(prepared.mod, resolve_target(target).tvm_target())
        names = [name for name in prim_funcs(fused) if name.startswith("fused_attention")]
        assert len(names) == 1 and f"_{dtype}_" in names[0] and names[0].endswith(kernel), (target, names)
        assert info.get("attention_dtype", "float32") == dtype, (target, info)
        assert info.get("attention_scores") == ("int8" if kernel == "_int8qk" else None), (target, info)


@pytest.mark.skipif("avx512_bf16" not in hardware.cpu_flags(), reason="CPU has no AVX512-BF16 to run the bf16 attention on")
@pytest.mark.parametrize("mode", ["int8-weight", "w8a8"])
def test_quantized_build_with_bf16_attention_matches_torch(mode, tmp_path):
    torch.manual_seed(0)
    module, inputs = AttentionBlock().eval(), {"x": torch.randn(1, 32, 64)}
    settings = BuildSettings(quantize=mode, shipped_log=False)
    report = build(from_torch(module, inputs), "x86-avx512-bf16", tmp_path / "a", settings=settings)
    out = np.asarray(autotune.load(report.paths.library)(inputs["x"].numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(inputs["x"]).numpy()
    assert compare(out, ref)["cosine"] >= 0.999  # int8 linears: the bar, not the bf16 build's


def _amx_build_target(amx_target, monkeypatch):
    """The target to build AMX artifacts for: `x86-amx` on an AMX CPU; else this CPU with the AMX
    features named (the passes then choose AMX kernels, whose tile instructions the amx_target
    fixture emulates) and the loader's CPU check told the emulation stands in for them."""
    from autotune.runtime import module as runtime_module

    target, emulated = amx_target
    if not emulated:
        return "x86-amx"
    monkeypatch.setattr(runtime_module, "missing_cpu_flags", lambda flags: [])
    monkeypatch.setattr(runtime_module, "request_amx_permission", lambda: None)
    return {"kind": "llvm", "mcpu": str(target.attrs["mcpu"]), "mattr": ["+amx-tile", "+amx-bf16", "+amx-int8"], "num-cores": 2}


def test_bf16_block_on_amx_tiles_matches_torch(tmp_path, monkeypatch, amx_target, dpbf16_target):
    """A DiT-shaped block built at bf16 for AMX: its linears and both GEMMs of its attention on AMX
    tiles, run (tile instructions emulated in C where the CPU lacks AMX; the loader's CPU check is
    then told the emulation stands in for it) and compared with torch."""
    target = _amx_build_target(amx_target, monkeypatch)
    torch.manual_seed(0)
    module = AttentionBlock(dim=64, heads=2).eval()  # head_dim 32: one AMX k step
    x = torch.randn(1, 40, 64)  # 40 tokens: padded to 64 query rows, keys masked
    details: dict = {}
    report = build(from_torch(module, {"x": x}), target, tmp_path / "amx", details=details,
                   settings=BuildSettings(quantize="bf16", shipped_log=False))
    names = list(prim_funcs(details["scheduled"]))
    assert sum(name.startswith("gemm_bf16_amx_") for name in names) == 4, names  # qkv, proj, the MLP's two
    assert sum(name.endswith("_amx") and "attention" in name for name in names) == 1, names
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(x).numpy()
    assert compare(out, ref)["cosine"] >= MIN_COSINE


def test_precision_flag_is_the_bf16_mode_and_excludes_quantize(capsys):
    from autotune.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["build", "--precision", "bf16"]).quantize == "bf16"
    assert parser.parse_args(["tune", "--precision", "fp32"]).quantize is None
    assert parser.parse_args(["build", "--quantize", "bf16"]).quantize == "bf16"  # the old spelling
    for bad in (["build", "--precision", "int4"], ["build", "--precision", "bf16", "--quantize", "w8a8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "not allowed with argument --precision" in capsys.readouterr().err


class ConvBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.silu(self.conv(x))


def test_bf16_convolutions_compute_in_float32_without_an_engine(tmp_path):
    """Without a bf16 matrix engine (x86-64 before AVX2) the convolution reads bf16-rounded inputs
    and float32 weights cast once at build (TVM's generic bf16 convolution widens every load)."""
    torch.manual_seed(0)
    module, x = ConvBlock().eval(), torch.randn(1, 8, 12, 12)
    prepared, info = prepare_model(from_torch(module, {"x": x}), PRE_AVX2, "bf16")
    convs = [b.value for blk in prepared.mod["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, tvm.relax.Call) and b.value.op.name == "relax.nn.conv2d"]
    assert [str(a.ty.dtype) for c in convs for a in c.args] == ["float32", "float32"]
    assert info["convolutions_in_float32"] == 1 and "convolutions_as_gemm" not in info
    assert any(w.shape == (16, 8, 3, 3) and w.dtype == np.float32 for w in prepared.weights.values())
    report = build(from_torch(module, {"x": x}), PRE_AVX2, tmp_path / "c", settings=BuildSettings(quantize="bf16", shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= MIN_COSINE


class Convolutions2d(torch.nn.Module):
    """A strided, padded 3x3 convolution (im2col with padding and stride) into a 1x1 (no im2col)."""

    def __init__(self):
        super().__init__()
        self.strided = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pointwise = torch.nn.Conv2d(16, 32, 1)

    def forward(self, x):
        return self.pointwise(torch.nn.functional.silu(self.strided(x)))


class Convolution3d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(8, 16, 3, padding=(1, 1, 2), dilation=(1, 1, 2))

    def forward(self, x):
        return self.conv(x)


class CausalConvolution8(torch.nn.Module):
    """The Wan VAE's causal convolution on 3 frames (zero time padding by F.pad) with 8 output
    channels: half an AVX-512 vector, so its weight is padded to 16 columns."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(8, 8, 3, padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0)))


CONV_CASES = {
    "conv2d": (Convolutions2d, (1, 8, 11, 13), 2, 1),  # module, input shape, GEMMs, im2col kernels
    "conv3d": (Convolution3d, (1, 8, 3, 6, 10), 1, 1),
    "causal8": (CausalConvolution8, (1, 8, 3, 6, 10), 1, 1),
}


@pytest.mark.parametrize("mode", ["bf16", "int8-weight"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_convolutions_become_im2col_gemms_that_match_torch(tmp_path, case, mode):
    """The rewrite's arithmetic on any CPU: a bf16 / int8-weight model's convolutions rewritten for
    an AVX512-BF16 target, the result built for the host, where its matmuls take TVM's generic
    path. (int8 weights: per-channel rounding costs about as much cosine as bf16's.) The causal
    convolution's F.pad becomes its own padding (no padded copy), its 8 output channels 16
    columns of the GEMM."""
    from autotune.passes.conv_gemm import convolutions_as_gemm
    from autotune.passes.quantize import quantize

    make, shape, gemms, gathers = CONV_CASES[case]
    torch.manual_seed(0)
    module, x = make().eval(), torch.randn(*shape)
    quantized, _ = quantize(from_torch(module, {"x": x}), mode, resolve_target("x86"))
    as_gemm, count = convolutions_as_gemm(quantized, resolve_target("x86-avx512-bf16").tvm_target())
    script = as_gemm.mod["main"].script()
    assert count == gemms and "R.nn.conv" not in script
    padded = case == "causal8"  # one pad left: the weight's columns, 8 -> 16 (x's F.pad is gone)
    assert script.count("R.nn.pad(") == padded and ("zero-padded to whole vectors" in as_gemm.notes[-1]) == padded
    assert sum(name.startswith("im2col") for name in prim_funcs(as_gemm.mod)) == gathers
    report = build(as_gemm, "x86", tmp_path / "g", settings=BuildSettings(shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= MIN_COSINE


@pytest.mark.parametrize("case, limit, chunks", [("conv2d", 3000, 3), ("conv3d", 8640, 9)])
def test_large_im2col_is_cut_into_chunks_that_match_torch(tmp_path, monkeypatch, case, limit, chunks):
    """An im2col over the size limit, gathered and multiplied in chunks of output rows, the products
    concatenated: the limits here cut the strided conv2d into 3 chunks of 2 output rows, the dilated
    conv3d into one chunk per (frame, 2 rows); one gather kernel, told where its chunk starts,
    serves all chunks of a convolution."""
    from autotune.passes import conv_gemm
    from autotune.passes.quantize import quantize

    monkeypatch.setattr(conv_gemm, "MAX_IM2COL_BYTES", limit)
    make, shape, gemms, _ = CONV_CASES[case]
    torch.manual_seed(0)
    module, x = make().eval(), torch.randn(*shape)
    quantized, _ = quantize(from_torch(module, {"x": x}), "bf16", resolve_target("x86"))
    as_gemm, count = conv_gemm.convolutions_as_gemm(quantized, resolve_target("x86-avx512-bf16").tvm_target())
    script = as_gemm.mod["main"].script()
    assert count == gemms and "chunks of output rows" in as_gemm.notes[-1]
    assert script.count("R.matmul(") == chunks + gemms - 1 and script.count("R.call_tir(im2col") == chunks
    assert sum(name.startswith("im2col") for name in prim_funcs(as_gemm.mod)) == 1
    report = build(as_gemm, "x86", tmp_path / "c", settings=BuildSettings(shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= MIN_COSINE


class CausalPair(torch.nn.Module):
    """Two causal 3x3x3 convolutions with an RMS norm (F.normalize, as the Wan VAE's) and SiLU
    between them, and a residual: the VAE up-block's pattern, small; then a 3-channel output
    convolution (as the VAE's last), which no engine takes."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(16, 16, 3, padding=(0, 1, 1))
        self.conv2 = torch.nn.Conv3d(16, 16, 3, padding=(0, 1, 1))
        self.head = torch.nn.Conv3d(16, 3, 3, padding=(0, 1, 1))

    def forward(self, x):
        causal = (0, 0, 0, 0, 2, 0)
        h = self.conv1(torch.nn.functional.pad(x, causal))
        h = torch.nn.functional.silu(torch.nn.functional.normalize(h, dim=1) * 2.0)
        h = self.conv2(torch.nn.functional.pad(h, causal)) + x
        return self.head(torch.nn.functional.pad(h, causal))


@pytest.mark.parametrize("mode, frames", [("bf16", 1), ("bf16", 3), ("w8a8", 3)])
def test_a_block_whose_convolutions_are_mostly_gemms_goes_channels_last(tmp_path, monkeypatch, mode, frames):
    """Two of three convolutions taken: the model goes channels-last, so the first GEMM's rows reach
    the second im2col without a transpose on the way (channels-first, one transposes them back and
    the next im2col's input forth again), the output convolution runs channels-first between
    transposes, and the build still matches torch. On one frame the causal padding is dropped
    (causal_padding.py), on three it is the convolutions' own."""
    from autotune.passes import conv_gemm

    def transposes_between_the_gemms(main) -> int:
        """permute_dims on the path from the second im2col's input back to the first GEMM (first
        operands: the data, not the norm's divisor or a scale)."""
        value = {b.var: b.value for block in main.body.blocks for b in block.bindings}
        gathers = [v for v in value.values() if isinstance(v, relax.Call) and "im2col" in str(v.args[0])]
        var, transposes = gathers[1].args[1][0], 0
        while not (isinstance(value[var], relax.Call) and "gemm" in str(value[var].args[0])):
            call = value[var]
            transposes += call.op.name == "relax.permute_dims"
            var = call.args[0] if isinstance(call, relax.Call) else call.tuple_value
        return transposes

    torch.manual_seed(0)
    module, x = CausalPair().eval(), torch.randn(1, 16, frames, 6, 8)
    preset = resolve_target("x86-avx512-bf16")
    last, info = prepare_model(from_torch(module, {"x": x}), preset, mode)
    assert info["convolutions_as_gemm"] == 2 and any("channels-last from one to the next" in n for n in last.notes)
    assert transposes_between_the_gemms(last.mod["main"]) == 0
    script = last.mod["main"].script()  # the head, left to TVM, channels-first between transposes
    assert script.count("R.nn.conv") == 1 and re.findall(r'data_layout="(\w+)"', script) == [["NCDHW", "NCHW"][frames == 1]]
    monkeypatch.setattr(conv_gemm, "channels_last_pays", lambda *args: False)
    first, _ = prepare_model(from_torch(module, {"x": x}), preset, mode)
    assert transposes_between_the_gemms(first.mod["main"]) == 2  # (the check can fail)
    monkeypatch.undo()
    report = build(from_torch(module, {"x": x}), "x86", tmp_path / mode,
                   settings=BuildSettings(quantize=mode, shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= {"bf16": 0.9995, "w8a8": 0.999}[mode]


def test_the_vae_norm_between_two_gemms_stays_channels_last(tmp_path, monkeypatch):
    """The Wan VAE's RMS norm (F.normalize: a clip and a broadcast_to, operators TVM's ConvertLayout
    has no rule for) between the two GEMMs of a channels-last float32 AVX2 build: no operator on
    any path from the second GEMM's input back to the first GEMM is a transpose, a clip or a
    broadcast_to (passes/layout_carriers.py); without that rewrite there are (the check can fail).
    The build matches torch within float32 summation-order error (max |err| / max |ref| < 1e-5)."""
    from autotune.passes import conv_gemm

    def layout_stops_between_the_gemms(main) -> int:
        value = {b.var: b.value for block in main.body.blocks for b in block.bindings}
        gemms = [v for v in value.values() if isinstance(v, relax.Call) and "gemm" in str(v.args[0])]
        stops, seen, todo = 0, set(), list(gemms[1].args[1])
        while todo:
            var = todo.pop()
            call = value.get(var)
            if var in seen or not isinstance(call, relax.Call) or call.same_as(gemms[0]):
                continue
            seen.add(var)
            stops += call.op.name in ("relax.permute_dims", "relax.clip", "relax.broadcast_to")
            todo += [a for a in call.args if isinstance(a, relax.Var)]
        return stops

    torch.manual_seed(0)
    module, x = CausalPair().eval(), torch.randn(1, 16, 3, 6, 8)
    preset = resolve_target("x86-avx2")
    prepared, _ = prepare_model(from_torch(module, {"x": x}), preset, None)
    assert layout_stops_between_the_gemms(prepared.mod["main"]) == 0
    with monkeypatch.context() as patched:
        patched.setattr(conv_gemm, "carry_layouts", lambda func: func)
        unrewritten, _ = prepare_model(from_torch(module, {"x": x}), preset, None)
    assert layout_stops_between_the_gemms(unrewritten.mod["main"]) >= 2
    report = build(from_torch(module, {"x": x}), preset.name, tmp_path / "f", settings=BuildSettings(shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(x).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_output_chunks_tile_the_output_once_within_the_limit():
    from autotune.passes.conv_gemm import output_chunks

    for shape, k, limit in [((1, 4, 480, 832), 3456, 256 << 20), ((2, 6, 7), 72, 3000), ((1, 3, 6, 10), 216, 1000)]:
        seen = np.zeros(shape, dtype=int)
        boxes = output_chunks(shape, k * 2, limit)
        for starts, sizes in boxes:
            seen[tuple(slice(a, a + n) for a, n in zip(starts, sizes))] += 1
            assert int(np.prod(sizes)) * k * 2 <= max(limit, k * 2)
        assert (seen == 1).all() and len(boxes) > 1
    assert len(output_chunks((1, 4, 480, 832), 3456 * 2, 256 << 20)) == 4 * 11  # a frame in 11 slabs of <= 44 rows


@pytest.mark.parametrize("target, isa", BF16_ENGINES)
def test_bf16_convolutions_run_on_the_engine_and_match_torch(tmp_path, target, isa):
    torch.manual_seed(0)
    module, x = Convolutions2d().eval(), torch.randn(1, 8, 11, 13)
    settings = BuildSettings(quantize="bf16", shipped_log=False)
    details: dict = {}
    report = build(from_torch(module, {"x": x}), target, tmp_path / "e", settings=settings, details=details)
    names = prim_funcs(details["scheduled"])
    assert sum(name.startswith(f"gemm_bf16_{isa}") for name in names) == 2
    # on AVX2 the strided convolution's GEMM reads its rows in place (gemm_cpu.reads_rows_in_place)
    in_place = isa in gemm.IMPLICIT_ISAS
    assert sum("_implicit_" in name for name in names) == in_place and any(n.startswith("im2col") for n in names) != in_place
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= MIN_COSINE


class ThreeChannelHead(torch.nn.Module):
    """A VAE's output convolution: 3 channels, which no engine takes (under half a vector), with
    enough arithmetic (3.5 MFLOP) that int8-weight quantizes it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_int8_weight_convolutions_no_engine_takes_compute_in_float32(tmp_path):
    """int8-weight's convolution that no engine takes runs TVM's generic kernel, which widens every
    int8 weight load (the tiny VAE decoder's output convolution 5x slower than float32): a weight
    that small ships widened to float32 (exact integers; the scale stays on the output), and the
    build matches torch as int8-weight does (cosine >= MIN_COSINE)."""
    from autotune.passes.matrix_engine import MAX_WIDENED_INT8_WEIGHTS

    torch.manual_seed(0)
    module, x = ThreeChannelHead().eval(), torch.randn(1, 16, 64, 64)
    assert module.conv.weight.numel() <= MAX_WIDENED_INT8_WEIGHTS
    prepared, info = prepare_model(from_torch(module, {"x": x}), resolve_target("x86-avx2"), "int8-weight")
    assert info["conv_layers"] == 1 and info["convolutions_in_float32"] == 1
    convs = [b.value for blk in prepared.mod["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, tvm.relax.Call) and b.value.op.name == "relax.nn.conv2d"]
    assert [str(a.ty.dtype) for c in convs for a in c.args] == ["float32", "float32"]
    report = build(from_torch(module, {"x": x}), "x86-avx2", tmp_path / "h",
                   settings=BuildSettings(quantize="int8-weight", shipped_log=False))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        assert compare(out, module(x).numpy())["cosine"] >= MIN_COSINE


class Float32Layers(torch.nn.Module):
    """A 3x3 convolution (1024 x 288 x 64: 38 MFLOP), then per-position linears of 64 -> 128 (exactly
    gemm_cpu.MIN_F32_FLOPS) and 128 -> 24 (6 MFLOP: under it)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 24)

    def forward(self, x):
        tokens = torch.nn.functional.silu(self.conv(x)).flatten(2).transpose(1, 2).contiguous()  # (1, 1024, 64)
        return self.down(torch.nn.functional.gelu(self.up(tokens)))


def test_float32_on_an_avx2_cpu_runs_large_products_on_the_fma_engine_and_matches_torch(tmp_path):
    """Float32 without AVX-512: the convolution (an implicit GEMM: its rows read in place from the
    padded input, no im2col) and the linear of 2^24 flops take the FMA engine (float32 weights packed
    at build time); the small linear stays on MetaSchedule's schedule.
    Float32 throughout, so within float32 summation-order error of torch (max |err| / max |ref|
    < 1e-5). With AVX-512 nothing moves (its float32 schedules keep the shipped records)."""
    from autotune.kernels.gemm_cpu import MIN_F32_FLOPS

    assert 2 * 1024 * 64 * 128 == MIN_F32_FLOPS
    torch.manual_seed(0)
    module, x = Float32Layers().eval(), torch.randn(1, 32, 32, 32)
    details: dict = {}
    report = build(from_torch(module, {"x": x}), "x86-avx2", tmp_path / "f", details=details,
                   settings=BuildSettings(shipped_log=False))
    names = sorted(name for name in prim_funcs(details["scheduled"]) if name.startswith("gemm_"))
    assert names == ["gemm_f32_avx2fmaf32_1024x128x64", "gemm_f32_avx2fmaf32_1024x64x288_implicit_1x32x32x32"], names
    assert not any(name.startswith("im2col") for name in prim_funcs(details["scheduled"]))
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float32)
    with torch.no_grad():
        ref = module(x).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5

    # with AVX-512 no float32 engine: the 3x3 convolution is a Winograd GEMM (passes/winograd.py)
    prepared, _ = prepare_model(from_torch(module, {"x": x}), resolve_target("x86-avx512"), None)
    assert not _engine_kernels(prepared.mod) and "R.nn.conv2d" not in prepared.mod["main"].script()
    assert any(name.startswith("winograd_gemm") for name in prim_funcs(prepared.mod))


def _int8_weights(linear: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 weights (as float64) and their scales."""
    w = linear.weight.detach().double().numpy()
    sw = np.abs(w).max(1) / 127
    return np.clip(np.rint(w / sw[:, None]), -127, 127), sw


def _fake_quantized_linear(x: np.ndarray, linear: torch.nn.Linear) -> np.ndarray:
    """w8a8's arithmetic in float64: per-token int8 activations, per-output-channel int8 weights."""
    wq, sw = _int8_weights(linear)
    sx = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8) / 127
    xq = np.clip(np.rint(x / sx), -127, 127)
    return (xq @ wq.T) * sx * sw + linear.bias.detach().double().numpy()


def _fake_quantized_conv(x: np.ndarray, conv: torch.nn.Module, sample_levels: int | None = None) -> np.ndarray:
    """w8a8's convolution arithmetic: im2col rows (an output position's taps x channels) quantized
    per row to int8 in float32 as the kernel does, or (`sample_levels`: AVX2's implicit GEMMs) each
    sample of x quantized with one scale to -sample_levels..sample_levels; per-output-channel int8
    weights; products and rescale in float64. x: (N, C, *spatial)."""
    w = conv.weight.detach().numpy()
    c_out, _, *taps = w.shape
    out = [(s + 2 * p - d * (t - 1) - 1) // st + 1
           for s, p, d, t, st in zip(x.shape[2:], conv.padding, conv.dilation, taps, conv.stride)]
    if sample_levels is None:
        rows = im2col_rows(np.moveaxis(x, 1, -1), taps, conv.stride, conv.padding, conv.dilation, out)
        rows = rows.reshape(-1, math.prod(taps) * x.shape[1])
        sx = np.maximum(np.abs(rows).max(-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
        xq = np.clip(np.rint(rows / sx), -127, 127)
    else:
        levels = np.float32(sample_levels)
        scale = np.maximum(np.abs(x).max(axis=tuple(range(1, x.ndim)), keepdims=True), np.float32(1e-8)) / levels
        quantized = np.clip(np.rint(x / scale), -levels, levels)
        xq = im2col_rows(np.moveaxis(quantized, 1, -1), taps, conv.stride, conv.padding, conv.dilation, out)
        xq = xq.reshape(-1, math.prod(taps) * x.shape[1])
        sx = np.repeat(scale.reshape(-1, 1), math.prod(out), axis=0)  # each sample's scale on its rows
    wk = np.moveaxis(w, [0, 1], [-1, -2]).reshape(-1, c_out)  # (*taps, C_in, C_out): the rows' k order
    sw = (np.abs(wk).max(0) / np.float32(127)).astype(np.float32)
    wq = np.clip(np.rint(wk / sw), -127, 127)
    y = (xq.astype(np.float64) @ wq) * sx * sw + conv.bias.detach().double().numpy()
    return np.moveaxis(y.reshape(x.shape[0], *out, c_out), -1, 1)


_VNNI = pytest.mark.skipif("avx512_vnni" not in hardware.cpu_flags(), reason="CPU has no AVX512-VNNI to run the engine on")
W8A8_CONV_ENGINES = [  # (build target, the int8 engine, the values it multiplies, how the activations are quantized)
    pytest.param("x86-avx512-vnni", gemm.VNNI, "u8", "rows", marks=_VNNI),  # im2col rows, per row
    pytest.param("x86-avx2", gemm.AVX2_INT8, "i16", "sample"),  # read in place, per sample to int16
]


def _sample_levels(quantized: str, conv: torch.nn.Module) -> int | None:
    return gemm.int16_levels(conv.weight[0].numel()) if quantized == "sample" else None


def _assert_w8a8_kernels(names: list[str], isa: str, values: str, quantized: str) -> None:
    """The convolution's activations quantized as `quantized` says: im2col rows gathered and quantized
    per row, or the input quantized per sample and read in place by an implicit GEMM."""
    if quantized == "rows":
        assert any(n.startswith(f"im2col_quant_{values}_") for n in names), names
    else:
        assert any(n.startswith("sample_quant_i16_") for n in names), names
        assert any(n.startswith(f"gemm_int8_{isa}_") and "_implicit_" in n for n in names), names
        assert not any(n.startswith("im2col") for n in names), names


@pytest.mark.parametrize("target, isa, values, quantized, x_shape", [
    *[pytest.param(*p.values, (1, 8, 3, 6, 10), marks=p.marks, id=p.values[0]) for p in W8A8_CONV_ENGINES],
    # 7 output positions, not a whole number of AVX2 register tiles: gathered, quantized per row
    pytest.param("x86-avx2", gemm.AVX2_INT8, "i16", "rows", (1, 8, 1, 1, 7), id="x86-avx2-gathered"),
])
def test_w8a8_convolution_runs_on_the_int8_engine_and_equals_the_fake_quantized_reference(
        tmp_path, target, isa, values, quantized, x_shape):
    """w8a8 on a convolution (3x3x3, dilated, padded): its activations quantized as the engine takes
    them, an int8 GEMM, exact int32 products, so the artifact equals w8a8's arithmetic within 1e-6 of
    max |y| (float32 rounding of the rescale)."""
    torch.manual_seed(0)
    module, x = Convolution3d().eval(), torch.randn(*x_shape)
    details: dict = {}
    report = build(from_torch(module, {"x": x}), target, tmp_path / "w", details=details,
                   settings=BuildSettings(quantize="w8a8", shipped_log=False))
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["passes"][0]["conv_layers"] == 1 and meta["passes"][0]["convolutions_as_gemm"] == 1
    names = list(prim_funcs(details["scheduled"]))
    _assert_w8a8_kernels(names, isa, values, quantized)
    assert any(n.startswith(f"gemm_int8_{isa}_") for n in names) and not any("conv" in n for n in names), names
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float64)
    ref = _fake_quantized_conv(x.numpy(), module.conv, _sample_levels(quantized, module.conv))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, f"max error {err:.2e} of max |y| against the fake-quantized reference"


@pytest.mark.parametrize("target, isa, values, quantized", W8A8_CONV_ENGINES)
def test_w8a8_strided_and_pointwise_convolutions_match_their_fake_quantized_references(
        tmp_path, target, isa, values, quantized):
    """A strided 3x3 convolution (batch 2: quantized per row, or per sample and read in place) into a
    1x1 (its rows are the input: the token quantizer), SiLU between: each layer's reference takes the
    previous one's float64 output, so a value rounding the other way in float32 may flip one step of
    the grid: within 1e-4 of max |y|."""
    torch.manual_seed(0)
    module, x = Convolutions2d().eval(), torch.randn(2, 8, 11, 13)
    x[1] *= 8  # samples of different ranges: each keeps its own scale
    details: dict = {}
    report = build(from_torch(module, {"x": x}), target, tmp_path / "w", details=details,
                   settings=BuildSettings(quantize="w8a8", shipped_log=False))
    names = list(prim_funcs(details["scheduled"]))
    _assert_w8a8_kernels(names, isa, values, quantized)
    assert any(n.startswith(f"token_quant_{values}_") for n in names), names
    assert sum(n.startswith(f"gemm_int8_{isa}_") for n in names) == 2, names
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float64)
    hidden = _fake_quantized_conv(x.numpy(), module.strided, _sample_levels(quantized, module.strided))
    silu = (hidden / (1 + np.exp(-hidden))).astype(np.float32)
    ref = _fake_quantized_conv(silu, module.pointwise)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"max error {err:.2e} of max |y| against the fake-quantized reference"


@pytest.mark.skipif("avx512_vnni" not in hardware.cpu_flags(), reason="CPU has no AVX512-VNNI to run the engine on")
def test_w8a8_linear_runs_on_vnni_and_equals_the_fake_quantized_reference(tmp_path):
    """The int32 products are exact (the +128 shift is taken back out exactly), so the artifact
    equals w8a8's arithmetic done in float64 up to float32 rounding of the rescale: 1e-6 of max |y|."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).eval()
    x = torch.randn(1, 7, 64)  # 7 rows: padded to 8 for the register tile
    report = build(from_torch(linear, {"x": x}), "x86-avx512-vnni", tmp_path / "w", settings=BuildSettings(quantize="w8a8", shipped_log=False))
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["passes"][0]["matrix_engine"] == {"AVX512-VNNI": 1}
    assert any(name.startswith("gemm_int8_avx512vnni") for name in meta["kernels"]["flops"])
    assert _weights_in_column_panels(report, (64, 48), 4) == 1  # int8 quads in 16-column panels
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float64)[0]
    ref = _fake_quantized_linear(x.double().numpy()[0], linear)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, f"max error {err:.2e} of max |y| against the fake-quantized reference"



def test_w8a8_linear_runs_on_avx2_and_equals_the_fake_quantized_reference(tmp_path):
    """Without VNNI the matmul runs on AVX2's int16 multiply-add: the quantizer writes int16
    activations (no shift), the products are exact, so the artifact equals w8a8's arithmetic in
    float64 within 1e-6 of max |y| (float32 rounding of the rescale)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40).eval()  # 40 columns: 5 vectors of 8
    x = torch.randn(2, 7, 64)  # 14 rows: padded to 16 for the register tile
    details: dict = {}
    report = build(from_torch(linear, {"x": x}), "x86-avx2", tmp_path / "w", details=details,
                   settings=BuildSettings(quantize="w8a8", shipped_log=False))
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["passes"][0]["matrix_engine"] == {"AVX2 (int16 multiply-add)": 1}
    names = list(prim_funcs(details["scheduled"]))
    assert any(n.startswith("token_quant_i16_") for n in names) and any(n.startswith("gemm_int8_avx2int16") for n in names), names
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float64)
    ref = np.stack([_fake_quantized_linear(row, linear) for row in x.double().numpy()])
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, f"max error {err:.2e} of max |y| against the fake-quantized reference"

    no_avx2 = resolve_target('{"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}')
    plain, info = prepare_model(from_torch(linear, {"x": x}), no_avx2, "w8a8")
    assert "matrix_engine" not in info and not _engine_kernels(plain.mod), "no AVX2: the generic int8 matmul stays"


def test_w8a8_linear_on_amx_int8_equals_the_fake_quantized_reference(tmp_path, monkeypatch, amx_target):
    """w8a8 on AMX-INT8 tiles (emulated where the CPU lacks AMX): the quantizer writes the shifted
    uint8 activations, the graph takes the shift back out; exact int32 products, so equal to w8a8's
    arithmetic in float64 within 1e-6 of max |y| (float32 rounding of the rescale)."""
    target = _amx_build_target(amx_target, monkeypatch)
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64).eval()  # k 128: two AMX-INT8 tile rows; 64 columns: two blocks
    x = torch.randn(1, 40, 128)  # 40 rows: padded to 64
    details: dict = {}
    report = build(from_torch(linear, {"x": x}), target, tmp_path / "w", details=details,
                   settings=BuildSettings(quantize="w8a8", shipped_log=False))
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["passes"][0]["matrix_engine"] == {"AMX-INT8": 1}
    names = list(prim_funcs(details["scheduled"]))
    assert any(n.startswith("token_quant_u8_") for n in names) and any(n.startswith("gemm_int8_amxint8") for n in names), names
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float64)[0]
    ref = _fake_quantized_linear(x.double().numpy()[0], linear)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, f"max error {err:.2e} of max |y| against the fake-quantized reference"


@pytest.mark.parametrize("target, isa", [
    pytest.param("x86-avx512-bf16", gemm.AVX512_W8, marks=pytest.mark.skipif(
        "avx512_bf16" not in hardware.cpu_flags(), reason="CPU has no AVX512-BF16 to run the engine on")),
    pytest.param("x86-avx2", gemm.AVX2_W8),
])
def test_int8_weight_linear_runs_on_the_bf16_engine_and_equals_its_reference(tmp_path, target, isa):
    """int8-weight on a bf16 engine: int8 weights converted in the kernel (exact: to bf16, or to
    float32 on AVX2), activations rounded to bf16 (AVX2: kept float32, what its FMA multiplies),
    float32 accumulation: equal to that arithmetic in float64 within 1e-5 of max |y| (the float32
    summation order)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).eval()
    x = torch.randn(1, 7, 64)
    report = build(from_torch(linear, {"x": x}), target, tmp_path / "w", settings=BuildSettings(quantize="int8-weight", shipped_log=False))
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["passes"][0]["matrix_engine"] == {gemm.ENGINE_NAMES[isa]: 1}
    assert any(name.startswith(f"gemm_w8_{isa}_") for name in meta["kernels"]["flops"])
    assert meta["weight_bytes"]["after"] < 64 * 48 * 2, "the weight ships as int8 (bf16 would be 6 KiB)"
    out = np.asarray(autotune.load(report.paths.library)(x.numpy()), dtype=np.float64)[0]
    wq, sw = _int8_weights(linear)
    activations = x[0] if isa in gemm.FMA else x[0].to(torch.bfloat16)
    ref = (activations.double().numpy() @ wq.T) * sw + linear.bias.detach().double().numpy()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"max error {err:.2e} of max |y| against the reference"
