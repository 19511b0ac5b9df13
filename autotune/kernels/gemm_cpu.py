"""GEMMs on the CPU's matrix engines: x86 bf16 (AMX-BF16 tiles, AVX512-BF16) and int8 (AMX-INT8
tiles, VNNI, and AVX2's int16 multiply-add where neither is there), on AVX2 FMA also float32; ARM
int8 and bf16 on its dot-product instructions (SDOT, BFDOT).

    bf16:          C[m, n] (float32) = sum_k A[m, k] (bf16)  * B[k, n] (bf16)
    int8 weights:  C[m, n] (float32) = sum_k A[m, k] (bf16)  * bf16(B[k, n] (int8))
    bf16 on AVX2:  C[m, n] (float32) = sum_k A[m, k] (float32 holding bf16 values) * float32(B[k, n] (bf16 or int8))
    int8:          C[m, n] (int32)   = sum_k A[m, k] (uint8) * B[k, n] (int8)
    int8 on AVX2:  C[m, n] (int32)   = sum_k A[m, k] (int16) * int16(B[k, n] (int8))
    int8 on ARM:   C[m, n] (int32)   = sum_k A[m, k] (int8)  * B[k, n] (int8)
    (ARM bf16 and int8 weights as x86's bf16 and int8 weights)
    float32 (AVX2 only): C[m, n] (float32) = sum_k A[m, k] (float32) * B[k, n] (float32)
    int16 weights (AVX2): C[m, n] (float32) = sum_k A[m, k] (float32) * float32(B[k, n] (int16)) * S[n] (float32)

B is a weight, shipped packed in the group-interleaved layout every engine reads,
Bp[k // g, n, k % g] = B[k, n], with g = 4 bytes / element size (bf16 pairs, int8 quads): a row
of Bp holds, for 16 (AVX-512) or 32 (AMX) consecutive columns, the g values of one k group side
by side (AVX2: int8 pairs, g = 2); AVX512-BF16 and VNNI schedules re-lay it in column panels of 16
(`_weight_in_column_panels`: the build ships that). Accumulation is float32 (bf16) or int32 (int8) throughout. The
int8 engines multiply unsigned activations by signed weights (`vpdpbusd`, `tdpbusd`): callers
holding signed int8 activations add 128 and subtract 128 * column sums of B (a weight-only term)
afterwards.

Eight instruction sets, one PrimFunc:
  * AVX512-BF16 (`vdpbf16ps`) and AVX512-VNNI (`vpdpbusd`), on Cooper Lake, Zen 4 and every AMX
    Xeon: an intrinsic computes 16 columns x one k group; the schedule keeps a register tile of MR
    rows x NV vectors of accumulators across the whole reduction (a cache of at most 15 vectors:
    TVM keeps buffers under 1 KiB on the stack, where LLVM promotes them to registers).
  * AMX-BF16 (`tdpbf16ps`) and AMX-INT8 (`tdpbusd`), Sapphire Rapids and later: an intrinsic
    computes a 32 x 32 block over KT of the reduction in 2 x 2 accumulator tiles kept across KT.
  * AVX2 (`vpmaddwd`, every x86-64 since Haswell / Zen 1), for int8 where there is no VNNI: 8
    columns x one k pair of int16 products summed into int32, exact (|a|, |b| <= 128). Signed
    activations come as int16 (the quantizer writes them so); the int8 weight panel a thread works
    on is widened to int16 once, like the bf16 engines' int8-weight panels. Peak: twice float32
    FMA's multiply-adds per cycle. (`vpmaddubsw` would take bytes directly but saturates its int16
    pair sums: not exact for 8-bit activations.) Its default register tile holds at most 12
    accumulators (AVX2 has 16 vector registers: the tile, a row of B and the broadcast A).
  * AVX2 FMA, for bf16 and int8-weight where there is no bf16 arithmetic: float32 `vfmadd231ps` on
    8 columns x one k pair. The weight panel a thread works on is widened to float32 once, laid out
    `Bf[k // 2, k % 2, n]` (a row of columns per k: one 8-lane load); the activations come as
    float32 holding bf16 values (widened by the kernel that produces them: a bf16 A widened in the
    inner loop ran at 120 GFLOP/s against 162 on a Zen 3, 1560 x 1536 x 1536). Same register tiles
    as AVX2 int8. Products of bf16 values are exact in float32: bf16 x bf16 -> float32 as above.
    The same kernel takes float32 x float32 on AVX2-only CPUs (`AVX2_F32`: the weight ships packed in
    float32 and the panel is only re-laid), whose float32 GEMMs MetaSchedule's fallback schedules
    ran 3-15x slower; and float32 x int16 weights with a scale per column (`AVX2_W16`: an
    int8-weight convolution's Winograd-transformed weight, quantized again to int16 per (point,
    output channel), passes/winograd.py), widened as int8 is and multiplied by its column's scale in
    the same pass, so that the product comes out dequantized (the same multiply in the Winograd
    output transform, 36 per output, took that kernel from 1.1 to 1.9 ms on the VAE up-block).
  * ARM SDOT (ARMv8.2 `+dotprod`: Neoverse N1 / V1, Cortex-A76 and later, Graviton 2 / 3): VNNI's
    scheme on 128-bit vectors, signed by signed (no shift): 4 columns x one k quad per instruction,
    a register tile of up to 8 rows x 4 vectors (at most 24 accumulators by default: NEON has 32
    vector registers). ARM BFDOT (ARMv8.6 `+bf16`: Neoverse V1 / N2 / V2, Graviton 3 / 4):
    `vdpbf16ps`'s scheme on 4 lanes, imported as LLVM IR as it is, also with int8 weights converted
    per panel as the `_w8` ISAs do. And float32 on every aarch64 CPU (`NEON_F32`: the AVX2 FMA
    kernel on 4 lanes, `fmla` of a broadcast A element by a row of 4 weight columns): without it an
    ARM float32 build ran every GEMM and convolution on MetaSchedule's fallback schedules (no log
    ships ARM records), which on AVX2 were 3-15x slower than this kernel; and bf16 / int8-weight
    where the CPU has no `+bf16` (`NEON_FMA_BF16`, `NEON_FMA_W8`: AVX2 FMA's bf16 scheme on 4 lanes;
    Cortex-A76 / A78 boards, Neoverse N1). Checked under qemu
    (tests/kernels/test_gemm_neon.py); not timed on ARM hardware yet.
TVM cannot name LLVM's `<32 x bfloat>` vectors (bf16 is legalised to float32 compute and uint16
storage), so `vdpbf16ps` is called through a tiny LLVM IR function imported into the kernel
(`pragma_import_llvm`) that takes the pairs as int32 and bitcasts them.

With int8 weights on the bf16 engines (the `_w8` ISAs) and on AVX2, each thread converts a panel of
columns of B to bf16 (int16) once (exact: |q| <= 127 fits bf16's 8 bits) and runs every row block
over it, so the weight is read from memory as int8 and converted once per panel, not once per row
block.

Long reductions are split (`k_split` partial products, summed by a second block) so that the
weight panel a thread streams stays in its L2 cache. On AVX512-BF16 and VNNI (weights read as
shipped) a task is a block of rows x one column panel, and the blocks of rows are outermost: a
block's activation rows (`ROW_BLOCK_BYTES`) stay in L2 while every column panel walks them, so
that A is read from memory once rather than once per column panel. Measured on a Zen 4 (2
threads, default tiles): the VAE's 6240 x 384 x 3456 conv GEMM 273 -> 405 GFLOP/s in bf16 and
675 -> 822 GOP/s in int8, the DiT block's 1560 x 1536 x 1536 int8 718 -> 824; bf16 at 1560 rows
unchanged. The default blocks only where A has more rows than the weight has columns
(`default_row_block`); tuning samples the block, unblocked included. (Not where weights are
converted per task: converting per block of rows cost the DiT block's int8-weight GEMMs 15-25 %;
there, rows are blocked only where the weight has too few column panels to give every core a
task: `converting_row_block`.)

On AVX2 (its FMA engines, and int16 multiply-add on activations quantized per sample, see
passes/conv_gemm.py) a convolution's GEMM may read its rows in place (`make_primfunc(...,
rows_from=geometry)`, `reads_rows_in_place`): A[row, (tap, c)] = Xp[b, o * s + tap * d, .., c], the
reduction written as (tap, k group of channels, element) so that a k pair is two consecutive
channels of one tap, contiguous in the padded channels-last input Xp as in an im2col row. The same
schedule and tiles; the broadcast A element is loaded from Xp instead of from a gathered row, so
the im2col matrix (taps times the input) is never written or read.

MetaSchedule: the gemm block carries a `schedule_rule` annotation naming the custom rule
registered here; the rule's register-tile sizes (AVX-512) or tile counts (AMX) are sampled
decisions, so tuning searches them like any task. `apply_schedule(sch)` is the default schedule
for untuned builds.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from autotune.support import tvm_compat
from autotune.support.ir import FLOPS_ATTR, GEMM_ATTR

from . import im2col

# The names below are part of every recorded workload and trace: changing one orphans the shipped records.
RULE_NAME = "autotune_gemm_bf16"  # MetaSchedule looks up s_tir.meta_schedule.cpu.<name> (both precisions)
AVX512 = "avx512bf16"
AMX = "amx"
VNNI = "avx512vnni"
AMX_INT8 = "amxint8"
AVX512_W8 = "avx512bf16w8"  # AVX512-BF16 with int8 weights
AMX_W8 = "amxw8"  # AMX-BF16 with int8 weights
AVX2_INT8 = "avx2int16"  # AVX2 vpmaddwd: int16 activations x int8 weights widened to int16
AVX2_BF16 = "avx2fma"  # AVX2 FMA: bf16 activations x bf16 weights, both widened to float32
AVX2_W8 = "avx2fmaw8"  # the same with int8 weights
AVX2_F32 = "avx2fmaf32"  # the same with float32 activations and weights
AVX2_W16 = "avx2fmaw16"  # the same with int16 weights and a scale per column (int8-weight convolutions' Winograd U)
NEON_SDOT = "neonsdot"  # ARM dot product (ARMv8.2 +dotprod): int8 x int8 -> int32, 4 lanes
NEON_BFDOT = "neonbfdot"  # ARM bf16 dot product (ARMv8.6 +bf16): bf16 pairs -> float32, 4 lanes
NEON_BFDOT_W8 = "neonbfdotw8"  # the same with int8 weights
NEON_F32 = "neonfmaf32"  # ARM float32 (every aarch64 CPU): NEON FMA on float32 panels, 4 lanes
NEON_FMA_BF16 = "neonfma"  # ARM bf16 without +bf16: NEON FMA, bf16 activations and weights widened to float32
NEON_FMA_W8 = "neonfmaw8"  # the same with int8 weights
BF16, INT8, F32 = "bfloat16", "int8", "float32"
PRECISION = {
    AVX512: BF16, AMX: BF16, VNNI: INT8, AMX_INT8: INT8, AVX512_W8: BF16, AMX_W8: BF16, AVX2_INT8: INT8,
    AVX2_BF16: BF16, AVX2_W8: BF16, AVX2_F32: F32, AVX2_W16: F32, NEON_SDOT: INT8, NEON_BFDOT: BF16, NEON_BFDOT_W8: BF16,
    NEON_F32: F32, NEON_FMA_BF16: BF16, NEON_FMA_W8: BF16,
}
INT8_WEIGHTS = {AVX512: AVX512_W8, AMX: AMX_W8, AVX2_BF16: AVX2_W8, NEON_BFDOT: NEON_BFDOT_W8, NEON_FMA_BF16: NEON_FMA_W8}  # bf16 engine -> its int8-weight variant
AMX_VECTOR = {AMX: AVX512, AMX_W8: AVX512_W8, AMX_INT8: VNNI}  # every AMX CPU has the vector engine too
AVX2 = (AVX2_INT8, AVX2_BF16, AVX2_W8, AVX2_F32, AVX2_W16)
NEON = (NEON_SDOT, NEON_BFDOT, NEON_BFDOT_W8, NEON_F32, NEON_FMA_BF16, NEON_FMA_W8)  # 128-bit vectors: 4 x 32-bit lanes
BF16_ARITHMETIC = (AMX, AVX512)  # bf16 engines that multiply bf16 itself (AVX2 widens it to float32)
FMA = (AVX2_BF16, AVX2_W8, AVX2_F32, AVX2_W16, NEON_F32, NEON_FMA_BF16, NEON_FMA_W8)  # float32 FMA on widened (or, float32, re-laid) panels
COLUMN_SCALED = (AVX2_W16,)  # engines whose weight comes with a float32 scale per column, S (*batch, n)
IMPLICIT_ISAS = (AVX2_BF16, AVX2_W8, AVX2_F32, AVX2_INT8)  # engines whose convolutions read their rows in place (`reads_rows_in_place`)
DTYPES = {BF16: ("bfloat16", "bfloat16", "float32"), INT8: ("uint8", "int8", "int32"), F32: ("float32",) * 3}  # A, B, accumulator
PANEL_ISAS = (AVX512, VNNI)  # vector engines that read the weight re-laid in column panels (`_weight_in_column_panels`)
MAX_PANEL_K = 2560  # longest reduction one partial product walks (weight panel stays in L2)
# Register-tile bounds (rows, vectors a row): AVX-512 up to 5 x 3; AVX2 up to 4 rows x 5 vectors,
# its default tile at most 12 accumulators (measured on a Zen 3, 1560 rows: 4 x 3 for 1536 columns,
# 3 x 4 for 8960, whose 1120 vectors 3 does not divide: 268 GOP/s against 195 for 4 x 2).
# NEON (32 vector registers): up to 8 rows x 4 vectors, its default tile at most 24 accumulators
# (with its vectors of weights and a broadcast row, within the 32 registers).
MAX_TILE = {**{isa: (4, 5) for isa in AVX2}, **{isa: (8, 4) for isa in NEON}}
# A weight one vector wide (8 columns on AVX2: a convolution to 8 channels) gives 4 rows only 4
# accumulators, too few to hide FMA latency (2 pipes x 4-5 cycles): its tile may be up to 12 rows
# high (float32 on a Zen 2, default tiles, one standalone run each: 16384 x 8 x 144 81 GFLOP/s at
# 4 x 1 against 128-137 at 8 x 1; 4096 x 8 x 72 85 against 108-110; int8 16384 x 8 x 216 160 against 182-187).
MAX_ONE_VECTOR_ROWS = {isa: 12 for isa in AVX2}
MAX_DEFAULT_ACCUMULATORS = {**{isa: 12 for isa in AVX2}, **{isa: 24 for isa in NEON}}
# The FMA engines' default tile also leaves a register for each weight vector of a k step and one for
# the broadcast A element (AVX2 has 16): 3 x 4 needs 17 and spills (float32 on a Zen 2, standalone,
# default schedule otherwise: 36 x 384 x 384 x 384 114 GFLOP/s at 3 x 4 against 172 at 4 x 3; 1560 x 8960
# x 1536 122 at 3 x 4 against 178 at 2 x 5). So that their rows take 4 x 3, the FMA engines pad rows to
# fours (`padded_rows`: 36 x 390 x 384 x 384 at 3 x 3 153 GFLOP/s, 392 rows at 4 x 3 172).
VECTOR_REGISTERS = {**{isa: 16 for isa in AVX2}, **{isa: 32 for isa in NEON}}
FMA_ROW_MULTIPLE = 4
AMX_KT = {BF16: (32, 64, 128, 256, 512), INT8: (64, 128, 256, 512)}
ROW_BLOCK_BYTES = 256 << 10  # the default block of activation rows a task's column panels share (L2)
MAX_ROW_BLOCKS = 64  # sampled row blocks: at most this many register tiles high, or all rows (unblocked)
MIN_TASKS = 16  # engines converting their weight panel per task: fewer panels than this get row blocks too,
MIN_CONVERTING_BLOCK = 64  # of at least this many rows (the panel's conversion under 1/64 of a task's work)
ENGINE_NAMES = {
    AVX512: "AVX512-BF16", AMX: "AMX-BF16", VNNI: "AVX512-VNNI", AMX_INT8: "AMX-INT8",
    AVX512_W8: "AVX512-BF16 (int8 weights)", AMX_W8: "AMX-BF16 (int8 weights)", AVX2_INT8: "AVX2 (int16 multiply-add)",
    AVX2_BF16: "AVX2 FMA (bf16 widened to float32)", AVX2_W8: "AVX2 FMA (int8 weights widened to float32)",
    AVX2_F32: "AVX2 FMA (float32)", AVX2_W16: "AVX2 FMA (int16 weights widened to float32)", NEON_SDOT: "NEON dot product (SDOT)", NEON_BFDOT: "NEON bf16 dot product (BFDOT)",
    NEON_BFDOT_W8: "NEON bf16 dot product (BFDOT, int8 weights)", NEON_F32: "NEON FMA (float32)",
    NEON_FMA_BF16: "NEON FMA (bf16 widened to float32)", NEON_FMA_W8: "NEON FMA (int8 weights widened to float32)",
}
# float32 takes the engine only on AVX2-only CPUs and on ARM, and a matmul only from this much arithmetic
# (convolutions at any size: conv_gemm): below it, MetaSchedule's own float32 GEMM schedule fuses
# the bias and activation into the matmul and costs no weight-panel copy, which matters more than
# the FMA tiling when a product is small (the tiny models' 32-wide linears: ~1 MFLOP).
MIN_F32_FLOPS = 1 << 24

# ---------------------------------------------------------------- which engine, which shapes


def group(isa: str) -> int:
    """k elements per 32-bit lane: bf16 pairs, int8 quads (AVX2: int16 pairs; float32: pairs, as the
    FMA engine's bf16)."""
    return 4 if PRECISION[isa] == INT8 and isa != AVX2_INT8 else 2


def lanes(isa: str) -> int:
    """Output columns of one vector instruction (NEON: 4 x 32 bits; AVX2: 8; AVX-512: 16)."""
    if isa in NEON:
        return 4
    return 8 if isa in AVX2 else 16


def activation_dtype(isa: str) -> str:
    """The dtype of A the engine multiplies: bf16, uint8 (x86's unsigned x signed int8 engines), int8
    (ARM's signed dot product), int16 (AVX2 int8), float32 (AVX2 FMA: bf16 values, widened by the
    kernel that produces them)."""
    if isa in FMA:
        return "float32"
    if isa == NEON_SDOT:
        return "int8"
    return "int16" if isa == AVX2_INT8 else DTYPES[PRECISION[isa]][0]


def int16_levels(k: int) -> int:
    """The largest |value| int16 activations of a k-long reduction may hold on AVX2's int16 engine
    (int8 weights, |w| <= 127) so that no int32 sum overflows: 32767 up to k = 516, 6,605 at
    MAX_PANEL_K (a 12.7-bit grid at least, against int8's 7)."""
    return min(32767, (2**31 - 1) // (127 * k))


def _is_amx(isa: str) -> bool:
    return isa in (AMX, AMX_INT8, AMX_W8)


def _converts_weights(isa: str) -> bool:
    return isa in (*INT8_WEIGHTS.values(), AVX2_INT8, *FMA)


def weight_dtype(isa: str) -> str:
    """The dtype the packed weight ships in: int8 for the int8 engines and the int8-weight variants,
    int16 for AVX2_W16, float32 for float32, else bf16."""
    if PRECISION[isa] == INT8 or isa in INT8_WEIGHTS.values():
        return "int8"
    if isa == AVX2_W16:
        return "int16"
    return "float32" if PRECISION[isa] == F32 else "bfloat16"


def _max_tile(isa: str, vectors: int = 0) -> tuple[int, int]:
    """(rows, vectors a row) bounds of the register tile, for a weight `vectors` vectors wide (0: any)."""
    rows, most_vectors = MAX_TILE.get(isa, (5, 3))
    return (MAX_ONE_VECTOR_ROWS.get(isa, rows) if vectors == 1 else rows), most_vectors


def _amx_k_step(isa: str) -> int:
    """k elements one 64-byte tile row holds."""
    return 32 if PRECISION[isa] == BF16 else 64


def target_isa(target, precision: str = BF16) -> str | None:
    """The best matrix engine the (LLVM) target has for `precision` ("bfloat16", "int8" or
    "float32"), or None. Float32 has one on ARM (NEON, every aarch64 CPU) and on x86 CPUs with AVX2
    and FMA but not AVX-512: with AVX-512, MetaSchedule's own float32 schedules (and the shipped
    log's records for them) keep it."""
    from tvm.target.codegen import target_has_features

    if target is None or target.kind.name != "llvm":
        return None
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        if precision == F32:
            return NEON_F32
        if precision == INT8:
            return NEON_SDOT if target_has_features("dotprod", target) else None
        return NEON_BFDOT if target_has_features("bf16", target) else NEON_FMA_BF16
    if precision == F32:
        fma = target_has_features("avx2", target) and target_has_features("fma", target)
        return AVX2_F32 if fma and not target_has_features("avx512f", target) else None
    if precision == BF16:
        if target_has_features("amx-bf16", target) and target_has_features("amx-tile", target):
            return AMX
        if target_has_features("avx512bf16", target):
            return AVX512
        return AVX2_BF16 if target_has_features("avx2", target) and target_has_features("fma", target) else None
    if target_has_features("amx-int8", target) and target_has_features("amx-tile", target):
        return AMX_INT8
    if target_has_features("avx512vnni", target):
        return VNNI
    return AVX2_INT8 if target_has_features("avx2", target) else None


def isa_for_shape(isa: str | None, rows: int, n: int, k: int) -> str | None:
    """The engine a (rows x k) @ (k x n) product can use on `isa`: AMX needs n a multiple of 32 and
    k of a tile row (rows are padded), AVX-512 whole 16-lane vectors and k groups (AVX2: 8 lanes,
    k pairs); None when neither fits."""
    if isa is None:
        return None
    if _is_amx(isa) and n % 32 == 0 and k % _amx_k_step(isa) == 0:
        return isa
    vector = AMX_VECTOR.get(isa, isa)
    if n % lanes(vector) == 0 and k % group(vector) == 0:
        return vector
    return None


def padded_columns(isa: str | None, rows: int, n: int, k: int) -> int | None:
    """The output columns a (rows x k) @ (k x n) product is computed with on `isa`: n itself where
    the engine takes it, else n rounded up to whole vectors of the vector engine (the weight
    zero-padded, the extra columns dropped) where at most half the columns computed are padding;
    None where neither fits."""
    if isa_for_shape(isa, rows, n, k) is not None:
        return n
    if isa is None:
        return None
    step = lanes(AMX_VECTOR.get(isa, isa))
    padded = -(-n // step) * step
    if 2 * n < padded or isa_for_shape(isa, rows, padded, k) is None:
        return None
    return padded


def padded_rows(isa: str, rows: int) -> int:
    """Rows the kernel computes: AMX works on 32-row blocks; the vector engines need a register-tile
    height of at least 3 that divides them (else pad to a multiple of 8); AVX2's FMA engines rows
    in fours (FMA_ROW_MULTIPLE: their fastest tile is 4 rows high)."""
    if _is_amx(isa):
        return -(-rows // 32) * 32
    padded = rows if _tile_heights_fit(isa, rows) else -(-rows // 8) * 8
    if isa in FMA and isa in AVX2:
        return -(-padded // FMA_ROW_MULTIPLE) * FMA_ROW_MULTIPLE
    return padded


def _tile_heights_fit(isa: str, rows: int) -> bool:
    """Whether a register tile at least 3 rows high divides `rows` on the vector engine `isa`."""
    return max(_divisors(rows, 1, _max_tile(isa)[0])) >= 3


def k_split(k: int, isa: str) -> int:
    """Partial products the reduction is cut into (each an engine-aligned length <= MAX_PANEL_K)."""
    align = _amx_k_step(isa) if _is_amx(isa) else group(isa)
    for parts in range(1, k // align + 1):
        if k % parts == 0 and (k // parts) % align == 0 and k // parts <= MAX_PANEL_K:
            return parts
    return 1


def _divisors(n: int, lo: int, hi: int) -> list[int]:
    return [d for d in range(lo, hi + 1) if n % d == 0] or [1]


# ---------------------------------------------------------------- the PrimFunc


def make_primfunc(m: int, n: int, k: int, isa: str, batch: int = 0,
                  rows_from: im2col.Geometry | None = None) -> tvm.tirx.PrimFunc:
    """A (m, k) @ Bp (k/g, n, g) -> C (m, n), unscheduled and annotated for MetaSchedule
    (`apply_schedule` schedules it). Batched activations come flattened to rows. With `batch`, that
    many independent products, each with its own weight: A (batch, m, k) @ Bp (batch, k/g, n, g)
    -> C (batch, m, n) (the Winograd transform points' GEMMs). With `rows_from`, a convolution's
    implicit GEMM: A's rows read in place from its padded channels-last input (`reads_rows_in_place`)."""
    if rows_from is not None:
        return _implicit_primfunc(m, n, k, isa, rows_from)
    parts = k_split(k, isa)
    kc = k // parts
    g = group(isa)
    lead = (batch,) if batch else ()
    A = te.placeholder((*lead, m, k), activation_dtype(isa), name="A")
    Bp = te.placeholder((*lead, k // g, n, g), weight_dtype(isa), name="Bp")
    S = te.placeholder((*lead, n), "float32", name="S") if isa in COLUMN_SCALED else None
    multiply = _weight_product(Bp, isa, S)

    def product(b, i, j, kk):
        return multiply(A[(*b, i, kk)], b, kk // g, kk % g, j)

    if parts == 1:
        r = te.reduce_axis((0, k), name="k")
        C = te.compute((*lead, m, n), lambda *bij: te.sum(product(bij[:-2], *bij[-2:], r), axis=r), name="gemm")
    else:
        r = te.reduce_axis((0, kc), name="k")
        P = te.compute((parts, *lead, m, n), lambda c, *bij: te.sum(product(bij[:-2], *bij[-2:], c * kc + r), axis=r),
                       name="gemm")
        s = te.reduce_axis((0, parts), name="part")
        C = te.compute((*lead, m, n), lambda *bij: te.sum(P[(s, *bij)], axis=s), name="ksum")
    func = te.create_prim_func([A, Bp, *([S] if S is not None else []), C]).without_attr("global_symbol")
    info = {"isa": isa, "rows": m, "n": n, "k": k, "parts": parts, **({"batch": batch} if batch else {})}  # (unbatched
    # kernels' attributes as before batches: they are part of the workload hash the shipped records are filed under)
    func = func.with_attr(GEMM_ATTR, info).with_attr(FLOPS_ATTR, float(2 * max(batch, 1) * m * n * k))
    func = func.with_attr("op_pattern", 8)  # opaque: FuseOps leaves it whole
    return _annotate(func)


def _weight_product(Bp: te.Tensor, isa: str, scales: te.Tensor | None = None):
    """multiply(a, batch index, k group, element, column) -> a x B[k, column] in the accumulator's
    dtype, B read from the packed weight Bp (*batch, k/g, n, g) as `isa` reads it: a float32 panel
    with the k group split out (FMA engines: Bf[kg, e, n], rows of columns; times the column's scale
    where `scales` (*batch, n) is given), the panel widened (int8 weights to bf16 or int16, in Bp's
    layout), or Bp itself."""
    acc = DTYPES[PRECISION[isa]][2]
    if isa in FMA:
        def widened(*index):
            *b, kg, e, j = index
            value = Bp[(*b, kg, j, e)].astype("float32")
            return value if scales is None else value * scales[(*b, j)]

        *lead, groups, n, g = Bp.shape
        B = te.compute((*lead, groups, g, n), widened, name="convert")
        return lambda a, b, kg, e, j: a * B[(*b, kg, e, j)]
    B = Bp
    if _converts_weights(isa):
        wide = activation_dtype(isa)  # bf16, or int16 on AVX2
        B = te.compute(Bp.shape, lambda *index: Bp[index].astype(wide), name="convert")
    return lambda a, b, kg, e, j: a.astype(acc) * B[(*b, kg, j, e)].astype(acc)


def reads_rows_in_place(isa: str | None, geometry: im2col.Geometry, n: int) -> bool:
    """Whether `isa` computes the convolution `geometry` (to `n` columns) as an implicit GEMM, its rows
    read in place from the padded input rather than gathered into an im2col matrix first: on the
    engines of AVX2 (see IMPLICIT_ISAS), where the whole reduction is one pass (no `k_split`),
    the channels are whole k groups and the rows need no padding to whole register tiles."""
    k = geometry.taps * geometry.channels
    return (isa in IMPLICIT_ISAS and isa_for_shape(isa, geometry.rows, n, k) == isa and k_split(k, isa) == 1
            and geometry.channels % group(isa) == 0 and _tile_heights_fit(isa, geometry.rows))


def _implicit_primfunc(m: int, n: int, k: int, isa: str, geometry: im2col.Geometry) -> tvm.tirx.PrimFunc:
    """C (m, n) = im2col(X) (m, k) @ B, im2col(X) read in place from Xp (the padded channels-last input):
    the reduction is (tap, k group of channels, element of the group), so that a k group is
    `group(isa)` consecutive channels of one tap, contiguous in Xp as in A's rows."""
    if not reads_rows_in_place(isa, geometry, n) or (m, k) != (geometry.rows, geometry.taps * geometry.channels):
        raise ValueError(f"gemm_cpu: no implicit {m}x{n}x{k} GEMM on {isa} for {geometry}")
    g = group(isa)
    X, read = geometry.reader(activation_dtype(isa))
    Bp = te.placeholder((k // g, n, g), weight_dtype(isa), name="Bp")
    multiply = _weight_product(Bp, isa)
    groups = geometry.channels // g
    tap = te.reduce_axis((0, geometry.taps), name="tap")
    kg = te.reduce_axis((0, groups), name="kg")
    e = te.reduce_axis((0, g), name="k")
    C = te.compute((m, n), lambda i, j: te.sum(multiply(read(i, tap, kg * g + e), (), tap * groups + kg, e, j),
                                               axis=[tap, kg, e]), name="gemm")
    func = te.create_prim_func([X, Bp, C]).without_attr("global_symbol")
    info = {"isa": isa, "rows": m, "n": n, "k": k, "parts": 1, "taps": geometry.taps}
    func = func.with_attr(GEMM_ATTR, info).with_attr(FLOPS_ATTR, float(2 * m * n * k)).with_attr("op_pattern", 8)
    return _annotate(func)


def kernel_name(m: int, n: int, k: int, isa: str, batch: int = 0) -> str:
    """gemm_bf16_ / gemm_w8_ (int8 weights on a bf16 engine) / gemm_w16_ (int16 weights on the float32
    engine) / gemm_int8_ / gemm_f32_ + ISA and shape (batched: the batch first, `36x390x384x1152`)."""
    kind = "int8" if PRECISION[isa] == INT8 else {"int8": "w8", "int16": "w16", "float32": "f32"}.get(weight_dtype(isa), "bf16")
    return f"gemm_{kind}_{isa}_{f'{batch}x' if batch else ''}{m}x{n}x{k}"


def _annotate(func):
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
    sch.annotate(sch.get_sblock("gemm"), "schedule_rule", RULE_NAME)
    if _info(func)["parts"] > 1:
        sch.annotate(sch.get_sblock("ksum"), "schedule_rule", "None")
    if _converts_weights(_info(func)["isa"]):
        sch.annotate(sch.get_sblock("convert"), "schedule_rule", "None")  # the gemm's rule places it
    return sch.mod["main"]


def _info(func) -> dict:
    info = func.attrs[GEMM_ATTR]
    return {key: (str(info[key]) if key == "isa" else int(info[key])) for key in info}


def is_gemm_kernel(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and GEMM_ATTR in func.attrs


def reads_column_panels(func) -> bool:
    """Whether `func` is a GEMM whose schedules (today's; not records tuned before) re-lay its weight in column panels."""
    return is_gemm_kernel(func) and _info(func)["isa"] in PANEL_ISAS


# ---------------------------------------------------------------- tensor intrinsics

# vdpbf16ps through LLVM IR: TVM has no type for <32 x bfloat>. Inlined (TVM marks imports alwaysinline).
DPBF16_LLVM = """
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define <16 x float> @autotune_dpbf16ps(<16 x float> %c, i32 %a, <16 x i32> %b) {
  %a1 = insertelement <16 x i32> poison, i32 %a, i64 0
  %a16 = shufflevector <16 x i32> %a1, <16 x i32> poison, <16 x i32> zeroinitializer
  %av = bitcast <16 x i32> %a16 to <32 x bfloat>
  %bv = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %av, <32 x bfloat> %bv)
  ret <16 x float> %r
}
"""
DPBF16_INTRIN = "autotune_avx512bf16_dot_16x2"

# bfdot likewise (TVM has no <8 x bfloat> either).
BFDOT_LLVM = """
declare <4 x float> @llvm.aarch64.neon.bfdot.v4f32.v8bf16(<4 x float>, <8 x bfloat>, <8 x bfloat>)
define <4 x float> @autotune_bfdot(<4 x float> %c, i32 %a, <4 x i32> %b) {
  %a1 = insertelement <4 x i32> poison, i32 %a, i64 0
  %a4 = shufflevector <4 x i32> %a1, <4 x i32> poison, <4 x i32> zeroinitializer
  %av = bitcast <4 x i32> %a4 to <8 x bfloat>
  %bv = bitcast <4 x i32> %b to <8 x bfloat>
  %r = call <4 x float> @llvm.aarch64.neon.bfdot.v4f32.v8bf16(<4 x float> %c, <8 x bfloat> %av, <8 x bfloat> %bv)
  ret <4 x float> %r
}
"""
BFDOT_INTRIN = "autotune_neon_bfdot_4x2"


def _dot_desc(a_dtype: str, b_dtype: str, acc: str, g: int, width: int = 16):
    """C[width] += A[g] x B[1, width, g]: `width` columns times one k group (the vector engines' dot product)."""

    @tvm_compat.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (g,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (1, width, g), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (width,), acc, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:width], A[0:g], B[0:1, 0:width, 0:g])
            T.writes(C[0:width])
            for j, k in T.grid(width, g):
                with T.sblock("update"):
                    vj, vk = T.axis.remap("SR", [j, k])
                    C[vj] = C[vj] + T.Cast(acc, A[vk]) * T.Cast(acc, B[vk // g, vj, vk % g])

    return desc


def _bf16_pairs_impl(width: int, function: str):
    """C[width] += A[2] x B[1, width, 2] through `function`, an LLVM IR function the kernel imports
    (DPBF16_LLVM, BFDOT_LLVM) that takes the A pair and the B pairs as int32 words (bf16 pairs start
    at even elements)."""
    acc, words = f"float32x{width}", f"int32x{width}"

    @tvm_compat.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "bfloat16", offset_factor=1)
        B = T.match_buffer(b, (1, width, 2), "bfloat16", offset_factor=1)
        C = T.match_buffer(c, (width,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:width], A[0:2], B[0:1, 0:width, 0:2])
            T.writes(C[0:width])
            pair = T.decl_buffer((1,), "int32", data=A.data, elem_offset=A.elem_offset // 2)
            pairs = T.decl_buffer((width,), "int32", data=B.data, elem_offset=B.elem_offset // 2)
            C[T.ramp(T.int32(0), 1, width)] = T.call_pure_extern(acc, function, C.vload([0], acc), pair[0], pairs.vload([0], words))

    return impl


def _int8_quads_impl(a_dtype: str, width: int, instruction: str):
    """C[width] += A[4] x B[1, width, 4] with an LLVM intrinsic that adds, in each int32 lane, the dot
    product of its 4 weight bytes with the A quad broadcast to every lane: VNNI's vpdpbusd (A
    unsigned) and ARM's sdot (A signed). LLVM 22 types their operands as byte vectors (TVM's own
    `dot_16x4_vnni` still passes <16 x i32> and fails LLVM's verifier)."""
    acc, quad_dtype, byte_dtype = f"int32x{width}", f"{a_dtype}x4", f"int8x{4 * width}"

    @tvm_compat.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (1, width, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (width,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:width], A[0:4], B[0:1, 0:width, 0:4])
            T.writes(C[0:width])
            quad = T.reinterpret(A.vload([0], quad_dtype), dtype="int32")
            quads = T.reinterpret(T.broadcast(quad, width), dtype=byte_dtype)
            C[T.ramp(T.int32(0), 1, width)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(instruction), C.vload([0], acc), quads, B.vload([0, 0, 0], byte_dtype), dtype=acc,
            )

    return impl


VNNI_INTRIN = "autotune_avx512vnni_dot_16x4"
SDOT_INTRIN = "autotune_neon_sdot_4x4"
MADD_INTRIN = "autotune_avx2_madd_8x2"


@tvm_compat.prim_func(s_tir=True)
def _madd_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "int16", offset_factor=1)
    B = T.match_buffer(b, (1, 8, 2), "int16", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:1, 0:8, 0:2])
        T.writes(C[0:8])
        # The A pair broadcast to 8 lanes as one int32, reinterpreted as 16 int16; vpmaddwd sums
        # each lane's two products into int32.
        pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        pairs = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, B.vload([0, 0, 0], "int16x16"), dtype="int32x8",
        )


FMA_INTRIN = "autotune_avx2_fma_8x2"
FMA4_INTRIN = "autotune_neon_fma_4x2"


def _fma_desc(width: int):
    """C[width] += A[2] x B[1, 2, width]: `width` columns times one k pair of float32 (the FMA engines)."""

    @tvm_compat.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "float32", offset_factor=1)
        B = T.match_buffer(b, (1, 2, width), "float32", offset_factor=1)
        C = T.match_buffer(c, (width,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:width], A[0:2], B[0:1, 0:2, 0:width])
            T.writes(C[0:width])
            for j, k in T.grid(width, 2):
                with T.sblock("update"):
                    vj, vk = T.axis.remap("SR", [j, k])
                    C[vj] = C[vj] + A[vk] * B[vk // 2, vk % 2, vj]

    return desc


def _fma_impl(width: int):
    """Each of the A pair broadcast to `width` lanes, times its row of the float32 panel (llvm.fma:
    AVX2 `vfmadd231ps`, NEON `fmla`)."""
    vec, fma = f"float32x{width}", f"llvm.fma.v{width}f32"

    @tvm_compat.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb0 = T.int32()
        sb1 = T.int32()
        A = T.match_buffer(a, (2,), "float32", offset_factor=1)
        B = T.match_buffer(b, (1, 2, width), "float32", offset_factor=1, strides=[sb0, sb1, 1])
        C = T.match_buffer(c, (width,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:width], A[0:2], B[0:1, 0:2, 0:width])
            T.writes(C[0:width])
            C[T.ramp(T.int32(0), 1, width)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(fma),
                T.broadcast(A[1], width),
                B.vload([0, 1, 0], vec),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(fma), T.broadcast(A[0], width), B.vload([0, 0, 0], vec), C.vload([0], vec),
                    dtype=vec,
                ),
                dtype=vec,
            )

    return impl


# The vector engines' intrinsic per ISA (16 columns; AVX2 8)
def _dot_intrin(isa: str) -> str:
    if isa == AVX2_INT8:
        return MADD_INTRIN
    if isa in FMA:
        return FMA4_INTRIN if isa in NEON else FMA_INTRIN
    if isa == NEON_SDOT:
        return SDOT_INTRIN
    if isa in (NEON_BFDOT, NEON_BFDOT_W8):
        return BFDOT_INTRIN
    return DPBF16_INTRIN if PRECISION[isa] == BF16 else VNNI_INTRIN


def imported_llvm(intrin: str) -> str | None:
    """The LLVM IR that kernels calling `intrin` import, or None. Read on each call: the tests'
    emulation of vdpbf16ps (on CPUs without AVX512-BF16) replaces DPBF16_LLVM."""
    return {DPBF16_INTRIN: DPBF16_LLVM, BFDOT_INTRIN: BFDOT_LLVM}.get(intrin)


# The AMX instructions the tile intrinsics call, as (instruction, *operands) -> TIR call. The tests
# swap it for calls into a C emulation (tests/kernels/amx_emulation.c) where the CPU has no AMX and
# re-register the intrinsics: the kernels' tiling, packing and tensorization then run on any x86-64.
def amx_instruction(name: str, *operands):
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *operands)


AMX_INSTRUCTION = amx_instruction


@functools.cache  # parsing takes ~0.1 s each; the tests switch between two instruction sets
def _amx_intrin(kt: int, precision: str, tile):
    """C[32, 32] += A[32, kt] x Bp[kt/g, 32, g] in tiles: C in tmm0-3 (2 x 2), A in tmm4-5, B in
    tmm6-7; C is loaded and stored once per call, kept in tiles across kt. `tile` makes the calls
    of the AMX instructions (AMX_INSTRUCTION).

    A and B tiles are addressed through byte views of their data: TVM's bf16 legalization then
    sees raw use of the buffer, and a local bf16 buffer (the int8-weight kernel's converted panel)
    keeps its bf16 storage. Through address_of(B[...]) the panel was promoted to float32 storage
    that the tile loads read as bf16 pairs: wrong products (found by the tests' AMX emulation)."""
    a_dtype, b_dtype, acc = DTYPES[precision]
    g, step = (2, 32) if precision == BF16 else (4, 64)  # k per 32-bit lane, k per 64-byte tile row
    elem = 4 // g  # bytes per element
    product = "tdpbf16ps" if precision == BF16 else "tdpbusd"

    @tvm_compat.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, kt), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (kt // g, 32, g), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (32, 32), acc, offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:32, 0:32], A[0:32, 0:kt], B[0 : kt // g, 0:32, 0:g])
            T.writes(C[0:32, 0:32])
            for i, j, k in T.grid(32, 32, kt):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast(acc, A[vi, vk]) * T.Cast(acc, B[vk // g, vj, vk % g])

    @tvm_compat.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (32, kt), a_dtype, offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (kt // g, 32, g), b_dtype, offset_factor=1, strides=[sb0, sb1, 1])
        C = T.match_buffer(c, (32, 32), acc, offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:32, 0:32], A[0:32, 0:kt], B[0 : kt // g, 0:32, 0:g])
            T.writes(C[0:32, 0:32])
            # A and B addressed as bytes (see the docstring)
            a_bytes = T.decl_buffer((32 * sa * elem,), "uint8", data=A.data, elem_offset=A.elem_offset * elem)
            b_bytes = T.decl_buffer((kt // g * sb0 * elem,), "uint8", data=B.data, elem_offset=B.elem_offset * elem)
            # Tile configuration: palette 1, 8 tiles of 16 rows x 64 bytes.
            cfg = T.alloc_buffer((64,), "uint8", align=64)
            for i in range(64):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)
            for t in T.unroll(8):
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(16)
            T.evaluate(tile("ldtilecfg", T.address_of(cfg[0])))
            for m in T.unroll(2):
                for n in T.unroll(2):
                    T.evaluate(tile("tileloadd64", T.uint8(m * 2 + n), T.address_of(C[m * 16, n * 16]),
                                    T.int64(sc * 4)))
            for ks in T.unroll(kt // step):
                for m in T.unroll(2):
                    T.evaluate(tile("tileloadd64", T.uint8(4 + m), T.address_of(a_bytes[(m * 16 * sa + ks * step) * elem]),
                                    T.int64(sa * elem)))
                for n in T.unroll(2):
                    T.evaluate(tile("tileloadd64", T.uint8(6 + n), T.address_of(b_bytes[(ks * 16 * sb0 + n * 16 * sb1) * elem]),
                                    T.int64(sb0 * elem)))
                for m in T.unroll(2):
                    for n in T.unroll(2):
                        T.evaluate(tile(product, T.uint8(m * 2 + n), T.uint8(4 + m), T.uint8(6 + n)))
            for m in T.unroll(2):
                for n in T.unroll(2):
                    T.evaluate(tile("tilestored64", T.uint8(m * 2 + n), T.address_of(C[m * 16, n * 16]),
                                    T.int64(sc * 4)))

    return desc, impl


def amx_intrin_name(kt: int, precision: str = BF16) -> str:
    return f"autotune_amx_{'bf16' if precision == BF16 else 'int8'}_32x32x{kt}"


def register_intrinsics() -> None:
    TensorIntrin.register(DPBF16_INTRIN, _dot_desc(*DTYPES[BF16], 2), _bf16_pairs_impl(16, "autotune_dpbf16ps"), override=True)
    TensorIntrin.register(BFDOT_INTRIN, _dot_desc(*DTYPES[BF16], 2, width=4), _bf16_pairs_impl(4, "autotune_bfdot"), override=True)
    TensorIntrin.register(VNNI_INTRIN, _dot_desc(*DTYPES[INT8], 4),
                          _int8_quads_impl("uint8", 16, "llvm.x86.avx512.vpdpbusd.512"), override=True)
    TensorIntrin.register(SDOT_INTRIN, _dot_desc("int8", "int8", "int32", 4, width=4),
                          _int8_quads_impl("int8", 4, "llvm.aarch64.neon.sdot.v4i32.v16i8"), override=True)
    TensorIntrin.register(MADD_INTRIN, _dot_desc("int16", "int16", "int32", 2, width=8), _madd_impl, override=True)
    TensorIntrin.register(FMA_INTRIN, _fma_desc(8), _fma_impl(8), override=True)
    TensorIntrin.register(FMA4_INTRIN, _fma_desc(4), _fma_impl(4), override=True)
    for precision, kts in AMX_KT.items():  # (the int8-weight variants use the bf16 intrinsics)
        for kt in kts:
            TensorIntrin.register(amx_intrin_name(kt, precision), *_amx_intrin(kt, precision, AMX_INSTRUCTION), override=True)


# ---------------------------------------------------------------- schedules


def default_avx512_tile(rows: int, n: int, isa: str = AVX512) -> tuple[int, int]:
    """(MR rows, NV vectors) of the register tile: the most accumulators (<= 15; AVX2 12; on the FMA
    engines with a register left for each weight vector and the broadcast), then the fewest loads,
    then (AVX2) the most rows, else the fewest."""
    max_rows, max_vectors = _max_tile(isa, n // lanes(isa))
    limit = MAX_DEFAULT_ACCUMULATORS.get(isa, max_rows * max_vectors)
    registers = VECTOR_REGISTERS[isa] if isa in FMA else math.inf
    pairs = [(mr, nv) for mr in _divisors(rows, 1, max_rows) for nv in _divisors(n // lanes(isa), 1, max_vectors)
             if mr * nv <= limit and mr * nv + nv + 1 <= registers]
    return max(pairs, key=lambda p: (p[0] * p[1], -(p[0] + p[1]), p[0] if isa in AVX2 else -p[0]))


def default_amx_knobs(n: int, kc: int, precision: str = BF16) -> tuple[int, int]:
    """(32-column blocks per task, KT) for AMX."""
    return max(_divisors(n // 32, 1, 8)), max(kt for kt in AMX_KT[precision] if kc % kt == 0)


def _blocks_rows(isa: str) -> bool:
    """Whether the vector schedule blocks rows outside the column panels (see the module doc)."""
    return isa in (AVX512, VNNI)


def row_block_sizes(rows: int, isa: str, vectors: int = 0) -> list[int]:
    """Candidate rows per block: multiples of every register-tile height the rows allow for a weight
    `vectors` vectors wide (so that a sampled tile height always divides a sampled block: the two are
    drawn independently; one vector wide, AVX2 tiles may be up to 12 rows high) that divide the
    rows, up to MAX_ROW_BLOCKS tiles of the tallest of any width, and all the rows (no blocking)."""
    unit = math.lcm(*_divisors(rows, 1, _max_tile(isa, vectors)[0]))
    top = MAX_ROW_BLOCKS * _max_tile(isa)[0]
    return sorted({unit * d for d in _divisors(rows // unit, 1, rows // unit) if unit * d <= top} | {rows})


def default_row_block(rows: int, n: int, kc: int, isa: str) -> int:
    """All the rows (unblocked) where the weight has at least as many columns as A has rows (A is
    then the smaller operand: re-read per column panel, it stays in cache, while blocking would
    stream the whole weight per block: the DiT block's 1560 x 8960 x 1536 went 409 -> 363 GFLOP/s
    in bf16); else the largest candidate block whose activation rows (kc of the reduction each)
    fit ROW_BLOCK_BYTES, else the smallest."""
    if n >= rows:
        return rows
    row_bytes = kc * (1 if PRECISION[isa] == INT8 else 2)
    sizes = row_block_sizes(rows, isa, n // lanes(isa))
    fitting = [size for size in sizes if size * row_bytes <= ROW_BLOCK_BYTES]
    return max(fitting) if fitting else min(sizes)


def converting_row_block(rows: int, panels: int, isa: str, vectors: int = 0) -> int:
    """Rows per task on an engine that converts its weight panel per task (one panel per task, so
    a weight of one or two panels, e.g. a convolution with 16 output channels, kept one core
    busy): with fewer than MIN_TASKS panels, the largest candidate block (`row_block_sizes`) of
    at least MIN_CONVERTING_BLOCK rows that makes MIN_TASKS tasks, else the smallest such block,
    each task converting its panel; all the rows otherwise. `vectors`: the weight's width in vectors."""
    sizes = [size for size in row_block_sizes(rows, isa, vectors) if size >= MIN_CONVERTING_BLOCK]
    if panels >= MIN_TASKS or not sizes:
        return rows
    fitting = [size for size in sizes if size * MIN_TASKS <= rows * panels]
    return max(fitting) if fitting else min(sizes)


def _sample(sch, candidates: list[int]):
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))


def apply_schedule(sch, sample: bool = False, panels: bool = True) -> None:
    """Schedule the GEMM PrimFunc in `sch` in place (default knobs, or MetaSchedule decisions).
    `panels=False`: the weight read as Bp's rows on every engine, as schedules made before column
    panels (for comparisons)."""
    info = _info(sch.mod["main"])
    gemm = sch.get_sblock("gemm")
    loops = sch.get_loops(gemm)
    parts = info["parts"]
    reductions = 3 if "taps" in info else 1  # an implicit GEMM's (tap, k group, element), or k
    outer = list(loops[:-2 - reductions])  # the partial product, the batch
    rows, n_loop = loops[-2 - reductions:-reductions]
    k_loops = list(loops[-reductions:])
    kc = info["k"] // parts
    if panels and info["isa"] in PANEL_ISAS:
        _weight_in_column_panels(sch, gemm, info["isa"], batched="batch" in info)
    if _is_amx(info["isa"]):
        _schedule_amx(sch, gemm, outer, rows, n_loop, k_loops[0], info["n"], kc, info["isa"], sample)  # (never implicit)
    else:
        _schedule_vector(sch, gemm, outer, rows, n_loop, k_loops, info["rows"], info["n"], kc, info["isa"], sample)
    if parts > 1:
        _schedule_ksum(sch)


def _weight_in_column_panels(sch, gemm, isa: str, batched: bool) -> None:
    """Read the weight in column panels, Bc[n // w, k // g, n % w, k % g] (w = the ISA's lanes): each
    vector of a register tile then streams its own contiguous panel, where in Bp's rows (n * g bytes
    apart, a page or more for the DiT block's weights) every k group of a tile is a new page and a new
    prefetch stream. The re-layout is MetaSchedule's layout-rewrite block (what its RewriteLayout adds
    for layout-free weights): tuning measures the kernel on data already in Bc, and the build runs the
    block once on the weights (passes/weight_prepack.py), so the artifact ships Bc. Measured on the DiT
    block's GEMMs (Zen 4, 2 threads, default tiles, `tools/bench_gemm.py`): 0.91-0.96x the time on VNNI,
    0.81-0.98x on AVX512-BF16. Records tuned before it replay without it, on Bp, as measured."""
    w = lanes(isa)
    sch.annotate(sch.cache_read(gemm, 1, "global"), "meta_schedule.layout_rewrite_preproc", True)
    if batched:
        sch.transform_layout(gemm, ("read", 1), lambda b, kg, j, e: (b, j // w, kg, j % w, e))
    else:
        sch.transform_layout(gemm, ("read", 1), lambda kg, j, e: (j // w, kg, j % w, e))


def _schedule_vector(sch, gemm, outer, rows, n_loop, k_loops, total_rows, n, kc, isa, sample):
    """AVX-512 and AVX2: a register tile of MR rows x NV vectors kept across the reduction; on
    AVX512-BF16 and VNNI, tasks in blocks of rows outside the column panels."""
    width = lanes(isa)
    if sample:
        max_rows, max_vectors = _max_tile(isa, n // width)
        mr = _sample(sch, _divisors(total_rows, 1, max_rows))
        nv = _sample(sch, _divisors(n // width, 1, max_vectors))
        mc = _sample(sch, row_block_sizes(total_rows, isa, n // width)) if _blocks_rows(isa) else None
    else:
        mr, nv = default_avx512_tile(total_rows, n, isa)
        mc = default_row_block(total_rows, n, kc, isa) if _blocks_rows(isa) else None
    if _converts_weights(isa):  # sampled: blocks as for the widest tile (fewest panels), or none
        widest = max(_divisors(n // width, 1, _max_tile(isa)[1])) if sample else nv
        block = converting_row_block(total_rows, n // (width * widest), isa, n // width)
        mc = None if block == total_rows else _sample(sch, [total_rows, block]) if sample else block
    no, nvl, columns = sch.split(n_loop, [None, nv, width])
    if mc is not None:
        block, rows = sch.split(rows, [None, mc])
        outer = [*outer, block]
    mo, mi = sch.split(rows, [None, mr])
    # k groups outside the tile, a group's elements inside (implicit: the taps and k groups outside)
    *kp, kl = k_loops if len(k_loops) > 1 else sch.split(k_loops[0], [None, group(isa)])
    sch.reorder(*outer, no, mo, *kp, mi, nvl, columns, kl)
    if _converts_weights(isa):
        task = sch.fuse(*outer, no)  # a column panel (and block of rows) per task: its tiles share the converted weights
        tile = mo
        sch.parallel(task)
        _convert_panel_at(sch, task)
    else:
        task = tile = sch.fuse(*outer, no, mo)
        sch.parallel(task)
    if imported_llvm(_dot_intrin(isa)):
        sch.annotate(task, "pragma_import_llvm", imported_llvm(_dot_intrin(isa)))
    acc = sch.cache_write(gemm, 0, "global")  # the register tile: under 1 KiB, so on the stack
    sch.reverse_compute_at(acc, tile)
    sch.decompose_reduction(gemm, kp[0])
    sch.tensorize(columns, _dot_intrin(isa))
    sch.unroll(mi)
    sch.unroll(nvl)
    # Unroll the tile's zeroing and write-back too, so that LLVM keeps the tile in registers. (A
    # pragma rather than get_loops: how many loops they have depends on the sampled sizes, and a
    # trace whose loop counts change cannot be replayed.)
    sch.annotate(task, "pragma_auto_unroll_max_step", 512)
    sch.annotate(task, "pragma_unroll_explicit", 1)


def _schedule_amx(sch, gemm, outer, rows, n_loop, k_loop, n, kc, isa, sample):
    # KT picks the intrinsic, so it stays fixed (a trace names its intrinsic; a resampled KT
    # could not replay); the column blocks per task are the decision.
    precision = PRECISION[isa]
    nb, kt = default_amx_knobs(n, kc, precision)
    if sample:
        nb = _sample(sch, _divisors(n // 32, 1, 8))
    no, nbl, nl = sch.split(n_loop, [None, nb, 32])
    mo, ml = sch.split(rows, [None, 32])
    ko, kl = sch.split(k_loop, [None, kt])
    sch.reorder(*outer, no, mo, nbl, ko, ml, nl, kl)
    if _converts_weights(isa):
        task = sch.fuse(*outer, no)
        sch.parallel(task)
        _convert_panel_at(sch, task)
    else:
        sch.parallel(sch.fuse(*outer, no, mo))
    sch.decompose_reduction(gemm, ko)
    sch.tensorize(ml, amx_intrin_name(kt, precision))


def _convert_panel_at(sch, task) -> None:
    """Convert the weight panel a task reads (int8 to bf16 or int16, bf16 or int8 to float32; float32
    re-laid) once, at the start of the task."""
    convert = sch.get_sblock("convert")
    sch.compute_at(convert, task)
    *_, k_groups, outer, inner = sch.get_loops(convert)
    # A loop, not straight-line code: under the task's auto-unroll a short K (a VAE convolution's
    # 288) would unroll the whole panel, seconds of LLVM time per kernel for no speed.
    sch.annotate(k_groups, "pragma_auto_unroll_max_step", 0)
    if _info(sch.mod["main"])["isa"] in FMA:  # (k pair, columns): a vector of columns per k
        sch.unroll(outer)
        sch.vectorize(inner)
    else:  # (columns, k group): contiguous
        sch.vectorize(sch.fuse(outer, inner))


def _schedule_ksum(sch) -> None:
    block = sch.get_sblock("ksum")
    loops = sch.get_loops(block)
    spatial = sch.fuse(*loops[:-1])
    outer, vec = sch.split(spatial, [None, 16])
    sch.reorder(outer, loops[-1], vec)
    sch.parallel(outer)
    sch.vectorize(vec)


# ---------------------------------------------------------------- MetaSchedule integration


def _custom_rule(sch, block):
    """s_tir.meta_schedule.cpu.autotune_gemm_bf16 (both precisions): the GEMM's design space, one sampled schedule."""
    apply_schedule(sch, sample=True)
    return [sch]


def register_rule() -> None:
    import tvm_ffi

    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{RULE_NAME}", _custom_rule, override=True)


def compile_standalone(m, n, k, isa, target, batch: int = 0, panels: bool = True, relaid: bool = False):
    """The kernel alone, default schedule, compiled: `lib["main"](a, bp, c)` (COLUMN_SCALED ISAs:
    `(a, bp, s, c)`). For tests and benchmarks.
    On the ISAs that read column panels the kernel re-lays `bp` itself on every call, unless `relaid`:
    then it takes `column_panels(bp, isa)`, as a built artifact's kernel does."""
    from tvm import s_tir
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    func = make_primfunc(m, n, k, isa, batch).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    apply_schedule(sch, panels=panels)
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(sch.mod) if relaid else sch.mod
    return tvm.compile(mod, target=target)


def column_panels(bp, isa: str):
    """numpy Bp (..., k/g, n, g) -> the (..., n/w, k/g, w, g) panels the vector engines read (w: the ISA's lanes)."""
    import numpy as np

    w = lanes(isa)
    *lead, kg, n, g = bp.shape
    split = bp.reshape(*lead, kg, n // w, w, g)
    return np.ascontiguousarray(np.moveaxis(split, -3, -4))


def pack_weight(b, g: int = 2):
    """numpy (k, n) -> the packed (k/g, n, g) layout the kernel reads (g = `group(isa)`)."""
    import numpy as np

    k, n = b.shape
    return np.ascontiguousarray(b.reshape(k // g, g, n).transpose(0, 2, 1))


register_intrinsics()
register_rule()
