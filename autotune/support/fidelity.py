"""How close outputs are to a reference: max/mean absolute error, cosine similarity, PSNR.

    from autotune.support.fidelity import compare, format_fidelity
    d = compare(tvm_out, torch_out)              # transformer noise prediction
    d = compare(frames, ref_frames, peak=2.0)    # VAE frames in [-1, 1]
    print(format_fidelity(d))                    # max|d| 1.2e-02  mean|d| 1.1e-03  cos 0.99998  PSNR 52.3 dB

Several outputs (a tuple or list) are compared as one concatenated vector. Everything is
computed in float64, whatever the inputs' dtypes (float16 / bfloat16 / torch tensors included).
"""

from __future__ import annotations

import math

import numpy as np


def _flat(values) -> np.ndarray:
    if isinstance(values, (list, tuple)):
        parts = [_flat(v) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0)
    if hasattr(values, "detach"):  # torch
        values = values.detach().float().cpu().numpy()
    return np.asarray(values).astype(np.float64).ravel()


def compare(outputs, reference, peak: float | None = None) -> dict:
    """Fidelity of `outputs` against `reference` (arrays, tensors, or lists/tuples of them).

    Returns {"max_abs", "mean_abs", "cosine", "psnr_db", "peak"}:
      max_abs / mean_abs: of outputs - reference;
      cosine: <o, r> / (|o| |r|) over the flattened values (1.0 when both are all zero);
      psnr_db: 10 log10(peak^2 / MSE); `peak` defaults to the reference's range
        (max - min); pass peak=2.0 for frames in [-1, 1]. inf when MSE is 0.
    Shapes must match (after flattening several outputs together).
    """
    o, r = _flat(outputs), _flat(reference)
    if o.shape != r.shape:
        raise ValueError(f"compare: outputs have {o.size} values, the reference {r.size}")
    if o.size == 0:
        raise ValueError("compare: nothing to compare (empty outputs)")
    diff = o - r
    mse = float(np.mean(diff * diff))
    norm = float(np.linalg.norm(o) * np.linalg.norm(r))
    if norm > 0:
        cosine = float(np.dot(o, r) / norm)
    else:
        cosine = 1.0 if not np.any(o) and not np.any(r) else 0.0
    if peak is None:
        peak = float(r.max() - r.min())
    if mse == 0:
        psnr = math.inf
    elif peak <= 0:
        psnr = -math.inf
    else:
        psnr = 10.0 * math.log10(peak * peak / mse)
    if not np.all(np.isfinite(o)):
        cosine, psnr = float("nan"), float("nan")
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "mean_abs": float(np.mean(np.abs(diff))),
        "cosine": cosine,
        "psnr_db": psnr,
        "peak": float(peak),
    }


def format_fidelity(d: dict) -> str:
    """One line: max|d| 1.2e-02  mean|d| 1.1e-03  cos 0.999980  PSNR 52.3 dB."""
    psnr = d["psnr_db"]
    psnr_text = "inf" if psnr == math.inf else f"{psnr:.1f}"
    return f"max|d| {d['max_abs']:.2e}  mean|d| {d['mean_abs']:.2e}  cos {d['cosine']:.6f}  PSNR {psnr_text} dB"
