"""`autotune bench`: every engine on the same inputs, shapes and threads, interleaved, in one run.

Engines: torch eager, torch.compile (inductor), ONNX Runtime (dynamo ONNX export), OpenVINO
(optional: `pip install openvino`), TVM untuned (fallback schedules), TVM tuned (a tuning log),
TVM tuned + each quantization mode asked for. Every engine runs at each precision asked for
(`PRECISIONS`), on the same float32 inputs, returning float32:
- fp32: the module as it is;
- bf16: torch eager and torch.compile run a bfloat16 copy of the module (floating inputs cast to
  bfloat16, outputs back to float32, inside the call); ONNX Runtime runs that copy exported (its
  CPU provider has no bf16 Conv/MatMul/Gemm kernels: the row then says why it has no time);
  OpenVINO compiles the float32 model with INFERENCE_PRECISION_HINT bf16 (the row's note says
  what its CPU plugin runs the matmuls and convolutions in); TVM builds with `--quantize bf16`;
- int8: each engine's own int8 for linears, convolutions stay float32: torch eager runs
  `quantize_dynamic` (its default: per-tensor int8 weights, dynamic int8 activations; x86 backend),
  torch.compile that module, ONNX Runtime its export through `onnxruntime.quantization.
  quantize_dynamic` (MatMulInteger), OpenVINO the model with int8 weights from
  `nncf.compress_weights` (weight-only, at the CPU plugin's default precision), TVM `--quantize w8a8`.
`--quantize` rows (float32 inputs and outputs, quantized weights inside) run once, beside the
fp32 rows: their ratio is to float32 torch eager and their "% of peak" to the SGEMM peak.

Each round times every (engine, precision) in a shuffled order, so drift and noise from a shared
machine hit all alike: a call, repeated for at least `MIN_ROUND_MS` (sub-millisecond models get
many calls: one preempted thread, a scheduler quantum of several ms, would otherwise be a round's
whole figure), its median call the round's time. An engine slower than BENCH_SLOW_CALL_SECONDS per
call (twice: the first call may be a compile) is timed by that second call alone, not every round.
Rounds go on past `rounds` until the workload's rounds have taken `min_seconds`: a burst of other work on a shared machine lasts seconds, so on a
sub-millisecond model (a round of every engine in about a second) it would otherwise hit most of
its few rounds. The median over rounds is reported with the ratio to torch eager at
the same precision, GFLOP/s, the fraction of this machine's GEMM peak at the row's precision
measured in the same run (torch's float32 and bfloat16 2048³ matmuls, `torch._int_mm` for int8,
smaller where torch is too slow at a precision on this CPU, and never a ceiling below SGEMM's;
plus a copy bandwidth probe), and fidelity against float32 torch eager.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autotune.models.workloads import Workload, get_workload
from autotune.support import defaults
from autotune.support.errors import InputError
from autotune.support.fidelity import compare
from autotune.support.threads import configure_threads

PRECISIONS = ("fp32", "bf16", "int8")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_KEYS = {"fp32": "sgemm_gflops", "bf16": "bf16_gemm_gflops", "int8": "int8_gemm_gops"}  # measure_peak's probes
TVM_MODES = {"bf16": "bf16", "int8": "w8a8"}  # the --quantize mode a TVM row builds with at each precision


def parse_precisions(text: str) -> list[str]:
    """`"fp32,bf16"` -> ["fp32", "bf16"] (duplicates dropped); anything else raises InputError."""
    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise InputError(
            f"--precision {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'no precision given'}; "
            f"give a comma list of {', '.join(PRECISIONS)} (e.g. --precision fp32,bf16)"
        )
    return names


# ---------------------------------------------------------------- engines (same two verbs each)
class EngineUnavailable(Exception):
    """An engine cannot run a workload at a precision; the message is the row's note (and what to do)."""


@dataclass
class Prepared:
    """An engine made ready for one workload at one precision."""

    run: Callable[[dict], object]  # the workload's float32 inputs by name -> float32 output(s)
    note: str = ""
    profile: Callable[[], object] | None = None  # TVM builds: time each kernel (CompiledModule.profile)


