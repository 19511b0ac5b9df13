"""What runs inside MetaSchedule's builder worker processes.

TVM's default builder imports `tvm.s_tir.tensor_intrin` in every worker (~25 s on a loaded
2-core machine, mostly CUDA intrinsics), so every build hit the timeout and every candidate came
back as a "Build error". Our workers register a lean build function instead; it imports the
tensor intrinsics only for targets that can use them (CUDA, where tensor-core rules need them).

MetaSchedule's default export is a `.tar` of objects and CUDA *source* that the measuring side
(an RPC server on the GPU machine) must link and compile itself, with a C++ compiler and NVRTC.
Our export links CUDA candidates here into a `.so` with the kernels as an nvcc fatbin inside
(support/cuda_library.py), so a GPU-side `autotune rpc server` needs only TVM's runtime.
"""

from __future__ import annotations

LEAN_BUILD = "autotune.lean_build"
LINKED_EXPORT = "autotune.linked_export"
_built_for: dict = {}  # the target this worker last built for: the export (same call) reads its arch


def lean_build(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if target.kind.name in ("cuda", "rocm", "vulkan", "metal"):
        from autotune.support.tvm_compat import import_tensor_intrin_fast

        import_tensor_intrin_fast()  # GPU schedules may reference the tensor-core intrinsics
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    _built_for["target"] = target
    return tvm_build(mod, target=target)


def linked_export(mod) -> str:
    """A candidate's runtime module as a file for the runner: CUDA as a linked `.so` with a fatbin."""
    import tempfile
    from pathlib import Path

    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    target = _built_for.get("target")
    if target is None or target.kind.name != "cuda":
        return default_export(mod)
    from autotune.support.cuda_library import export_linked

    path = Path(tempfile.mkdtemp(prefix="autotune-candidate-")) / "candidate.so"
    export_linked(mod, path, str(target.attrs["arch"]))
    return str(path)


def initialize_worker() -> None:
    """Popen-pool initializer: register the lean build and the linked export in the worker."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import tvm_ffi

    tvm_ffi.register_global_func(LEAN_BUILD, lean_build, override=True)
    tvm_ffi.register_global_func(LINKED_EXPORT, linked_export, override=True)
