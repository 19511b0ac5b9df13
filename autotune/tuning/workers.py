"""What runs inside MetaSchedule's builder worker processes.

TVM's default builder imports `tvm.s_tir.tensor_intrin` in every worker (~25 s on a loaded
2-core machine, mostly CUDA intrinsics), so every build hit the timeout and every candidate came
back as a "Build error". Our workers register a lean build function instead; it imports the
tensor intrinsics only for targets that can use them (CUDA, where tensor-core rules need them).
"""

from __future__ import annotations

LEAN_BUILD = "autotune.lean_build"


def lean_build(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if target.kind.name in ("cuda", "rocm", "vulkan", "metal"):
        from autotune.support.tvm_compat import import_tensor_intrin_fast

        import_tensor_intrin_fast()  # GPU schedules may reference the tensor-core intrinsics
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def initialize_worker() -> None:
    """Popen-pool initializer: register the lean build function in the worker."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import tvm_ffi

    tvm_ffi.register_global_func(LEAN_BUILD, lean_build, override=True)
