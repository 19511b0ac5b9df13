"""From prepared kernels to an artifact: apply the tuning log, fallback-schedule the rest, lower,
and export per target kind (host llvm, cross-compiled aarch64, CUDA with nvcc fatbins).

May import: support, frontend, passes, tuning (the log), runtime (the artifact format), kernels
(the CUDA tensor-core rule for kernels without a record).
"""
from .compile import BuildReport, build

__all__ = ["BuildReport", "build"]
