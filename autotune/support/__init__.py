"""Leaf helpers every stage uses: threads, errors, defaults and settings, target presets, tensor
signatures, IR facts (`ir`), fidelity metrics, memory checks, `cuda_library` (CUDA kernels as
nvcc fatbins inside a `.so`: builds and tuning candidates), and `tvm_compat`, the one place that
touches TVM internals.

May import: the standard library, numpy, tvm. Nothing else of autotune: every other package
imports this one, so it stays light (the aarch64 runtime loads it with tvm and numpy only).
"""
