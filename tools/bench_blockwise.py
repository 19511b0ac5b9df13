"""The Wan transformer at its real width, block-wise: build time, disk size, one forward's time,
peak memory and agreement with torch eager run layer by layer.

    python tools/synthetic_checkpoint.py --model wan2.1-i2v-14b-480p --components transformer -o ckpt
    python tools/bench_blockwise.py --weights ckpt --precision bf16,w8a8 -o tools/results/blockwise

One forward at 480x832 and one latent frame (1,560 video tokens, 512 text, 257 image tokens).
The torch reference runs the same three units in float32, one layer's weights in memory at a
time (the whole model would not fit). Peak RSS is the run's, in a fresh process that streams the
layers (VmHWM reset after the imports). Writes bench.md and bench.json to the output directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "wan2.1-i2v-14b-480p"
RESOLUTION = dict(height=480, width=832, frames=1)  # 30 x 52 = 1,560 tokens


def torch_layer_by_layer(source) -> tuple[np.ndarray, float]:
    """The float32 torch output of the units chained, one block's weights in memory at a time."""
    from autotune.models.wan_blocks import fill_unit, make_units

    config = source.weights.config
    started = time.perf_counter()
    inputs = [torch.from_numpy(v) for v in source.example_inputs.values()]
    with torch.no_grad():
        units = make_units(config, _token_grid(source))
        fill_unit("prologue", units["prologue"], source.weights)
        fill_unit("epilogue", units["epilogue"], source.weights)
        tokens, context, timestep_proj, temb, cos, sin = units["prologue"](*inputs)
        for layer in range(source.num_layers):  # each fill replaces the previous layer's tensors
            block = fill_unit("block", units["block"], source.weights, layer)
            tokens = block(tokens, context, timestep_proj, cos, sin)
        out = units["epilogue"](tokens, temb)
    return out.numpy(), time.perf_counter() - started


def _token_grid(source) -> tuple[int, int, int]:
    from autotune.models import get_model_spec

    return get_model_spec(source.model_name).derive_shapes(**RESOLUTION)["token_grid"]


def run_fresh(manifest: Path, inputs: Path) -> dict:
    """One streamed forward in a fresh process: seconds and the run's peak RSS."""
    code = f"""
import json, time, numpy as np, autotune, autotune.runtime.blockwise, tvm
inputs = dict(np.load({str(inputs)!r}))
open("/proc/self/clear_refs", "w").write("5")
m = autotune.load({str(manifest)!r}, layers="stream")
t = time.perf_counter(); out = m(**inputs); seconds = time.perf_counter() - t
np.save({str(inputs.with_name('out.npy'))!r}, out)
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({{"seconds": seconds, "peak_rss": hwm}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the artifact run failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "output": np.load(inputs.with_name("out.npy"))}


def main(argv=None) -> int:
    from autotune.build.blockwise import build_blockwise
    from autotune.frontend.blockwise import load_blockwise_source
    from autotune.support.fidelity import compare
    from autotune.support.settings import BuildSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="a diffusers checkpoint (tools/synthetic_checkpoint.py)")
    p.add_argument("--precision", default="bf16,w8a8", help="comma-separated --quantize modes; fp32 for none")
    p.add_argument("--target", default="x86")
    p.add_argument("-o", "--output", default="tools/results/blockwise", help="where bench.md and bench.json go")
    p.add_argument("--work", default="/tmp/autotune-bench-blockwise", help="artifacts and inputs (GBs; weights deleted after each run)")
    args = p.parse_args(argv)
    out, work = Path(args.output), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = load_blockwise_source(MODEL, weights=args.weights, **RESOLUTION)
    import_s = time.perf_counter() - started
    print(f"imported {source.summary()} in {import_s:.0f} s", flush=True)
    inputs = work / "inputs.npz"
    np.savez(inputs, **source.example_inputs)
    reference, reference_s = torch_layer_by_layer(source)
    print(f"torch eager float32, layer by layer: {reference_s:.1f} s", flush=True)
    rows = []
    for precision in args.precision.split(","):
        quantize = None if precision == "fp32" else precision
        build_started = time.perf_counter()
        report = build_blockwise(source, args.target, work / precision / "transformer.so",
                                 settings=BuildSettings(quantize=quantize))
        build_s = time.perf_counter() - build_started + import_s
        disk = sum(f.stat().st_size for f in (work / precision).rglob("*") if f.is_file())
        run = run_fresh(report.paths.metadata, inputs)
        fidelity = compare(run["output"], reference)
        rows.append({
            "precision": precision, "layers": source.num_layers, "build_s": round(build_s, 1),
            "disk_bytes": disk, "forward_s": round(run["seconds"], 2), "peak_rss_bytes": run["peak_rss"],
            "layer_bytes": json.loads(report.paths.metadata.read_text())["layers"][0]["bytes"],
            "kernels": report.kernels, "tuned": report.tuned_kernels, "fidelity": fidelity,
        })
        print(json.dumps(rows[-1]), flush=True)
        for f in (work / precision).rglob("*.safetensors"):  # the artifact's weights: GBs, not kept
            f.unlink()
    (out / "bench.json").write_text(json.dumps({"model": MODEL, "weights": args.weights, "resolution": RESOLUTION,
                                                "torch_layer_by_layer_s": reference_s, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# {MODEL} transformer, block-wise, one forward at 480x832, 1 latent frame (1,560 tokens)",
        "",
        f"`python tools/bench_blockwise.py --weights {args.weights} --precision {args.precision}`; "
        f"{source.num_layers} layers of the exact widths; torch eager float32 layer by layer: {reference_s:.1f} s.",
        "",
        "| precision | build (s) | artifact on disk | one layer's weights | forward (s) | peak RSS of the run | cosine vs torch fp32 | kernels tuned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['build_s']:.0f} | {r['disk_bytes'] / 2**30:.2f} GiB | {r['layer_bytes'] / 2**20:.0f} MiB | "
            f"{r['forward_s']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['fidelity']['cosine']:.6f} | {r['tuned']}/{r['kernels']} |"
        )
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
