"""The CUDA tensor-core flash attention (autotune/kernels/attention_cuda_tc.py), run here without a
GPU: its device code compiled for the CPU against a small SIMT emulation (simt_emulation.h: a thread
per CUDA thread, barriers, wmma fragments by the CUDA guide's layout rules) and compared with
numpy's softmax attention. What this cannot show (the real wmma hardware, TVM's launch) is left
to tools/gpu_check.py; that nvcc compiles it to HMMA is tests/build/test_targets.py's."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from autotune.kernels import attention_cuda_tc as tc

HERE = Path(__file__).parent

DRIVER = r"""
#include "simt_emulation.h"
%(device)s
extern "C" void run(void* q, void* k, void* v, void* o, void* lse, int bh, int qo_len, int kv_len, float scale_log2) {
  launch((qo_len + 63) / 64, bh, %(smem)d, [&](unsigned char* smem) {
    %(symbol)s(q, k, v, o, lse, smem, qo_len, kv_len, scale_log2);
  });
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ to compile the emulated kernel")
    built = {}

    def kernel(d: int, dtype: str):
        if (d, dtype) not in built:
            source = DEVICE_SOURCE_FOR_CPU + "\n" + tc._entry_points()
            out = tmp_path_factory.mktemp("attention") / f"attention_{d}_{dtype}.so"
            (out.parent / "kernel.cc").write_text(
                DRIVER % {"device": source, "smem": tc.smem_bytes(d), "symbol": tc.device_symbol(d, dtype)}
            )
            proc = subprocess.run(
                [gxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", f"-I{HERE}", "-o", str(out), str(out.parent / "kernel.cc")],
                capture_output=True, text=True,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
            built[(d, dtype)] = ctypes.CDLL(str(out))
        return built[(d, dtype)]

    return kernel


# The device source without the CUDA headers (the emulation stands in for them).
DEVICE_SOURCE_FOR_CPU = "\n".join(line for line in tc.DEVICE_SOURCE.splitlines() if not line.startswith("#include"))


def _attention(kernel, q, k, v, scale):
    bh, lq, d = q.shape
    lk = k.shape[1]
    o = np.zeros((bh, lq, d), q.dtype)
    lse = np.zeros((bh, lq), q.dtype)
    args = [np.ascontiguousarray(a) for a in (q, k, v)]
    kernel.run(*(ctypes.c_void_p(a.ctypes.data) for a in (*args, o, lse)), bh, lq, lk, ctypes.c_float(scale * np.log2(np.e)))
    return o.astype(np.float32), lse.astype(np.float32)


@pytest.mark.parametrize("d,lq,lk,dtype", [(64, 100, 150, "bfloat16"), (128, 64, 64, "bfloat16"), (32, 70, 257, "float16")])
def test_tensor_core_attention_matches_numpy(emulated, d, lq, lk, dtype):
    """Ragged tiles (lq, lk not multiples of 64) included: padded keys are masked, padded queries
    not written. bf16/fp16 inputs, float32 softmax; tolerance: P and O are rounded to the input
    dtype (8 / 11 mantissa bits), so max error < 2e-2 and cosine > 0.9999 against float64."""
    rng = np.random.default_rng(d + lq)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    q, k, v = (rng.standard_normal((2, n, d)).astype(np_dtype) for n in (lq, lk, lk))
    scale = 1.0 / np.sqrt(d)
    out, lse = _attention(emulated(d, dtype), q, k, v, scale)
    s = np.einsum("bqd,bkd->bqk", q.astype(np.float64), k.astype(np.float64)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), v.astype(np.float64))
    ref_lse = np.log(p.sum(-1)) + s.max(-1)
    assert np.abs(out - ref).max() < 2e-2
    cosine = (out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)
    assert cosine > 0.9999, cosine
    np.testing.assert_allclose(lse, ref_lse, atol=5e-2, rtol=1e-2)
