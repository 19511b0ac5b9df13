"""`autotune rpc`."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rpc",
        help="TVM RPC for measuring on remote devices: rpc tracker | rpc server --tracker H:P --key K | rpc status",
        description="Remote measurement with TVM's own RPC. On the machine you tune from: `autotune rpc tracker`. On "
        "each device (a GPU box, an ARM board with an aarch64 TVM): `autotune rpc server --tracker HOST:9190 --key K`. "
        "Then `autotune tune --target T --rpc HOST:9190 --key K` builds here and measures on every free device under K.",
    )
    p.add_argument("rpc_args", nargs=argparse.REMAINDER, help="tracker [--host --port] | server --tracker HOST:PORT --key K [--host --port --custom-addr] | status --tracker HOST:PORT")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.tuning.remote import main as rpc_main

    return rpc_main(args.rpc_args)
