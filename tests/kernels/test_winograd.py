"""Winograd kernels (kernels/winograd.py): input transform, the batched GEMM (its untuned default
schedule) with the transformed weight, output transform, against torch's direct convolution:
F(4x4, 3x3) in float32, F(2x2, 3x3) on the bf16 engine (gemm_cpu's batched kernel)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm
from tvm import s_tir

from autotune.kernels import gemm_cpu, winograd

MAX_RELATIVE_ERROR = 2e-5  # float32 transforms, relative to the output's largest magnitude
# bf16 V and U (F(2x2)), relative to the output's largest magnitude; the direct convolution on
# the same bf16 inputs is ~3e-3 off float32 (kernels/winograd.py's doc: F(2x2) about twice that)
MAX_BF16_RELATIVE_ERROR = 1.5e-2


def _compiled(func, block: str, target=None):
    sch = s_tir.Schedule(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    winograd.apply_schedule(sch, sch.get_sblock(block))
    return tvm.compile(sch.mod, target=target or tvm.target.Target({"kind": "llvm", "num-cores": 2}))


def _video_conv(c_in, c_out, frames, kt, height, width, pads):
    """(x (1, C_in, D, H, W), w (C_out, C_in, kt, 3, 3), torch's conv3d of them with `pads` before
    (D, H, W) and after (H, W), float32)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c_in, frames, height, width)).astype("float32")
    w = (rng.standard_normal((c_out, c_in, kt, 3, 3)) / np.sqrt(c_in * 9 * kt)).astype("float32")
    ref = torch.nn.functional.conv3d(torch.from_numpy(np.pad(x, [(0, 0), (0, 0), (pads[0], 0), (0, 0), (0, 0)])),
                                     torch.from_numpy(w), padding=(0, *pads[1:])).numpy()
    return x, w, ref


@pytest.mark.parametrize("c_in, c_out, frames, kt, height, width, pads", [
    (16, 32, 1, 1, 8, 12, (0, 1, 1)),      # whole tiles, vectors
    (24, 16, 1, 1, 11, 13, (0, 1, 1)),     # ragged tiles, 24 channels (8-lane vectors)
    (20, 20, 3, 3, 7, 9, (2, 1, 1)),       # a causal video convolution: 2 zero frames in front, 3 time taps
    (16, 16, 1, 1, 10, 10, (0, 0, 0)),     # no padding: an 8 x 8 output
])
def test_transforms_with_a_gemm_equal_torch_convolution(c_in, c_out, frames, kt, height, width, pads):
    x, w, ref = _video_conv(c_in, c_out, frames, kt, height, width, pads)
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


@pytest.mark.parametrize("c_in, c_out, frames, kt, height, width, pads, x_dtype", [
    (32, 32, 1, 1, 8, 12, (0, 1, 1), "bfloat16"),   # whole tiles
    (16, 48, 3, 3, 7, 9, (2, 1, 1), "float32"),     # ragged tiles, a causal video convolution, float32 input
])
def test_bf16_engine_transforms_with_the_batched_gemm_equal_torch_convolution(
        dpbf16_target, c_in, c_out, frames, kt, height, width, pads, x_dtype):
    """F(2x2, 3x3): the input transform rounds V to bf16 into rows padded past the tiles, the
    16 points' products run on gemm_cpu's batched AVX512-BF16 kernel (U in bf16), the output
    transform reads only the tiles' rows."""
    target = dpbf16_target[0]
    x, w, ref = _video_conv(c_in, c_out, frames, kt, height, width, pads)
    out, tile = ref.shape[2:], winograd.ENGINE_TILE
    tiles = out[0] * winograd.tiles(out[1], tile) * winograd.tiles(out[2], tile)
    rows, points = tiles + 3, winograd.points(tile)  # 3 padding rows
    to_input = _compiled(winograd.make_input_primfunc((1, frames, height, width, c_in), kt, pads, out, 16, tile,
                                                      x_dtype, "bfloat16", rows), winograd.INPUT_BLOCK, target)
    to_output = _compiled(winograd.make_output_primfunc((points, rows, c_out), (1, *out), 16, tile),
                          winograd.OUTPUT_BLOCK, target)
    gemm = gemm_cpu.compile_standalone(rows, c_out, kt * c_in, gemm_cpu.AVX512, target, batch=points)

    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1)).astype(ml_dtypes.bfloat16 if x_dtype == "bfloat16" else "float32")
    v = tvm.runtime.tensor(np.full((points, rows, kt, c_in), np.nan, ml_dtypes.bfloat16))
    to_input["main"](tvm.runtime.tensor(x_last), v)
    assert not v.numpy()[:, tiles:].astype("float32").any(), "rows past the tiles must be zero"
    taps = w.transpose(3, 4, 2, 1, 0).reshape(9, kt * c_in * c_out)
    u = (winograd.weight_matrix(tile) @ taps).reshape(points, kt * c_in, c_out).astype(ml_dtypes.bfloat16)
    packed = np.stack([gemm_cpu.pack_weight(u[t]) for t in range(points)])
    m = tvm.runtime.tensor(np.zeros((points, rows, c_out), "float32"))
    gemm["main"](tvm.runtime.tensor(v.numpy().reshape(points, rows, kt * c_in)), tvm.runtime.tensor(packed), m)
    y = tvm.runtime.tensor(np.zeros((1, *out, c_out), "float32"))
    to_output["main"](m, y)

    got = y.numpy().transpose(0, 4, 1, 2, 3)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= MAX_BF16_RELATIVE_ERROR, f"max error {err:.2e} of the output's peak"


