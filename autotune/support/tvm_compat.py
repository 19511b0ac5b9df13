"""Work-arounds for TVM 0.27 behaviour that is slow or wrong, applied from one place."""

from __future__ import annotations

import inspect
import linecache
import sys


def import_tensor_intrin_fast() -> None:
    """Import tvm.s_tir.tensor_intrin (MetaSchedule imports it on first use) in ~3 s, not ~75 s.

    TVMScript's @T.prim_func calls inspect.stack(), whose inspect.getmodule scans all of
    sys.modules for every "<frozen importlib>" frame; with torch and diffusers loaded that made
    the import of its ~250 intrinsics take ~75 s here (26 s in a bare process). The same frames,
    with source lines from linecache, come back in milliseconds.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def fast_stack(context=1):
        frame, out = sys._getframe(1), []
        while frame is not None:
            fn = frame.f_code.co_filename
            line = linecache.getline(fn, frame.f_lineno) if context and not fn.startswith("<") else ""
            out.append(
                inspect.FrameInfo(frame, fn, frame.f_lineno, frame.f_code.co_name, [line] if line else None, 0 if line else None)
            )
            frame = frame.f_back
        return out

    original, inspect.stack = inspect.stack, fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original
