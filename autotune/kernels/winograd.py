"""Winograd F(m x m, 3x3) convolutions on CPUs: a 3x3 convolution as (m + 2)^2 GEMMs of fewer
multiply-adds (Lavin & Gray, 2016). F(4x4, 3x3) in float32: 36 GEMMs of a quarter of the direct
convolution's multiply-adds; F(2x2, 3x3) on the bf16 matrix engines: 16 GEMMs of 4/9 of them
(bf16 rounding of the transformed values: F(4x4)'s larger transform coefficients made a bf16
convolution's error 7x the direct one's, 1.6e-2 against 2.3e-3 relative RMS on 128 channels,
F(2x2)'s 2x, 4.5e-3).

Channels-last, one 2-D tile grid over (H, W); a convolution of a video (kernel kt x 3 x 3) adds its
kt frame taps to the GEMMs' reduction:

    V[t, p, dt, c] = (B^T d B)[t]      d: the 6x6 input tile of output tile p, frame tap dt, channel c
    U[t, (dt, c), k] = (G g G^T)[t]    g: the 3x3 weight of (k, c, dt)   (weight-only: build time)
    M[t, p, k] = sum_(dt, c) V[t, p, dt, c] U[t, (dt, c), k]            (a batch of 36 GEMMs)
    Y[n, f, 4 th + i, 4 tw + j, k] = (A^T M[:, p, k] A)[i, j]

(for m = 4; alpha = m + 2 points a side.) t runs over the alpha x alpha transform points, p over
the m x m output tiles (n, f, th, tw). The transform matrices are TVM's (`topi.nn.winograd_util`:
Cook-Toom on the points 0, +-1, +-1/2), A (alpha x m), B (alpha x alpha), G (alpha x 3). The
float32 GEMM is `make_gemm_primfunc`; on the bf16 engines (V and U in bf16, float32 accumulation)
it is gemm_cpu's batched kernel (`gemm_cpu.make_primfunc(..., batch=points)`), which may compute
more rows than there are tiles (AMX: whole 32-row blocks): the input transform writes zeros there
and the output transform never reads them. The two transform kernels are written out term by term in
Python, without the zero coefficients, and chosen per (t) or (i, j) by a Select that their
schedules' unrolled loops fold away; their loops are fixed here (the `schedule_rule` annotation
names the rule registered below), the batched GEMM is TVM's matmul, which MetaSchedule tunes.
The input transform first gathers one tile's vector of channels into a buffer on the stack, zeros
past the input's edges (a bounds check per gathered value: checked in every term instead, LLVM
took 35 s to compile one kernel).

Error in float32: about 6e-6 of the output's peak against torch's direct convolution on the VAE
up-block's shapes (tests/kernels/test_winograd.py bounds it at 2e-5 on small ones).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import tvm
from tvm import te

TILE = 4  # output tile edge m in float32; F(4x4, 3x3): alpha = 6 transform points a side
ENGINE_TILE = 2  # on the bf16 matrix engines (see above)
KERNEL = 3
ALPHA = TILE + KERNEL - 1
INPUT_BLOCK = "winograd_input"
TILE_BLOCK = "winograd_tile"  # the input transform's 6 x 6 tiles, gathered (zeros past the edges) into a local buffer
OUTPUT_BLOCK = "winograd_output"
GEMM_BLOCK = "winograd_gemm"
GEMM_ATTR = "autotune_winograd_gemm"  # PrimFunc attribute of the GEMMs (`is_gemm_kernel`)
MAX_TILE = (6, 4)  # the GEMM's register tile: the most rows (<= 6) and vectors (<= 4) that divide its shape
RULE_NAME = "autotune_winograd"  # s_tir.meta_schedule.cpu.<name>; part of recorded traces
LANES_ATTR = "autotune_winograd_lanes"  # block annotation: the vector width its schedule uses
QUANTIZED = ("uint8", "int8")  # V dtypes quantized per (point, tile) row, a scale each (w8a8)
QUANT_BLOCKS = ("amax", "scale", "quantize")  # token_quant.quantized_rows' stages, in order


@functools.cache
def transform_matrices(tile: int = TILE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) in float64 for F(tile x tile, 3x3): A (alpha, m), B (alpha, alpha), G (alpha, r)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    return _cook_toom_convolution(_interpolation_points(tile + KERNEL - 2), tile, KERNEL)


def points(tile: int = TILE) -> int:
    """Transform points (the GEMMs' batch): alpha^2."""
    return (tile + KERNEL - 1) ** 2


def _int64(shape) -> tuple:
    """Shapes as Relax's legalized kernels declare them (int64), so FuseTIR can merge a bias add
    into the output transform (it refuses a buffer whose shape differs in index type)."""
    return tuple(tvm.tirx.IntImm("int64", int(v)) for v in shape)


def tiles(size: int, tile: int = TILE) -> int:
    return -(-size // tile)


def _linear(coefficients, values) -> tvm.tirx.PrimExpr:
    """sum c * v over the nonzero coefficients (0 if none)."""
    terms = [v if c == 1 else -v if c == -1 else v * float(c) for c, v in zip(coefficients, values) if c != 0]
    if not terms:
        return tvm.tirx.const(0.0, "float32")
    return functools.reduce(lambda a, b: a + b, terms)


def _select(index, exprs):
    """exprs[index] for a loop variable `index` the schedule unrolls (the chain folds to one term)."""
    chosen = exprs[-1]
    for value in range(len(exprs) - 2, -1, -1):
        chosen = tvm.tirx.Select(index == value, exprs[value], chosen)
    return chosen


def make_input_primfunc(x_shape: tuple[int, ...], kt: int, pads: tuple[int, int, int], out: tuple[int, int, int],
                        lanes: int, tile: int = TILE, x_dtype: str = "float32", v_dtype: str = "float32",
                        rows: int | None = None):
    """X (N, D, H, W, C) -> V (points, rows, kt, C): the input tiles transformed, in float32, stored
    as `v_dtype`. pads: zeros before along (D, H, W); out: the convolution's output (Do, Ho, Wo);
    lanes: float32 lanes of the target's vectors; rows: the GEMM's rows, at least the tiles (the
    rows past them zero; default: the tiles)."""
    n_, d_, h_, w_, c_ = x_shape
    do_, ho_, wo_ = out
    nh, nw = tiles(ho_, tile), tiles(wo_, tile)
    p_ = n_ * do_ * nh * nw
    rows = rows or p_
    alpha = tile + KERNEL - 1
    _, b, _ = transform_matrices(tile)
    X = te.placeholder(_int64(x_shape), x_dtype, name="X")
    zero = tvm.tirx.const(0.0, "float32")

    def gather(p, dt, i, j, c):
        n = p // (do_ * nh * nw)
        f = p // (nh * nw) % do_ + dt - pads[0]
        h = p // nw % nh * tile - pads[1] + i
        w = p % nw * tile - pads[2] + j
        past_tiles = [p < p_] if rows > p_ else []  # (the engine's padding rows: zeros)
        inside = tvm.tirx.all(*past_tiles, f >= 0, f < d_, h >= 0, h < h_, w >= 0, w < w_)
        # if_then_else, not Select: a Select loads its branch even where the tile hangs over the edge
        return tvm.tirx.if_then_else(inside, X[n, f, h, w, c].astype("float32"), zero)

    d = te.compute(_int64((rows, kt, alpha, alpha, c_)), gather, name=TILE_BLOCK)

    def body(t, p, dt, c):
        values = []
        for xi in range(alpha):  # separable: rows first (B^T d), then columns (. B)
            row = [_linear(b[:, xi], [d[p, dt, i, j, c] for i in range(alpha)]) for j in range(alpha)]
            values += [_linear(b[:, nu], row) for nu in range(alpha)]
        value = _select(t, values)
        return value if v_dtype in QUANTIZED else value.astype(v_dtype)

    V = te.compute(_int64((alpha * alpha, rows, kt, c_)), body, name=INPUT_BLOCK)
    if v_dtype not in QUANTIZED:
        return _annotated(te.create_prim_func([X, V]), INPUT_BLOCK, _lanes(c_, lanes))
    from .token_quant import quantized_rows

    VQ, SV = quantized_rows(lambda t, p, dt, c: V[t, p, dt, c], V.shape[:2], V.shape[2:], v_dtype)
    return _annotated(te.create_prim_func([X, VQ, SV]), INPUT_BLOCK, _lanes(c_, lanes))


def make_output_primfunc(m_shape: tuple[int, int, int], out: tuple[int, int, int, int], lanes: int, tile: int = TILE,
                         scales: str = ""):
    """M (points, rows, K) float32 -> Y (N, Do, Ho, Wo, K): the output tiles transformed back; Y is
    (N, Ho, Wo, K) where Do is None (a 2-D convolution: no frame axis for a bias add to fuse past).
    M may have more rows than tiles (`make_input_primfunc`'s rows): they are not read. `scales`,
    applied to M as it is read: "weight" (U quantized per (point, output channel): M * SU[t, k],
    inputs (M, SU (points, K))); "both" (M the int32 product of quantized V and U:
    (M - OFF[t, k]) * SV[t, p] * SU[t, k], inputs (M, SV (points, rows, 1), SU, OFF (points, K)
    int32: 128 x U's column sums where V was shifted to uint8, else 0))."""
    _, rows_, k_ = m_shape
    n_, do_, ho_, wo_ = out
    nh, nw = tiles(ho_, tile), tiles(wo_, tile)
    alpha = tile + KERNEL - 1
    a, _, _ = transform_matrices(tile)
    M = te.placeholder(_int64(m_shape), "int32" if scales == "both" else "float32", name="M")
    SV = te.placeholder(_int64((alpha * alpha, rows_, 1)), "float32", name="SV")
    SU = te.placeholder(_int64((alpha * alpha, k_)), "float32", name="SU")
    OFF = te.placeholder(_int64((alpha * alpha, k_)), "int32", name="OFF")
    inputs = {"": [M], "weight": [M, SU], "both": [M, SV, SU, OFF]}[scales]

    def product(t, p, k):
        if scales == "both":
            return (M[t, p, k] - OFF[t, k]).astype("float32") * SV[t, p, 0] * SU[t, k]
        return M[t, p, k] * SU[t, k] if scales == "weight" else M[t, p, k]

    def body(n, f, h, w, k):
        p = ((n * (do_ or 1) + f) * nh + h // tile) * nw + w // tile
        values = [[product(xi * alpha + nu, p, k) for nu in range(alpha)] for xi in range(alpha)]
        rows = []
        for i in range(tile):
            row = [_linear(a[:, i], [values[xi][nu] for xi in range(alpha)]) for nu in range(alpha)]
            rows.append(_select(w % tile, [_linear(a[:, j], row) for j in range(tile)]))
        return _select(h % tile, rows)

    if do_ is None:
        Y = te.compute(_int64((n_, ho_, wo_, k_)), lambda n, h, w, k: body(n, 0, h, w, k), name=OUTPUT_BLOCK)
    else:
        Y = te.compute(_int64((n_, do_, ho_, wo_, k_)), body, name=OUTPUT_BLOCK)
    return _annotated(te.create_prim_func([*inputs, Y]), OUTPUT_BLOCK, _lanes(k_, lanes))


def make_gemm_primfunc(rows: int, depth: int, cols: int, lanes: int):
    """V (36, P, Q) @ Up (36, K / w, Q, w) -> M (36, P, K), float32: the 36 GEMMs, U packed at build
    time in panels of w = `panel_width(K, lanes)` output channels (`pack_weight`), so that a
    vector of columns is one contiguous load for each step of the reduction. MetaSchedule tunes it
    with its own rules (multi-level tiling: 162 GFLOP/s on the VAE up-block's 390 x 384 x 384 on a
    Zen 4, 2 threads); an untuned build gives it `apply_schedule`'s register tiles (~100 GFLOP/s
    there, against ~9 for a random sample of MetaSchedule's space)."""
    w = panel_width(cols, lanes)
    batch = points()
    V = te.placeholder(_int64((batch, rows, depth)), "float32", name="V")
    U = te.placeholder(_int64((batch, cols // w, depth, w)), "float32", name="U")
    q = te.reduce_axis((tvm.tirx.IntImm("int64", 0), tvm.tirx.IntImm("int64", depth)), name="q")
    M = te.compute(_int64((batch, rows, cols)),
                   lambda t, i, j: te.sum(V[t, i, q] * U[t, j // w, q, j % w], axis=q), name=GEMM_BLOCK)
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([V, U, M]).without_attr("global_symbol")}))
    sch.annotate(sch.get_sblock(GEMM_BLOCK), LANES_ATTR, w)  # no schedule_rule: MetaSchedule's own space tunes it
    return sch.mod["main"].with_attr("op_pattern", 8).with_attr(GEMM_ATTR, True)  # opaque: never fused


def is_gemm_kernel(func) -> bool:
    """Whether `func` is a Winograd GEMM (`make_gemm_primfunc`): untuned, it takes `apply_schedule`'s
    register tiles rather than a random sample of MetaSchedule's space."""
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and GEMM_ATTR in func.attrs


def panel_width(cols: int, lanes: int) -> int:
    return _lanes(cols, lanes)


def pack_weight(u: np.ndarray, lanes: int) -> np.ndarray:
    """U (36, Q, K) -> (36, K / w, Q, w), the layout `make_gemm_primfunc` reads (numpy; for tests)."""
    batch, depth, cols = u.shape
    w = panel_width(cols, lanes)
    return np.ascontiguousarray(u.reshape(batch, depth, cols // w, w).transpose(0, 2, 1, 3))


def weight_matrix(tile: int = TILE) -> np.ndarray:
    """(points, 9) float32: U[t] = sum_s this[t, s] g[s] for a 3x3 weight g flattened row-major (G g G^T)."""
    _, _, g = transform_matrices(tile)
    return np.kron(g, g).astype("float32")


def _annotated(func, block: str, width: int):
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func.without_attr("global_symbol")}))
    sch.annotate(sch.get_sblock(block), "schedule_rule", RULE_NAME)
    sch.annotate(sch.get_sblock(block), LANES_ATTR, width)
    if block == INPUT_BLOCK:  # the others are placed by the transform's rule
        for name in (TILE_BLOCK, *(QUANT_BLOCKS if _has_block(sch, QUANT_BLOCKS[-1]) else ())):
            sch.annotate(sch.get_sblock(name), "schedule_rule", "None")
    # OutEWiseFusable: FuseOps may append elementwise consumers (a bias) but puts it in no reduction
    return sch.mod["main"].with_attr("op_pattern", 4)


def apply_schedule(sch, block) -> None:
    """The transforms' fixed schedule: tiles across the cores, channels in vectors, the transform
    points (input) or the output tile's 4 x 4 positions (output) unrolled so the Selects fold. The
    GEMMs' default (untuned builds): a register tile of rows x vectors of accumulators kept across
    the reduction."""
    name = sch.get(block).name_hint
    width = int(sch.get(block).annotations[LANES_ATTR])
    loops = sch.get_loops(block)
    if name == GEMM_BLOCK:
        _schedule_gemm(sch, block, width)
    elif name == INPUT_BLOCK and _has_block(sch, QUANT_BLOCKS[-1]):
        _schedule_quantizing_input(sch, block, width)
    elif name == INPUT_BLOCK:
        t, p, dt, c = loops
        co, ci = sch.split(c, [None, width])
        sch.reorder(p, dt, co, t, ci)
        sch.parallel(p)
        _transform_tile(sch, t, co, ci)
    else:
        # m, from the transform points every input of the block leads with (M, and the scales)
        tile = math.isqrt(int(sch.get(block).reads[0].source.shape[0])) - KERNEL + 1
        *lead, h, w, k = loops  # (n, [f,] h, w, k)
        ho, hi = sch.split(h, [None, tile])
        wo, wi = sch.split(w, [None, tile])
        ko, ki = sch.split(k, [None, width])
        sch.reorder(*lead, ho, wo, ko, hi, wi, ki)
        sch.parallel(sch.fuse(*lead, ho, wo))
        sch.unroll(hi)
        sch.unroll(wi)
        sch.vectorize(ki)


def _transform_tile(sch, t, co, ci) -> None:
    """The input transform's points `t` unrolled (the Selects fold), channels `ci` in a vector, one
    tile's vector of channels gathered on the stack at `co`."""
    sch.unroll(t)
    sch.vectorize(ci)
    tile = sch.get_sblock(TILE_BLOCK)
    sch.compute_at(tile, co)
    sch.set_scope(tile, 0, "local")
    *_, i, j, c = sch.get_loops(tile)
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(c)


def _schedule_quantizing_input(sch, block, width: int) -> None:
    """w8a8: per tile (in parallel), its points' float32 values on the stack (points x kt x C), each
    point's row maximum as `width` partial maxima in a vector, then the row quantized (token_quant's
    stages, kernels/token_quant.py)."""
    *_, channels = sch.get_loops(sch.get_sblock(QUANT_BLOCKS[0]))
    _, lane = sch.split(channels, [None, width])
    partials = sch.rfactor(lane, 0)  # (before the moves below: rfactor wants the reduction's loops to itself)
    t, p, dt, c = sch.get_loops(block)
    sch.reorder(p, t, dt, c)
    sch.parallel(p)
    for b in (partials, *(sch.get_sblock(name) for name in QUANT_BLOCKS)):  # (scales, values: outputs)
        sch.reverse_compute_at(b, p)
    lane, *others = sch.get_loops(partials)[1:]  # (under p: the partial maxima's lane first)
    sch.reorder(*others, lane)
    sch.vectorize(lane)
    sch.set_scope(block, 0, "local")
    co, ci = sch.split(c, [None, width])
    sch.reorder(dt, co, t, ci)
    _transform_tile(sch, t, co, ci)
    *_, channels = sch.get_loops(sch.get_sblock(QUANT_BLOCKS[-1]))
    _, vector = sch.split(channels, [None, width])
    sch.vectorize(vector)


def _schedule_gemm(sch, block, width: int) -> None:
    """Per transform point, blocks of rows (in parallel) walk every column panel, the block's rows
    staying in L1 while the point's U streams from L2; an accumulator tile of mr rows x nv vectors
    is kept in registers (a stack buffer under 1 KiB, which LLVM promotes) across the reduction."""
    t, i, j, q = sch.get_loops(block)
    rows, vectors = int(sch.get(i).extent), int(sch.get(j).extent) // width
    mr, nv = _largest_divisor(rows, MAX_TILE[0]), _largest_divisor(vectors, MAX_TILE[1])
    io, ii = sch.split(i, [None, mr])
    jo, jv, jl = sch.split(j, [None, nv, width])
    sch.reorder(t, io, jo, q, ii, jv, jl)
    sch.parallel(sch.fuse(t, io))
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jl)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, jo)
    sch.decompose_reduction(block, q)
    *_, ai, aj = sch.get_loops(acc)
    aj_outer, aj_inner = sch.split(aj, [None, width])
    sch.vectorize(aj_inner)
    init = sch.get_sblock(f"{GEMM_BLOCK}_init")
    *_, ij = sch.get_loops(init)
    sch.vectorize(ij)


def _largest_divisor(n: int, most: int) -> int:
    return max(d for d in range(1, most + 1) if n % d == 0)


def _has_block(sch, name: str) -> bool:
    return any(sch.get(b).name_hint == name for b in sch.get_child_blocks(sch.get_sblock("root")))


def _lanes(channels: int, lanes: int) -> int:
    """The widest vector of at most `lanes` float32 that divides the channel count."""
    return math.gcd(int(channels), lanes)



def _custom_rule(sch, block):
    """s_tir.meta_schedule.cpu.autotune_winograd: the transforms' one schedule (nothing sampled)."""
    apply_schedule(sch, block)
    return [sch]


def register_rule() -> None:
    import tvm_ffi

    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{RULE_NAME}", _custom_rule, override=True)


register_rule()
