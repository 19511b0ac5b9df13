"""Write a compiled executable as a shared library, per target kind.

    llvm (host)   export_library with the system compiler
    llvm (cross)  export_library linked by the preset's cross compiler (cross.py)
    cuda          kernels compiled by nvcc into fatbins inside the library (support/cuda_library.py)
"""

from __future__ import annotations

import contextlib

from autotune.runtime.artifact import ArtifactPaths
from autotune.support.targets import TargetPreset


def export(executable, paths: ArtifactPaths, preset: TargetPreset) -> list[str]:
    """Write the library; CUDA kernels go in as nvcc-compiled fatbins. Returns notes."""
    paths.library.parent.mkdir(parents=True, exist_ok=True)
    if preset.family == "cuda":
        from autotune.support.cuda_library import export_cuda_library

        return export_cuda_library(executable, paths.library, preset)
    if preset.cross_compiler:
        from .cross import cross_compiler

        executable.export_library(str(paths.library), fcompile=cross_compiler(preset))
    else:
        executable.export_library(str(paths.library))
    return []


def codegen_context(preset: TargetPreset):
    """CUDA: compile kernels with nvcc for the preset's arch (NVRTC needs cuda-bindings)."""
    if preset.family == "cuda":
        from autotune.support.cuda_library import nvcc_compile_callback, preset_arch

        return nvcc_compile_callback(preset_arch(preset))
    return contextlib.nullcontext()
