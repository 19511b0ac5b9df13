"""`autotune bench`: every engine on the same inputs, shapes and threads, interleaved, in one run.

Engines: torch eager, torch.compile (inductor), ONNX Runtime (dynamo ONNX export), TVM untuned
(fallback schedules), TVM tuned (a tuning log), TVM tuned + each quantization mode asked for.
Each round calls every engine once, in a shuffled order, so drift and noise from a shared
machine hit all engines alike; the median over rounds is reported with the ratio to torch eager,
GFLOP/s, the fraction of this machine's peak measured in the same run (a tuned SGEMM and a copy
bandwidth probe), and fidelity against torch eager.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autotune.models.workloads import Workload, get_workload
from autotune.support.fidelity import compare
from autotune.support.threads import configure_threads


# ---------------------------------------------------------------- engines (same two verbs each)
class TorchEager:
    name = "torch eager"

    def prepare(self, w: Workload, workdir: Path):
        module = w.module

        def run(inputs):
            with torch.no_grad():
                return module(*inputs.values())

        return run


class TorchCompile:
    name = "torch.compile"

    def prepare(self, w: Workload, workdir: Path):
        compiled = torch.compile(w.module)

        def run(inputs):
            with torch.no_grad():
                return compiled(*inputs.values())

        return run


class OnnxRuntime:
    name = "ONNX Runtime"

    def prepare(self, w: Workload, workdir: Path):
        import onnxruntime as ort

        path = workdir / f"{w.name}.onnx"
        torch.onnx.export(w.module, tuple(w.inputs.values()), str(path), dynamo=True, opset_version=18, input_names=list(w.inputs))
        options = ort.SessionOptions()
        options.intra_op_num_threads = configure_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle pool sleeps: engines take turns
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(inputs):
            return session.run(None, {n: v.numpy() for n, v in zip(names, inputs.values())})[0]

        return run


@dataclass
class TVM:
    log: str | None = None
    quantize: str | None = None
    label: str = ""
    tuned: bool = False  # apply the shipped log for the target (and `log`); untuned: fallback schedules only

    @property
    def name(self) -> str:
        return self.label or ("TVM tuned" if self.tuned or self.log else "TVM untuned")

    def prepare(self, w: Workload, workdir: Path):
        import autotune
        from autotune.build.compile import build
        from autotune.frontend.importer import from_torch
        from autotune.support.settings import BuildSettings

        imported = from_torch(w.module, w.inputs, source=w.name)
        slug = self.name.replace(" ", "_").replace("+", "")
        report = build(imported, "x86", workdir / slug / f"{w.name}.so", log_dir=self.log, settings=BuildSettings(quantize=self.quantize, shipped_log=self.tuned))
        self.kernels = (report.tuned_kernels, report.kernels)
        module = autotune.load(report.paths.library)
        np_inputs = {k: v.numpy() for k, v in w.inputs.items()}
        self.profile = lambda: module.profile(np_inputs, repeat=3)
        return lambda inputs: module(**np_inputs)


# ---------------------------------------------------------------- the machine's limits
def measure_peak(threads: int, size: int = 2048, repeat: int = 5) -> dict:
    """SGEMM FLOP/s of torch's tuned BLAS, and copy bandwidth, measured now."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    gflops = 2 * size**3 / statistics.median(times) / 1e9
    src = np.ones(64 * 2**20 // 4, dtype=np.float32)  # 64 MiB
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    gbs = 2 * src.nbytes / statistics.median(times) / 1e9
    return {"sgemm_gflops": gflops, "copy_gbs": gbs, "sgemm_size": size}


# ---------------------------------------------------------------- the run
@dataclass
class Row:
    workload: str
    engine: str
    median_ms: float
    min_ms: float
    ratio_vs_eager: float = float("nan")
    gflops: float = float("nan")
    peak_fraction: float = float("nan")
    fidelity: dict = field(default_factory=dict)
    note: str = ""
    largest_kernel: dict = field(default_factory=dict)  # TVM builds: the kernel with the most FLOPs per call, timed alone


def _as_numpy(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().numpy()
    return np.asarray(out)


def run_bench(workloads: list[str], engines: list, rounds: int = 15, log=None) -> tuple[list[Row], dict]:
    log = log or logging.getLogger(__name__).info
    threads = configure_threads()
    torch.set_num_threads(threads)
    peak = measure_peak(threads)
    log(f"machine: SGEMM {peak['sgemm_gflops']:.1f} GFLOP/s, copy {peak['copy_gbs']:.1f} GB/s, {threads} threads")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for wname in workloads:
            w = get_workload(wname)
            flops = w.flops()
            with torch.no_grad():
                reference = _as_numpy(w.module(*w.inputs.values()))
            runners, notes, by_name = {}, {}, {e.name: e for e in engines}
            for engine in engines:
                log(f"[{wname}] preparing {engine.name}")
                try:
                    runners[engine.name] = engine.prepare(w, Path(tmp))
                    runners[engine.name](w.inputs)  # warm-up (and inductor's compile)
                    if hasattr(engine, "kernels"):
                        notes[engine.name] = f"{engine.kernels[0]}/{engine.kernels[1]} kernels tuned"
                except Exception as exc:  # an engine that cannot run this workload is reported, not fatal
                    log(f"[{wname}] {engine.name} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    rows.append(Row(wname, engine.name, float("nan"), float("nan"), note=f"failed: {type(exc).__name__}"))
            times = {name: [] for name in runners}
            order = list(runners)
            for _ in range(rounds):
                random.shuffle(order)
                for name in order:
                    t = time.perf_counter()
                    runners[name](w.inputs)
                    times[name].append((time.perf_counter() - t) * 1e3)
            eager = statistics.median(times["torch eager"]) if "torch eager" in times else float("nan")
            for name, ts in times.items():
                median = statistics.median(ts)
                fidelity = compare(_as_numpy(runners[name](w.inputs)), reference)
                rows.append(
                    Row(
                        wname, name, median, min(ts), median / eager,
                        flops / median / 1e6, flops / median / 1e6 / peak["sgemm_gflops"],
                        fidelity, notes.get(name, ""), _largest_kernel(by_name[name], peak),
                    )
                )
            this = [r for r in rows if r.workload == wname]
            log(format_markdown(this, peak) + "\n\n" + format_largest_kernels(this))
    return rows, peak


def _largest_kernel(engine, peak: dict) -> dict:
    """Profile a TVM build kernel by kernel; report the one with the most FLOPs per call."""
    if not hasattr(engine, "profile"):
        return {}
    top = engine.profile().largest()
    if top is None:
        return {}
    return {
        "kernel": top.name, "calls": top.calls, "gflop": top.gflop, "ms": top.ms,
        "gflops": top.gflops, "peak_fraction": top.gflops / peak["sgemm_gflops"],
    }


def format_largest_kernels(rows: list[Row]) -> str:
    lines = [
        "| workload | engine | largest kernel (most FLOPs per call) | calls | GFLOP (all calls) | ms (all calls) | GFLOP/s | % of SGEMM peak |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k = r.largest_kernel
        if k:
            lines.append(
                f"| {r.workload} | {r.engine} | `{k['kernel']}` | {k['calls']} | {k['gflop']:.2f} | {k['ms']:.2f} | "
                f"{k['gflops']:.1f} | {100 * k['peak_fraction']:.1f}% |"
            )
    return "\n".join(lines)


def format_markdown(rows: list[Row], peak: dict) -> str:
    lines = [
        "| workload | engine | median ms | vs torch eager | GFLOP/s | % of SGEMM peak | max abs err | cosine | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        fid = r.fidelity
        lines.append(
            f"| {r.workload} | {r.engine} | {r.median_ms:.3f} | {r.ratio_vs_eager:.2f}x | {r.gflops:.1f} | "
            f"{100 * r.peak_fraction:.1f}% | {fid.get('max_abs', float('nan')):.1e} | {fid.get('cosine', float('nan')):.6f} | {r.note} |"
        )
    return "\n".join(lines)


def write_chart(rows: list[Row], path: Path) -> None:
    """A horizontal bar chart of latency relative to torch eager (PIL, no plotting library)."""
    from PIL import Image, ImageDraw

    rows = [r for r in rows if np.isfinite(r.ratio_vs_eager)]
    bar_h, left, width = 22, 330, 420
    img = Image.new("RGB", (left + width + 90, 40 + bar_h * len(rows) + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "latency relative to torch eager (lower is faster; line = 1.0x)", fill="black")
    top = max([r.ratio_vs_eager for r in rows] + [1.0])
    scale = width / top
    for i, r in enumerate(rows):
        y = 40 + i * bar_h
        color = (46, 125, 50) if r.engine.startswith("TVM") else (120, 120, 120)
        draw.text((10, y + 4), f"{r.workload}: {r.engine}", fill="black")
        draw.rectangle([left, y + 3, left + r.ratio_vs_eager * scale, y + bar_h - 3], fill=color)
        draw.text((left + r.ratio_vs_eager * scale + 5, y + 4), f"{r.ratio_vs_eager:.2f}x", fill="black")
    x1 = left + scale
    draw.line([x1, 35, x1, 40 + bar_h * len(rows)], fill="red")
    img.save(path)


def write_results(rows: list[Row], peak: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "bench.md"
    md.write_text(
        f"# autotune bench\n\nCommand: `{command}`\n\nMachine peak measured in the same run: SGEMM "
        f"{peak['sgemm_gflops']:.1f} GFLOP/s (torch BLAS, {peak['sgemm_size']}³), copy bandwidth {peak['copy_gbs']:.1f} GB/s.\n\n"
        + format_markdown(rows, peak)
        + "\n\nEach TVM build profiled kernel by kernel (`CompiledModule.profile`), its largest kernel:\n\n"
        + format_largest_kernels(rows)
        + "\n\n![latency relative to torch eager](bench.png)\n"
    )
    (out_dir / "bench.json").write_text(json.dumps({"command": command, "peak": peak, "rows": [r.__dict__ for r in rows]}, indent=2))
    write_chart(rows, out_dir / "bench.png")
    return md
