"""Flash-style attention for LLVM CPU targets.

    O[b, i, :] = sum_j softmax_j(scale * Q[b, i, :] . K[b, j, :]) * V[b, j, :]

Inputs are 3-D: Q (BH, Lq, D); the keys either as K (BH, Lk, D) or transposed, KT (BH, D, Lk)
(`k_layout`, whichever the importer's graph has without a copy); V (BH, Lk, Dv); output
O (BH, Lq, Dv). The scale is a compile-time constant of the kernel.

The PrimFunc is written in its final algorithmic form (not scheduled): per (head, query tile of
TQ rows) it walks the keys in tiles of TK with an online softmax (running max m, running sum l,
fp32 accumulator acc), so nothing of size Lq x Lk ever exists. The intermediates are declared with
their logical shapes (e.g. S is [BH, Lq, Lk]), but every access to them sits under the loops of one
(head, query tile[, key tile]), so TVM's buffer compaction allocates only one tile of each
(S: TQ x TK, acc: TQ x Dv) per parallel task. The keys are packed once per head into contiguous
tiles (KTp: O(Lk x D)); Q and V are copied only when Lq / Lk need padding. Memory is
O(tokens x head_dim).

Tail handling: Lq and Lk need not be multiples of the tiles; padded keys are masked to -inf,
padded query rows are not stored.

bf16 on AVX512-BF16 (`engine="avx512bf16"`, every CPU with AMX has it too): both GEMMs run on
`vdpbf16ps` (gemm_cpu's intrinsic: 16 lanes x one pair of bf16 per instruction, float32
accumulators). Their right operands are packed pair-interleaved once per head, the keys as
KTp[b, kt, d // 2, j, d % 2] and the values as Vp[b, kt, j // 2, dv, j % 2]; P is rounded to bf16
(what torch's bf16 SDPA multiplies V by too) and the row sum adds the rounded values, so the
normalisation matches the product.

bf16 on AMX-BF16 (`engine="amx"`): the same packs are the pair-interleaved B operands that AMX
tiles read (16 pairs = one 64-byte tile row), so both GEMMs run on gemm_cpu's 32 x 32 x KT tile
intrinsic (`tdpbf16ps`): S = Q.K^T per 32 x 32 block over the whole head_dim, PV = P.V per
32 x 32 block over the key tile. It needs 32-row query tiles, key tiles and head_dims the
intrinsic has a KT for (`amx_engine_fits`, `choose_amx_tiles`); the softmax stays on AVX-512.

int8 scores (`engine="avx512vnni"`, what w8a8 builds use on CPUs with VNNI and AVX512-BF16, as
SageAttention does on GPUs): Q.K^T on `vpdpbusd` (gemm_cpu's VNNI intrinsic, int32 accumulators),
P.V on `vdpbf16ps` as above. Before the heads' loop, Q is quantized per row (symmetric int8 plus
128: vpdpbusd multiplies unsigned by signed) and K per key after the keys' mean over the sequence
is subtracted, which shifts each query's scores by one constant that softmax cannot see, and which
would otherwise take most of a key's 8 bits where the keys share an offset. The keys are packed
in quads, KTq[b, kt, d // 4, j, d % 4]. A score is then S * sk[j] - 128 * sum_d(kq[j]) * sk[j] (the
+128 taken back out, exactly, with the key's int8 sum), in units of the query row's scale, which
with C multiplies in exp2 (`crow`), so the running max and the softmax keep their float32 form.
On the DiT block's three attentions (Zen 4, default tiles): 0.85x the time of the bf16 kernel;
cosine ~0.99994 against float64 (bf16 kernel 0.99999) with keys sharing an offset of 4 sigma.

Numerics: all accumulation in fp32 (fp16/bf16 inputs are widened on load); exp is a vectorisable
exp2 polynomial (Cephes, rel. error ~2e-7) with exp(-inf) = 0 exactly; a row whose scores are all
-inf gives 0 (what torch's SDPA decomposition produces), not NaN.

Scheduling: `apply_schedule(sch)` gives untuned builds a register-blocked schedule (parallel over
head x query tiles; Q.K^T in rows x (vectors of keys) register tiles, P.V in rows x (vectors of
head_dim) tiles; AVX-512 or AVX2 lanes); `apply_schedule(sch, sample=True)` is the same schedule
with the register-tile sizes as MetaSchedule decisions. The PrimFunc's blocks carry a
`schedule_rule` annotation naming the custom rule registered here, so MetaSchedule's default
space generator ("post-order-apply") hands the kernel to that rule and tunes it like any task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T

from autotune.kernels import gemm_cpu, token_quant
from autotune.support import tvm_compat

# KERNEL_ATTR on a kernel: its shape and tiles
from autotune.support.ir import ATTENTION_ATTR as KERNEL_ATTR

LOG2E = 1.4426950408889634
RULE_NAME = "autotune_attention"  # MetaSchedule looks up s_tir.meta_schedule.<target key>.<name>
ENGINES = (None, gemm_cpu.AVX512, gemm_cpu.AMX, gemm_cpu.VNNI)  # widened fp32, vdpbf16ps, AMX tiles, int8 scores


@dataclass(frozen=True)
class CpuTiles:
    tq: int = 64  # query rows per parallel task
    tk: int = 64  # keys per online-softmax step
    lanes: int = 16  # vector lanes (16: AVX-512 fp32, 8: AVX2)


def vector_lanes(target) -> int:
    """fp32 lanes of the widest vector unit the target has (16 AVX-512, 8 AVX2, 4 NEON/other)."""
    if target is None:
        return 8
    attrs = target.attrs
    mcpu = str(attrs.get("mcpu", "")) if "mcpu" in attrs else ""
    mtriple = str(attrs.get("mtriple", "")) if "mtriple" in attrs else ""
    mattr = [str(a) for a in attrs["mattr"]] if "mattr" in attrs else []
    if "aarch64" in mtriple or "arm" in mtriple:
        return 4  # NEON (SVE builds still vectorise 4-wide here)
    if any("avx512" in a for a in mattr):
        return 16
    avx512_cpus = (
        "skylake-avx512", "cascadelake", "cooperlake", "icelake", "tigerlake", "rocketlake",
        "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5", "x86-64-v4",
    )
    if any(mcpu.startswith(c) for c in avx512_cpus):
        return 16
    return 8


def choose_tiles(lq: int, lk: int, d: int, dv: int, lanes: int) -> CpuTiles:
    """Tile sizes for one attention problem.

    Keys: TK = 64 (4 AVX-512 / 8 AVX2 vectors), fewer for short key sequences; padded to a
    multiple. Queries: a tile of about 64 rows that divides Lq when one exists (no padded rows),
    else 64 with padding; short sequences take one tile of Lq rounded up to 4.
    """
    tk = min(64, -(-lk // lanes) * lanes)
    tk = max(tk, lanes)
    if lq <= 64:
        return CpuTiles(tq=-(-lq // 4) * 4, tk=tk, lanes=lanes)
    for tq in (64, 60, 56, 52, 48, 72, 80, 44, 40):
        if lq % tq == 0:
            return CpuTiles(tq=tq, tk=tk, lanes=lanes)
    return CpuTiles(tq=64, tk=tk, lanes=lanes)


def dot_engine_fits(dtype: str, d: int, dv: int, tiles: CpuTiles) -> bool:
    """Whether a problem can take the vdpbf16ps kernel: bf16, head_dims in pairs and whole 16-lane vectors."""
    return dtype == "bfloat16" and d % 2 == 0 and dv % 16 == 0 and tiles.lanes == 16 and tiles.tk % 16 == 0


def int8_scores_fit(dtype: str, d: int, dv: int, tiles: CpuTiles) -> bool:
    """Whether a problem can take the int8-scores kernel (Q.K^T on vpdpbusd): the vdpbf16ps kernel's
    conditions, and a head_dim of whole 16-lane vectors (its quantizers reduce |q| in vectors)."""
    return dot_engine_fits(dtype, d, dv, tiles) and d % tiles.lanes == 0


def choose_amx_tiles(lq: int, lk: int) -> CpuTiles:
    """Tiles for the AMX kernel: 32 or 64 query rows and keys (the tile intrinsic's 32 x 32 blocks;
    64 when the sequence is longer than one block), AVX-512 lanes for the softmax."""
    return CpuTiles(tq=32 if lq <= 32 else 64, tk=32 if lk <= 32 else 64, lanes=16)


def amx_engine_fits(dtype: str, d: int, dv: int, tiles: CpuTiles) -> bool:
    """Whether a problem can take the AMX kernel: bf16, head_dim a KT of the tile intrinsic, dv whole
    32-column blocks, tiles of 32-row blocks."""
    kts = gemm_cpu.AMX_KT[gemm_cpu.BF16]
    return (dtype == "bfloat16" and d in kts and dv % 32 == 0 and tiles.tq % 32 == 0 and tiles.tk in kts
            and tiles.lanes == 16)


def _exp2(t):
    """2**t for float32 t <= 0, vectorisable: t = n + f, 2**n from the exponent bits, 2**f by a
    degree-6 polynomial on [-0.5, 0.5] (Cephes exp2f). t <= -127 (and -inf) gives exactly 0."""
    t = T.max(t, T.float32(-127.0))  # t <= 0 here: scores minus their running max
    n = T.round(t)
    f = t - n
    p = T.float32(1.535336188319500e-4)
    p = p * f + T.float32(1.339887440266574e-3)
    p = p * f + T.float32(9.618437357674640e-3)
    p = p * f + T.float32(5.550332471162809e-2)
    p = p * f + T.float32(2.402264791363012e-1)
    p = p * f + T.float32(6.931472028550421e-1)
    p = p * f + T.float32(1.0)
    bits = T.shift_left(T.Cast("int32", n) + 127, 23)
    return T.reinterpret("float32", bits) * p


def make_primfunc(
    bh: int, lq: int, lk: int, d: int, dv: int, scale: float, dtype: str, tiles: CpuTiles, k_layout: str = "kt",
    engine: str | None = None,
):
    """The unscheduled flash-attention PrimFunc for one static problem.

    k_layout: "kt" takes the keys transposed, KT (BH, D, Lk) (what the importers materialise when
    nothing can be peeled); "k" takes them as K (BH, Lk, D) (the layout torch passes to SDPA):
    either way they are packed once per head into contiguous key tiles.
    engine: "avx512bf16" puts both GEMMs of a bf16 kernel on `vdpbf16ps` (`dot_engine_fits` says when
    a problem can take it), "amx" on AMX tiles (`amx_engine_fits`), "avx512vnni" Q.K^T on vpdpbusd
    with int8 Q and K and P.V on vdpbf16ps (`int8_scores_fit`); None widens bf16 to float32 on load.

    Structure (t = head x query tile, a parallel loop; kt = key tile, serial):
        kt_pack                         keys packed per key tile (contiguous tiles, zero-padded)
        q_pad, v_pad                    padded fp32 copies (only when a length needs padding)
        for t (parallel), kt:
          block "scores" (t, kt):       S = Q.K^T, tile max, new running max, alpha, P = exp(S - m),
                                        tile sum          (reads the state m, writes tile buffers)
          block "update" (t, kt):       l = l*alpha + sum, m = max(m, tile max), PV = P.V,
                                        acc = acc*alpha + PV   (the online-softmax state)
        inv_l, out: O = acc * (1 / l)
    The two scope blocks make each a "stage pipeline" for the schedule primitives (the state is
    read in "scores" and written in "update"). Each sits under a unit loop: with two block
    realizes directly in the key loop's body, TVM 0.27's copy-on-write (ScheduleState::Replace
    checks uniqueness on loops and blocks only) mutates the *unscheduled* PrimFunc in place when
    the second one is scheduled, which corrupts MetaSchedule's workload (replays then fail).
    With an engine the "qk" and "pv" blocks bind only their tile's own indices and name
    the head, query tile and key tile in their bodies: tensorize's blockize in TVM 0.27 drops the
    enclosing scope block's variables from an inner binding (vb = ob became 0), which silently
    addressed head 0 and wrote outside the register tile.
    """
    if scale <= 0:
        raise ValueError(f"attention scale must be positive (got {scale}); fold a negative scale into Q")
    if k_layout not in ("kt", "k"):
        raise ValueError(f"k_layout must be 'kt' or 'k', not {k_layout!r}")
    TQ, TK, W = tiles.tq, tiles.tk, tiles.lanes
    K_SHAPE = (bh, d, lk) if k_layout == "kt" else (bh, lk, d)
    KT_LAYOUT = k_layout == "kt"
    if engine not in ENGINES:
        raise ValueError(f"attention engine must be one of {ENGINES}, not {engine!r}")
    DOT = engine is not None
    AMX = engine == gemm_cpu.AMX
    I8 = engine == gemm_cpu.VNNI  # int8 scores: Q.K^T on vpdpbusd, P.V on vdpbf16ps
    if I8 and not int8_scores_fit(dtype, d, dv, tiles):
        raise ValueError(f"the int8-scores attention needs bf16, head_dim and dv multiples of 16 and 16-lane tiles "
                         f"(got {dtype}, d {d}, dv {dv}, {tiles})")
    if engine == gemm_cpu.AVX512 and not dot_engine_fits(dtype, d, dv, tiles):
        raise ValueError(f"the {engine} attention needs bf16, even head_dim, 16-lane tiles and dv % 16 == 0 "
                         f"(got {dtype}, d {d}, dv {dv}, {tiles})")
    if AMX and not amx_engine_fits(dtype, d, dv, tiles):
        raise ValueError(f"the AMX attention needs bf16, head_dim in {gemm_cpu.AMX_KT[gemm_cpu.BF16]}, dv % 32 == 0 "
                         f"and tiles from choose_amx_tiles (got {dtype}, d {d}, dv {dv}, {tiles})")
    if TK % W:
        raise ValueError(f"key tile {TK} is not a multiple of the vector width {W}")
    NQ, NK = -(-lq // TQ), -(-lk // TK)
    LQP, LKP = NQ * TQ, NK * TK
    PAD_Q, PAD_K = LQP != lq, LKP != lk
    C = float(scale * LOG2E)  # exp(scale * (s - m)) = 2 ** (C * (s - m))
    NEG = -math.inf
    acc_t = "float32"
    JO = TK // W
    BH, LQ, LK, D, DV = bh, lq, lk, d, dv
    f32 = T.float32
    INFO = {"bh": bh, "lq": lq, "lk": lk, "d": d, "dv": dv, "tq": TQ, "tk": TK, "lanes": W,
            "pad_q": int(PAD_Q), "pad_k": int(PAD_K), "scale": float(scale), "k_transposed": int(KT_LAYOUT)}
    if DOT:  # (only then: the attribute is part of every recorded workload's hash)
        INFO["bf16_dot"] = 1
    if AMX:
        INFO["amx"] = 1
    if I8:
        INFO["int8_scores"] = 1
    QMAX, DO = token_quant.INT8_MAX, D // W
    in_t = dtype if DOT else acc_t  # what the packed operands and P hold (P rounded to bf16 for the dot product)

    def load(x):
        return x if dtype == acc_t else T.Cast(acc_t, x)

    def keep(x):  # an input value as the packs hold it
        return x if DOT else load(x)

    def zero():
        return T.Cast(in_t, f32(0.0)) if DOT else f32(0.0)

    def q_val(Q, vb, vi, vk):
        if PAD_Q:
            return T.if_then_else(vi < LQ, keep(Q[vb, T.min(vi, LQ - 1), vk]), zero())
        return keep(Q[vb, vi, vk])

    def k_at(K, vb, vk, vj):  # key vj, feature vk, in either layout
        return K[vb, vk, vj] if KT_LAYOUT else K[vb, vj, vk]

    def kt_val(K, vb, vk, vj):
        if PAD_K:
            return T.if_then_else(vj < LK, keep(k_at(K, vb, vk, T.min(vj, LK - 1))), zero())
        return keep(k_at(K, vb, vk, vj))

    def v_val(V, vb, vj, vk):
        if PAD_K:
            return T.if_then_else(vj < LK, keep(V[vb, T.min(vj, LK - 1), vk]), zero())
        return keep(V[vb, vj, vk])

    def rounded_p(x):
        return T.Cast(in_t, x) if DOT else x

    def p_val(P, vb, vi, vj):
        return load(P[vb, vi, vj]) if DOT else P[vb, vi, vj]

    def pv_val(PV, vb, vi, vkt, vk):  # the P.V tile's element in either layout
        return PV[vb, vkt, vi, vk] if AMX else PV[vb, vi, vkt, vk]

    def score(S, KS, vb, vi, vj):  # I8: int8 scores in units of the query row's scale (KS: the keys' scale and shift)
        if I8:
            return T.Cast(acc_t, S[vb, vi, vj]) * KS[0][vb, vj] - KS[1][vb, vj]
        return S[vb, vi, vj]

    def masked(S, KS, vb, vi, vj):  # padded keys score -inf
        if PAD_K:
            return T.Select(vj < LK, score(S, KS, vb, vi, vj), f32(NEG))
        return score(S, KS, vb, vi, vj)

    def c_row(crow, vb, vi):  # the scores' factor in exp2 (I8: crow holds C x the query row's scale)
        return crow[vb, vi] if I8 else f32(C)

    def key(KT, kmean, vb, vk, vj):  # I8: key vj's feature vk less the keys' mean (softmax is blind to it)
        return load(k_at(KT, vb, vk, T.min(vj, LK - 1))) - kmean[vb, vk]

    def inv_scale(amax):  # 127 / the row's scale
        return f32(QMAX) / T.max(amax, f32(token_quant.MIN_SCALE))

    def m_old(m, vb, vi, vkt):  # the running max before key tile vkt (m is not yet set at 0)
        return T.Select(vkt == 0, f32(NEG), m[vb, vi])

    def safe(mx):  # the running max, 0 while it is still -inf (keeps exp(-inf - -inf) out)
        return T.Select(mx == f32(NEG), f32(0.0), mx)

    @tvm_compat.prim_func(private=True, s_tir=True)
    def attention(
        Q: T.Buffer((BH, LQ, D), dtype),
        KT: T.Buffer(K_SHAPE, dtype),
        V: T.Buffer((BH, LK, DV), dtype),
        O: T.Buffer((BH, LQ, DV), dtype),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: INFO})
        Qp = T.sblock_alloc_buffer((BH, LQP, D) if PAD_Q and not I8 else (1,), in_t)
        KTp = T.sblock_alloc_buffer((1,) if I8 else (BH, NK, D // 2, TK, 2) if DOT else (BH, NK, D, TK), in_t)
        Vp = T.sblock_alloc_buffer((BH, NK, TK // 2, DV, 2) if DOT else ((BH, LKP, DV) if PAD_K else (1,)), in_t)
        S = T.sblock_alloc_buffer((BH, LQP, LKP), "int32" if I8 else acc_t)
        P = T.sblock_alloc_buffer((BH, LQP, LKP), in_t)
        tmax_w = T.sblock_alloc_buffer((BH, LQP, NK, W), acc_t)
        tmax = T.sblock_alloc_buffer((BH, LQP, NK), acc_t)
        mnew = T.sblock_alloc_buffer((BH, LQP, NK), acc_t)
        alpha = T.sblock_alloc_buffer((BH, LQP, NK), acc_t)
        lsum_w = T.sblock_alloc_buffer((BH, LQP, NK, W), acc_t)
        lsum = T.sblock_alloc_buffer((BH, LQP, NK), acc_t)
        # (AMX: the key tile leads, so that a 32 x 32 block of PV is a plain 2-D region for the tile intrinsic)
        PV = T.sblock_alloc_buffer((BH, NK, LQP, DV) if AMX else (BH, LQP, NK, DV), acc_t)
        m = T.sblock_alloc_buffer((BH, LQP), acc_t)
        l = T.sblock_alloc_buffer((BH, LQP), acc_t)
        acc = T.sblock_alloc_buffer((BH, LQP, DV), acc_t)
        rl = T.sblock_alloc_buffer((BH, LQP), acc_t)
        if I8:
            Qq = T.sblock_alloc_buffer((BH, LQP, D), "uint8")  # Q per row in int8, + 128
            qamax_w = T.sblock_alloc_buffer((BH, LQP, W), acc_t)
            qamax = T.sblock_alloc_buffer((BH, LQP), acc_t)
            crow = T.sblock_alloc_buffer((BH, LQP), acc_t)  # C x the row's scale
            kmean = T.sblock_alloc_buffer((BH, D), acc_t)
            kamax_w = T.sblock_alloc_buffer((BH, LKP, W), acc_t)
            kamax = T.sblock_alloc_buffer((BH, LKP), acc_t)
            KTq = T.sblock_alloc_buffer((BH, NK, D // 4, TK, 4), "int8")  # keys in int8, quads of head_dim
            ksum = T.sblock_alloc_buffer((BH, LKP), "int32")
            kscale = T.sblock_alloc_buffer((BH, LKP), acc_t)
            kshift = T.sblock_alloc_buffer((BH, LKP), acc_t)  # 128 x the key's int8 sum x its scale
        if PAD_Q and not I8:
            for b, i, k in T.grid(BH, LQP, D):
                with T.sblock("q_pad"):
                    vb, vi, vk = T.axis.remap("SSS", [b, i, k])
                    Qp[vb, vi, vk] = q_val(Q, vb, vi, vk)
        # Keys are packed tile by tile (KTp[b, kt, d, j], contiguous per key tile): read in
        # place, the rows of a key tile are Lk floats apart and alias in the L1 cache.
        if I8:  # Q per row, K per key (less the keys' mean), symmetric int8; K packed in quads as vpdpbusd reads it
            for b, i, do, w in T.grid(BH, LQP, DO, W):
                with T.sblock("q_amax_w"):
                    vb, vi, vdo, vw = T.axis.remap("SSRS", [b, i, do, w])
                    with T.init():
                        qamax_w[vb, vi, vw] = f32(0.0)
                    qamax_w[vb, vi, vw] = T.max(qamax_w[vb, vi, vw], T.abs(load(q_val(Q, vb, vi, vdo * W + vw))))
            for b, i, w in T.grid(BH, LQP, W):
                with T.sblock("q_amax"):
                    vb, vi, vw = T.axis.remap("SSR", [b, i, w])
                    with T.init():
                        qamax[vb, vi] = f32(0.0)
                    qamax[vb, vi] = T.max(qamax[vb, vi], qamax_w[vb, vi, vw])
            for b, i, k in T.grid(BH, LQP, D):
                with T.sblock("q_quant"):
                    vb, vi, vk = T.axis.remap("SSS", [b, i, k])
                    Qq[vb, vi, vk] = T.Cast("uint8", T.Cast("int32", T.round(load(q_val(Q, vb, vi, vk)) * inv_scale(qamax[vb, vi]))) + 128)
            for b, i in T.grid(BH, LQP):
                with T.sblock("q_scale"):
                    vb, vi = T.axis.remap("SS", [b, i])
                    crow[vb, vi] = T.max(qamax[vb, vi], f32(token_quant.MIN_SCALE)) * f32(C / QMAX)
            for b, j, k in T.grid(BH, LK, D):
                with T.sblock("k_mean"):
                    vb, vj, vk = T.axis.remap("SRS", [b, j, k])
                    with T.init():
                        kmean[vb, vk] = f32(0.0)
                    kmean[vb, vk] = kmean[vb, vk] + load(k_at(KT, vb, vk, vj)) * f32(1.0 / LK)
            for b, j, do, w in T.grid(BH, LKP, DO, W):
                with T.sblock("k_amax_w"):
                    vb, vj, vdo, vw = T.axis.remap("SSRS", [b, j, do, w])
                    with T.init():
                        kamax_w[vb, vj, vw] = f32(0.0)
                    kamax_w[vb, vj, vw] = T.max(kamax_w[vb, vj, vw], T.abs(key(KT, kmean, vb, vdo * W + vw, vj)))
            for b, j, w in T.grid(BH, LKP, W):
                with T.sblock("k_amax"):
                    vb, vj, vw = T.axis.remap("SSR", [b, j, w])
                    with T.init():
                        kamax[vb, vj] = f32(0.0)
                    kamax[vb, vj] = T.max(kamax[vb, vj], kamax_w[vb, vj, vw])
            for b, kt, k, j, e in T.grid(BH, NK, D // 4, TK, 4):
                with T.sblock("kt_pack"):
                    vb, vkt, vk, vj, ve = T.axis.remap("SSSSS", [b, kt, k, j, e])
                    KTq[vb, vkt, vk, vj, ve] = T.Cast("int8", T.Select(
                        vkt * TK + vj < LK,
                        T.round(key(KT, kmean, vb, vk * 4 + ve, vkt * TK + vj) * inv_scale(kamax[vb, vkt * TK + vj])), f32(0.0)))
            for b, j, k in T.grid(BH, LKP, D):
                with T.sblock("k_sum"):
                    vb, vj, vk = T.axis.remap("SSR", [b, j, k])
                    with T.init():
                        ksum[vb, vj] = 0
                    ksum[vb, vj] = ksum[vb, vj] + T.Cast("int32", KTq[vb, vj // TK, vk // 4, vj % TK, vk % 4])
            for b, j in T.grid(BH, LKP):
                with T.sblock("k_scale"):
                    vb, vj = T.axis.remap("SS", [b, j])
                    kscale[vb, vj] = T.max(kamax[vb, vj], f32(token_quant.MIN_SCALE)) * f32(1.0 / QMAX)
                    kshift[vb, vj] = T.Cast(acc_t, ksum[vb, vj]) * f32(128.0) * T.max(kamax[vb, vj], f32(token_quant.MIN_SCALE)) * f32(1.0 / QMAX)
        if DOT and not I8:  # pairs of head_dim (keys) and of keys (values) side by side, as vdpbf16ps reads them
            for b, kt, k, j, e in T.grid(BH, NK, D // 2, TK, 2):
                with T.sblock("kt_pack"):
                    vb, vkt, vk, vj, ve = T.axis.remap("SSSSS", [b, kt, k, j, e])
                    KTp[vb, vkt, vk, vj, ve] = kt_val(KT, vb, vk * 2 + ve, vkt * TK + vj)
        if DOT:
            for b, kt, j, k, e in T.grid(BH, NK, TK // 2, DV, 2):
                with T.sblock("v_pack"):
                    vb, vkt, vj, vk, ve = T.axis.remap("SSSSS", [b, kt, j, k, e])
                    Vp[vb, vkt, vj, vk, ve] = v_val(V, vb, vkt * TK + vj * 2 + ve, vk)
        else:
            for b, kt, k, j in T.grid(BH, NK, D, TK):
                with T.sblock("kt_pack"):
                    vb, vkt, vk, vj = T.axis.remap("SSSS", [b, kt, k, j])
                    KTp[vb, vkt, vk, vj] = kt_val(KT, vb, vk, vkt * TK + vj)
            if PAD_K:
                for b, j, k in T.grid(BH, LKP, DV):
                    with T.sblock("v_pad"):
                        vb, vj, vk = T.axis.remap("SSS", [b, j, k])
                        Vp[vb, vj, vk] = v_val(V, vb, vj, vk)
        Qs = T.meta_var(Qq if I8 else Qp if PAD_Q else Q)
        KS = T.meta_var((kscale, kshift) if I8 else None)
        CROW = T.meta_var(crow if I8 else None)
        Vs = T.meta_var(Vp if (PAD_K or DOT) else V)
        for t in T.parallel(BH * NQ):
            for kt in range(NK):
                for _s in range(1):  # a loop between kt and the block: see make_primfunc doc
                    with T.sblock("scores"):
                        ob = T.axis.spatial(BH, t // NQ)
                        oq = T.axis.spatial(NQ, t % NQ)
                        okt = T.axis.spatial(NK, kt)
                        if I8:  # (as the bf16 one below) int32: the quantized rows, the shift taken out in `score`
                            for qi, kj, k in T.grid(TQ, TK, D):
                                with T.sblock("qk"):
                                    vi, vkj, vk = T.axis.remap("SSR", [qi, kj, k])
                                    with T.init():
                                        S[ob, oq * TQ + vi, okt * TK + vkj] = 0
                                    S[ob, oq * TQ + vi, okt * TK + vkj] = S[ob, oq * TQ + vi, okt * TK + vkj] + T.Cast("int32", Qs[ob, oq * TQ + vi, vk]) * T.Cast("int32", KTq[ob, okt, vk // 4, vkj, vk % 4])
                        elif DOT:  # the tile's own indices only (see the docstring: blockize)
                            for qi, kj, k in T.grid(TQ, TK, D):
                                with T.sblock("qk"):
                                    vi, vkj, vk = T.axis.remap("SSR", [qi, kj, k])
                                    with T.init():
                                        S[ob, oq * TQ + vi, okt * TK + vkj] = f32(0.0)
                                    S[ob, oq * TQ + vi, okt * TK + vkj] = S[ob, oq * TQ + vi, okt * TK + vkj] + load(Qs[ob, oq * TQ + vi, vk]) * load(KTp[ob, okt, vk // 2, vkj, vk % 2])
                        else:
                            for qi, kj, k in T.grid(TQ, TK, D):
                                with T.sblock("qk"):
                                    vb = T.axis.spatial(BH, ob)
                                    vi = T.axis.spatial(LQP, oq * TQ + qi)
                                    vkt = T.axis.spatial(NK, okt)
                                    vkj = T.axis.spatial(TK, kj)
                                    vk = T.axis.reduce(D, k)
                                    with T.init():
                                        S[vb, vi, vkt * TK + vkj] = f32(0.0)
                                    S[vb, vi, vkt * TK + vkj] = S[vb, vi, vkt * TK + vkj] + load(Qs[vb, vi, vk]) * KTp[vb, vkt, vk, vkj]
                        for qi, jo, w in T.grid(TQ, JO, W):
                            with T.sblock("tile_max_w"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                vw = T.axis.spatial(W, w)
                                vjo = T.axis.reduce(JO, jo)
                                with T.init():
                                    tmax_w[vb, vi, vkt, vw] = f32(NEG)
                                tmax_w[vb, vi, vkt, vw] = T.max(tmax_w[vb, vi, vkt, vw], masked(S, KS, vb, vi, vkt * TK + vjo * W + vw))
                        for qi, w in T.grid(TQ, W):
                            with T.sblock("tile_max"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                vw = T.axis.reduce(W, w)
                                with T.init():
                                    tmax[vb, vi, vkt] = f32(NEG)
                                tmax[vb, vi, vkt] = T.max(tmax[vb, vi, vkt], tmax_w[vb, vi, vkt, vw])
                        for qi in range(TQ):
                            with T.sblock("m_new"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                mnew[vb, vi, vkt] = T.max(m_old(m, vb, vi, vkt), tmax[vb, vi, vkt])
                        for qi in range(TQ):
                            with T.sblock("alpha"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                alpha[vb, vi, vkt] = _exp2((m_old(m, vb, vi, vkt) - safe(mnew[vb, vi, vkt])) * c_row(CROW, vb, vi))
                        for qi, kj in T.grid(TQ, TK):
                            with T.sblock("p"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                vkj = T.axis.spatial(TK, kj)
                                P[vb, vi, vkt * TK + vkj] = rounded_p(_exp2((masked(S, KS, vb, vi, vkt * TK + vkj) - safe(mnew[vb, vi, vkt])) * c_row(CROW, vb, vi)))
                        for qi, jo, w in T.grid(TQ, JO, W):
                            with T.sblock("tile_sum_w"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                vw = T.axis.spatial(W, w)
                                vjo = T.axis.reduce(JO, jo)
                                with T.init():
                                    lsum_w[vb, vi, vkt, vw] = f32(0.0)
                                lsum_w[vb, vi, vkt, vw] = lsum_w[vb, vi, vkt, vw] + p_val(P, vb, vi, vkt * TK + vjo * W + vw)
                        for qi, w in T.grid(TQ, W):
                            with T.sblock("tile_sum"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.spatial(NK, okt)
                                vw = T.axis.reduce(W, w)
                                with T.init():
                                    lsum[vb, vi, vkt] = f32(0.0)
                                lsum[vb, vi, vkt] = lsum[vb, vi, vkt] + lsum_w[vb, vi, vkt, vw]
                for _u in range(1):
                    with T.sblock("update"):
                        # okt is declared spatial although the state (l, m, acc) carries over key tiles:
                        # a reduction iter here keeps TVM from allocating the P.V tile inside the
                        # key loop. The state stays allocated outside it because "out" reads it.
                        ob = T.axis.spatial(BH, t // NQ)
                        oq = T.axis.spatial(NQ, t % NQ)
                        okt = T.axis.spatial(NK, kt)
                        for qi in range(TQ):
                            with T.sblock("update_l"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.reduce(NK, okt)
                                with T.init():
                                    l[vb, vi] = f32(0.0)
                                l[vb, vi] = l[vb, vi] * alpha[vb, vi, vkt] + lsum[vb, vi, vkt]
                        for qi in range(TQ):
                            with T.sblock("update_m"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vkt = T.axis.reduce(NK, okt)
                                with T.init():
                                    m[vb, vi] = f32(NEG)
                                m[vb, vi] = T.max(m[vb, vi], tmax[vb, vi, vkt])
                        if AMX:
                            for qi, k, kj in T.grid(TQ, DV, TK):
                                with T.sblock("pv"):
                                    vi, vk, vkj = T.axis.remap("SSR", [qi, k, kj])
                                    with T.init():
                                        PV[ob, okt, oq * TQ + vi, vk] = f32(0.0)
                                    PV[ob, okt, oq * TQ + vi, vk] = PV[ob, okt, oq * TQ + vi, vk] + load(P[ob, oq * TQ + vi, okt * TK + vkj]) * load(Vs[ob, okt, vkj // 2, vk, vkj % 2])
                        elif DOT:
                            for qi, k, kj in T.grid(TQ, DV, TK):
                                with T.sblock("pv"):
                                    vi, vk, vkj = T.axis.remap("SSR", [qi, k, kj])
                                    with T.init():
                                        PV[ob, oq * TQ + vi, okt, vk] = f32(0.0)
                                    PV[ob, oq * TQ + vi, okt, vk] = PV[ob, oq * TQ + vi, okt, vk] + load(P[ob, oq * TQ + vi, okt * TK + vkj]) * load(Vs[ob, okt, vkj // 2, vk, vkj % 2])
                        else:
                            for qi, k, kj in T.grid(TQ, DV, TK):
                                with T.sblock("pv"):
                                    vb = T.axis.spatial(BH, ob)
                                    vi = T.axis.spatial(LQP, oq * TQ + qi)
                                    vkt = T.axis.spatial(NK, okt)
                                    vk = T.axis.spatial(DV, k)
                                    vkj = T.axis.reduce(TK, kj)
                                    with T.init():
                                        PV[vb, vi, vkt, vk] = f32(0.0)
                                    PV[vb, vi, vkt, vk] = PV[vb, vi, vkt, vk] + P[vb, vi, vkt * TK + vkj] * load(Vs[vb, vkt * TK + vkj, vk])
                        for qi, k in T.grid(TQ, DV):
                            with T.sblock("update_acc"):
                                vb = T.axis.spatial(BH, ob)
                                vi = T.axis.spatial(LQP, oq * TQ + qi)
                                vk = T.axis.spatial(DV, k)
                                vkt = T.axis.reduce(NK, okt)
                                with T.init():
                                    acc[vb, vi, vk] = f32(0.0)
                                acc[vb, vi, vk] = acc[vb, vi, vk] * alpha[vb, vi, vkt] + pv_val(PV, vb, vi, vkt, vk)
            for qi in range(TQ):
                with T.sblock("inv_l"):
                    vb = T.axis.spatial(BH, t // NQ)
                    vi = T.axis.spatial(LQP, t % NQ * TQ + qi)
                    # m == -inf: every score of the row was -inf (l == 0): output 0, as torch's
                    # guard does. (Reading m here also keeps its allocation outside the key loop.)
                    rl[vb, vi] = T.Select(m[vb, vi] == f32(NEG), f32(0.0), f32(1.0) / l[vb, vi])
            for qi, k in T.grid(TQ, DV):
                with T.sblock("out"):
                    vb = T.axis.spatial(BH, t // NQ)
                    vi = T.axis.spatial(LQP, t % NQ * TQ + qi)
                    vk = T.axis.spatial(DV, k)
                    T.where(t % NQ * TQ + qi < LQ)
                    O[vb, vi, vk] = T.Cast(dtype, acc[vb, vi, vk] * rl[vb, vi])

    return attention


# --- schedules ------------------------------------------------------------------------------------


AVX2_REGISTERS = 16  # vector registers (ymm0-15): the float32 register tiles' budget on AVX2


@dataclass(frozen=True)
class CpuKnobs:
    """Register tiles of the two micro-kernels (the tunable part of the schedule)."""

    qk_rows: int = 8  # query rows per Q.K^T register tile
    qk_vecs: int = 2  # key vectors (of `lanes`) per Q.K^T register tile
    pv_rows: int = 4  # query rows per P.V register tile
    pv_vecs: int = 4  # head_dim vectors per P.V register tile


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(f for f in range(1, min(n, cap) + 1) if n % f == 0)


def default_knobs(tiles: CpuTiles, d: int, dv: int, dot: bool = False) -> CpuKnobs:
    lanes = tiles.lanes
    if dot:  # vdpbf16ps tiles: at most 7 rows x 2 vectors of accumulators
        rows = _largest_divisor_at_most(tiles.tq, 7)
        return CpuKnobs(rows, _largest_divisor_at_most(tiles.tk // lanes, 2), rows, _largest_divisor_at_most(dv // lanes, 2))
    qk_rows, qk_vecs = _register_tile(tiles, tiles.tk // lanes, 2)
    dv_vecs = max(1, dv // lanes) if dv % lanes == 0 else 0
    pv_rows, pv_vecs = _register_tile(tiles, dv_vecs, 4) if dv_vecs else (_largest_divisor_at_most(tiles.tq, 16), 0)
    return CpuKnobs(qk_rows, qk_vecs, pv_rows, pv_vecs)


def _register_tile(tiles: CpuTiles, vectors: int, most_vectors: int) -> tuple[int, int]:
    """(rows, vectors) of a float32 register tile over `vectors` vectors: the most vectors (up to
    `most_vectors`), then rows up to 16 accumulators. On AVX2 (8 lanes, 16 vector registers) the
    tile also leaves a register for each vector of the other operand and one for the broadcast:
    the most accumulators that do, then the most vectors (its P.V tile of 4 x 4 vectors spilled:
    12 x 1560 x 1560 x 128 at 89 GFLOP/s against 165 at 6 x 2 on a Zen 2)."""
    vecs = _largest_divisor_at_most(vectors, most_vectors)
    rows = _largest_divisor_at_most(tiles.tq, 16 // vecs)
    if tiles.lanes != 8 or rows * vecs + vecs + 1 <= AVX2_REGISTERS:
        return rows, vecs
    fitting = [(_largest_divisor_at_most(tiles.tq, min(16 // v, (AVX2_REGISTERS - 1 - v) // v)), v)
               for v in _divisors(vectors, 1, most_vectors)]
    return max(fitting, key=lambda tile: (tile[0] * tile[1], tile[1]))


def _kernel_info(sch) -> dict:
    func = sch.mod["main"]
    info = func.attrs[KERNEL_ATTR] if func.attrs is not None and KERNEL_ATTR in func.attrs else None
    if info is None:
        raise ValueError(f"not an autotune attention kernel (no {KERNEL_ATTR} attribute)")
    return {k: int(v) for k, v in info.items()}


def _vectorize_tail(sch, loop, lanes: int):
    """Vectorise `loop` if it has at most `lanes`·k iterations; split off `lanes` otherwise."""
    extent = int(sch.get(loop).extent)
    if extent <= lanes:
        sch.vectorize(loop)
    elif extent % lanes == 0:
        _, inner = sch.split(loop, factors=[None, lanes])
        sch.vectorize(inner)


def _divisors(n: int, lo: int, hi: int) -> list[int]:
    found = [f for f in range(lo, hi + 1) if n % f == 0]
    return found or [n]


def _sample(sch, candidates: list[int]):
    """A MetaSchedule decision among `candidates` (uniform prior). Candidates are never 1 for
    row counts: a unit loop would vanish under compute-at and change the trace's shape."""
    if len(candidates) == 1:
        return candidates[0]
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))


