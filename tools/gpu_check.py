"""One prepared GPU check: autotune's bf16 cuda-sm90 DiT blocks against torch on an NVIDIA GPU.

The GPU machine this project borrows now and then has Python 3.12, torch and numpy, no TVM, no
network, and takes at most 64 MiB of files. So the check comes in two halves:

  here (CPU):  python tools/gpu_check.py bundle [-o gpu_check.tar.gz] [--blocks 1.3b,14b] [--frames 21]
  there (GPU): tar xzf gpu_check.tar.gz && python gpu_check/gpu_check.py run gpu_check

`bundle` builds each Wan DiT block (diffusers' WanTransformerBlock, seeded weights; 21 latent frames
of 480p = 32,760 tokens) for cuda-sm90 at bf16, checks the tensor-core SASS of every GEMM, and packs
the libraries with a runtime-only TVM (no libtvm_compiler.so), the cp312 wheels of tvm-ffi and
ml_dtypes, diffusers, autotune's sources and this script. Weights are not shipped (a 14B-width block
is 770 MiB): `run` rebuilds the torch block from the same seed and takes the artifact's weights from
it; the bundle records each weight's sha256, and `bundle` itself checks that this reconstruction
equals the artifact's own weights bit for bit.

`run` checks every weight against its recorded hash, then (on a GPU) runs each artifact against
torch bf16 eager (cosine, max error), and times it against torch eager (math attention), torch SDPA
(flash) and torch.compile, interleaved, medians; it writes results.md and results.json beside the
bundle. Without a GPU it stops after the weight check with "no GPU" (exit 3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20  # what the GPU machine accepts per call
TARGET = "cuda-sm90"
# Wan2.1 widths: 1.3B (dim 1536, 12 heads, ffn 8960) and 14B (5120, 40, 13824); tiny for the tests
BLOCKS = {
    "1.3b": {"dim": 1536, "heads": 12, "ffn": 8960},
    "14b": {"dim": 5120, "heads": 40, "ffn": 13824},
    "tiny": {"dim": 64, "heads": 2, "ffn": 128},
}
LATENT_HW = (30, 52)  # 480x832 / 8 / 2: tokens per latent frame 1,560
WHEELS = {"apache-tvm-ffi": "0.1.14.post1", "ml_dtypes": None}  # None: the version installed here
PY_TAG = "cp312"


# -- both halves ---------------------------------------------------------------------------------
def make_block(config: dict, frames: int):
    """The seeded torch DiT block and its inputs (autotune's `dit-block` workload at this width)."""
    from autotune.models.workloads import dit_block

    text, image = (512, 257) if config["dim"] >= 1536 else (16, 8)
    return dit_block(config["dim"], config["heads"], config["ffn"], (frames, *LATENT_HW), text=text, image=image)


def weight_arrays(module, names: list[str], dtypes: dict[str, str]) -> dict:
    """The artifact's weights, from the torch module's parameters and buffers.

    torch.export names a parameter `block.attn1.to_q.weight` as `p_block_attn1_to_q_weight` (buffers
    `b_...`); the bf16 build stores it cast to bfloat16 (round to nearest even, as ml_dtypes does)."""
    import ml_dtypes
    import numpy as np

    from autotune.support.ir import exported_name

    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    by_export_name = {exported_name(key, prefix): value for key, value in tensors.items() for prefix in ("p_", "b_", "c_")}
    missing = [n for n in names if n not in by_export_name]
    if missing:
        raise SystemExit(f"the artifact's weights {missing[:5]} have no counterpart in the torch module: rebuild the bundle")
    out = {}
    for name in names:
        array = by_export_name[name].detach().float().cpu().numpy()
        dtype = dtypes[name]
        out[name] = np.ascontiguousarray(array.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)))
    return out


def digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).tobytes()).hexdigest()


