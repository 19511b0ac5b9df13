"""Measure tuning candidates on other machines: TVM's RPC tracker and servers, and a runner on them.

    autotune rpc tracker --host 0.0.0.0 --port 9190              # anywhere both sides can reach
    autotune rpc server --tracker HOST:9190 --key gpu            # on each device (GPU box, ARM board)
    autotune tune --target cuda-sm90 --rpc HOST:9190 --key gpu   # here: build locally, measure there

Candidates are built here (MetaSchedule's LocalBuilder with autotune's lean build function) and
shipped to a free server under the key, which loads and times them. The server needs only TVM
(and, for MetaSchedule's default `.tar` artifacts, a C++ compiler to link them). These are TVM's
own tracker, server and `RPCRunner`; this module only wires them to autotune's settings.
TVM RPC runs arbitrary code sent to it: keep servers on a trusted network.

`python -m autotune.tuning.remote tracker|server|status ...` runs the same functions without the CLI.
"""

from __future__ import annotations

import math
import time

from autotune.support.errors import TuningFailed

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090
PORT_SEARCH = 100  # ports tried upward from the requested one when it is taken


def parse_address(address: str, default_port: int = DEFAULT_TRACKER_PORT) -> tuple[str, int]:
    """"HOST:PORT" (or "HOST") -> (host, port)."""
    address = address.strip()
    if not address:
        raise ValueError("empty address; expected HOST:PORT")
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    if not port.isdigit() or not host:
        raise ValueError(f"'{address}' is not HOST:PORT")
    return host.strip("[]"), int(port)


# -- tracker and servers ----------------------------------------------------------------------
def start_tracker(host: str = "0.0.0.0", port: int = DEFAULT_TRACKER_PORT, port_end: int | None = None, silent: bool = False):
    """Start TVM's RPC tracker in a child process; returns it (`.host`, `.port`, `.terminate()`).

    It binds the first free port in [port, port_end) (port_end defaults to port + 100).
    """
    from tvm.rpc.tracker import Tracker

    return Tracker(host=host, port=port, port_end=port_end or port + PORT_SEARCH, silent=silent)


def start_server(
    tracker_addr: str | tuple[str, int],
    key: str,
    host: str = "0.0.0.0",
    port: int = DEFAULT_SERVER_PORT,
    port_end: int | None = None,
    load_library: str | None = None,
    custom_addr: str | None = None,
    silent: bool = False,
):
    """Start TVM's RPC server in a child process, registered with the tracker under `key`.

    `custom_addr` is the address the tracker hands to clients (set it when this machine is
    reached by another name than the one it connects from). Returns the server (`.port`,
    `.terminate()`).
    """
    from tvm import rpc

    if not key:
        raise ValueError("an RPC server needs a key (e.g. 'gpu', 'arm'): tune finds servers by key")
    if isinstance(tracker_addr, str):
        tracker_addr = parse_address(tracker_addr)
    return rpc.Server(
        host=host,
        port=port,
        port_end=port_end or port + PORT_SEARCH,
        key=key,
        tracker_addr=tuple(tracker_addr),
        load_library=load_library,
        custom_addr=custom_addr,
        silent=silent,
    )


def wait_forever(handle) -> None:
    """Block until the tracker/server child exits (Ctrl-C stops it)."""
    try:
        while handle.proc is not None and handle.proc.is_alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            handle.terminate()
        except ConnectionError:  # the child is already gone (a signal to the whole process group)
            pass


def tracker_summary(tracker: str | tuple[str, int], timeout_s: float = 10.0) -> dict:
    """TVM tracker summary: {"queue_info": {key: {"free", "pending"}}, "server_info": [...]}."""
    import socket
    import threading

    from tvm import rpc

    host, port = parse_address(tracker) if isinstance(tracker, str) else tracker
    box: dict = {}
    try:  # fail fast: TVM's client retries a refused connection for a minute
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        box["error"] = exc

    def query():
        try:
            box["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as exc:  # noqa: BLE001 - reported below
            box["error"] = exc

    if "error" not in box:
        thread = threading.Thread(target=query, daemon=True)
        thread.start()
        thread.join(timeout_s)
    if "summary" not in box:
        reason = box.get("error", f"no answer within {timeout_s:.0f} s")
        raise TuningFailed(
            f"cannot reach the RPC tracker at {host}:{port}: {reason}. Start one with `autotune rpc tracker "
            f"--port {port}` and check the address (`--rpc HOST:PORT`)."
        )
    return box["summary"]


def server_counts(tracker: str | tuple[str, int], key: str, timeout_s: float = 10.0) -> tuple[int, int]:
    """(free, registered) servers under `key`."""
    summary = tracker_summary(tracker, timeout_s)
    free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    registered = sum(1 for s in summary.get("server_info", []) if s.get("key", "").split(":", 1)[-1] == key)
    return free, registered


def wait_for_servers(tracker, key: str, count: int, timeout_s: float = 60.0) -> int:
    """Poll the tracker until `count` servers are free under `key`; the number free."""
    deadline = time.time() + timeout_s
    while True:
        free, _ = server_counts(tracker, key)
        if free >= count or time.time() > deadline:
            return free
        time.sleep(0.5)


# -- the MetaSchedule runner ----------------------------------------------------------------------
def session_timeout_s(settings) -> int:
    """One RPC session uploads, loads and times one candidate: a bound on all of that."""
    return int(math.ceil(2 * settings.run_timeout_s + 10))


def make_rpc_runner(settings, evaluator_config):
    """An `RPCRunner` measuring on the servers registered under `settings.rpc_key` at `settings.rpc`.

    One worker per free server (so every server measures at once); a candidate whose server
    dies or times out comes back as a failed measurement and the run goes on.
    """
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    if not settings.rpc_key:
        raise TuningFailed(
            f"--rpc {settings.rpc} needs --key: the key the RPC servers registered with "
            "(`autotune rpc server --key KEY`)"
        )
    try:
        host, port = parse_address(settings.rpc)
    except ValueError as exc:
        raise TuningFailed(f"--rpc: {exc}") from exc
    free, registered = server_counts((host, port), settings.rpc_key)
    if registered == 0:
        raise TuningFailed(
            f"the RPC tracker at {host}:{port} has no server registered under key '{settings.rpc_key}'. On the "
            f"device run `autotune rpc server --tracker {host}:{port} --key {settings.rpc_key}`; "
            f"`autotune rpc status --tracker {host}:{port}` lists what is registered."
        )
    config = RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=settings.rpc_key,
        session_priority=1,
        session_timeout_sec=session_timeout_s(settings),
    )
    # One worker per free server; when all are busy (another tuning run) requests queue at the tracker.
    return RPCRunner(rpc_config=config, evaluator_config=evaluator_config, max_workers=free or registered)
