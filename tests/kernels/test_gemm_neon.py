"""ARM's matrix engines: int8 on SDOT (ARMv8.2 +dotprod), bf16 and int8 weights on BFDOT (ARMv8.6
+bf16), float32 on NEON FMA (every aarch64 CPU): the GEMM kernels alone and builds, cross-compiled here and run under
qemu-aarch64 (skipped, with the reason, where the cross compiler or the qemu env is missing:
`python tools/run_on_qemu_aarch64.py setup`).

References: numpy. SDOT: the int32 product, exact. BFDOT and FMA: the float64 product of the same
bf16 (or int8, or float32) values, within 1e-5 of the largest output (float32 accumulation;
measured 1e-6 at k = 5120). Builds of a convolution and a linear against float32 torch: cosine >= 0.999 at w8a8,
>= 0.9995 at int8-weight (x86's bounds for the tiny transformer, tests/passes/test_quantize.py).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
from conftest import ConvAndLinear

from autotune.build.compile import build
from autotune.build.cross import cross_compiler
from autotune.kernels import gemm_cpu
from autotune.passes.quantize import quantize
from autotune.support.errors import InputError
from autotune.support.fidelity import compare, format_fidelity
from autotune.support.settings import BuildSettings
from autotune.support.targets import resolve_target

REPO = Path(__file__).resolve().parents[2]
DOTPROD, SVE = "aarch64-dotprod", "aarch64-sve"  # (SVE's preset, a Neoverse V1, also has +bf16)


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


def _count(library: Path, instruction: str) -> int:
    """How many `instruction`s the aarch64 library's code holds (the cross toolchain's objdump)."""
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True, check=True)
    return sum(1 for line in disassembly.stdout.splitlines() if f"\t{instruction}\t" in line)


def test_the_arm_engines_are_the_ones_the_target_has():
    """SDOT where the target has +dotprod (Neoverse N1 on), BFDOT where it has +bf16 (Neoverse V1);
    neither on a Cortex-A72 (`arm`); NEON FMA for float32 on every one, and for bf16 (widened) without +bf16."""
    isa = {preset: {precision: gemm_cpu.target_isa(resolve_target(preset).tvm_target(), precision)
                    for precision in (gemm_cpu.INT8, gemm_cpu.BF16, gemm_cpu.F32)} for preset in ("arm", DOTPROD, SVE)}
    f32 = gemm_cpu.NEON_F32
    assert isa["arm"] == {gemm_cpu.INT8: None, gemm_cpu.BF16: gemm_cpu.NEON_FMA_BF16, gemm_cpu.F32: f32}
    assert isa[DOTPROD] == {gemm_cpu.INT8: gemm_cpu.NEON_SDOT, gemm_cpu.BF16: gemm_cpu.NEON_FMA_BF16, gemm_cpu.F32: f32}
    assert isa[SVE] == {gemm_cpu.INT8: gemm_cpu.NEON_SDOT, gemm_cpu.BF16: gemm_cpu.NEON_BFDOT, gemm_cpu.F32: f32}
    assert gemm_cpu.target_isa(resolve_target("x86-avx512-vnni").tvm_target(), gemm_cpu.INT8) == gemm_cpu.VNNI
    assert gemm_cpu.activation_dtype(gemm_cpu.NEON_SDOT) == "int8"  # signed x signed: no +128 shift
    assert gemm_cpu.INT8_WEIGHTS[gemm_cpu.NEON_BFDOT] == gemm_cpu.NEON_BFDOT_W8
    assert gemm_cpu.INT8_WEIGHTS[gemm_cpu.NEON_FMA_BF16] == gemm_cpu.NEON_FMA_W8


_GUEST = r"""
import sys
import ml_dtypes
import numpy as np
import tvm

