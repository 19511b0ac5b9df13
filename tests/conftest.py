"""Shared fixtures: small models imported from torch and ONNX, and a fresh-process runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several pytest workers (tools/test.sh): one thread each,
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):  # or the workers' thread pools fight over the cores
        os.environ.setdefault(name, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import autotune  # noqa: E402, F401  (sets TVM_NUM_THREADS before tvm is imported)


class MLPBlock(torch.nn.Module):
    """A transformer-style block: LayerNorm → Linear → GELU → Linear, residual. Matmul-heavy,
    so that tuning has something to win over the fallback schedules."""

    def __init__(self, dim: int = 256, hidden: int = 512):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class ConvAndLinear(torch.nn.Module):
    """A 3x3 convolution (16 -> 32 channels) and a linear (32 -> 64), side by side: the two kinds of
    weight matmul the quantization modes and matrix engines rewrite, at a build's smallest cost."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.linear = torch.nn.Linear(32, 64)

    def forward(self, x, tokens):
        return self.conv(x), self.linear(tokens)


class AttentionBlock(torch.nn.Module):
    """Pre-norm self-attention + MLP: the shape of a DiT block, tiny."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = MLPBlock(dim, 2 * dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return self.mlp(x)


@pytest.fixture(scope="session")
def mlp_block():
    torch.manual_seed(0)
    module = MLPBlock().eval()
    x = torch.randn(1, 128, 256)
    with torch.no_grad():
        ref = module(x).numpy()
    return module, {"x": x}, ref


@pytest.fixture(scope="session")
def attention_block():
    torch.manual_seed(0)
    module = AttentionBlock().eval()
    x = torch.randn(1, 32, 64)
    with torch.no_grad():
        ref = module(x).numpy()
    return module, {"x": x}, ref


@pytest.fixture(scope="session")
def onnx_attention_block(tmp_path_factory, attention_block):
    """The attention block exported with the dynamo ONNX exporter (opset 18)."""
    module, inputs, ref = attention_block
    path = tmp_path_factory.mktemp("onnx") / "block.onnx"
    torch.onnx.export(module, (inputs["x"],), str(path), dynamo=True, opset_version=18, input_names=["x"])
    return path, inputs, ref


# Session fixtures that take a minute to make: under pytest-xdist (tools/test.sh: --dist loadgroup)
# every test that uses one runs on the same worker, which makes it once.
SHARED_SESSION_FIXTURES = ("tiny_pipeline_artifacts", "tuned_mlp")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SHARED_SESSION_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


@pytest.fixture(autouse=True, scope="session")
def quantize_every_layer():
    """The suite's models are tiny: under `quantize.SMALL_LAYER` int8-weight and w8a8 would keep
    every layer float32 and test no quantized kernel (session-wide, so that module fixtures see it
    too). The tests of that bound set it back."""
    from autotune.passes import quantize

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "SMALL_LAYER", None)
        yield


def run_fresh(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (nothing shared with the test process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def run_cli(*args: str, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def im2col_rows(x: np.ndarray, kernel, strides, pad_before, dilation, out_spatial) -> np.ndarray:
    """numpy im2col of channels-last x (N, *spatial, C): (N, *out_spatial, *kernel, C), zero padding."""
    pad = [(p, t * d) for p, t, d in zip(pad_before, kernel, dilation)]  # (enough after: unused rows are cut)
    xp = np.pad(x, [(0, 0), *pad, (0, 0)])
    rows = np.zeros((x.shape[0], *out_spatial, *kernel, x.shape[-1]), x.dtype)
    for taps in np.ndindex(*kernel):
        window = tuple(slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(taps, dilation, strides, out_spatial))
        rows[(slice(None), *[slice(None)] * len(kernel), *taps)] = xp[(slice(None), *window)]
    return rows


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.fixture(scope="session")
def tuned_mlp(tmp_path_factory, mlp_block):
    """The MLP block tuned for a few trials: (imported, log, report). The log is read-only for the tests."""
    from autotune.frontend.importer import from_torch
    from autotune.support.settings import TuneSettings
    from autotune.tuning.tune import tune

    module, inputs, _ = mlp_block
    imported = from_torch(module, inputs)
    log = tmp_path_factory.mktemp("tuned_mlp_log")
    report = tune(imported, "x86", log, TuneSettings(trials=48, trials_per_iter=16), progress=False)
    return imported, log, report


# The i2v pipeline's tiny artifacts: 64x64, 9 frames (3 latent frames: the VAE's causal-conv cache
# path from the 3rd latent frame on).
TINY_PIPELINE = {"model": "wan-i2v-tiny", "height": 64, "width": 64, "frames": 9}


@pytest.fixture(scope="session")
def tiny_pipeline_artifacts(tmp_path_factory):
    """The four wan-i2v-tiny artifacts (TINY_PIPELINE), built once, untuned, for x86 (~1 min on a
    loaded 2-core machine): the pipeline tests run them, the component tests check each encoder
    and the decoder against torch."""
    from autotune.i2v.pipeline import build_pipeline_artifacts

    p = TINY_PIPELINE
    out = tmp_path_factory.mktemp("pipeline") / f"{p['model']}-x86"
    build_pipeline_artifacts(p["model"], "x86", out, height=p["height"], width=p["width"], frames=p["frames"], quiet=True)
    return out


@pytest.fixture(scope="session")
def real_log(tuned_mlp):
    """A real tuning log: the tuned MLP block's."""
    return tuned_mlp[1]


