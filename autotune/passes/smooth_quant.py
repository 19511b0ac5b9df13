"""SmoothQuant for w8a8: move activation outliers into the weights before quantizing.

Per-token int8 activations share one scale across a token's channels, so a few channels with
large magnitudes (outliers, common in transformer activations) leave the others only a few
int8 levels. For a linear y = x W^T, any positive per-input-channel factor s gives the same
product with x' = x / s and W' = W * s; SmoothQuant (Xiao et al., 2023) picks

    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)        (alpha = 0.5)

which evens the activation channels out at the cost of uneven weight columns (quantized per
output channel, they take it better). The channel ranges max|x_j| come from running the torch
module once on its example inputs (`frontend.calibration.linear_input_ranges`, which a model
imported from torch carries as `ImportedModel.calibration`).

Only where outliers are there to hurt: a linear is smoothed when its largest input channel range
is at least OUTLIER_RATIO times the median one; elsewhere w8a8 stays as it was (same kernels).
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.5
OUTLIER_RATIO = 8.0


def outlier_ratio(x_range: np.ndarray) -> float:
    """Largest channel range over the median one (1.0: flat)."""
    median = float(np.median(x_range))
    return float(x_range.max()) / median if median > 0 else float("inf") if x_range.max() > 0 else 1.0


def smoothing_factors(x_range: np.ndarray, w_in_range: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s per input channel; 1 where a channel is zero on either side (nothing to balance)."""
    x_range = x_range.astype(np.float64)
    w_in_range = w_in_range.astype(np.float64)
    live = (x_range > 0) & (w_in_range > 0)
    s = np.ones_like(x_range)
    s[live] = x_range[live] ** alpha / w_in_range[live] ** (1 - alpha)
    return s.astype(np.float32)
