"""Devices the runtime can run an artifact on: each a small class with the same few verbs."""

from __future__ import annotations

import tvm

from autotune.support.errors import ArtifactError
from autotune.support.hardware import cuda_device_arch


class CPU:
    kind = "cpu"

    @staticmethod
    def open(index: int):
        return tvm.cpu(index)

    @staticmethod
    def unavailable_reason() -> str | None:
        return None


class CUDA:
    kind = "cuda"

    @staticmethod
    def open(index: int):
        return tvm.cuda(index)

    @staticmethod
    def unavailable_reason() -> str | None:
        arch, why_not = cuda_device_arch()
        return None if arch else f"{why_not}. Run the artifact on a machine with an NVIDIA GPU and driver."


DEVICES = {"cpu": CPU, "cuda": CUDA}


def open_device(spec: str, artifact_device: str):
    """'cpu', 'cuda', 'cuda:1' → a tvm Device, after checking the artifact was built for it."""
    kind, _, index = spec.partition(":")
    if kind not in DEVICES:
        raise ArtifactError(f"unknown device '{spec}'; expected one of {', '.join(DEVICES)} (optionally ':INDEX')")
    if kind != artifact_device:
        raise ArtifactError(
            f"this artifact was built for device '{artifact_device}', not '{kind}': load it with "
            f"device='{artifact_device}', or build it for a {kind} target"
        )
    reason = DEVICES[kind].unavailable_reason()
    if reason:
        raise ArtifactError(f"cannot run on '{spec}': {reason}")
    return DEVICES[kind].open(int(index or 0))
