"""What the commands share: the console, numbered steps, the model / target / log / pass options,
loading a model source, and building one artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autotune.support import defaults


def console():
    from rich.console import Console

    return Console(highlight=False)


class Steps:
    """Numbered steps in the log: `[2/4] tune ...`."""

    def __init__(self, total: int):
        self.total = total
        self.n = 0
        self.console = console()

    def __call__(self, text: str):
        self.n += 1
        self.console.print(f"[bold cyan][{self.n}/{self.total}][/] {text}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=defaults.MODEL,
        help=f"a zoo model (see `autotune models`; default {defaults.MODEL}, seeded random weights), a benchmark "
        "workload (dit-block, vae-up-block, tiny-transformer, ...: see `autotune bench --help`) or a model file: .onnx, or .pt2 (torch.export.save; an ExportedProgram file is code: load only files you trust)",
    )
    g.add_argument(
        "--component",
        default=defaults.COMPONENT,
        help="which compile unit of a zoo model: transformer (one denoising step), vae-encoder, vae-decoder, "
        "image-encoder (vae_decoder etc. work too)",
    )
    g.add_argument("--weights", help="local diffusers-format checkpoint directory (transformer/, vae/, image_encoder/)")
    g.add_argument("--height", type=int, help="video height in pixels (multiple of 16; default: the model's)")
    g.add_argument("--width", type=int, help="video width in pixels (multiple of 16)")
    g.add_argument("--frames", type=int, help="video frames (4k+1)")


def add_target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=defaults.TARGET,
        help="target preset (see `autotune targets`: x86, x86-avx512, arm, aarch64-dotprod, cuda-sm90, ...) "
        f"or a TVM target dict as JSON. Default: {defaults.TARGET} (this machine's CPU)",
    )


def add_log_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--log", default=defaults.LOG_DIR, help=help_text)


def load_model_source(args):
    """Import the model; prune it first when --prune is given. Returns (source, prune info or None).

    A Wan transformer is imported block-wise (prologue, one block, epilogue), except when pruned:
    pruning gives each layer its own widths, so the layers no longer share one compiled block."""
    from autotune.frontend.blockwise import load_component
    from autotune.frontend.prune import prune
    from autotune.frontend.sources import load_source

    where = (args.model, args.component, args.weights, args.height, args.width, args.frames)
    if not getattr(args, "prune", None):
        return load_component(*where), None
    return prune(load_source(*where), args.prune)


def _precision_mode(text: str) -> str | None:
    """--precision NAME -> the --quantize mode it means (fp32: none)."""
    modes = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}
    if text not in modes:
        raise argparse.ArgumentTypeError(f"'{text}' is not a precision: choose from {', '.join(modes)}")
    return modes[text]


def add_pass_args(p: argparse.ArgumentParser) -> None:
    from autotune.passes.quantize import MODES

    g = p.add_argument_group("passes (tune and build must be given the same ones, so the log matches)")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument(
        "--precision", dest="quantize", type=_precision_mode, metavar="{fp32,bf16,fp16}",
        help="compute precision (default fp32). bf16 is --quantize bf16: bfloat16 weights and matmuls, on the "
        "CPU's matrix engine (AMX-BF16, AVX512-BF16; on AVX2 CPUs float32 FMA on bf16 widened in the kernel) where the "
        "target has one",
    )
    precision.add_argument("--quantize", choices=list(MODES), help="; ".join(f"{name}: {cls.description}" for name, cls in MODES.items()))
    g.add_argument("--prune", help="structured pruning of the torch model, kept fractions: e.g. ffn=0.75,heads=0.5")
    g.add_argument(
        "--no-winograd", dest="winograd", action="store_false",
        help="keep 3x3 convolutions direct (or im2col GEMMs on a matrix engine) instead of Winograd GEMMs: slower "
        "on CPUs, but their weights ship at their own size (Winograd's transformed weights are 4x a 3x3 weight in "
        "float32, 16/9x at bf16 and int8)",
    )


def tune_command(args, kernels: int) -> str:
    """The `autotune tune` command that gives the kernels a build found no record for one: the same
    model, target, passes and log as the build's `args`, about 32 trials per kernel."""
    import shlex

    words = ["autotune", "tune", "--model", args.model]
    if args.component != defaults.COMPONENT:
        words += ["--component", args.component]
    for flag in ("weights", "height", "width", "frames", "quantize", "prune"):
        if getattr(args, flag, None) is not None:
            words += [f"--{flag}", str(getattr(args, flag))]
    if not getattr(args, "winograd", True):
        words += ["--no-winograd"]
    words += ["--target", args.target, "--log", args.log, "--trials", str(32 * kernels)]
    return shlex.join(words)


def artifact_path(out: str, source, target_name: str) -> Path:
    return Path(out) / f"{source.model_name}-{target_name}" / f"{source.name}.so"


def build_one(source, target, out: str, log: str | None, settings, extra: dict | None = None):
    """Build `source` (a ModelSource, or a BlockwiseSource: a block-wise artifact) into OUT."""
    from autotune.build.blockwise import build_source

    path = artifact_path(out, source, target_name(target))
    return build_source(source, target, path, log, settings, {"model": source.label, **(extra or {})})


def report_fidelity(source, report) -> dict | None:
    """Run the artifact on the example inputs against the fp32 torch reference; store it in the metadata."""
    from autotune.runtime.loader import load
    from autotune.support.fidelity import compare, format_fidelity

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


def target_name(target: str) -> str:
    return target if not target.strip().startswith("{") else "custom"


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON (for scripts)")


def print_listing(rows: list[dict], columns: list[str], details: list[str]) -> None:
    """One line per row with `columns` aligned, then each of `details` on its own indented line.

    Nothing is cut or wrapped: `autotune targets | grep NAME` finds whole names at any width."""
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
        for name in details:
            if row.get(name):
                print(f"    {name}: {row[name]}")


def print_json(value) -> None:
    print(json.dumps(value, indent=2))