def _cast_floating(value, dtype: torch.dtype):
    """`value` (a tensor, or a tuple/list of them) with its floating tensors cast to `dtype`."""
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class AtPrecision(torch.nn.Module):
    """A copy of `module` in `dtype`, called with float32 inputs and returning float32 outputs."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = copy.deepcopy(module).to(dtype)
        self.dtype = dtype

    def forward(self, *inputs):
        return _cast_floating(self.inner(*_cast_floating(inputs, self.dtype)), torch.float32)


def module_at(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The torch module an engine runs at `precision`: `module` itself at fp32, a cast copy at bf16,
    a copy with dynamically quantized int8 linears at int8."""
    if precision == "fp32":
        return module
    if precision == "int8":
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        # torch's default (per-tensor weight scales): its per-channel dynamic linears measured ~14x
        # slower on the tiny image encoder (AMD Zen 4, torch 2.13). diffusers' Wan condition embedder
        # reads `next(time_embedder.parameters()).dtype`, which a quantized time_embedder no longer
        # has (StopIteration): its two small linears stay float32.
        linears = {name: default_dynamic_qconfig for name, m in module.named_modules()
                   if isinstance(m, torch.nn.Linear) and "time_embedder" not in name.split(".")}
        return quantize_dynamic(copy.deepcopy(module), linears, dtype=torch.qint8).eval()
    return AtPrecision(module, TORCH_DTYPES[precision]).eval()


INT8_TORCH_NOTE = "quantize_dynamic: int8 linears (per-tensor weights, dynamic activations); convolutions float32"


class TorchEager:
    name = "torch eager"
    precisions = PRECISIONS

    def prepare(self, w: Workload, workdir: Path, precision: str) -> Prepared:
        module = module_at(w.module, precision)

        def run(inputs):
            with torch.no_grad():
                return module(*inputs.values())

        return Prepared(run, note=INT8_TORCH_NOTE if precision == "int8" else "")


class TorchCompile:
    name = "torch.compile"
    precisions = PRECISIONS

    def prepare(self, w: Workload, workdir: Path, precision: str) -> Prepared:
        compiled = torch.compile(module_at(w.module, precision))

        def run(inputs):
            with torch.no_grad():
                return compiled(*inputs.values())

        return Prepared(run, note=INT8_TORCH_NOTE if precision == "int8" else "")


class OnnxRuntime:
    name = "ONNX Runtime"
    precisions = PRECISIONS

    def prepare(self, w: Workload, workdir: Path, precision: str) -> Prepared:
        path = workdir / f"{w.name}-{precision}.onnx"
        exported = w.module if precision == "int8" else module_at(w.module, precision)  # int8: ORT quantizes the fp32 export
        torch.onnx.export(exported, tuple(w.inputs.values()), str(path), dynamo=True, opset_version=18,
                          input_names=list(w.inputs))
        note = ""
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = path.with_name(f"{w.name}-int8-quantized.onnx")
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
            path, note = quantized, "quantize_dynamic: int8 MatMul/Gemm weights per channel, dynamic int8 activations"
        session = self._session(path, precision)
        names = [i.name for i in session.get_inputs()]

        def run(inputs):
            return session.run(None, {n: v.numpy() for n, v in zip(names, inputs.values())})[0]

        return Prepared(run, note=note)

    @staticmethod
    def _session(path: Path, precision: str):
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import (
            InvalidGraph,
            NotImplemented,
        )

        options = ort.SessionOptions()
        options.intra_op_num_threads = configure_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle pool sleeps: engines take turns
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (InvalidGraph, NotImplemented) as exc:  # what ORT raises for an op type it has no kernel for
            if precision == "fp32":
                raise
            raise EngineUnavailable(
                f"ONNX Runtime CPU has no {precision} kernel for this model's ops (Conv, MatMul/Gemm): "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from exc


class OpenVINO:
    """OpenVINO's CPU plugin, on the float32 model; the precision goes in as INFERENCE_PRECISION_HINT."""

    name = "OpenVINO"
    precisions = PRECISIONS
    HINTS = {"fp32": "f32", "bf16": "bf16"}  # set at fp32 too: on CPUs with bf16 support the default is bf16

    def prepare(self, w: Workload, workdir: Path, precision: str) -> Prepared:
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineUnavailable("not installed: pip install openvino (or pip install 'autotune[bench]')") from exc
        model, how = openvino_model(w.module, tuple(w.inputs.values()))
        config = {"INFERENCE_NUM_THREADS": configure_threads()}
        if precision == "int8":
            model = _openvino_int8_weights(model)  # compute at the plugin's default precision, as users get it
        else:
            config["INFERENCE_PRECISION_HINT"] = self.HINTS[precision]
        compiled = ov.Core().compile_model(model, "CPU", config)
        request = compiled.create_infer_request()

        def run(inputs):
            return request.infer([v.numpy() for v in inputs.values()])[0]

        note = openvino_precision_note(compiled)
        return Prepared(run, note=note if how == "traced" else f"{note}; converted from torch.export")


def _openvino_int8_weights(model):
    """`model` with int8 weights (per output channel, symmetric) from NNCF, OpenVINO's own quantizer."""
    try:
        import nncf
    except ImportError as exc:
        raise EngineUnavailable("int8 weights come from NNCF, not installed: pip install nncf (or pip install 'autotune[bench]')") from exc
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)


