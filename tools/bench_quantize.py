"""Quantization modes side by side: speed, weight bytes and fidelity of untuned x86 builds.

    python tools/bench_quantize.py                     # every wan-i2v-tiny component, all CPU modes
    python tools/bench_quantize.py --components transformer --rounds 30

For each component of wan-i2v-tiny it builds fp32 and every CPU quantization mode for the x86
preset *untuned* (every kernel gets its fallback schedule, as `autotune build` without a log),
loads each artifact, checks it against the float32 torch reference, and times all of them
interleaved (round r times mode 1, mode 2, ..., so load from other processes hits every mode
alike), reporting medians and the ratio to fp32. Writes tools/results/quantize.md and .json.

Builds share one fallback-schedule cache keyed by the kernels' structural hash (most kernels
are the same in every mode; the fallback samples ~1 s of MetaSchedule design space per kernel),
so the whole run takes minutes, not a quarter of an hour.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import autotune  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
from autotune.support import hardware
from autotune.support.tvm_compat import import_tensor_intrin_fast

RESULTS = Path(__file__).resolve().parent / "results"
CPU_MODES = ["fp16", "bf16", "int8-weight", "w8a8"]
COMPONENTS = ("transformer", "image_encoder", "vae_encoder", "vae_decoder")
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")  # named in the report


def _relative_size(shipped: int | None, module: int | None) -> str:
    """The shipped weights against the torch module's float32 ones (precomputed transforms can add bytes)."""
    if not shipped or not module:
        return ""
    if abs(shipped - module) < 0.005 * module:
        return "same"
    return f"{module / shipped:.2f}× smaller" if shipped < module else f"{shipped / module:.2f}× larger"


def cached_fallback():
    """A drop-in for autotune.build.fallback.schedule_untuned that reuses schedules across builds."""
    import tvm_ffi

    from autotune.build.fallback import _cpu_schedule
    from autotune.support.ir import is_scheduled, prim_funcs

    cache: dict = {}
    stats = {"scheduled": 0, "reused": 0}

    def schedule_untuned(mod, target, seed: int = 0):
        count = 0
        for name, func in prim_funcs(mod).items():
            if is_scheduled(func):
                continue
            key = (str(target), tvm_ffi.structural_hash(func, map_free_vars=True))
            hit = next((s for f, s in cache.get(key, []) if tvm_ffi.structural_equal(f, func, map_free_vars=True)), None)
            if hit is None:
                hit = _cpu_schedule(func, target, seed)
                hit = hit.with_attr("tirx.is_scheduled", True) if hit is not None else None
                cache.setdefault(key, []).append((func, hit))
                stats["scheduled"] += 1
            else:
                stats["reused"] += 1
            if hit is not None:
                mod[name] = hit
                count += 1
        return mod, count

    return schedule_untuned, stats


def time_interleaved(calls: dict, rounds: int, inner: int) -> dict:
    """{label: fn} -> {label: [ms per call, one per round]}, labels interleaved within each round
    in a shuffled order (no label always runs after the same one)."""
    for fn in calls.values():  # warm up
        for _ in range(3):
            fn()
    samples = {k: [] for k in calls}
    order = list(calls.items())
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for label, fn in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[label].append((time.perf_counter() - t0) * 1e3 / inner)
    return samples


def bench_component(component: str, args, fallback, workdir: Path) -> dict:
    import torch
    import tvm

    import autotune.build.compile as build_module
    from autotune.frontend.sources import load_source
    from autotune.support.fidelity import compare
    from autotune.support.settings import BuildSettings

    kwargs = {}
    if component.startswith("vae"):
        kwargs = dict(height=args.vae_size, width=args.vae_size, frames=args.vae_frames)
    source = load_source("wan-i2v-tiny", component, **kwargs)
    reference = source.reference_outputs()[0]
    peak = 2.0 if component == "vae_decoder" else None
    print(f"{source.imported.summary()}", flush=True)

    rows: dict[str, dict] = {}
    modules = {}
    for mode in ["fp32"] + args.modes:
        started = time.time()
        settings = BuildSettings(quantize=None if mode == "fp32" else mode, shipped_log=False)  # untuned, as said
        try:
            report = build_module.build(source.imported, args.target, workdir / f"{component}-{mode}.so", settings=settings)
        except Exception as exc:  # a mode that fails to build is a result, not a crash
            rows[mode] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  {mode:<12} build FAILED: {rows[mode]['error']}", flush=True)
            continue
        metadata = json.loads(report.paths.metadata.read_text())
        module = autotune.load(report.paths.library)
        out = module(**source.example_inputs)
        fid = compare(out, reference, peak=peak)
        rows[mode] = {
            "kernels": report.kernels,
            "fallback_kernels": report.fallback_kernels,
            "build_s": round(time.time() - started, 1),
            "weight_bytes": metadata["weight_bytes"]["after"],
            "weight_bytes_fp32": metadata["weight_bytes"]["before"],
            "layers": metadata["passes"][0]["layers"] if metadata["passes"] else None,
            "fidelity": fid,
        }
        modules[mode] = module
        print(
            f"  {mode:<12} built in {rows[mode]['build_s']:5.1f} s, {report.kernels} kernels; "
            f"cos {fid['cosine']:.6f} PSNR {fid['psnr_db']:.1f} dB",
            flush=True,
        )

    # Interleaved timing of the VM calls with inputs already on the device.
    calls = {}
    for mode, module in modules.items():
        vm_args = [tvm.runtime.tensor(np.asarray(source.example_inputs[s.name]), module.device) for s in module.inputs]
        calls[mode] = (lambda m=module, a=vm_args: m._main(*a, *m._weights))
    torch_inputs = [torch.from_numpy(v) for v in source.example_inputs.values()]

    def torch_call():
        with torch.no_grad():
            source.reference(*torch_inputs)

    # torch apart: its OpenMP threads keep spinning a while after it returns, slowing whatever runs
    # next (a fixed order, torch last, put the fp32 build there every round: 2.1x its time).
    samples = time_interleaved(calls, args.rounds, args.inner)
    samples.update(time_interleaved({"torch eager fp32": torch_call}, args.rounds, args.inner))
    base = statistics.median(samples["fp32"]) if "fp32" in samples else None
    for label, values in samples.items():
        med = statistics.median(values)
        row = rows.setdefault(label, {})
        row["median_ms"] = med
        row["min_ms"] = min(values)
        row["vs_fp32"] = med / base if base else None
    return {"component": component, "label": source.label, "shape": source.imported.summary(), "rows": rows}


