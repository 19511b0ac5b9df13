"""Winograd F(4x4, 3x3) kernels (kernels/winograd.py): input transform, the batched GEMM (its
untuned default schedule) with the transformed weight, output transform, against torch's direct
convolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import s_tir

from autotune.kernels import winograd

MAX_RELATIVE_ERROR = 2e-5  # float32 transforms, relative to the output's largest magnitude


def _compiled(func, block: str):
    sch = s_tir.Schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    winograd.apply_schedule(sch, sch.get_sblock(block))
    return tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm", "num-cores": 2}))


@pytest.mark.parametrize("c_in, c_out, frames, kt, height, width, pads", [
    (16, 32, 1, 1, 8, 12, (0, 1, 1)),      # whole tiles, vectors
    (24, 16, 1, 1, 11, 13, (0, 1, 1)),     # ragged tiles, 24 channels (8-lane vectors)
    (20, 20, 3, 3, 7, 9, (2, 1, 1)),       # a causal video convolution: 2 zero frames in front, 3 time taps
    (16, 16, 1, 1, 10, 10, (0, 0, 0)),     # no padding: an 8 x 8 output
])
def test_transforms_with_a_gemm_equal_torch_convolution(c_in, c_out, frames, kt, height, width, pads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c_in, frames, height, width)).astype("float32")
    w = (rng.standard_normal((c_out, c_in, kt, 3, 3)) / np.sqrt(c_in * 9 * kt)).astype("float32")
    ref = torch.nn.functional.conv3d(torch.from_numpy(np.pad(x, [(0, 0), (0, 0), (pads[0], 0), (0, 0), (0, 0)])),
                                     torch.from_numpy(w), padding=(0, *pads[1:])).numpy()
    out = ref.shape[2:]
    tiles = out[0] * winograd.tiles(out[1]) * winograd.tiles(out[2])
    to_input = _compiled(winograd.make_input_primfunc((1, frames, height, width, c_in), kt, pads, out, 16),
                         winograd.INPUT_BLOCK)
    to_output = _compiled(winograd.make_output_primfunc((36, tiles, c_out), (1, *out), 16), winograd.OUTPUT_BLOCK)
    gemm = _compiled(winograd.make_gemm_primfunc(tiles, kt * c_in, c_out, 16), winograd.GEMM_BLOCK)

    v = tvm.runtime.tensor(np.zeros((36, tiles, kt, c_in), "float32"))
    to_input["main"](tvm.runtime.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))), v)
    taps = w.transpose(3, 4, 2, 1, 0).reshape(9, kt * c_in * c_out)  # (3x3 taps, (dt, c_in, c_out))
    u = (winograd.weight_matrix() @ taps).reshape(36, kt * c_in, c_out)
    m = tvm.runtime.tensor(np.zeros((36, tiles, c_out), "float32"))
    gemm["main"](tvm.runtime.tensor(v.numpy().reshape(36, tiles, kt * c_in)),
                 tvm.runtime.tensor(winograd.pack_weight(u.astype("float32"), 16)), m)
    y = tvm.runtime.tensor(np.zeros((1, *out, c_out), "float32"))
    to_output["main"](m, y)

    got = y.numpy().transpose(0, 4, 1, 2, 3)
    assert np.abs(got - ref).max() <= MAX_RELATIVE_ERROR * np.abs(ref).max()


def test_transform_matrices_reconstruct_a_1d_convolution():
    """A^T [(G g) * (B^T d)] = the 4 outputs of a 3-tap correlation of 6 inputs (float64)."""
    a, b, g = winograd.transform_matrices()
    rng = np.random.default_rng(1)
    d, taps = rng.standard_normal(6), rng.standard_normal(3)
    direct = np.array([d[i:i + 3] @ taps for i in range(4)])
    assert np.allclose(a.T @ ((g @ taps) * (b.T @ d)), direct, atol=1e-12)