def openvino_model(module: torch.nn.Module, inputs: tuple):
    """`module` as an OpenVINO model, and how: "traced" (TorchScript, OpenVINO's default), or through
    torch.export where tracing meets an op OpenVINO cannot convert (the Wan VAE's nearest-exact upsample)."""
    import openvino as ov
    from openvino.frontend import OpConversionFailure

    try:
        return ov.convert_model(module, example_input=inputs), "traced"
    except OpConversionFailure as exc:
        summary = " ".join(str(exc).split())[-200:]  # the message ends with the ops it has no rule for
        logging.getLogger(__name__).info("OpenVINO could not convert the traced module (...%s); trying torch.export", summary)
    return ov.convert_model(torch.export.export(module, inputs)), "exported"


def openvino_precision_note(compiled) -> str:
    """What OpenVINO's CPU plugin runs: the precision hint in force and its matmul/conv layers' precisions."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in ("FullyConnected", "MatMul", "Convolution", "Deconvolution"):
            counts[info["runtimePrecision"].astype(str)] += 1
    layers = ", ".join(f"{n} in {p}" for p, n in sorted(counts.items())) or "none found"
    return f"hint {hint}; matmul/conv layers run: {layers}"


@dataclass
class TVM:
    log: str | None = None
    quantize: str | None = None
    label: str = ""
    tuned: bool = False  # apply the shipped log for the target (and `log`); untuned: fallback schedules only

    @property
    def name(self) -> str:
        return self.label or ("TVM tuned" if self.tuned or self.log else "TVM untuned")

    @property
    def precisions(self) -> tuple[str, ...]:
        return ("fp32",) if self.quantize else PRECISIONS  # a --quantize build runs beside the fp32 rows

    def prepare(self, w: Workload, workdir: Path, precision: str) -> Prepared:
        import autotune
        from autotune.build.compile import build
        from autotune.frontend.importer import from_torch
        from autotune.support.settings import BuildSettings

        quantize = TVM_MODES.get(precision, self.quantize)
        imported = from_torch(w.module, w.inputs, source=w.name)
        slug = self.name.replace(" ", "_").replace("+", "")
        settings = BuildSettings(quantize=quantize, shipped_log=self.tuned)
        report = build(imported, "x86", workdir / slug / precision / f"{w.name}.so", log_dir=self.log, settings=settings)
        module = autotune.load(report.paths.library)
        np_inputs = {k: v.numpy() for k, v in w.inputs.items()}
        return Prepared(
            run=lambda inputs: module(**np_inputs),
            note=f"{report.tuned_kernels}/{report.kernels} kernels tuned",
            profile=lambda: module.profile(np_inputs, repeat=3),
        )


# ---------------------------------------------------------------- the machine's limits
def _median_seconds(call: Callable[[], object], repeat: int) -> float:
    """Median wall time of `call()` over `repeat` runs, after one warm-up run."""
    call()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


PROBE_CALL_SECONDS = 0.5  # a GEMM probe's matrices shrink until one call takes about this long


def _gemm_call(dtype: torch.dtype, size: int) -> Callable[[], object]:
    """torch's matmul on two size x size matrices: `torch.mm` (float), `torch._int_mm` (int8 -> int32)."""
    if dtype == torch.int8:
        a, b = (torch.randint(-127, 128, (size, size), dtype=torch.int8) for _ in range(2))
        return lambda: torch._int_mm(a, b)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return lambda: torch.mm(a, b)