# vdpbf16ps's arithmetic in FMAs (bf16 pairs widened by a shift), under the same name and
# signature as kernels/gemm_cpu.py's import: a kernel scheduled with it runs on any x86-64 CPU.
# It checks the kernels' packing, tiling and tensorization where the CPU lacks AVX512-BF16; the
# instruction itself is checked only where the CPU has it.
DPBF16_EMULATION_LLVM = """
define <16 x float> @autotune_dpbf16ps(<16 x float> %c, i32 %a, <16 x i32> %b) {
  %alo = shl i32 %a, 16
  %ahi = and i32 %a, -65536
  %alo_f = bitcast i32 %alo to float
  %ahi_f = bitcast i32 %ahi to float
  %alo1 = insertelement <16 x float> poison, float %alo_f, i64 0
  %alo16 = shufflevector <16 x float> %alo1, <16 x float> poison, <16 x i32> zeroinitializer
  %ahi1 = insertelement <16 x float> poison, float %ahi_f, i64 0
  %ahi16 = shufflevector <16 x float> %ahi1, <16 x float> poison, <16 x i32> zeroinitializer
  %blo = shl <16 x i32> %b, splat (i32 16)
  %bhi = and <16 x i32> %b, splat (i32 -65536)
  %blo_f = bitcast <16 x i32> %blo to <16 x float>
  %bhi_f = bitcast <16 x i32> %bhi to <16 x float>
  %s = call <16 x float> @llvm.fma.v16f32(<16 x float> %alo16, <16 x float> %blo_f, <16 x float> %c)
  %r = call <16 x float> @llvm.fma.v16f32(<16 x float> %ahi16, <16 x float> %bhi_f, <16 x float> %s)
  ret <16 x float> %r
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
"""


def _host_target():
    """This CPU as an LLVM target, 2 cores: where the emulated instructions run."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


def _emulated_amx_instruction(name: str, *operands):
    from tvm.script import tirx as T

    return T.call_extern("void", f"autotune_amx_{name}", *operands)


@pytest.fixture(scope="session")
def amx_emulation_library(tmp_path_factory):
    """tests/kernels/amx_emulation.c compiled and loaded into this process (RTLD_GLOBAL, so that
    kernels calling its functions resolve them): the path, or a skip without a C compiler."""
    import ctypes
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc/gcc) to build the AMX emulation with")
    source = Path(__file__).parent / "kernels" / "amx_emulation.c"
    library = tmp_path_factory.mktemp("amx_emulation") / "libamx_emulation.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    return library


@pytest.fixture
def amx_target(request):
    """(target, emulated): a target on which AMX kernels run here: `x86-amx` where the CPU has
    AMX-BF16 and AMX-INT8 (tile permission requested), else the host with gemm_cpu's tile
    intrinsics re-registered to call the C emulation (tests/kernels/amx_emulation.c)."""
    from autotune.kernels import gemm_cpu
    from autotune.support import hardware
    from autotune.support.targets import resolve_target

    if not hardware.missing_cpu_flags(["amx_tile", "amx_bf16", "amx_int8"]):
        hardware.request_amx_permission()
        yield resolve_target("x86-amx").tvm_target(), False
        return
    request.getfixturevalue("amx_emulation_library")
    gemm_cpu.AMX_INSTRUCTION = _emulated_amx_instruction
    gemm_cpu.register_intrinsics()
    try:
        yield _host_target(), True
    finally:
        gemm_cpu.AMX_INSTRUCTION = gemm_cpu.amx_instruction
        gemm_cpu.register_intrinsics()


@pytest.fixture
def vnni_target():
    """(target, emulated): a target on which VNNI kernels run here: AVX512-VNNI (Cascade Lake) where
    the CPU has it, else the host with gemm_cpu's vpdpbusd intrinsic implemented by its own
    description (four u8 x s8 products into each int32 lane, in plain TIR): only the instruction's
    operand encoding goes unchecked off VNNI CPUs."""
    import tvm
    from tvm.s_tir import TensorIntrin

    from autotune.kernels import gemm_cpu
    from autotune.support import hardware

    if "avx512_vnni" in hardware.cpu_flags():
        yield tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}), False
        return
    desc = gemm_cpu._dot_desc(*gemm_cpu.DTYPES[gemm_cpu.INT8], 4)
    TensorIntrin.register(gemm_cpu.VNNI_INTRIN, desc, desc, override=True)
    try:
        yield _host_target(), True
    finally:
        gemm_cpu.register_intrinsics()


@pytest.fixture
def dpbf16_target(monkeypatch):
    """(target, emulated): a target on which kernels using vdpbf16ps run here: AVX512-BF16 where
    the CPU has it, else the host with the instruction emulated."""
    import tvm

    from autotune.kernels import gemm_cpu
    from autotune.support import hardware

    if "avx512_bf16" in hardware.cpu_flags():
        return tvm.target.Target({"kind": "llvm", "mcpu": "cooperlake", "num-cores": 2}), False
    monkeypatch.setattr(gemm_cpu, "DPBF16_LLVM", DPBF16_EMULATION_LLVM)
    return _host_target(), True
