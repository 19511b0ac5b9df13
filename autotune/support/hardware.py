"""What this machine has: the local CUDA GPU (if any), and why not when there is none."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

DEFAULT_CUDA_ARCH = "sm_90"  # what the `cuda` preset builds for on a machine without a GPU


def cuda_device_arch() -> tuple[str | None, str | None]:
    """(the first visible GPU's arch, e.g. "sm_90", None), or (None, why no GPU is usable)."""
    import tvm

    if not tvm.runtime.enabled("cuda"):
        return None, (
            "TVM's CUDA runtime is not loaded on this machine (no NVIDIA driver: libcuda.so.1 is missing)"
        )
    device = tvm.cuda(0)
    if not device.exist:
        return None, "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return "sm_" + device.compute_version.replace(".", ""), None


@functools.lru_cache(maxsize=None)
def warn_default_cuda_arch(reason: str) -> None:
    """Say once per reason that the `cuda` preset fell back to DEFAULT_CUDA_ARCH."""
    log.warning(
        "target 'cuda' means this machine's GPU, and none is usable: %s. Building for %s (Hopper); to build for "
        "another GPU name it: --target cuda-sm80 | cuda-sm89 | cuda-sm90.",
        reason,
        DEFAULT_CUDA_ARCH,
    )