def _gemm_rate(dtype: torch.dtype, size: int, repeat: int) -> tuple[float, int]:
    """(GFLOP/s or GOP/s, the size measured) of torch's `dtype` GEMM at `size`³, or smaller where
    this CPU runs it so slowly (torch's fallback kernels without bf16 / int8 instructions: 0.3
    GFLOP/s measured for bf16 on a Zen 3) that a 2048³ call would take a minute."""
    small = 256
    estimate = _median_seconds(_gemm_call(dtype, small), 3) * (size / small) ** 3  # (3: one slow call is noise)
    while size > small and estimate > PROBE_CALL_SECONDS:
        size //= 2
        estimate /= 8
    return 2 * size**3 / _median_seconds(_gemm_call(dtype, size), repeat) / 1e9, size


def _copy_gbs(repeat: int) -> float:
    """GB/s (read + write) of copying 64 MiB."""
    src = np.ones(64 * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda: np.copyto(dst, src), repeat) / 1e9


def measure_peak(threads: int, size: int = 2048, repeat: int = 5) -> dict:
    """GEMM FLOP/s of torch's kernels in float32 (SGEMM), bfloat16 and int8, and copy bandwidth, measured now."""
    torch.set_num_threads(threads)
    sgemm, sgemm_size = _gemm_rate(torch.float32, size, repeat)
    bf16, bf16_size = _gemm_rate(torch.bfloat16, size, repeat)
    int8, int8_size = _gemm_rate(torch.int8, size, repeat)
    return {
        "sgemm_gflops": sgemm,
        "bf16_gemm_gflops": bf16,
        "int8_gemm_gops": int8,
        "copy_gbs": _copy_gbs(repeat),
        "sgemm_size": sgemm_size,
        "bf16_gemm_size": bf16_size,
        "int8_gemm_size": int8_size,
    }


def peak_gflops(peak: dict, precision: str) -> float:
    """The GEMM peak a row at `precision` is measured against: never below the SGEMM peak (a CPU
    without bf16 / int8 matrix instructions can still compute them in float32)."""
    return max(peak[PEAK_KEYS[precision]], peak["sgemm_gflops"])


# ---------------------------------------------------------------- the run
@dataclass
class Row:
    workload: str
    engine: str
    precision: str
    median_ms: float | None  # None: the engine did not run (the note says why)
    min_ms: float | None = None
    rounds: int = 0  # interleaved rounds behind the median
    ratio_vs_eager: float | None = None  # to torch eager at the same precision
    gflops: float | None = None
    peak_fraction: float | None = None  # of the GEMM peak at the row's precision (SGEMM for --quantize rows)
    fidelity: dict | None = None  # against float32 torch eager
    note: str = ""
    largest_kernel: dict | None = None  # TVM builds: the kernel with the most FLOPs per call, timed alone


def _as_numpy(out) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().float().numpy()
    return np.asarray(out)


def run_bench(
    workloads: list[str], engines: list, rounds: int = 15, log=None, precisions=("fp32",), min_seconds: float = 0.0,
) -> tuple[list[Row], dict]:
    """Every engine at every precision on each workload; rows grouped by workload, then precision.
    Each workload gets at least `rounds` rounds, and more until they have taken `min_seconds`."""
    log = log or logging.getLogger(__name__).info
    threads = configure_threads()
    torch.set_num_threads(threads)
    peak = measure_peak(threads)
    log(f"machine: SGEMM {peak['sgemm_gflops']:.1f} GFLOP/s, bf16 GEMM {peak['bf16_gemm_gflops']:.1f} GFLOP/s, "
        f"int8 GEMM {peak['int8_gemm_gops']:.1f} GOP/s, copy {peak['copy_gbs']:.1f} GB/s, {threads} threads")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for wname in workloads:
            this = _bench_workload(get_workload(wname), engines, list(precisions), rounds, min_seconds, peak, Path(tmp), log)
            log(format_markdown(this) + "\n\n" + format_largest_kernels(this))
            rows += this
    return rows, peak


