"""ARM's int8 dot-product engine (SDOT, ARMv8.2 +dotprod): the GEMM kernel alone and a w8a8 build,
cross-compiled here and run under qemu-aarch64 (skipped, with the reason, where the cross compiler
or the qemu env is missing: `python tools/run_on_qemu_aarch64.py setup`).

References: numpy's int32 product, exact; the w8a8 VAE decoder's frames against float32 torch,
PSNR >= 40 dB (its x86 bound, tests/passes/test_quantize.py; measured here 42 dB on the tiny
decoder at 32x32, 5 frames).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from autotune.build.compile import build
from autotune.build.cross import cross_compiler
from autotune.frontend.sources import load_source
from autotune.kernels import gemm_cpu
from autotune.passes.quantize import quantize
from autotune.support.errors import InputError
from autotune.support.fidelity import compare, format_fidelity
from autotune.support.settings import BuildSettings
from autotune.support.targets import resolve_target

REPO = Path(__file__).resolve().parents[2]
DOTPROD = "aarch64-dotprod"


def _qemu():
    """The qemu tool (tools/run_on_qemu_aarch64.py), or a skip saying what is missing."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64 cross compiler missing: apt-get install -y g++-aarch64-linux-gnu")
    spec = importlib.util.spec_from_file_location("run_on_qemu_aarch64", REPO / "tools" / "run_on_qemu_aarch64.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        tool.check()
    except tool.QemuEnvMissing as exc:
        pytest.skip(f"no qemu aarch64 env: {exc}")
    return tool


def _sdot_count(library: Path) -> int:
    """SDOT instructions in the aarch64 library's code (the cross toolchain's objdump)."""
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True, check=True)
    return sum(1 for line in disassembly.stdout.splitlines() if "\tsdot\t" in line)


def test_the_int8_engine_is_sdot_where_the_arm_target_has_dot_products():
    assert gemm_cpu.target_isa(resolve_target(DOTPROD).tvm_target(), gemm_cpu.INT8) == gemm_cpu.NEON_SDOT
    assert gemm_cpu.target_isa(resolve_target("aarch64-sve").tvm_target(), gemm_cpu.INT8) == gemm_cpu.NEON_SDOT
    assert gemm_cpu.target_isa(resolve_target("arm").tvm_target(), gemm_cpu.INT8) is None  # Cortex-A72: no SDOT
    for preset in (DOTPROD, "arm"):
        for precision in (gemm_cpu.BF16, gemm_cpu.F32):
            assert gemm_cpu.target_isa(resolve_target(preset).tvm_target(), precision) is None, (preset, precision)
    assert gemm_cpu.target_isa(resolve_target("x86-avx512-vnni").tvm_target(), gemm_cpu.INT8) == gemm_cpu.VNNI
    assert gemm_cpu.activation_dtype(gemm_cpu.NEON_SDOT) == "int8"  # signed x signed: no +128 shift


_GUEST = r"""
import sys
import numpy as np
import tvm

root = sys.argv[1]
for i in range(int(sys.argv[2])):
    lib = tvm.runtime.load_module(f"{root}/k{i}.so")
    a, bp = np.load(f"{root}/a{i}.npy"), np.load(f"{root}/bp{i}.npy")
    c = tvm.runtime.tensor(np.zeros((a.shape[0], bp.shape[1]), np.int32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(bp), c)
    np.save(f"{root}/c{i}.npy", c.numpy())
"""


def test_sdot_gemm_equals_numpy_exactly_under_qemu(tmp_path):
    """Aligned, ragged (10 rows: a register tile of 5; 12 columns: 3 vectors; k 40) and split
    (k 5120: two partial products) shapes, the full int8 range of both operands."""
    tool = _qemu()
    preset = resolve_target(DOTPROD)
    rng = np.random.default_rng(0)
    shapes = [(24, 32, 64), (10, 12, 40), (96, 64, 5120)]
    assert gemm_cpu.k_split(5120, gemm_cpu.NEON_SDOT) == 2
    expected = []
    for i, (m, n, k) in enumerate(shapes):
        lib = gemm_cpu.compile_standalone(m, n, k, gemm_cpu.NEON_SDOT, preset.tvm_target())
        lib.export_library(str(tmp_path / f"k{i}.so"), fcompile=cross_compiler(preset))
        assert _sdot_count(tmp_path / f"k{i}.so") > 0, shapes[i]
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        b = rng.integers(-128, 128, (k, n)).astype(np.int8)
        np.save(tmp_path / f"a{i}.npy", a)
        np.save(tmp_path / f"bp{i}.npy", gemm_cpu.pack_weight(b, gemm_cpu.group(gemm_cpu.NEON_SDOT)))
        expected.append(a.astype(np.int32) @ b.astype(np.int32))
    tool.run_python(_GUEST, str(tmp_path), str(len(shapes)), timeout=600)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(np.load(tmp_path / f"c{i}.npy"), want, err_msg=str(shapes[i]))


def test_w8a8_on_arm_runs_its_gemms_on_sdot_and_keeps_the_picture(tmp_path):
    """The tiny VAE decoder (one latent frame, 16x16): every quantized convolution an int8 GEMM on
    SDOT (the build's note counts them), SDOT in the library, frames within PSNR 40 dB of float32
    torch under qemu. Without dot products (the `arm` preset) w8a8 is refused, saying what it needs."""
    tool = _qemu()
    source = load_source("wan-i2v-tiny", "vae_decoder", height=16, width=16, frames=1)
    with pytest.raises(InputError, match=r"\+dotprod.*use int8-weight"):
        quantize(source.imported, "w8a8", "arm")
    report = build(source.imported, DOTPROD, tmp_path / "vae.so", settings=BuildSettings(quantize="w8a8"))
    engine = [n for n in report.notes if n.startswith("matrix engine:")]
    quantized = [n for n in report.notes if "convolutions computed as GEMMs" in n]
    assert len(engine) == 1 and "on NEON dot product (SDOT)" in engine[0], report.notes
    gemms = int(engine[0].split("matrix engine: ")[1].split()[0])
    assert quantized and f"{gemms} of them on int8 rows" in quantized[0], report.notes
    assert _sdot_count(report.paths.library) > 0
    (frames,) = tool.run_artifact(report.paths.library, {k: np.asarray(v) for k, v in source.example_inputs.items()})
    fidelity = compare(frames, source.reference_outputs()[0], peak=2.0)
    assert fidelity["psnr_db"] >= 40.0, format_fidelity(fidelity)