def fmt_bytes(n) -> str:
    return f"{n / 1024:.0f} KiB" if n is not None else ""


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Quantization modes: untuned x86 builds of wan-i2v-tiny",
        "",
        f"Generated by `tools/bench_quantize.py` on {meta['date']}: target `{meta['target']}` "
        f"(`{meta['tvm_target']}`), TVM {meta['tvm']}, {meta['threads']} threads, {meta.get('cpu', meta['machine'])}. "
        f"Every kernel fallback-scheduled (no tuning log). Timing: {meta['rounds']} interleaved rounds × "
        f"{meta['inner']} calls, median per call; ratio = median / fp32 median (lower is faster). "
        "Fidelity against the float32 torch module (VAE: PSNR over peak-to-peak 2.0, frames in [-1, 1]).",
        "",
    ]
    for res in results:
        lines += [f"## {res['label']}", "", f"`{res['shape']}`", ""]
        lines += [
            "| mode | median ms | vs fp32 | weights | vs torch fp32 | quantized layers | cosine | PSNR dB | max abs err | kernels | build s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mode, r in res["rows"].items():
            if "error" in r:
                lines.append(f"| {mode} | build failed: {r['error']} |||||||||")
                continue
            fid = r.get("fidelity")
            wb, wb32 = r.get("weight_bytes"), r.get("weight_bytes_fp32")
            cells = [
                mode,
                f"{r['median_ms']:.2f}",
                f"{r['vs_fp32']:.2f}×" if r.get("vs_fp32") else "",
                fmt_bytes(wb),
                _relative_size(wb, wb32),
                str(r.get("layers") if r.get("layers") is not None else ("" if fid is None else "—")),
                f"{fid['cosine']:.6f}" if fid else "",
                f"{fid['psnr_db']:.1f}" if fid else "",
                f"{fid['max_abs']:.2e}" if fid else "",
                str(r.get("kernels", "")),
                str(r.get("build_s", "")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"Fallback schedules: {meta['fallback']['scheduled']} kernels scheduled, {meta['fallback']['reused']} reused "
        "from an identical kernel of an earlier build. Total run time "
        f"{meta['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", nargs="+", default=list(COMPONENTS), help=f"of wan-i2v-tiny (default: all, {', '.join(COMPONENTS)})")
    parser.add_argument("--modes", nargs="+", default=CPU_MODES)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed sample")
    parser.add_argument("--vae-size", type=int, default=32, help="VAE video height = width (encoder input, decoder output)")
    parser.add_argument("--vae-frames", type=int, default=5, help="VAE video frames (5 = 2 latent frames)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize.md")
    args = parser.parse_args(argv)

    import tvm

    import autotune.build.compile as build_module
    from autotune.support.targets import resolve_target

    started = time.time()
    import_tensor_intrin_fast()
    fallback, stats = cached_fallback()
    build_module.schedule_untuned = fallback
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for component in args.components:
            print(f"== {component}", flush=True)
            results.append(bench_component(component, args, fallback, Path(tmp)))
    preset = resolve_target(args.target)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "target": args.target,
        "tvm_target": str(preset.tvm_target()),
        "tvm": tvm.__version__,
        "threads": int(__import__("os").environ.get("TVM_NUM_THREADS", "0")),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": f"{hardware.cpu_model()} ({', '.join(f for f in VECTOR_FLAGS if f in hardware.cpu_flags()) or 'no AVX2'})",
        "rounds": args.rounds,
        "inner": args.inner,
        "fallback": stats,
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, meta))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=float) + "\n")
    print(args.out.read_text())
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
