"""`autotune models`: the model zoo."""

from __future__ import annotations

from .common import add_json_arg, print_json, print_listing


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter counts, FLOPs and shapes")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.models import list_models

    rows = []
    for spec in list_models():
        for name in spec.component_names:
            comp = spec.component(name)
            rows.append({
                "model": spec.name,
                "component": name,
                "params": comp.param_count(),
                "flops_per_call": comp.flops(),
                "inputs": {k: {"shape": list(v[0]), "dtype": str(v[1]).replace("torch.", "")} for k, v in comp.input_specs.items()},
                "shapes": dict(comp.shape_info),
            })
    if args.json:
        print_json(rows)
        return 0
    print("models (autotune --model MODEL --component COMPONENT)")
    print_listing(
        [
            {
                **r,
                "params": f"{r['params'] / 1e6:,.1f} M",
                "GFLOP/call": f"{r['flops_per_call'] / 1e9:,.2f}",
                "inputs": ", ".join(f"{k}{v['shape']}" for k, v in r["inputs"].items()),
                "shapes": ", ".join(f"{k}={v}" for k, v in r["shapes"].items()),
            }
            for r in rows
        ],
        columns=["model", "component", "params", "GFLOP/call"],
        details=["inputs", "shapes"],
    )
    return 0
