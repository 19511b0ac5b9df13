"""Refuse, before starting, work that cannot fit in this machine's memory."""

from __future__ import annotations

import psutil

from .errors import InputError

# Importing keeps the torch weights, the exported program's copy and the Relax/numpy weights:
# about three copies of the fp32 weights at the peak.
IMPORT_COPIES = 3


def available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def check_fits_in_memory(component, weights_given: bool, dtype_bytes: int = 4) -> None:
    """Raise InputError with the figures when importing `component` would not fit in memory."""
    params = component.param_count()
    need = params * dtype_bytes * IMPORT_COPIES
    have = available_bytes()
    if need > have:
        raise InputError(
            f"{component.model_name}/{component.name} has {params / 1e9:.2f} B parameters: importing it needs about "
            f"{need / 2**30:.1f} GiB of memory ({IMPORT_COPIES} fp32 copies at the peak) and this machine has "
            f"{have / 2**30:.1f} GiB available. Use a machine with more memory, or the tiny model "
            "(--model wan-i2v-tiny) to try the flow."
        )