def _quantized(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along `axis` (token_quant's arithmetic): (integers, scales)."""
    scale = np.maximum(np.abs(values).max(axis=axis, keepdims=True), 1e-8) / 127
    return np.clip(np.round(values / scale), -127, 127), scale


@pytest.mark.parametrize("c_in, c_out, frames, kt, height, width, pads", [
    (32, 32, 1, 1, 8, 12, (0, 1, 1)),     # whole tiles
    (16, 48, 3, 3, 7, 9, (2, 1, 1)),      # ragged tiles, a causal video convolution
])
def test_int8_transforms_with_the_vnni_gemm_equal_their_fake_quantized_reference(
        vnni_target, c_in, c_out, frames, kt, height, width, pads):
    """w8a8's F(2x2, 3x3): the input transform quantizes each (point, tile) row of V to uint8 (+128)
    with a scale, the 16 points' products run exactly on gemm_cpu's batched VNNI kernel against U
    quantized per (point, output channel), the output transform dequantizes as it reads. Against
    numpy doing the same quantization in float64 (a value on a rounding boundary may round the
    other way: 1e-3 of the peak), and against torch's float32 convolution (int8's error: 3e-2)."""
    target = vnni_target[0]
    x, w, ref = _video_conv(c_in, c_out, frames, kt, height, width, pads)
    out, tile = ref.shape[2:], winograd.ENGINE_TILE
    nh, nw = winograd.tiles(out[1], tile), winograd.tiles(out[2], tile)
    tiles, points, depth = out[0] * nh * nw, winograd.points(tile), kt * c_in
    to_input = _compiled(winograd.make_input_primfunc((1, frames, height, width, c_in), kt, pads, out, 16, tile,
                                                      "float32", "uint8"), winograd.INPUT_BLOCK, target)
    to_output = _compiled(winograd.make_output_primfunc((points, tiles, c_out), (1, *out), 16, tile, scales="both"),
                          winograd.OUTPUT_BLOCK, target)
    gemm = gemm_cpu.compile_standalone(tiles, c_out, depth, gemm_cpu.VNNI, target, batch=points)

    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    vq, sv = tvm.runtime.tensor(np.zeros((points, tiles, kt, c_in), "uint8")), tvm.runtime.tensor(np.zeros((points, tiles, 1), "float32"))
    to_input["main"](tvm.runtime.tensor(x_last), vq, sv)
    taps = w.transpose(3, 4, 2, 1, 0).reshape(9, depth * c_out).astype(np.float64)
    uq, su = _quantized((winograd.weight_matrix(tile).astype(np.float64) @ taps).reshape(points, depth, c_out), 1)
    packed = np.stack([gemm_cpu.pack_weight(uq[t].astype(np.int8), 4) for t in range(points)])
    m = tvm.runtime.tensor(np.zeros((points, tiles, c_out), "int32"))
    gemm["main"](tvm.runtime.tensor(vq.numpy().reshape(points, tiles, depth)), tvm.runtime.tensor(packed), m)
    off = 128 * uq.sum(axis=1).astype("int32")
    y = tvm.runtime.tensor(np.zeros((1, *out, c_out), "float32"))
    to_output["main"](m, sv, tvm.runtime.tensor(su[:, 0].astype("float32")), tvm.runtime.tensor(off), y)
    got = y.numpy().transpose(0, 4, 1, 2, 3)

    # the reference: V in float64 per tile, quantized per (point, tile) row, the same U
    a, b, _ = winograd.transform_matrices(tile)
    padded = np.pad(x_last[0].astype(np.float64), [(pads[0], 0), (pads[1], nh * tile + 2 - height - pads[1]),
                                                   (pads[2], nw * tile + 2 - width - pads[2]), (0, 0)])
    v = np.zeros((points, out[0], nh, nw, kt, c_in))
    for f, th, tw in np.ndindex(out[0], nh, nw):
        d = padded[f:f + kt, th * tile:th * tile + 4, tw * tile:tw * tile + 4]  # (kt, 4, 4, C)
        v[:, f, th, tw] = np.einsum("ia,tijc,jb->abtc", b, d, b).reshape(points, kt, c_in)
    vq_ref, sv_ref = _quantized(v.reshape(points, tiles, depth), 2)
    assert np.abs(vq.numpy().reshape(points, tiles, depth).astype(int) - 128 - vq_ref).max() <= 1
    mf = np.einsum("tpq,tqk->tpk", vq_ref * sv_ref, uq * su).reshape(points, out[0], nh, nw, c_out)
    y_ref = np.einsum("ai,abfhwk,bj->kfhiwj", a, mf.reshape(tile + 2, tile + 2, *mf.shape[1:]), a)
    y_ref = y_ref.reshape(c_out, out[0], nh * tile, nw * tile)[None, :, :, :out[1], :out[2]]
    peak = np.abs(ref).max()
    assert np.abs(got - y_ref).max() <= 1e-3 * peak
    assert np.abs(got - ref).max() <= 3e-2 * peak


@pytest.mark.parametrize("tile", [winograd.TILE, winograd.ENGINE_TILE])
def test_transform_matrices_reconstruct_a_1d_convolution(tile):
    """A^T [(G g) * (B^T d)] = the m outputs of a 3-tap correlation of m + 2 inputs (float64)."""
    a, b, g = winograd.transform_matrices(tile)
    rng = np.random.default_rng(1)
    d, taps = rng.standard_normal(tile + 2), rng.standard_normal(3)
    direct = np.array([d[i:i + 3] @ taps for i in range(tile)])
    assert np.allclose(a.T @ ((g @ taps) * (b.T @ d)), direct, atol=1e-12)
