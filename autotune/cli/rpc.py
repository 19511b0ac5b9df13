"""`autotune rpc`: a TVM RPC tracker, a device server registered with it, or the tracker's status."""

from __future__ import annotations

import json
import logging
import signal
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rpc",
        help="TVM RPC for measuring on remote devices: rpc tracker | rpc server --tracker H:P --key K | rpc status",
        description="Remote measurement with TVM's own RPC. On the machine you tune from: `autotune rpc tracker`. On "
        "each device (a GPU box, an ARM board with an aarch64 TVM): `autotune rpc server --tracker HOST:9190 --key K`. "
        "Then `autotune tune --target T --rpc HOST:9190 --key K` builds here and measures on every free device under K.",
    )
    from autotune.tuning.remote import DEFAULT_SERVER_PORT, DEFAULT_TRACKER_PORT

    rpc = p.add_subparsers(dest="rpc_command", required=True, metavar="ROLE")
    t = rpc.add_parser("tracker", help="run an RPC tracker")
    t.add_argument("--host", default="0.0.0.0")
    t.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT, help=f"(default {DEFAULT_TRACKER_PORT})")
    s = rpc.add_parser("server", help="run an RPC server registered with a tracker")
    s.add_argument("--tracker", required=True, help="HOST:PORT of the tracker")
    s.add_argument("--key", required=True, help="the device key tuning asks for (--key of autotune tune)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_SERVER_PORT, help=f"(default {DEFAULT_SERVER_PORT})")
    s.add_argument("--custom-addr", default=None, help="the address the tracker hands out for this server")
    q = rpc.add_parser("status", help="servers registered with a tracker")
    q.add_argument("--tracker", required=True, help="HOST:PORT of the tracker")
    p.set_defaults(func=run)


def run(args) -> int:
    from autotune.tuning.remote import (
        start_server,
        start_tracker,
        tracker_summary,
        wait_forever,
    )

    def on_sigterm(*_):
        raise KeyboardInterrupt  # so wait_forever terminates the tracker/server child process

    logging.basicConfig(level=logging.INFO)  # TVM's tracker and server report connections and loads at INFO
    signal.signal(signal.SIGTERM, on_sigterm)
    if args.rpc_command == "tracker":
        handle = start_tracker(args.host, args.port)
        print(f"tracker listening on {args.host}:{handle.port}", flush=True)
        wait_forever(handle)
    elif args.rpc_command == "server":
        handle = start_server(args.tracker, args.key, args.host, args.port, custom_addr=args.custom_addr)
        print(f"server on port {handle.port} registered with {args.tracker} under key '{args.key}'", flush=True)
        wait_forever(handle)
    else:
        json.dump(tracker_summary(args.tracker), sys.stdout, indent=2)
        print()
    return 0
