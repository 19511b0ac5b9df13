"""Thread count for TVM's runtime, set before `tvm` is first imported.

TVM reads TVM_NUM_THREADS once, at import; without it the runtime ran a single thread on
2-core machines. Every autotune entry point imports this module first.
"""

import os


def physical_thread_count() -> int:
    """Threads TVM should use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads() -> int:
    """Set TVM_NUM_THREADS (unless the user already did) and return the value in force."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_thread_count())
    return int(os.environ["TVM_NUM_THREADS"])