def apply_schedule(sch, knobs: CpuKnobs | None = None, sample: bool = False):
    """Schedule the attention PrimFunc in `sch` (a tvm.s_tir.Schedule) in place.

    knobs: the register tiles (default: `default_knobs`). sample=True makes the register tiles
    MetaSchedule sampled decisions (sample_categorical over the valid sizes) so that the search
    explores them.
    """
    info = _kernel_info(sch)
    W = info["lanes"]
    tq, tk, d, dv = info["tq"], info["tk"], info["d"], info["dv"]
    dot = bool(info.get("bf16_dot", 0))
    amx = bool(info.get("amx", 0))
    int8 = bool(info.get("int8_scores", 0))
    knobs = knobs or default_knobs(CpuTiles(tq, tk, W), d, dv, dot)

    # Padding copies (only where a length is not a multiple of its tile) and the key/value packs.
    for name, padded in (("q_pad", info["pad_q"] and not int8), ("v_pad", info["pad_k"] and not dot)):
        if not padded:
            continue
        b, x, y = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(b, x))
        _vectorize_tail(sch, y, W)
    if int8:
        _schedule_quantizers(sch, W)
    if dot:
        for name in ("kt_pack", "v_pack"):
            b, kt, _, y, e = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(b, kt))
            _vectorize_tail(sch, sch.fuse(y, e), 2 * W)
    else:
        b, kt, k, j = sch.get_loops(sch.get_sblock("kt_pack"))
        sch.parallel(sch.fuse(b, kt))
        _vectorize_tail(sch, j, W)

    # Q.K^T: register tile (rows x vecs*W) accumulated over head_dim, then stored to the S tile.
    qk = sch.get_sblock("qk")
    qi, kj, k = sch.get_loops(qk)[-3:]
    if amx:
        _amx_tile(sch, qk, qi, kj, k, d, W)
    elif dot:
        _dot_tile(sch, qk, qi, kj, k, tq, tk // W, knobs.qk_rows, knobs.qk_vecs, W, sample, import_llvm=not int8,
                  int8=int8)
    else:
        if sample:
            rows = _sample(sch, _divisors(tq, 2, 16))
            cols = _sample(sch, [v * W for v in _divisors(tk // W, 1, 4)])
        else:
            rows, cols = knobs.qk_rows, knobs.qk_vecs * W
        qi_o, qi_i = sch.split(qi, factors=[None, rows])
        kj_o, kj_i = sch.split(kj, factors=[None, cols])
        sch.reorder(qi_o, kj_o, k, qi_i, kj_i)
        wb = sch.cache_write(qk, 0, "global")
        sch.reverse_compute_at(wb, kj_o)
        sch.unroll(qi_i)
        sch.vectorize(kj_i)
        sch.decompose_reduction(qk, k)  # init loops inherit unroll / vectorize
        wl = sch.get_loops(wb)
        sch.unroll(wl[-2])
        sch.vectorize(wl[-1])

    # Row max / row sum over a key tile: W-wide partial reductions (vectorised), then W -> 1.
    for name in ("tile_max_w", "tile_sum_w"):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        sch.vectorize(loops[-1])
        sch.decompose_reduction(blk, loops[-2])
    for name in ("tile_max", "tile_sum"):
        sch.unroll(sch.get_loops(sch.get_sblock(name))[-1])

    p = sch.get_sblock("p")
    _vectorize_tail(sch, sch.get_loops(p)[-1], W)

    # P.V: register tile (rows x vecs*W of head_dim) accumulated over the key tile, then
    # acc = acc * alpha + tile, fused in at the tile.
    pv = sch.get_sblock("pv")
    qi, k, kj = sch.get_loops(pv)[-3:]
    upd = sch.get_sblock("update_acc")
    if amx:
        _amx_tile(sch, pv, qi, k, kj, tk, W, consumer=upd)
    elif dot:
        k_o = _dot_tile(sch, pv, qi, k, kj, tq, dv // W, knobs.pv_rows, knobs.pv_vecs, W, sample, import_llvm=int8)
        sch.reverse_compute_at(upd, k_o)
        ul = sch.get_loops(upd)
        sch.unroll(ul[-2])
        sch.vectorize(ul[-1])
    elif dv % W == 0:
        if sample:
            rows = _sample(sch, _divisors(tq, 2, 16))
            cols = _sample(sch, [v * W for v in _divisors(dv // W, 1, 8)])
        else:
            rows, cols = knobs.pv_rows, knobs.pv_vecs * W
        qi_o, qi_i = sch.split(qi, factors=[None, rows])
        k_o, k_i = sch.split(k, factors=[None, cols])
        sch.reorder(qi_o, k_o, kj, qi_i, k_i)
        sch.reverse_compute_at(upd, k_o)
        sch.unroll(qi_i)
        sch.vectorize(k_i)
        ul = sch.get_loops(upd)
        sch.unroll(ul[-2])
        sch.vectorize(ul[-1])
        sch.decompose_reduction(pv, kj)
    else:  # odd head_dim: plain loops, vectorised where they can be
        sch.reorder(qi, kj, k)
        sch.decompose_reduction(pv, kj)
    for name in ("out",):
        _vectorize_tail(sch, sch.get_loops(sch.get_sblock(name))[-1], W)
    return sch


def _dot_tile(sch, block, rows_loop, cols_loop, red_loop, total_rows, vectors, rows, vecs, W, sample, import_llvm=False,
              int8=False):
    """One of the two GEMMs on vdpbf16ps (`int8`: on vpdpbusd): a register tile of `rows` x `vecs`
    16-lane accumulators (at most 14: the tile stays in registers) over the reduction in pairs
    (quads), stored once. Returns the loop the stored tile sits under."""
    if sample:
        rows = _sample(sch, _divisors(total_rows, 2, 7))
        vecs = _sample(sch, _divisors(vectors, 1, 2))
    r_o, r_i = sch.split(rows_loop, factors=[None, rows])
    c_o, c_v, c_l = sch.split(cols_loop, factors=[None, vecs, W])
    pair, half = sch.split(red_loop, factors=[None, 4 if int8 else 2])
    sch.reorder(r_o, c_o, pair, r_i, c_v, c_l, half)
    if import_llvm:
        sch.annotate(r_o, "pragma_import_llvm", gemm_cpu.DPBF16_LLVM)
    wb = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(wb, c_o)
    init = sch.decompose_reduction(block, pair)
    sch.tensorize(c_l, gemm_cpu.VNNI_INTRIN if int8 else gemm_cpu.DPBF16_INTRIN)
    sch.unroll(r_i)
    sch.unroll(c_v)
    init_loops, wb_loops = sch.get_loops(init), sch.get_loops(wb)
    for loop in (init_loops[-3], init_loops[-2], wb_loops[-2]):
        sch.unroll(loop)
    sch.vectorize(init_loops[-1])
    sch.vectorize(wb_loops[-1])
    return c_o


def _schedule_quantizers(sch, W):
    """The int8-scores kernel's quantizers of Q and K: rows across the cores, |x| maxima in vector
    partials (as the tile maxima), the quantized rows in vectors along head_dim."""
    for name in ("q_amax_w", "k_amax_w"):
        block = sch.get_sblock(name)
        b, i, do, w = sch.get_loops(block)
        sch.parallel(sch.fuse(b, i))
        sch.vectorize(w)
        sch.decompose_reduction(block, do)
    for name in ("q_amax", "k_amax"):
        b, i, w = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(b, i))
        sch.unroll(w)
    b, i, k = sch.get_loops(sch.get_sblock("q_quant"))
    sch.parallel(sch.fuse(b, i))
    _vectorize_tail(sch, k, W)
    for name in ("q_scale", "k_scale"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
    mean = sch.get_sblock("k_mean")
    b, j, k = sch.get_loops(mean)
    sch.parallel(b)
    _vectorize_tail(sch, k, W)
    sch.decompose_reduction(mean, j)
    b, j, _ = sch.get_loops(sch.get_sblock("k_sum"))
    sch.parallel(sch.fuse(b, j))


def _amx_tile(sch, block, rows_loop, cols_loop, red_loop, kt, W, consumer=None):
    """One of the two GEMMs on AMX: 32 x 32 blocks of the tile, each the tile intrinsic over the whole
    reduction (`kt` long) on a zeroed block; `consumer` (a block reading the tile) is fused in per
    block. (Before tensorize: after it, TVM 0.27's reverse_compute_at trips over the replaced block.)"""
    r_o, r_i = sch.split(rows_loop, factors=[None, 32])
    c_o, c_i = sch.split(cols_loop, factors=[None, 32])
    sch.reorder(r_o, c_o, r_i, c_i, red_loop)
    init = sch.decompose_reduction(block, r_i)
    _vectorize_tail(sch, sch.get_loops(init)[-1], W)
    if consumer is not None:
        sch.reverse_compute_at(consumer, c_o)
        _vectorize_tail(sch, sch.get_loops(consumer)[-1], W)
    sch.tensorize(r_i, gemm_cpu.amx_intrin_name(kt, gemm_cpu.BF16))


def compile_standalone(
    bh: int, lq: int, lk: int, d: int, dv: int, target, scale: float | None = None, dtype: str = "float32",
    tiles: CpuTiles | None = None, knobs: CpuKnobs | None = None, k_layout: str = "kt", engine: str | None = None,
):
    """The kernel alone, scheduled (default knobs) and compiled: `lib["main"](q, kt, v, out)`.

    For tests and benchmarks of the kernel outside a model; builds go through attention.py."""
    from tvm import s_tir

    scale = d**-0.5 if scale is None else scale
    tiles = tiles or choose_tiles(lq, lk, d, dv, vector_lanes(target))
    func = make_primfunc(bh, lq, lk, d, dv, scale, dtype, tiles, k_layout=k_layout, engine=engine).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    apply_schedule(sch, knobs)
    return tvm.compile(sch.mod, target=target)


# --- MetaSchedule integration ---------------------------------------------------------------------


def annotate_for_metaschedule(func):
    """Mark the PrimFunc's blocks so MetaSchedule's post-order-apply space generator hands the
    kernel to our custom rule (on block "qk") and leaves every other block alone ("None")."""
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for block in _all_blocks(sch):
        name = sch.get(block).name_hint
        sch.annotate(block, "schedule_rule", RULE_NAME if name == "qk" else "None")
    return sch.mod["main"]


def _all_blocks(sch):
    out = []
    body = sch.mod["main"].body  # an SBlockRealize of the root block, when the function has one
    root = sch.get_sblock("root") if getattr(getattr(body, "block", None), "name_hint", None) == "root" else None

    def visit(parent):
        for child in sch.get_child_blocks(parent):
            out.append(child)
            visit(child)

    if root is not None:
        out.append(root)
        visit(root)
    return out



def _custom_rule(sch, block):
    """s_tir.meta_schedule.cpu.autotune_attention: the design space of the attention kernel.

    Returns one schedule whose register-tile sizes (rows and vectors of the Q.K^T and P.V
    tiles) are SampleCategorical decisions. MetaSchedule's evolutionary search explores them by
    sampling the space afresh each generation (its CPU mutators only rewrite tile-size /
    parallel / unroll decisions), and its cost model ranks the candidates."""
    apply_schedule(sch, sample=True)
    return [sch]


def register_rule() -> None:
    import tvm_ffi

    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{RULE_NAME}", _custom_rule, override=True)


register_rule()
