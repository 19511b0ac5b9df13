"""`autotune targets`: the target presets."""

from __future__ import annotations

import json

from .common import add_json_arg, print_json, print_listing


def add_parser(sub) -> None:
    p = sub.add_parser("targets", help="list target presets")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.support.targets import list_presets

    rows = [
        {
            "name": p.name,
            "family": p.family,
            "device": p.device,
            "target": p.target,  # placeholders ($host_cpu, $host_mattr, $cuda_arch) are filled in on use
            "host": p.host,
            "cross_compiler": p.cross_compiler,
            "needs": p.needs,
            "description": p.description,
        }
        for p in list_presets()
    ]
    if args.json:
        print_json(rows)
        return 0
    print("targets (--target NAME, or a TVM target dict as JSON; $host_cpu, $host_mattr (from /proc/cpuinfo flags), $host_cores, $cuda_arch are detected on use)")
    text = [{**r, "target": json.dumps(r["target"]), "cross compiler": r["cross_compiler"] or "-"} for r in rows]
    print_listing(text, columns=["name", "device", "cross compiler", "description"], details=["target", "needs"])
    return 0