# -- bundle (CPU machine, full TVM) --------------------------------------------------------------
def _build(name: str, frames: int, work: Path) -> dict:
    from autotune.build.compile import build
    from autotune.frontend.importer import from_torch
    from autotune.runtime.artifact import iter_weights, read_metadata
    from autotune.support.settings import BuildSettings

    started = time.time()
    workload = make_block(BLOCKS[name], frames)
    imported = from_torch(workload.module, workload.inputs, source=f"dit-block-{name}")
    report = build(imported, TARGET, work / name / "block.so", settings=BuildSettings(quantize="bf16", shipped_log=False))
    tc = report.tensor_cores
    if tc is None:
        raise SystemExit(f"cannot read the SASS of {report.paths.library}: install the `cuda` extra (cuobjdump, nvdisasm)")
    metadata = read_metadata(report.paths)
    built = dict(iter_weights(report.paths.weights, metadata["weights"]))
    rebuilt = weight_arrays(workload.module, list(built), {k: v.dtype.name for k, v in built.items()})
    wrong = [k for k in built if digest(built[k]) != digest(rebuilt[k])]
    if wrong:
        raise SystemExit(f"{name}: weights rebuilt from the torch module differ from the artifact's: {wrong[:5]}")
    tokens = frames * LATENT_HW[0] * LATENT_HW[1]
    print(f"{name}: {tokens} tokens, {report.kernels} kernels, on tensor cores: GEMMs "
          f"{sum(n > 0 for n in tc.gemm.values())}/{len(tc.gemm)}, attention "
          f"{sum(n > 0 for n in tc.attention.values())}/{len(tc.attention)}; built in {time.time() - started:.0f} s")
    report.paths.weights.unlink()  # rebuilt on the GPU machine from the same seed
    return {
        "config": BLOCKS[name], "frames": frames, "tokens": tokens, "library": f"artifacts/{name}/block.so",
        "weights": {k: {"dtype": v.dtype.name, "shape": list(v.shape), "sha256": digest(v)} for k, v in built.items()},
        "tensor_cores": tc.to_json(),
    }


def _runtime_only_tvm(site: Path) -> None:
    import tvm

    source = Path(tvm.__file__).parent
    skip = shutil.ignore_patterns("__pycache__", "3rdparty", "src", "libtvm_compiler.so", "*.a")
    shutil.copytree(source, site / "tvm", ignore=skip)


def _wheels(dest: Path) -> None:
    import importlib.metadata as md

    for dist, version in WHEELS.items():
        pin = version or md.version(dist)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{dist}=={pin}", "--only-binary=:all:",
               "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "-d", str(dest)]
        subprocess.run(cmd, check=True)
    import diffusers

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"diffusers=={diffusers.__version__}",
                    "-d", str(dest)], check=True)


