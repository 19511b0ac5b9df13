"""`autotune import`."""

from __future__ import annotations

from pathlib import Path

from .common import Steps, add_model_args, add_target_arg, load_model_source


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="import a model into Relax and report its signature and kernels")
    add_model_args(p)
    add_target_arg(p)
    p.add_argument("-o", "--output", help="write the imported Relax module (TVMScript) to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.passes.pipeline import fuse_for_target
    from autotune.support.ir import prim_funcs
    from autotune.support.targets import resolve_target

    preset = resolve_target(args.target)  # a bad --target fails before the import
    steps = Steps(2)
    steps(f"import {args.model} ({args.component})")
    source, _ = load_model_source(args)
    print(source.summary())
    steps(f"fuse for {args.target}")
    scripts = []
    for unit, calls in source.tune_units():
        fused = fuse_for_target(unit.mod, preset.tvm_target())
        print(f"{unit.source}: {len(prim_funcs(fused))} kernels (tuning tasks before deduplication), run {calls}x per call")
        scripts.append(f"# {unit.source}\n{unit.mod.script()}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n\n".join(scripts))
        print(f"Relax module written to {args.output}")
    return 0