def _bench_workload(
    w: Workload, engines: list, precisions: list[str], rounds: int, min_seconds: float, peak: dict, workdir: Path, log,
) -> list[Row]:
    plan = [(e, p) for p in precisions for e in engines if p in e.precisions]
    prepared, unavailable, slow = _prepare_all(w, plan, workdir, log)
    times = _interleave({k: v for k, v in prepared.items() if k not in slow}, w.inputs, rounds, min_seconds)
    times.update({key: [ms] for key, (ms, _) in slow.items()})
    with torch.no_grad():
        reference = _as_numpy(w.module(*w.inputs.values()))
    flops = w.flops()
    rows = []
    for engine, precision in plan:
        key = (engine.name, precision)
        if key in unavailable:
            rows.append(Row(w.name, engine.name, precision, None, note=unavailable[key]))
            continue
        eager = times.get(("torch eager", precision))
        row = _measured_row(w, key, prepared[key], times[key], eager, flops, reference, peak_gflops(peak, precision),
                            output=slow[key][1] if key in slow else None)
        if key in slow:
            row.note = "; ".join(filter(None, [row.note, f"one call timed: over {defaults.BENCH_SLOW_CALL_SECONDS:g} s "
                                                         "per call, so not repeated in the rounds"]))
        rows.append(row)
    return rows


def _prepare_all(w: Workload, plan: list, workdir: Path, log) -> tuple[dict, dict, dict]:
    """Prepare and warm up each (engine, precision); returns ({key: Prepared}, {key: why it cannot
    run}, {key: (ms, output) of one call} for engines slower than BENCH_SLOW_CALL_SECONDS a call
    (torch at bf16 on a CPU without bf16 arithmetic: minutes), timed once instead of every round)."""
    prepared, unavailable, slow = {}, {}, {}
    for engine, precision in plan:
        key = (engine.name, precision)
        log(f"[{w.name}] preparing {engine.name} at {precision}")
        try:
            ready = engine.prepare(w, workdir, precision)
            seconds, output = _timed_call(ready, w.inputs)  # warm-up (and inductor's compile)
            if seconds > defaults.BENCH_SLOW_CALL_SECONDS:  # slow, or a one-time cost: a second call tells
                seconds, output = _timed_call(ready, w.inputs)
                if seconds > defaults.BENCH_SLOW_CALL_SECONDS:
                    log(f"[{w.name}] {engine.name} at {precision}: {seconds:.0f} s per call; timed once, not every round")
                    slow[key] = (seconds * 1e3, output)
        except EngineUnavailable as exc:
            log(f"[{w.name}] {engine.name} at {precision}: {exc}")
            unavailable[key] = str(exc)
        except Exception as exc:  # an engine that cannot run this workload is reported, not fatal
            log(f"[{w.name}] {engine.name} at {precision} failed: {type(exc).__name__}: {str(exc)[:300]}")
            unavailable[key] = f"failed: {type(exc).__name__}: {_first_line(exc)}"
        else:
            prepared[key] = ready
    return prepared, unavailable, slow


def _timed_call(ready: Prepared, inputs: dict) -> tuple[float, object]:
    start = time.perf_counter()
    output = ready.run(inputs)
    return time.perf_counter() - start, output


def _first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


MIN_ROUND_MS = 50.0


def _interleave(prepared: dict, inputs: dict, rounds: int, min_seconds: float = 0.0) -> dict:
    """Milliseconds per call of each prepared engine: per round (engines shuffled), the median of
    the calls made in at least MIN_ROUND_MS; `rounds` rounds, more until `min_seconds` have passed
    (at most defaults.BENCH_MAX_ROUNDS)."""
    times = {key: [] for key in prepared}
    order = list(prepared)
    began, done = time.perf_counter(), 0
    while done < rounds or (time.perf_counter() - began < min_seconds and done < defaults.BENCH_MAX_ROUNDS):
        done += 1
        random.shuffle(order)
        for key in order:
            calls, start = [], time.perf_counter()
            while not calls or (time.perf_counter() - start) * 1e3 < MIN_ROUND_MS:
                t = time.perf_counter()
                prepared[key].run(inputs)
                calls.append((time.perf_counter() - t) * 1e3)
            times[key].append(statistics.median(calls))
    return times