def bundle(output: Path, blocks: list[str], frames: int, wheels: Path | None = None) -> Path:
    root = output.parent / "gpu_check"
    shutil.rmtree(root, ignore_errors=True)
    (root / "site").mkdir(parents=True)
    manifest = {"target": TARGET, "blocks": {}}
    for name in blocks:
        manifest["blocks"][name] = _build(name, frames, root / "artifacts")
    _runtime_only_tvm(root / "site")
    shutil.copytree(REPO / "autotune", root / "site" / "autotune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(__file__, root / "gpu_check.py")
    (root / "wheels").mkdir()
    if wheels is not None:  # already downloaded (tests: no network needed twice)
        for wheel in wheels.glob("*.whl"):
            shutil.copy(wheel, root / "wheels")
    else:
        _wheels(root / "wheels")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with tarfile.open(output, "w:gz") as tar:
        tar.add(root, arcname="gpu_check")
    size = output.stat().st_size
    print(f"{output}: {size / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if size > LIMIT_BYTES:
        raise SystemExit(f"the bundle is {size / 2**20:.1f} MiB, over the GPU machine's {LIMIT_BYTES / 2**20:.0f} MiB")
    return output


# -- run (GPU machine: torch, numpy; TVM and the rest from the bundle) ----------------------------
def _use_bundle(root: Path) -> None:
    """Put the bundle's packages first on sys.path; the runtime-only TVM needs no compiler."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    site = root / "site"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for wheel in sorted((root / "wheels").glob("*.whl")):
        if "-py3-none-" in wheel.name or f"-{tag}-" in wheel.name:
            marker = site / f".{wheel.name}.unpacked"
            if not marker.exists():
                zipfile.ZipFile(wheel).extractall(site)
                marker.touch()
        else:
            print(f"note: {wheel.name} is not for this Python ({tag}); using the installed package instead")
    sys.path.insert(0, str(site))


def _median_ms(times: list[float]) -> float:
    return sorted(times)[len(times) // 2] * 1e3


def run(root: Path, rounds: int) -> int:
    root = root.resolve()
    _use_bundle(root)
    import torch
    import tvm

    import autotune
    from autotune.runtime.artifact import save_weights
    from autotune.support.tvm_compat import load_cuda_runtime

    print(f"tvm {tvm.__version__} from {Path(tvm.__file__).parent} (runtime only: {tvm.base._RUNTIME_ONLY}); "
          f"autotune from {Path(autotune.__file__).parent}; torch {torch.__version__}")
    manifest = json.loads((root / "manifest.json").read_text())
    workloads = {}
    for name, entry in manifest["blocks"].items():
        workload = make_block(entry["config"], entry["frames"])
        expected = entry["weights"]
        arrays = weight_arrays(workload.module, list(expected), {k: v["dtype"] for k, v in expected.items()})
        wrong = [k for k, a in arrays.items() if digest(a) != expected[k]["sha256"]]
        if wrong:
            raise SystemExit(f"{name}: torch {torch.__version__} rebuilt {len(wrong)} weights differently from the "
                             f"bundle's (seeded RNG differs?): {wrong[:5]}")
        save_weights((root / entry["library"]).with_name("block.weights.safetensors"), arrays)
        print(f"{name}: {len(arrays)} weights rebuilt from the seed, every sha256 as recorded")
        workloads[name] = workload
    why_not = load_cuda_runtime()
    for name, entry in manifest["blocks"].items():
        if why_not is None:  # the libraries load (fatbin records accepted) before any GPU is needed
            kinds = [m.kind for m in tvm.runtime.load_module(str(root / entry["library"])).imports[0].imports]
            print(f"{name}: library loaded by the runtime-only TVM, device modules {kinds}")
        else:
            print(f"{name}: library not loaded here: {why_not}")
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False on this machine; run this where an NVIDIA GPU "
              "(sm_90 for these artifacts) and its driver are present", file=sys.stderr)
        return 3
    rows, failed = [], 0
    for name, entry in manifest["blocks"].items():  # results written after each block: a crash keeps the rest
        try:
            rows.append(_measure(name, entry, workloads[name], root, rounds))
        except Exception as exc:  # noqa: BLE001 - reported in the table and the exit code, then the next block
            import traceback

            traceback.print_exc()
            rows.append({"block": name, "tokens": entry["tokens"], "error": f"{type(exc).__name__}: {exc}"[:500]})
            failed += 1
        (root / "results.json").write_text(json.dumps(rows, indent=1))
        (root / "results.md").write_text(_table(rows, torch.cuda.get_device_name()))
    print((root / "results.md").read_text())
    return 1 if failed else 0


def _measure(name: str, entry: dict, workload, root: Path, rounds: int) -> dict:
    import torch
    import tvm
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import autotune

    device = torch.device("cuda")
    module = workload.module.to(device=device, dtype=torch.bfloat16)
    inputs = [v.to(device) for v in workload.inputs.values()]
    half = [v.to(torch.bfloat16) for v in inputs]
    artifact = autotune.load(root / entry["library"], device="cuda")
    args = [tvm.runtime.from_dlpack(v.contiguous()) for v in inputs]
    compiled = torch.compile(module)

    def ours():
        return artifact.run(args)

    def eager():
        with sdpa_kernel(SDPBackend.MATH):
            return module(*half)

    def sdpa():
        return module(*half)

    def torch_compile():
        return compiled(*half)

    engines = {"autotune": ours, "torch eager": eager, "torch SDPA": sdpa, "torch.compile": torch_compile}
    # math attention materializes heads x tokens^2 scores (bf16, and a float32 softmax): at 14B width
    # and 32,760 tokens that is ~260 GB, more than the GPU has; such a row says so instead
    score_bytes = entry["config"]["heads"] * entry["tokens"] ** 2 * 6
    skipped = {}
    if score_bytes > 0.7 * torch.cuda.mem_get_info()[0]:
        del engines["torch eager"]
        skipped["torch eager"] = f"math attention needs ~{score_bytes / 2**30:.0f} GiB of scores"
    with torch.no_grad():
        reference = sdpa().float()
        out = ours()
        out = torch.from_dlpack(out if not isinstance(out, (list, tuple)) else out[0]).float()
        cosine = float(torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0))
        max_error = float((out - reference).abs().max())
        for fn in engines.values():  # warm-up (compiles, captures the CUDA graph)
            fn()
        times = {k: [] for k in engines}
        for _ in range(rounds):
            for engine, fn in engines.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[engine].append(time.perf_counter() - start)
    medians = {k: _median_ms(v) for k, v in times.items()}
    return {"block": name, "tokens": entry["tokens"], "median_ms": medians, "skipped": skipped,
            "cosine_vs_torch_bf16": cosine, "max_abs_error": max_error, "rounds": rounds}


def _table(rows: list[dict], device: str) -> str:
    engines = ["autotune", "torch eager", "torch SDPA", "torch.compile"]
    lines = [f"GPU check on {device}: one DiT block forward at bf16, medians of interleaved rounds.", "",
             "| block | tokens | " + " | ".join(f"{e} (ms)" for e in engines)
             + " | autotune / SDPA | autotune / torch.compile | cosine vs torch bf16 | max abs error |",
             "|---|---:|" + "---:|" * (len(engines) + 4)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['block']} | {r['tokens']} | failed: {r['error']} |")
            continue
        m = r["median_ms"]
        lines.append(f"| {r['block']} | {r['tokens']} | " + " | ".join(f"{m[e]:.2f}" if e in m else "—" for e in engines)
                     + f" | {m['autotune'] / m['torch SDPA']:.2f} | {m['autotune'] / m['torch.compile']:.2f}"
                     + f" | {r['cosine_vs_torch_bf16']:.6f} | {r['max_abs_error']:.3g} |")
    lines += [f"- {r['block']}: {engine} not run: {why}" for r in rows for engine, why in r.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="build the artifacts and pack the bundle (CPU machine)")
    b.add_argument("-o", "--output", type=Path, default=Path("gpu_check.tar.gz"))
    b.add_argument("--blocks", default="1.3b,14b", help=f"comma-separated, of {', '.join(BLOCKS)} (default 1.3b,14b)")
    b.add_argument("--frames", type=int, default=21, help="latent frames (21: 81 video frames, 32,760 tokens)")
    b.add_argument("--wheels", type=Path, help="a folder with the cp312 wheels already downloaded")
    r = sub.add_parser("run", help="check and time the artifacts (GPU machine)")
    r.add_argument("root", type=Path, help="the unpacked bundle (gpu_check/)")
    r.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "bundle":
        unknown = [b for b in args.blocks.split(",") if b not in BLOCKS]
        if unknown:
            parser.error(f"unknown blocks {unknown}; known: {', '.join(BLOCKS)}")
        bundle(args.output.resolve(), args.blocks.split(","), args.frames, args.wheels)
        return 0
    return run(args.root, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