root = sys.argv[1]
for i in range(int(sys.argv[2])):
    lib = tvm.runtime.load_module(f"{root}/k{i}.so")
    a, bp = (np.load(f"{root}/{name}{i}.npy") for name in ("a", "bp"))
    a, bp = (x.view(ml_dtypes.bfloat16) if x.dtype == np.uint16 else x for x in (a, bp))  # (npy has no bf16)
    c = tvm.runtime.tensor(np.zeros((a.shape[0], bp.shape[1]), np.int32 if a.dtype == np.int8 else np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(bp), c)
    np.save(f"{root}/c{i}.npy", c.numpy())
"""

# (engine, instruction) x shapes: aligned; ragged (10 rows: a register tile of 5; 12 columns: 3
# vectors; k 40); a reduction split in two partial products (k 5120).
SHAPES = [(24, 32, 64), (10, 12, 40), (96, 64, 5120)]
ENGINES = [(gemm_cpu.NEON_SDOT, "sdot"), (gemm_cpu.NEON_BFDOT, "bfdot"), (gemm_cpu.NEON_BFDOT_W8, "bfdot"),
           (gemm_cpu.NEON_F32, "fmla"), (gemm_cpu.NEON_FMA_BF16, "fmla"), (gemm_cpu.NEON_FMA_W8, "fmla")]


def _operands(isa: str, m: int, n: int, k: int, rng):
    """(A, B) as the engine takes them: int8 x int8 over the full range (SDOT), bf16 x bf16 or bf16 x
    int8 (BFDOT; FMA: the bf16 values of A as float32), float32 x float32 (FMA)."""
    if isa == gemm_cpu.NEON_SDOT:
        return rng.integers(-128, 128, (m, k)).astype(np.int8), rng.integers(-128, 128, (k, n)).astype(np.int8)
    if isa == gemm_cpu.NEON_F32:
        return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    if isa in gemm_cpu.FMA:
        a = a.astype(np.float32)
    if isa in (gemm_cpu.NEON_BFDOT_W8, gemm_cpu.NEON_FMA_W8):
        return a, rng.integers(-127, 128, (k, n)).astype(np.int8)
    return a, rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)


def _sampled_kernel(isa: str, m: int, n: int, k: int, pick: int, target):
    """The kernel scheduled by MetaSchedule's rule with every sampled decision (register-tile rows
    and vectors, rows per block) at its `pick`-th candidate (0: smallest, -1: largest), replayed as
    tuning replays a trace with other decisions."""
    from tvm import s_tir

    func = gemm_cpu.make_primfunc(m, n, k, isa).with_attr("global_symbol", "main")
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm_cpu.apply_schedule(sampled, sample=True)
    trace = sampled.trace
    for inst in [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]:
        trace = trace.with_decision(inst, pick % len(inst.attrs[0]), remove_postproc=True)
    replayed = s_tir.Schedule(tvm.IRModule({"main": func}))
    trace.apply_to_schedule(replayed, remove_postproc=True)
    return tvm.compile(replayed.mod, target=target)


def test_arm_dot_product_gemms_equal_numpy_under_qemu(tmp_path):
    """Each engine's kernel on each shape (default schedule) and with the rule's smallest and
    largest sampled tiles (48 x 32 x 64), its instruction in the library; one qemu run for all."""
    tool = _qemu()
    preset = resolve_target(SVE)
    rng = np.random.default_rng(0)
    assert gemm_cpu.k_split(5120, gemm_cpu.NEON_SDOT) == gemm_cpu.k_split(5120, gemm_cpu.NEON_F32) == 2
    cases = [(isa, instruction, shape, None) for isa, instruction in ENGINES for shape in SHAPES]
    cases += [(isa, instruction, (48, 32, 64), pick) for isa, instruction in ENGINES for pick in (0, -1)]
    expected = []
    for i, (isa, instruction, (m, n, k), pick) in enumerate(cases):
        if pick is None:
            lib = gemm_cpu.compile_standalone(m, n, k, isa, preset.tvm_target())
        else:
            lib = _sampled_kernel(isa, m, n, k, pick, preset.tvm_target())
        lib.export_library(str(tmp_path / f"k{i}.so"), fcompile=cross_compiler(preset))
        assert _count(tmp_path / f"k{i}.so", instruction) > 0, cases[i]
        a, b = _operands(isa, m, n, k, rng)
        bp = gemm_cpu.pack_weight(b, gemm_cpu.group(isa))
        np.save(tmp_path / f"a{i}.npy", a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a)
        np.save(tmp_path / f"bp{i}.npy", bp.view(np.uint16) if bp.dtype == ml_dtypes.bfloat16 else bp)
        if isa == gemm_cpu.NEON_SDOT:
            expected.append(a.astype(np.int32) @ b.astype(np.int32))
        else:
            expected.append(a.astype(np.float64) @ b.astype(np.float64))
    tool.run_python(_GUEST, str(tmp_path), str(len(cases)), timeout=600)
    for i, want in enumerate(expected):
        got = np.load(tmp_path / f"c{i}.npy")
        if cases[i][0] == gemm_cpu.NEON_SDOT:
            np.testing.assert_array_equal(got, want, err_msg=str(cases[i]))
        else:
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), cases[i]


def test_bf16_and_int8_weight_matmuls_go_onto_bfdot_where_the_target_has_bf16_else_onto_fma():
    """prepare_model only (no build): a convolution (as an im2col GEMM) and a linear on BFDOT at bf16
    and int8-weight on aarch64-sve; without +bf16 (aarch64-dotprod) on NEON FMA, widened."""
    from autotune.frontend.importer import from_torch
    from autotune.passes.pipeline import prepare_model

    torch.manual_seed(0)
    imported = from_torch(ConvAndLinear().eval(), {"x": torch.randn(1, 16, 8, 8), "tokens": torch.randn(1, 64, 32)})
    for mode, engine, fma in (("bf16", "NEON bf16 dot product (BFDOT)", "NEON FMA (bf16 widened to float32)"),
                              ("int8-weight", "NEON bf16 dot product (BFDOT, int8 weights)", "NEON FMA (int8 weights widened to float32)")):
        for preset, want in ((SVE, engine), (DOTPROD, fma)):
            prepared, info = prepare_model(imported, resolve_target(preset), mode)
            assert info["matrix_engine"] == {want: 2} and info["convolutions_as_gemm"] == 1, (mode, preset, info)


_RUN_ARTIFACTS = r"""
import sys
import numpy as np
import autotune

