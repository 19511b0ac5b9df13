"""Target presets, cross-compiled aarch64 artifacts (run under qemu when available), CUDA artifacts
built without a GPU (fatbin inside, checked by parsing and with cuobjdump / TVM's real CUDA loader
when available), and the refusal to tune a device this machine cannot measure on."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from conftest import run_fresh

from autotune.build import cross
from autotune.build.compile import build, compile_module
from autotune.build.sass import (
    INSTALL_HINT,
    check_tensor_cores,
    find_cuda_tool,
    per_prim_func,
    sass_of,
    tensor_core_counts,
)
from autotune.frontend.importer import from_torch
from autotune.support import cuda_library as cuda
from autotune.support.errors import BuildFailed, TargetError, TuningFailed
from autotune.support.package_data import targets_dir
from autotune.support.settings import BuildSettings, TuneSettings
from autotune.support.targets import list_presets, resolve_target

REPO = Path(__file__).resolve().parents[2]
EM_X86_64, EM_AARCH64 = 62, 183
PRESETS = sorted(p.stem for p in targets_dir().glob("*.json"))
CUDA_PRESETS = ["cuda-sm80", "cuda-sm89", "cuda-sm90"]


def elf_machine(path: Path) -> int:
    head = Path(path).read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert head[5] == 1, "expected little-endian"
    return struct.unpack_from("<H", head, 18)[0]


@pytest.fixture(scope="module")
def tiny_mlp():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = module(x).numpy()
    return from_torch(module, {"x": x}), {"x": x.numpy()}, ref


# -- presets ----------------------------------------------------------------------------------------
def test_every_preset_resolves_to_a_tvm_target():
    assert sorted(p.name for p in list_presets()) == PRESETS
    assert {"x86", "x86-avx2", "x86-avx512", "x86-avx512-vnni", "arm", "aarch64-neon", "aarch64-dotprod",
            "aarch64-sve", "cuda", "cuda-sm80", "cuda-sm89", "cuda-sm90"} <= set(PRESETS)
    for name in PRESETS:
        preset = resolve_target(name)
        assert preset.name == name
        target = preset.tvm_target()
        kind = {"x86": "llvm", "arm": "llvm", "cuda": "cuda"}[preset.family]
        assert target.kind.name == kind, name
        if preset.family == "cuda":
            assert preset.device == "cuda" and target.host is not None and target.host.kind.name == "llvm"
            assert str(target.attrs["arch"]).startswith("sm_")
        else:
            assert preset.device == "cpu"
            assert int(target.attrs["num-cores"]) >= 1, f"{name}: MetaSchedule needs num-cores"
        if preset.family == "arm":
            assert "aarch64" in str(target.attrs["mtriple"]) and preset.cross_compiler == "aarch64-linux-gnu-g++"
    assert str(resolve_target("cuda-sm80").tvm_target().attrs["arch"]) == "sm_80"
    assert resolve_target("cuda").resolved_target_dict()["arch"] == "sm_90"  # no GPU here: the default


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as err:
        resolve_target("riscv")
    message = str(err.value)
    assert "unknown target 'riscv'" in message
    for name in PRESETS:
        assert name in message
    with pytest.raises(TargetError, match="does not parse"):
        resolve_target('{"kind": "llvm",')
    with pytest.raises(TargetError, match="TVM rejects"):
        resolve_target('{"kind": "no-such-kind"}')


def test_raw_json_targets():
    x86 = resolve_target('{"kind": "llvm", "mcpu": "skylake-avx512"}')
    assert (x86.family, x86.device, x86.cross_compiler) == ("x86", "cpu", None)
    assert str(x86.tvm_target().attrs["mcpu"]) == "skylake-avx512"
    assert int(x86.tvm_target().attrs["num-cores"]) >= 1  # filled in: MetaSchedule requires it
    arm = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert (arm.family, arm.cross_compiler) == ("arm", "aarch64-linux-gnu-g++")
    gpu = resolve_target('{"kind": "cuda", "arch": "sm_89"}')
    assert (gpu.family, gpu.device) == ("cuda", "cuda")
    assert str(gpu.tvm_target().attrs["arch"]) == "sm_89"


@pytest.mark.parametrize("name", [p for p in PRESETS if not p.startswith("cuda")])
def test_every_cpu_preset_compiles(name, tiny_mlp):
    imported, _, _ = tiny_mlp
    executable, (kernels, tuned, fallback, _), _, _ = compile_module(imported, resolve_target(name))
    assert kernels >= 3 and tuned == 0 and fallback == kernels
    assert executable.mod.kind == "relax.VMExecutable"


# -- aarch64 -------------------------------------------------------------------------------------------
needs_cross = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="aarch64 cross compiler missing: apt-get install -y g++-aarch64-linux-gnu",
)


def test_missing_cross_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TargetError, match=r"apt-get install -y g\+\+-aarch64-linux-gnu"):
        cross.cross_compiler(resolve_target("aarch64-neon"))
    with pytest.raises(TargetError, match="apt-get install -y g\\+\\+-aarch64-linux-gnu"):
        cross.ensure_cross_toolchain()


@needs_cross
def test_ensure_cross_toolchain():
    path = cross.ensure_cross_toolchain()
    assert Path(path).name == "aarch64-linux-gnu-g++"


@pytest.fixture(scope="module")
def arm_artifact(tmp_path_factory, tiny_mlp):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64 cross compiler missing: apt-get install -y g++-aarch64-linux-gnu")
    imported, _, _ = tiny_mlp
    out = tmp_path_factory.mktemp("arm") / "mlp.so"
    report = build(imported, "aarch64-neon", out)
    return report


@needs_cross
def test_aarch64_build_is_an_aarch64_elf(arm_artifact):
    library = arm_artifact.paths.library
    assert elf_machine(library) == EM_AARCH64
    meta = json.loads(arm_artifact.paths.metadata.read_text())
    assert meta["target"]["family"] == "arm" and "aarch64" in meta["target"]["tvm"]


def _qemu_tool():
    spec = importlib.util.spec_from_file_location("run_on_qemu_aarch64", REPO / "tools" / "run_on_qemu_aarch64.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cross
def test_aarch64_build_runs_under_qemu_like_x86(tmp_path, arm_artifact, tiny_mlp):
    tool = _qemu_tool()
    try:
        tool.check()
    except tool.QemuEnvMissing as exc:
        pytest.skip(f"no qemu aarch64 env: {exc}")
    imported, inputs, ref = tiny_mlp
    x86 = build(imported, "x86", tmp_path / "x86" / "mlp.so")
    assert elf_machine(x86.paths.library) == EM_X86_64
    np.save(tmp_path / "x.npy", inputs["x"])
    x86_run = run_fresh(
        f"""
        import numpy as np, autotune
        m = autotune.load({str(x86.paths.library)!r})
        np.save({str(tmp_path / 'x86.npy')!r}, m(x=np.load({str(tmp_path / 'x.npy')!r})))
        """
    )
    assert x86_run.returncode == 0, x86_run.stderr[-3000:]
    x86_y = np.load(tmp_path / "x86.npy")
    (arm_y,) = tool.run_artifact(arm_artifact.paths.library, inputs, timeout=600)
    np.testing.assert_allclose(x86_y, ref, atol=1e-4)
    np.testing.assert_allclose(arm_y, x86_y, atol=1e-4)


# -- CUDA ---------------------------------------------------------------------------------------------
def _has_nvcc() -> bool:
    try:
        cuda.find_nvcc()
        return True
    except BuildFailed:
        return False


needs_nvcc = pytest.mark.skipif(not _has_nvcc(), reason="nvcc (CUDA toolkit) not installed")


def _cuobjdump() -> str | None:
    return find_cuda_tool("cuobjdump") if find_cuda_tool("nvdisasm") else None


needs_sass = pytest.mark.skipif(_cuobjdump() is None, reason=f"no cuobjdump/nvdisasm to read SASS: {INSTALL_HINT}")


@needs_nvcc
@pytest.mark.parametrize("name", CUDA_PRESETS)
def test_cuda_build_embeds_a_fatbin_for_the_arch(name, tmp_path, tiny_mlp):
    imported, _, _ = tiny_mlp
    report = build(imported, name, tmp_path / "mlp.so")
    arch = resolve_target(name).resolved_target_dict()["arch"]
    library = report.paths.library
    assert elf_machine(library) == EM_X86_64  # host code
    fatbins = cuda.embedded_fatbins(library)
    assert len(fatbins) == 1
    assert cuda.fatbin_archs(fatbins[0]) == {"sass": [arch], "ptx": [arch.replace("sm_", "compute_")]}
    assert b"__global__" not in library.read_bytes()  # the CUDA source is not what ships
    tool = _cuobjdump()
    if tool:
        image = tmp_path / "kernels.fatbin"
        image.write_bytes(fatbins[0])
        listed = subprocess.run([tool, "--list-elf", str(image)], capture_output=True, text=True, check=True).stdout
        assert f".{arch}.cubin" in listed, listed


@needs_nvcc
@needs_sass
@pytest.mark.parametrize("name,precision", [("cuda-sm90", "bf16"), ("cuda-sm80", "fp16")])
def test_half_precision_cuda_build_puts_every_gemm_on_tensor_cores(name, precision, tmp_path, attention_block):
    """LayerNorm, Linear, GELU, SDPA in bf16/fp16: every GEMM kernel's SASS and the fused attention's
    hold HMMA (counted per kernel from the embedded fatbin, in the report and the metadata)."""
    module, inputs, _ = attention_block
    report = build(from_torch(module, inputs), name, tmp_path / "block.so", settings=BuildSettings(quantize=precision))
    assert report.kernels >= 8 and report.fallback_kernels == report.kernels - 1  # attention comes scheduled
    tc = report.tensor_cores
    assert len(tc.gemm) >= 4, tc.lines()  # q, k, v, out projections and the MLP
    assert all(n > 0 for n in tc.gemm.values()), tc.lines()
    (fatbin,) = cuda.embedded_fatbins(report.paths.library)
    sass = sass_of(fatbin)
    assert sass.count("HMMA") == sum(tc.gemm.values()) + sum(tc.attention.values()) + sum(tc.other_with_tensor_cores.values())
    meta = json.loads(report.paths.metadata.read_text())
    assert meta["kernels"]["tensor_core_instructions"]["gemm"] == tc.gemm
    assert len(tc.attention) == 1 and all(n > 0 for n in tc.attention.values()), tc.lines()  # flash attention on wmma
    arch = resolve_target(name).resolved_target_dict()["arch"]
    assert meta["target"]["device"] == "cuda" and arch in meta["target"]["tvm"]


@needs_nvcc
@needs_sass
def test_cuda_gemms_left_on_cuda_cores_fail_a_half_precision_build(tmp_path, attention_block):
    """The check can fail: a float32 build's GEMMs have no HMMA; held to bf16's rule they are named."""
    module, inputs, _ = attention_block
    details: dict = {}
    report = build(from_torch(module, inputs), "cuda-sm90", tmp_path / "block.so", details=details)
    assert details["gemm_kernels"] and set(details["gemm_kernels"].values()) == {"float32"}
    assert all(n == 0 for n in report.tensor_cores.gemm.values())
    assert any("compute in float32 on CUDA cores (fp32 build); --precision bf16" in n for n in report.notes)
    assert any("attention runs on CUDA cores" in n for n in report.notes)  # float32: TVM's CUDA-core kernel
    with pytest.raises(BuildFailed, match="no tensor-core instruction in their SASS") as failed:
        check_tensor_cores(report.paths.library, details["gemm_kernels"], details["attention_kernels"], "bf16")
    assert all(name in str(failed.value) for name in details["gemm_kernels"])


def test_tensor_core_counts_read_per_kernel_from_sass():
    sass = """
        Function : fused_matmul_add_kernel
        /*0010*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/ HMMA.16816.F32.BF16 R6, R8, R14, R6 ;
        Function : fused_matmul_add_kernel_1
        /*0010*/ HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        Function : fused_matmul1_kernel
        /*0010*/ FFMA R1, R2, R3, R4 ;
    """
    counts = tensor_core_counts(sass)
    assert counts == {"fused_matmul_add_kernel": 2, "fused_matmul_add_kernel_1": 1, "fused_matmul1_kernel": 0}
    assert per_prim_func(counts, ["fused_matmul_add", "fused_matmul1"]) == {"fused_matmul_add": 3, "fused_matmul1": 0}


@needs_nvcc
def test_cuda_build_captures_kernel_launches_in_a_cuda_graph(tiny_mlp):
    """RewriteCUDAGraph is on in the CUDA pipeline: the VM program captures/replays its launches."""
    imported, _, _ = tiny_mlp
    preset = resolve_target("cuda-sm90")
    executable, _, _, _ = compile_module(imported, preset)
    text = executable.as_text()
    assert "vm.builtin.cuda_graph.run_or_capture" in text, text[-3000:]


def _driver_stub(tmp_path: Path) -> Path | None:
    """A libcuda.so.1 exporting the driver symbols TVM's CUDA runtime links, each failing with
    CUDA_ERROR_NO_DEVICE: enough to load `tvm/lib/libtvm_runtime_cuda.so` on a GPU-less machine."""
    import tvm

    runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    gcc = shutil.which("gcc")
    if not runtime.exists() or gcc is None or shutil.which("nm") is None:
        return None
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(runtime)], capture_output=True, text=True).stdout
    symbols = sorted({line.split()[-1].split("@")[0] for line in undefined.splitlines() if line.split()[-1].startswith("cu")})
    symbols = [s for s in symbols if s[2:3].isupper()]  # driver API (cuXxx), not cudaXxx (libcudart)
    source = tmp_path / "libcuda_stub.c"
    source.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s in symbols))
    stub = tmp_path / "libcuda.so.1"
    subprocess.run([gcc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), str(source)], check=True)
    return stub


@needs_nvcc
def test_cuda_artifact_is_accepted_by_tvms_cuda_loader(tmp_path, tiny_mlp):
    """With a driver stub, TVM's real CUDA runtime loads; its loader must accept our fatbin record."""
    stub = _driver_stub(tmp_path)
    if stub is None:
        pytest.skip("cannot build a libcuda stub here (needs gcc, nm and tvm/lib/libtvm_runtime_cuda.so)")
    imported, _, _ = tiny_mlp
    preset = resolve_target("cuda-sm90")
    executable, _, _, _ = compile_module(imported, preset)
    source = cuda.cuda_sources(executable.mod)[0].decode()
    kernels = sorted(set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)))
    assert len(kernels) >= 3, source[-2000:]
    library = tmp_path / "mlp.so"
    cuda.export_cuda_library(executable, library, preset)
    proc = run_fresh(
        f"""
        import ctypes, json
        ctypes.CDLL({str(stub)!r}, mode=ctypes.RTLD_GLOBAL)   # before tvm loads its CUDA runtime
        import tvm
        assert tvm.runtime.enabled("cuda")
        lib = tvm.runtime.load_module({str(library)!r})
        (host,) = lib.imports
        (dev,) = host.imports
        print(json.dumps({{"kind": dev.kind, "found": [dev.implements_function(k) for k in {kernels!r}],
                          "bogus": dev.implements_function("no_such_kernel")}}))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"kind": "cuda", "found": [True] * len(kernels), "bogus": False}, result


@needs_nvcc
def test_cuda_build_where_tvms_cuda_runtime_is_loaded(tmp_path, tiny_mlp):
    """On a GPU machine TVM compiles kernels during codegen (NVRTC by default, which needs
    cuda-bindings); under `nvcc_compile_callback` it uses nvcc for the preset's arch instead."""
    stub = _driver_stub(tmp_path)
    if stub is None:
        pytest.skip("cannot build a libcuda stub here (needs gcc, nm and tvm/lib/libtvm_runtime_cuda.so)")
    imported, _, _ = tiny_mlp
    (tmp_path / "mod.pkl").write_bytes(pickle.dumps(imported))
    library = tmp_path / "mlp.so"
    proc = run_fresh(
        f"""
        import ctypes, json, pickle
        ctypes.CDLL({str(stub)!r}, mode=ctypes.RTLD_GLOBAL)
        import autotune, tvm
        from autotune.support import cuda_library as cuda
        from autotune.build.compile import compile_module
        from autotune.support.targets import resolve_target
        assert tvm.runtime.enabled("cuda")
        imported = pickle.load(open({str(tmp_path / 'mod.pkl')!r}, "rb"))
        preset = resolve_target("cuda-sm89")
        with cuda.nvcc_compile_callback("sm_89"):
            executable, _, _, _ = compile_module(imported, preset)
        notes = cuda.export_cuda_library(executable, {str(library)!r}, preset)
        print(json.dumps(notes))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already compiled by TVM" in proc.stdout  # codegen compiled it, through our callback
    (fatbin,) = cuda.embedded_fatbins(library)
    assert cuda.fatbin_archs(fatbin) == {"sass": ["sm_89"], "ptx": ["compute_89"]}


def test_cuda_blob_rewrite_roundtrip():
    """The import-blob codec reproduces TVM's bytes, and a source record becomes a fatbin record."""
    source = b"extern \"C\" __global__ void k() {}\n"
    fmap = b"\x01\x00\x00\x00\x00\x00\x00\x00FMAP"
    record = cuda._raw(b"cuda") + fmap + cuda._raw(source)
    blob = cuda.serialize_imports_blob([0, 1, 2, 2], [1, 2], [("relax.VMExecutable", b"vm"), ("_lib", None), ("cuda", record)])
    assert cuda.parse_imports_blob(blob)[2][2] == ("cuda", record)
    assert cuda.split_cuda_record(record, [b"other", source]) == ("cuda", fmap, source)
    with pytest.raises(BuildFailed, match="serialization of CUDA modules has changed"):
        cuda.split_cuda_record(record, [b"other"])


# -- tuning refusals -------------------------------------------------------------------------------------
def test_tuning_cuda_without_a_gpu_or_rpc_fails_at_once(tmp_path, tiny_mlp):
    from autotune.support.targets import local_cuda_arch
    from autotune.tuning.tune import tune

    if local_cuda_arch() is not None:
        pytest.skip("this machine has a usable CUDA GPU")
    imported, _, _ = tiny_mlp
    started = time.time()
    with pytest.raises(TuningFailed) as err:
        tune(imported, "cuda-sm90", tmp_path / "log", TuneSettings(trials=4), progress=False)
    assert time.time() - started < 10
    message = str(err.value)
    assert "needs a CUDA GPU" in message and "--rpc HOST:PORT" in message and "autotune rpc server" in message
    assert not (tmp_path / "log").exists()  # refused before anything was written


def test_tuning_arm_on_x86_without_rpc_fails_at_once(tmp_path, tiny_mlp):
    import platform

    from autotune.tuning.tune import tune

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is ARM")
    imported, _, _ = tiny_mlp
    with pytest.raises(TuningFailed, match="--rpc HOST:PORT --key arm"):
        tune(imported, "aarch64-neon", tmp_path / "log", TuneSettings(trials=4), progress=False)


@needs_nvcc
@needs_sass
def test_gpu_check_bundle_runs_up_to_the_point_that_needs_a_gpu(tmp_path):
    """tools/gpu_check.py: the bundle (a tiny-width block here) fits the GPU machine's 64 MiB, carries
    a runtime-only TVM and no weights; unpacked and run in a fresh process it rebuilds every weight
    from the seed to the recorded sha256, loads the CUDA library without TVM's compiler (through a
    driver stub), and stops with a clear "no GPU"."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    archive = tool.bundle(tmp_path / "gpu_check.tar.gz", ["tiny"], frames=1)
    assert archive.stat().st_size < tool.LIMIT_BYTES
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert "gpu_check/site/tvm/lib/libtvm_runtime_cuda.so" in names and "gpu_check/artifacts/tiny/block.so" in names
    assert not any(n.endswith(("libtvm_compiler.so", ".safetensors")) for n in names)
    assert any(re.search(r"wheels/apache_tvm_ffi-0\.1\.14\.post1-cp312-.*\.whl$", n) for n in names)
    manifest = json.loads((tmp_path / "unpacked" / "gpu_check" / "manifest.json").read_text())
    tensor_cores = manifest["blocks"]["tiny"]["tensor_cores"]
    assert len(tensor_cores["gemm"]) >= 4 and all(n > 0 for n in tensor_cores["gemm"].values())
    assert tensor_cores["attention"] and all(n > 0 for n in tensor_cores["attention"].values())
    stub = _driver_stub(tmp_path)
    preload = f"import ctypes; ctypes.CDLL({str(stub)!r}, mode=ctypes.RTLD_GLOBAL)" if stub else ""
    script = tmp_path / "unpacked" / "gpu_check" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, "-c", f"{preload}\nimport runpy, sys\nsys.argv = ['gpu_check.py', 'run', {str(script.parent)!r}]\n"
         f"sys.exit(runpy.run_path({str(script)!r}, run_name='__main__'))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert "(runtime only: True)" in proc.stdout and str(tmp_path) in proc.stdout  # the bundle's TVM, not ours
    assert "every sha256 as recorded" in proc.stdout
    if stub:
        assert "device modules ['cuda']" in proc.stdout, proc.stdout
    assert "no GPU" in proc.stderr


@needs_nvcc
def test_rpc_builder_exports_cuda_candidates_as_linked_libraries(tmp_path):
    """MetaSchedule's builder (our worker functions) exports a CUDA candidate as a `.so` with the
    fatbin inside, which a runtime-only TVM loads: the GPU-side RPC server needs no compiler."""
    from tvm import te
    from tvm.s_tir import dlight as dl

    from autotune.tuning import workers

    a = te.placeholder((256, 128), "float32", name="a")
    w = te.placeholder((128, 64), "float32", name="w")
    k = te.reduce_axis((0, 128), name="k")
    c = te.compute((256, 64), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k), name="c")
    target = resolve_target("cuda-sm90").tvm_target()
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(tvm.IRModule({"main": te.create_prim_func([a, w, c])}))
    built = workers.lean_build(mod, target, None)
    path = Path(workers.linked_export(built))
    assert path.suffix == ".so" and elf_machine(path) == EM_X86_64
    (fatbin,) = cuda.embedded_fatbins(path)
    assert cuda.fatbin_archs(fatbin)["sass"] == ["sm_90"]
    stub = _driver_stub(tmp_path)
    if stub is None:
        pytest.skip("cannot build a libcuda stub here (needs gcc, nm and tvm/lib/libtvm_runtime_cuda.so)")
    proc = run_fresh(
        f"""
        import ctypes, json, os
        ctypes.CDLL({str(stub)!r}, mode=ctypes.RTLD_GLOBAL)
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"   # no compiler: what an RPC server on a GPU needs
        import tvm
        from autotune.support.tvm_compat import load_cuda_runtime
        assert tvm.base._RUNTIME_ONLY and load_cuda_runtime() is None
        lib = tvm.runtime.load_module({str(path)!r})
        print(json.dumps({{"kinds": [m.kind for m in lib.imports], "main": lib.implements_function("main")}}))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"kinds": ["cuda"], "main": True}