def _measured_row(w: Workload, key: tuple, ready: Prepared, times: list, eager: list | None, flops: int,
                  reference: np.ndarray, peak: float, output=None) -> Row:
    """`output`: the engine's output on the workload's inputs where a call already made it."""
    median = statistics.median(times)
    gflops = flops / median / 1e6
    return Row(
        w.name, key[0], key[1], median, min(times), len(times),
        ratio_vs_eager=median / statistics.median(eager) if eager else None,
        gflops=gflops,
        peak_fraction=gflops / peak,
        fidelity=compare(_as_numpy(ready.run(w.inputs) if output is None else output), reference),
        note=ready.note,
        largest_kernel=_largest_kernel(ready, peak),
    )


def _largest_kernel(ready: Prepared, peak: float) -> dict | None:
    """Profile a TVM build kernel by kernel; report the one with the most FLOPs per call (None: not TVM)."""
    if ready.profile is None:
        return None
    top = ready.profile().largest()
    if top is None:
        return None
    return {
        "kernel": top.name, "calls": top.calls, "gflop": top.gflop, "ms": top.ms,
        "gflops": top.gflops, "peak_fraction": top.gflops / peak,
    }


# ---------------------------------------------------------------- reports
def _grouped(rows: list[Row]) -> list[Row]:
    """Rows by workload (in run order), then precision (fp32 first), engines in run order within."""
    workloads = list(dict.fromkeys(r.workload for r in rows))
    return sorted(rows, key=lambda r: (workloads.index(r.workload), PRECISIONS.index(r.precision)))