inputs = dict(np.load(sys.argv[1]))
for library in sys.argv[2:]:
    outputs = autotune.load(library)(**inputs)
    np.savez(library + ".out.npz", *outputs)
"""

# mode (None: float32), preset, the engine the build's report names and how many matmuls it takes,
# its instruction, the cosine bound against torch (x86's bounds for the tiny transformer at these
# modes, tests/passes/test_quantize.py; float32: the same arithmetic, summed in another order)
ENGINE_BUILDS = [("w8a8", DOTPROD, "NEON dot product (SDOT)", 2, "sdot", 0.999),
                 ("int8-weight", SVE, "NEON bf16 dot product (BFDOT, int8 weights)", 2, "bfdot", 0.9995),
                 (None, "arm", "NEON FMA (float32)", 1, "fmla", 0.999999),
                 ("bf16", "arm", "NEON FMA (bf16 widened to float32)", 2, "fmla", 0.9999)]


def test_arm_builds_run_on_their_engines_and_match_torch(tmp_path):
    """A convolution (an im2col GEMM; w8a8: on int8 rows) and a linear, on the engine (the build's
    notes count them: float32 takes the convolution, its linear is under MIN_F32_FLOPS), the
    instruction in the library, both outputs within the bound of float32 torch under qemu (one
    guest run for every build). Without dot products (the `arm` preset) w8a8 is refused, saying
    what it needs."""
    from autotune.frontend.importer import from_torch

    tool = _qemu()
    torch.manual_seed(0)
    module = ConvAndLinear().eval()
    inputs = {"x": torch.randn(1, 16, 16, 16), "tokens": torch.randn(1, 64, 32)}
    imported = from_torch(module, inputs)
    with pytest.raises(InputError, match=r"\+dotprod.*use int8-weight"):
        quantize(imported, "w8a8", "arm")
    libraries = []
    for mode, preset, engine, matmuls, instruction, _ in ENGINE_BUILDS:
        report = build(imported, preset, tmp_path / str(mode) / "m.so", settings=BuildSettings(quantize=mode))
        assert any(n.startswith(f"matrix engine: {matmuls} matmuls on {engine},") for n in report.notes), (mode, report.notes)
        assert mode != "w8a8" or any("1 of them on int8 rows" in n for n in report.notes), report.notes
        assert _count(report.paths.library, instruction) > 0, mode
        libraries.append(str(report.paths.library))
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    tool.run_python(_RUN_ARTIFACTS, str(tmp_path / "inputs.npz"), *libraries, timeout=600)
    with torch.no_grad():
        expected = [t.numpy() for t in module(**inputs)]
    for (mode, *_, cosine), library in zip(ENGINE_BUILDS, libraries):
        with np.load(library + ".out.npz") as outputs:
            for i, want in enumerate(expected):
                fidelity = compare(outputs[f"arr_{i}"], want)
                assert fidelity["cosine"] >= cosine, (mode, i, format_fidelity(fidelity))
