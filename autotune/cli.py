"""The `autotune` command line: import | tune | build | run | inspect | targets | models | demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import _threads

_threads.configure_threads()

from .errors import AutotuneError, InputError  # noqa: E402

DEFAULT_MODEL = "wan-i2v-tiny"
DEFAULT_LOG = "logs"
DEFAULT_OUT = "out"


def _console():
    from rich.console import Console

    return Console(highlight=False)


class Steps:
    """Numbered steps in the log: `[2/4] tune ...`."""

    def __init__(self, total: int):
        self.total = total
        self.n = 0
        self.console = _console()

    def __call__(self, text: str):
        self.n += 1
        self.console.print(f"[bold cyan][{self.n}/{self.total}][/] {text}")


# ---------------------------------------------------------------- shared options
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a zoo model (see `autotune models`; default {DEFAULT_MODEL}, seeded random weights), a benchmark "
        "workload (dit-block, vae-up-block, tiny-transformer, ...: see `autotune bench --help`) or a model file: .onnx, or .pt2 (torch.export.save; an ExportedProgram file is code: load only files you trust)",
    )
    g.add_argument(
        "--component",
        default="transformer",
        help="which compile unit of a zoo model: transformer (one denoising step), vae_encoder, vae_decoder, image_encoder",
    )
    g.add_argument("--weights", help="local diffusers-format checkpoint directory (transformer/, vae/, image_encoder/)")
    g.add_argument("--height", type=int, help="video height in pixels (multiple of 16; default: the model's)")
    g.add_argument("--width", type=int, help="video width in pixels (multiple of 16)")
    g.add_argument("--frames", type=int, help="video frames (4k+1)")


def _add_target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="x86",
        help="target preset (see `autotune targets`: x86, x86-avx512, arm, aarch64-dotprod, cuda-sm90, ...) "
        "or a TVM target dict as JSON. Default: x86 (this machine's CPU)",
    )


def _add_log_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--log", default=DEFAULT_LOG, help=help_text)


def _load(args):
    """Import the model; prune it first when --prune is given. Returns (source, prune info or None)."""
    from .sources import load_source

    source = load_source(args.model, args.component, args.weights, args.height, args.width, args.frames)
    if getattr(args, "prune", None):
        from .prune import prune

        source, info = prune(source, args.prune)
        return source, info
    return source, None


def _add_pass_args(p: argparse.ArgumentParser) -> None:
    from .quantize import MODES

    g = p.add_argument_group("passes (tune and build must be given the same ones, so the log matches)")
    g.add_argument("--quantize", choices=list(MODES), help="; ".join(f"{name}: {cls.description}" for name, cls in MODES.items()))
    g.add_argument("--prune", help="structured pruning of the torch model, kept fractions: e.g. ffn=0.75,heads=0.5")


def _artifact_path(out: str, source, target_name: str) -> Path:
    return Path(out) / f"{source.model_name}-{target_name}" / f"{source.name}.so"


# ---------------------------------------------------------------- commands
def cmd_models(args) -> int:
    from rich.table import Table

    from .models import list_models

    table = Table(title="models (autotune --model NAME --component C)")
    for col in ("model", "component", "params", "GFLOP/call", "inputs", "shapes"):
        table.add_column(col)
    for spec in list_models():
        for name in spec.component_names:
            comp = spec.component(name)
            inputs = ", ".join(f"{k}{list(v[0])}" for k, v in comp.input_specs.items())
            info = ", ".join(f"{k}={v}" for k, v in comp.shape_info.items())
            table.add_row(spec.name, name, f"{comp.param_count() / 1e6:,.1f} M", f"{comp.flops() / 1e9:,.2f}", inputs, info)
    _console().print(table)
    return 0


def cmd_targets(args) -> int:
    from rich.table import Table

    from .targets import list_presets

    table = Table(title="targets (--target NAME, or a TVM target dict as JSON)")
    for col in ("name", "device", "TVM target", "cross compiler", "needs", "description"):
        table.add_column(col)
    for p in list_presets():
        table.add_row(p.name, p.device, json.dumps(p.resolved_target_dict()), p.cross_compiler or "-", p.needs, p.description)
    _console().print(table)
    return 0


def cmd_import(args) -> int:
    from .lowering import fuse_for_target, prim_funcs
    from .targets import resolve_target

    steps = Steps(2)
    steps(f"import {args.model} ({args.component})")
    source, _ = _load(args)
    print(source.imported.summary())
    steps(f"fuse for {args.target}")
    preset = resolve_target(args.target)
    fused = fuse_for_target(source.imported.mod, preset.tvm_target())
    print(f"{len(prim_funcs(fused))} kernels (tuning tasks before deduplication)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(source.imported.mod.script())
        print(f"Relax module written to {args.output}")
    return 0


def cmd_tune(args) -> int:
    from .settings import TuneSettings
    from .tune import tune

    settings = TuneSettings(
        trials=args.trials,
        trials_per_task=args.trials_per_task,
        trials_per_iter=args.trials_per_iter,
        run_timeout_s=args.run_timeout,
        build_timeout_s=args.build_timeout,
        quantize=args.quantize,
        rpc=args.rpc,
        rpc_key=args.key,
    )
    steps = Steps(2)
    steps(f"import {args.model} ({args.component})")
    source, _ = _load(args)
    print(source.imported.summary())
    steps(f"tune for {args.target}: {args.trials} new trials into {args.log}")
    print(settings)
    try:
        report = tune(source.imported, args.target, args.log, settings)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every record measured so far is in {args.log}; run the same command to resume")
        return 130
    for problem in report.log_problems:
        print(f"warning: skipped {problem}")
    print(report.summary())
    return 0


def _build_one(source, target, out: str, log: str | None, settings, extra: dict | None = None):
    from .build import build

    path = _artifact_path(out, source, _target_name(target))
    metadata = {"model": source.label, **(extra or {})}
    return build(source.imported, target, path, log_dir=log, settings=settings, extra_metadata=metadata)


def _report_fidelity(source, report) -> dict | None:
    """Run the artifact on the example inputs against the fp32 torch reference; store it in the metadata."""
    import json

    from .fidelity import compare, format_fidelity
    from .runtime import load

    reference = source.reference_outputs()
    if reference is None:
        return None
    outs = load(report.paths.library)(**source.example_inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    peak = 2.0 if source.name == "vae_decoder" else None  # frames in [-1, 1]
    fidelity = compare(outs[0], reference[0], peak=peak)
    print(f"fidelity vs fp32 torch: {format_fidelity(fidelity)}")
    meta = json.loads(report.paths.metadata.read_text())
    meta["fidelity"] = fidelity
    report.paths.metadata.write_text(json.dumps(meta, indent=2) + "\n")
    return fidelity


def _target_name(target: str) -> str:
    return target if not target.strip().startswith("{") else "custom"


def cmd_build(args) -> int:
    from .settings import BuildSettings

    settings = BuildSettings(quantize=args.quantize, prune=args.prune)
    steps = Steps(3)
    steps(f"import {args.model} ({args.component})")
    source, prune_info = _load(args)
    print(source.imported.summary())
    steps(f"build for {args.target} with log {args.log}")
    print(settings)
    report = _build_one(source, args.target, args.output, args.log, settings, {"prune": prune_info} if prune_info else None)
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    meta = json.loads(report.paths.metadata.read_text())
    before, after = meta["weight_bytes"]["before"], meta["weight_bytes"]["after"]
    print(f"weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({before / max(after, 1):.2f}x smaller)")
    steps("fidelity against the fp32 torch reference on the example inputs")
    if args.quantize or args.prune:
        if _report_fidelity(source, report) is None:
            print("no torch reference for a model file: fidelity not measured")
    else:
        print("no quantization or pruning: the build is fp32 (checked by the test suite, not here)")
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from .runtime import load

    module = load(args.artifact, device=args.device, check_finite=args.check_finite)
    print(module)
    if args.inputs:
        with np.load(args.inputs) as data:
            inputs = {k: data[k] for k in data.files}
    else:
        inputs = module.random_inputs()
    outputs = module(**inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for spec, out in zip(module.outputs, outputs):
        print(f"{spec.name}: {out.dtype}{list(out.shape)} mean {float(np.mean(out)):.6g} std {float(np.std(out)):.6g}")
    if args.save:
        np.savez(args.save, **{s.name: o for s, o in zip(module.outputs, outputs)})
        print(f"outputs saved to {args.save}")
    timing = module.benchmark(inputs, repeat=args.repeat)
    print(f"latency: median {timing['median_ms']:.3f} ms (min {timing['min_ms']:.3f}, max {timing['max_ms']:.3f}) over {args.repeat} runs")
    if args.profile:
        print(module.profile(inputs, repeat=max(1, min(args.repeat, 5))).format(top=args.profile))
    return 0


def cmd_merge(args) -> int:
    from .tuning_log import merge_log

    for src in args.sources:
        if not Path(src).is_dir():
            raise InputError(f"{src}: not a tuning log directory (expected workloads.jsonl and records.jsonl in it)")
        report = merge_log(src, args.log)
        print(f"{src} -> {args.log}: {report.summary()}")
        for problem in report.problems:
            print(f"  skipped {problem}")
    return 0


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if path.is_dir():
        from .targets import resolve_target
        from .tuning_log import read_log

        target = resolve_target(args.target).tvm_target() if args.target else None
        report, _ = read_log(path, target)
        print(f"{path}: {report.summary()}")
        for problem in report.problems:
            print(f"  skipped {problem}")
        return 0
    from .artifact import ArtifactPaths, read_metadata

    print(json.dumps(read_metadata(ArtifactPaths.for_library(path)), indent=2))
    return 0


def cmd_bench(args) -> int:
    from .bench import TVM, OnnxRuntime, TorchCompile, TorchEager, run_bench, write_results

    engines = [TorchEager()]
    if not args.no_compile:
        engines.append(TorchCompile())
    engines += [OnnxRuntime(), TVM()]
    if args.log and Path(args.log).exists():
        engines.append(TVM(log=args.log))
        for mode in args.quantize or []:
            engines.append(TVM(log=args.log, quantize=mode, label=f"TVM tuned + {mode}"))
    else:
        print(f"note: no tuning log at {args.log}: only the untuned TVM build is measured")
        for mode in args.quantize or []:
            engines.append(TVM(quantize=mode, label=f"TVM untuned + {mode}"))
    rows, peak = run_bench(args.workloads.split(","), engines, rounds=args.rounds)
    command = "autotune bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "autotune bench"
    path = write_results(rows, peak, Path(args.output), command)
    print(f"results: {path} (+ bench.json, bench.png)")
    return 0


def cmd_rpc(args) -> int:
    from .remote import main as rpc_main

    return rpc_main(args.rpc_args)


def cmd_demo(args) -> int:
    """Tune briefly, build untuned and tuned, compare both with torch and with each other."""
    import numpy as np

    from .runtime import load
    from .settings import BuildSettings, TuneSettings
    from .tune import tune

    steps = Steps(5)
    started = time.time()
    steps(f"import {args.model} ({args.component}) from torch")
    source, _ = _load(args)
    print(source.imported.summary())
    reference = source.reference_outputs()
    steps(f"build untuned (fallback schedules) for {args.target}")
    untuned = _build_one(source, args.target, str(Path(args.output) / "untuned"), None, BuildSettings())
    print(untuned.summary())
    steps(f"tune {args.trials} trials for {args.target} into {args.log}")
    report = tune(source.imported, args.target, args.log, TuneSettings(trials=args.trials))
    print(report.summary())
    steps("build with the tuning log")
    tuned = _build_one(source, args.target, args.output, args.log, BuildSettings())
    for note in tuned.notes:
        print(f"note: {note}")
    print(tuned.summary())
    steps("run both, compare with torch eager")
    rows = []
    for label, built in (("untuned", untuned), ("tuned", tuned)):
        module = load(built.paths.library)
        outs = module(**source.example_inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        err = max(float(np.max(np.abs(o - r))) for o, r in zip(outs, reference)) if reference else float("nan")
        timing = module.benchmark(source.example_inputs, repeat=args.repeat)
        rows.append((label, timing["median_ms"], err))
    for label, ms, err in rows:
        print(f"{label:>8}: {ms:9.3f} ms   max |error| vs torch {err:.2e}")
    speedup = rows[0][1] / rows[1][1]
    print(f"tuned vs untuned speed-up: {speedup:.2f}x   (artifact: {tuned.paths.library}; total {time.time() - started:.0f} s)")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotune",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hardware-aware auto-tuning for image-to-video diffusion models: import a model into TVM Relax, "
        "tune it with MetaSchedule (XGBoost cost model) for a target, build a shippable .so, run it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo with parameter counts, FLOPs and shapes")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("targets", help="list target presets")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("import", help="import a model into Relax and report its signature and kernels")
    _add_model_args(p)
    _add_target_arg(p)
    p.add_argument("-o", "--output", help="write the imported Relax module (TVMScript) to this file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "tune",
        help="search schedules with MetaSchedule; records are appended to the log as measured (Ctrl-C safe, resumable)",
        description="Tune every kernel of the model for a target. Each measured candidate is appended to LOG at once; "
        "an interrupted run loses at most the batch in flight, and re-running the same command resumes from the log, "
        "spending only the new --trials.",
    )
    _add_model_args(p)
    _add_target_arg(p)
    _add_log_arg(p, f"tuning log directory, created if missing and appended to (default {DEFAULT_LOG}/)")
    _add_pass_args(p)
    p.add_argument("--trials", type=int, default=64, help="new measured candidates in this run, all kernels together (default 64)")
    p.add_argument("--trials-per-task", type=int, help="cap per kernel (default: twice an even share)")
    p.add_argument("--trials-per-iter", type=int, default=16, help="candidates measured per batch (default 16)")
    p.add_argument("--run-timeout", type=float, default=10.0, help="seconds one candidate's measurement may take (default 10)")
    p.add_argument("--build-timeout", type=float, default=60.0, help="seconds one candidate's compilation may take (default 60)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on devices registered with this TVM RPC tracker")
    p.add_argument("--key", help="device key on the RPC tracker (with --rpc)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "build",
        help="apply the tuning log, compile, and export NAME.so + NAME.weights.safetensors + NAME.json",
        description="Build an artifact. Kernels with a record in --log get their best schedule; the rest get a "
        "fallback schedule. Weights are saved beside the library, never baked into it.",
    )
    _add_model_args(p)
    _add_target_arg(p)
    _add_log_arg(p, f"tuning log directory to apply (default {DEFAULT_LOG}/; missing: build untuned)")
    p.add_argument("-o", "--output", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/); the artifact goes to OUT/MODEL-TARGET/COMPONENT.so")
    _add_pass_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="load an artifact, run it once on inputs, time it")
    p.add_argument("artifact", help="the artifact's .so (its .weights.safetensors and .json beside it)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--inputs", help=".npz file with one array per input name (default: random inputs)")
    p.add_argument("--save", help="save the outputs to this .npz file")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--check-finite", action="store_true", help="reject inputs containing NaN or Inf")
    p.add_argument("--profile", type=int, nargs="?", const=15, metavar="N",
                   help="also time each kernel and print the N slowest (default 15) with GFLOP/s")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "merge",
        help="append the records of other tuning logs to a log",
        description="Copy into --log the records (and workloads) of each SRC log that it lacks, e.g. logs tuned "
        "on separate machines of one kind, or a kernel tuned alone. Safe while --log is being tuned into.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="tuning log directories to read")
    _add_log_arg(p, f"tuning log directory to append to (default {DEFAULT_LOG}/)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="show an artifact's metadata, or summarise a tuning log directory")
    p.add_argument("path", help="an artifact .so/.json, or a log directory")
    p.add_argument("--target", help="with a log directory: count only records for this target")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "bench",
        help="torch eager / torch.compile / ONNX Runtime / TVM untuned / TVM tuned (+quantized) side by side",
        description="Measure every engine on the same inputs and threads, interleaved, in one run; report median "
        "latency, ratio to torch eager, GFLOP/s, fraction of the SGEMM peak measured in the same run, and fidelity. "
        "Writes OUT/bench.md, bench.json and bench.png.",
    )
    p.add_argument("--workloads", default="tiny-transformer,tiny-vae-decoder,tiny-image-encoder",
                   help="comma-separated: tiny-transformer, tiny-vae-decoder, tiny-image-encoder, dit-block, vae-up-block")
    p.add_argument("--log", default="schedules/x86", help="tuning log for the tuned builds (default: the shipped schedules/x86)")
    p.add_argument("--quantize", action="append", help="also measure TVM tuned + this mode (repeatable)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes on big workloads)")
    p.add_argument("-o", "--output", default="tools/results", help="directory for bench.md/json/png (default tools/results)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "rpc",
        help="TVM RPC for measuring on remote devices: rpc tracker | rpc server --tracker H:P --key K | rpc status",
        description="Remote measurement with TVM's own RPC. On the machine you tune from: `autotune rpc tracker`. On "
        "each device (a GPU box, an ARM board with an aarch64 TVM): `autotune rpc server --tracker HOST:9190 --key K`. "
        "Then `autotune tune --target T --rpc HOST:9190 --key K` builds here and measures on every free device under K.",
    )
    p.add_argument("rpc_args", nargs=argparse.REMAINDER, help="tracker [--host --port] | server --tracker HOST:PORT --key K [--host --port --custom-addr] | status --tracker HOST:PORT")
    p.set_defaults(func=cmd_rpc)

    from .pipeline_cli import add_generate_parser

    add_generate_parser(sub)

    p = sub.add_parser(
        "demo",
        help="the main job on the embedded default: tune briefly, build, run, report speed-up and error vs torch",
    )
    _add_model_args(p)
    _add_target_arg(p)
    _add_log_arg(p, f"tuning log directory (default {DEFAULT_LOG}/)")
    p.add_argument("-o", "--output", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    p.add_argument("--trials", type=int, default=128, help="tuning trials (default 128)")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per build (default 30)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        # Engines take turns in one process: an OpenMP pool that spins after its call (torch's
        # default) steals the cores from the next engine. Make every pool sleep when idle.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return args.func(args)
    except AutotuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