def _num(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """A table cell: the number formatted, or an em dash where there is none."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value * scale:{spec}}{suffix}"


def _text(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def format_markdown(rows: list[Row]) -> str:
    lines = [
        "| workload | precision | engine | median ms | vs torch eager (same precision) | GFLOP/s | % of GEMM peak (row's precision) "
        "| max abs err vs fp32 eager | cosine | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in _grouped(rows):
        fid = r.fidelity or {}
        lines.append(
            f"| {r.workload} | {r.precision} | {r.engine} | {_num(r.median_ms, '.3f')} | {_num(r.ratio_vs_eager, '.2f', suffix='x')} | "
            f"{_num(r.gflops, '.1f')} | {_num(r.peak_fraction, '.1f', 100, '%')} | {_num(fid.get('max_abs'), '.1e')} | "
            f"{_num(fid.get('cosine'), '.6f')} | {_text(r.note)} |"
        )
    return "\n".join(lines)


def format_precisions_side_by_side(rows: list[Row]) -> str:
    """One line per workload and engine, a column per precision: median ms (ratio to torch eager at that precision)."""
    precisions = [p for p in PRECISIONS if any(r.precision == p for r in rows)]
    cells: dict[tuple, dict] = {}
    for r in _grouped(rows):
        cells.setdefault((r.workload, r.engine), {})[r.precision] = (
            "—" if r.median_ms is None else f"{r.median_ms:.3f} ({_num(r.ratio_vs_eager, '.2f', suffix='x')})"
        )
    lines = [
        "| workload | engine | " + " | ".join(f"{p} median ms (vs eager)" for p in precisions) + " |",
        "|---|---|" + "---:|" * len(precisions),
    ]
    for (workload, engine), by_precision in cells.items():
        lines.append(f"| {workload} | {engine} | " + " | ".join(by_precision.get(p, "") for p in precisions) + " |")
    return "\n".join(lines)


def format_largest_kernels(rows: list[Row]) -> str:
    lines = [
        "| workload | precision | engine | largest kernel (most FLOPs per call) | calls | GFLOP (all calls) | ms (all calls) "
        "| GFLOP/s | % of GEMM peak (row's precision) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in _grouped(rows):
        k = r.largest_kernel
        if k:
            lines.append(
                f"| {r.workload} | {r.precision} | {r.engine} | `{k['kernel']}` | {k['calls']} | {k['gflop']:.2f} | {k['ms']:.2f} | "
                f"{k['gflops']:.1f} | {100 * k['peak_fraction']:.1f}% |"
            )
    return "\n".join(lines)


def write_chart(rows: list[Row], path: Path) -> None:
    """A horizontal bar chart of latency relative to torch eager at the same precision (PIL, no plotting library)."""
    from PIL import Image, ImageDraw

    rows = [r for r in _grouped(rows) if r.ratio_vs_eager is not None and math.isfinite(r.ratio_vs_eager)]
    bar_h, left, width = 22, 380, 420
    img = Image.new("RGB", (left + width + 90, 40 + bar_h * len(rows) + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "latency relative to torch eager at the same precision (lower is faster; line = 1.0x)", fill="black")
    top = max([r.ratio_vs_eager for r in rows] + [1.0])
    scale = width / top
    for i, r in enumerate(rows):
        y = 40 + i * bar_h
        color = (46, 125, 50) if r.engine.startswith("TVM") else (120, 120, 120)
        draw.text((10, y + 4), f"{r.workload} {r.precision}: {r.engine}", fill="black")
        draw.rectangle([left, y + 3, left + r.ratio_vs_eager * scale, y + bar_h - 3], fill=color)
        draw.text((left + r.ratio_vs_eager * scale + 5, y + 4), f"{r.ratio_vs_eager:.2f}x", fill="black")
    x1 = left + scale
    draw.line([x1, 35, x1, 40 + bar_h * len(rows)], fill="red")
    img.save(path)


def _size_note(peak: dict, key: str) -> str:
    """' (at N³)' where a probe ran smaller than the SGEMM's size (too slow on this CPU)."""
    size = peak.get(key, peak["sgemm_size"])
    return "" if size == peak["sgemm_size"] else f" (at {size}³: too slow on this CPU for {peak['sgemm_size']}³)"


def _rounds_note(rows: list[Row]) -> str:
    rounds = {}
    for r in filter(lambda r: r.rounds, rows):  # an engine timed once (too slow for rounds) does not set the count
        rounds[r.workload] = max(rounds.get(r.workload, 0), r.rounds)
    return ", ".join(f"{w} {n}" for w, n in rounds.items()) or "none"


def write_results(rows: list[Row], peak: dict, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "bench.md"
    side_by_side = len({r.precision for r in rows}) > 1
    md.write_text(
        f"# autotune bench\n\nCommand: `{command}`\n\nMachine peak measured in the same run (torch matmul, "
        f"{peak['sgemm_size']}³): SGEMM {peak['sgemm_gflops']:.1f} GFLOP/s, bf16 GEMM {peak['bf16_gemm_gflops']:.1f} GFLOP/s"
        f"{_size_note(peak, 'bf16_gemm_size')}, int8 GEMM (`torch._int_mm`) {peak['int8_gemm_gops']:.1f} GOP/s"
        f"{_size_note(peak, 'int8_gemm_size')}; "
        f"copy bandwidth {peak['copy_gbs']:.1f} GB/s. Every engine takes the same float32 inputs and returns float32; "
        "a row's ratio is to torch eager at its precision, its % of peak to the GEMM peak at its precision "
        "(`--quantize` rows, and precisions whose peak is below SGEMM's: the SGEMM peak), its fidelity to float32 torch eager. "
        f"Interleaved rounds per workload: {_rounds_note(rows)}.\n\n"
        + (format_precisions_side_by_side(rows) + "\n\n" if side_by_side else "")
        + format_markdown(rows)
        + "\n\nEach TVM build profiled kernel by kernel (`CompiledModule.profile`), its largest kernel:\n\n"
        + format_largest_kernels(rows)
        + "\n\n![latency relative to torch eager](bench.png)\n"
    )
    (out_dir / "bench.json").write_text(json.dumps({"command": command, "peak": peak, "rows": [asdict(r) for r in rows]}, indent=2))
    write_chart(rows, out_dir / "bench.png")
    return md
