"""Activation statistics from a torch module, for quantization that needs them (SmoothQuant)."""

from __future__ import annotations

import numpy as np

from autotune.support.ir import exported_name


def linear_input_ranges(module, example_inputs: dict) -> dict[str, np.ndarray]:
    """max |x| per input channel of every `torch.nn.Linear` of `module` over one forward on
    `example_inputs`, keyed by the imported name of the linear's weight (`p_<path>_weight`)."""
    import torch

    ranges: dict[str, np.ndarray] = {}
    hooks = []

    def record(name):
        def hook(_module, args):
            x = args[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(0).float().numpy()
            key = exported_name(f"{name}.weight" if name else "weight")
            ranges[key] = np.maximum(ranges[key], amax) if key in ranges else amax

        return hook

    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            hooks.append(sub.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            module(*example_inputs.values())
    finally:
        for h in hooks:
            h.remove()
    return ranges
