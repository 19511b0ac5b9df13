"""bf16 GEMM on x86 matrix engines: AMX-BF16 tiles, or AVX512-BF16 dot products.

    C[m, n] (float32) = sum_k A[m, k] (bf16) * B[k, n] (bf16)

B is a weight, shipped packed in the pair-interleaved layout both engines read,
Bp[k // 2, n, k % 2] = B[k, n]: a row of Bp holds, for 16 (AVX-512) or 32 (AMX) consecutive
columns, the two bf16 values of one k pair side by side. Accumulation is float32 throughout.

Two instruction sets, one PrimFunc:
  * AVX512-BF16 (`vdpbf16ps`, Cooper Lake, Zen 4, and every AMX Xeon): an intrinsic computes 16
    columns x one k pair; the schedule keeps a register tile of MR rows x NV vectors of
    accumulators across the whole reduction (a cache of at most 15 vectors: TVM keeps buffers under
    1 KiB on the stack, where LLVM promotes them to registers).
  * AMX-BF16 (`tdpbf16ps`, Sapphire Rapids and later): an intrinsic computes a 32 x 32 block over
    KT of the reduction in 2 x 2 accumulator tiles kept across KT.
TVM cannot name LLVM's `<32 x bfloat>` vectors (bf16 is legalised to float32 compute and uint16
storage), so `vdpbf16ps` is called through a tiny LLVM IR function imported into the kernel
(`pragma_import_llvm`) that takes the pairs as int32 and bitcasts them.

Long reductions are split (`k_split` partial products, summed by a second block) so that the
weight panel a thread streams stays in its L2 cache.

MetaSchedule: the gemm block carries a `schedule_rule` annotation naming the custom rule
registered here; the rule's register-tile sizes (AVX-512) or tile counts and KT (AMX) are
sampled decisions, so tuning searches them like any task. `apply_schedule(sch)` is the default
schedule for untuned builds.
"""

from __future__ import annotations

import tvm
from tvm import te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from autotune.support.ir import FLOPS_ATTR, GEMM_ATTR

RULE_NAME = "autotune_gemm_bf16"  # MetaSchedule looks up s_tir.meta_schedule.cpu.<name>
AVX512 = "avx512bf16"
AMX = "amx"
MAX_PANEL_K = 2560  # longest reduction one partial product walks (weight panel stays in L2)
MAX_ACCUMULATORS = 15  # 16-lane float32 vectors in the AVX-512 register tile (stack, < 1 KiB)
AMX_KT = (32, 64, 128, 256, 512)

# ---------------------------------------------------------------- which engine, which shapes


def target_isa(target) -> str | None:
    """The best bf16 matrix engine the (LLVM) target has: AMX, AVX512-BF16, or None."""
    from tvm.target.codegen import target_has_features

    if target is None or target.kind.name != "llvm":
        return None
    if target_has_features("amx-bf16", target) and target_has_features("amx-tile", target):
        return AMX
    if target_has_features("avx512bf16", target):
        return AVX512
    return None


def isa_for_shape(isa: str | None, rows: int, n: int, k: int) -> str | None:
    """The engine a (rows x k) @ (k x n) product can use on `isa` (AMX needs 32-multiples of n and k;
    rows are padded); None when neither fits (odd k, n not a multiple of 16)."""
    if isa == AMX and n % 32 == 0 and k % 32 == 0:
        return AMX
    if isa in (AMX, AVX512) and n % 16 == 0 and k % 2 == 0:
        return AVX512
    return None


def padded_rows(isa: str, rows: int) -> int:
    """Rows the kernel computes: AMX works on 32-row blocks; AVX-512 needs a register-tile height
    of at least 3 that divides them (else pads to a multiple of 8)."""
    if isa == AMX:
        return -(-rows // 32) * 32
    if max(_divisors(rows, 1, 5)) >= 3:
        return rows
    return -(-rows // 8) * 8


def k_split(k: int, isa: str) -> int:
    """Partial products the reduction is cut into (each an even, engine-aligned length <= MAX_PANEL_K)."""
    align = 32 if isa == AMX else 2
    for parts in range(1, k // align + 1):
        if k % parts == 0 and (k // parts) % align == 0 and k // parts <= MAX_PANEL_K:
            return parts
    return 1


def _divisors(n: int, lo: int, hi: int) -> list[int]:
    return [d for d in range(lo, hi + 1) if n % d == 0] or [1]


# ---------------------------------------------------------------- the PrimFunc


def make_primfunc(m: int, n: int, k: int, isa: str) -> tvm.tirx.PrimFunc:
    """A (m, k) bf16 @ Bp (k/2, n, 2) bf16 -> C (m, n) float32, unscheduled and annotated for
    MetaSchedule (`apply_schedule` schedules it). Batched activations come flattened to rows."""
    parts = k_split(k, isa)
    kc = k // parts
    A = te.placeholder((m, k), "bfloat16", name="A")
    Bp = te.placeholder((k // 2, n, 2), "bfloat16", name="Bp")

    def product(i, j, kk):
        return A[i, kk].astype("float32") * Bp[kk // 2, j, kk % 2].astype("float32")

    if parts == 1:
        r = te.reduce_axis((0, k), name="k")
        C = te.compute((m, n), lambda i, j: te.sum(product(i, j, r), axis=r), name="gemm")
    else:
        r = te.reduce_axis((0, kc), name="k")
        P = te.compute((parts, m, n), lambda c, i, j: te.sum(product(i, j, c * kc + r), axis=r), name="gemm")
        s = te.reduce_axis((0, parts), name="part")
        C = te.compute((m, n), lambda i, j: te.sum(P[s, i, j], axis=s), name="ksum")
    func = te.create_prim_func([A, Bp, C]).without_attr("global_symbol")
    info = {"isa": isa, "rows": m, "n": n, "k": k, "parts": parts}
    func = func.with_attr(GEMM_ATTR, info).with_attr(FLOPS_ATTR, float(2 * m * n * k))
    func = func.with_attr("op_pattern", 8)  # opaque: FuseOps leaves it whole
    return _annotate(func)


def _annotate(func):
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
    sch.annotate(sch.get_sblock("gemm"), "schedule_rule", RULE_NAME)
    if _info(func)["parts"] > 1:
        sch.annotate(sch.get_sblock("ksum"), "schedule_rule", "None")
    return sch.mod["main"]


def _info(func) -> dict:
    info = func.attrs[GEMM_ATTR]
    return {key: (str(info[key]) if key == "isa" else int(info[key])) for key in info}


def is_gemm_kernel(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and GEMM_ATTR in func.attrs


# ---------------------------------------------------------------- tensor intrinsics

# vdpbf16ps through LLVM IR: TVM has no type for <32 x bfloat>. Inlined (TVM marks imports alwaysinline).
_DPBF16_LLVM = """
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


@T.prim_func(s_tir=True)
def _dpbf16_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "bfloat16", offset_factor=1)
    B = T.match_buffer(b, (1, 16, 2), "bfloat16", offset_factor=1)
    C = T.match_buffer(c, (16,), "float32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:1, 0:16, 0:2])
        T.writes(C[0:16])
        for j, k in T.grid(16, 2):
            with T.sblock("update"):
                vj, vk = T.axis.remap("SR", [j, k])
                C[vj] = C[vj] + T.Cast("float32", A[vk]) * T.Cast("float32", B[vk // 2, vj, vk % 2])


@T.prim_func(s_tir=True)
def _dpbf16_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "bfloat16", offset_factor=1)
    B = T.match_buffer(b, (1, 16, 2), "bfloat16", offset_factor=1)
    C = T.match_buffer(c, (16,), "float32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:1, 0:16, 0:2])
        T.writes(C[0:16])
        # The pair of A and the 16 pairs of B as int32 words (bf16 pairs start at even elements).
        pair = T.decl_buffer((1,), "int32", data=A.data, elem_offset=A.elem_offset // 2)
        pairs = T.decl_buffer((16,), "int32", data=B.data, elem_offset=B.elem_offset // 2)
        C[T.ramp(T.int32(0), 1, 16)] = T.call_pure_extern(
            "float32x16", "autotune_dpbf16ps", C.vload([0], "float32x16"), pair[0], pairs.vload([0], "int32x16")
        )


def _amx_intrin(kt: int):
    """C[32, 32] f32 += A[32, kt] bf16 x Bp[kt/2, 32, 2] bf16 in tiles: C in tmm0-3 (2 x 2), A in
    tmm4-5, B in tmm6-7; C is loaded and stored once per call, kept in tiles across kt."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, kt), "bfloat16", offset_factor=1)
        B = T.match_buffer(b, (kt // 2, 32, 2), "bfloat16", offset_factor=1)
        C = T.match_buffer(c, (32, 32), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:32, 0:32], A[0:32, 0:kt], B[0 : kt // 2, 0:32, 0:2])
            T.writes(C[0:32, 0:32])
            for i, j, k in T.grid(32, 32, kt):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast("float32", A[vi, vk]) * T.Cast("float32", B[vk // 2, vj, vk % 2])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (32, kt), "bfloat16", offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (kt // 2, 32, 2), "bfloat16", offset_factor=1, strides=[sb0, sb1, 1])
        C = T.match_buffer(c, (32, 32), "float32", offset_factor=1, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:32, 0:32], A[0:32, 0:kt], B[0 : kt // 2, 0:32, 0:2])
            T.writes(C[0:32, 0:32])
            # Tile configuration: palette 1, 8 tiles of 16 rows x 64 bytes.
            cfg = T.alloc_buffer((64,), "uint8", align=64)
            for i in range(64):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)
            for t in T.unroll(8):
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(16)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            for m in T.unroll(2):
                for n in T.unroll(2):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(m * 2 + n),
                                                  T.address_of(C[m * 16, n * 16]), T.int64(sc * 4)))
            for ks in T.unroll(kt // 32):
                for m in T.unroll(2):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(4 + m),
                                                  T.address_of(A[m * 16, ks * 32]), T.int64(sa * 2)))
                for n in T.unroll(2):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(6 + n),
                                                  T.address_of(B[ks * 16, n * 16, 0]), T.int64(sb0 * 2)))
                for m in T.unroll(2):
                    for n in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbf16ps", T.uint8(m * 2 + n),
                                                      T.uint8(4 + m), T.uint8(6 + n)))
            for m in T.unroll(2):
                for n in T.unroll(2):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.uint8(m * 2 + n),
                                                  T.address_of(C[m * 16, n * 16]), T.int64(sc * 4)))

    return desc, impl


def amx_intrin_name(kt: int) -> str:
    return f"autotune_amx_bf16_32x32x{kt}"


def register_intrinsics() -> None:
    TensorIntrin.register(DPBF16_INTRIN, _dpbf16_desc, _dpbf16_impl, override=True)
    for kt in AMX_KT:
        TensorIntrin.register(amx_intrin_name(kt), *_amx_intrin(kt), override=True)


# ---------------------------------------------------------------- schedules


def default_avx512_tile(rows: int, n: int) -> tuple[int, int]:
    """(MR rows, NV vectors) of the register tile: the most accumulators (<= 15), then the fewest loads."""
    pairs = [(mr, nv) for mr in _divisors(rows, 1, 5) for nv in _divisors(n // 16, 1, 3)]
    return max(pairs, key=lambda p: (p[0] * p[1], -(p[0] + p[1])))


def default_amx_knobs(n: int, kc: int) -> tuple[int, int]:
    """(32-column blocks per task, KT) for AMX."""
    return max(_divisors(n // 32, 1, 8)), max(kt for kt in AMX_KT if kc % kt == 0)


def _sample(sch, candidates: list[int]):
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))


def apply_schedule(sch, sample: bool = False) -> None:
    """Schedule the GEMM PrimFunc in `sch` in place (default knobs, or MetaSchedule decisions)."""
    info = _info(sch.mod["main"])
    gemm = sch.get_sblock("gemm")
    loops = sch.get_loops(gemm)
    parts = info["parts"]
    outer = [loops[0]] if parts > 1 else []
    rows, n_loop, k_loop = loops[-3:]
    kc = info["k"] // parts
    if info["isa"] == AMX:
        _schedule_amx(sch, gemm, outer, rows, n_loop, k_loop, info["n"], kc, sample)
    else:
        _schedule_avx512(sch, gemm, outer, rows, n_loop, k_loop, info["rows"], info["n"], sample)
    if parts > 1:
        _schedule_ksum(sch)


def _schedule_avx512(sch, gemm, outer, rows, n_loop, k_loop, total_rows, n, sample):
    if sample:
        mr = _sample(sch, _divisors(total_rows, 1, 5))
        nv = _sample(sch, _divisors(n // 16, 1, 3))
    else:
        mr, nv = default_avx512_tile(total_rows, n)
    no, nvl, lanes = sch.split(n_loop, [None, nv, 16])
    mo, mi = sch.split(rows, [None, mr])
    kp, kl = sch.split(k_loop, [None, 2])
    sch.reorder(*outer, no, mo, kp, mi, nvl, lanes, kl)
    task = sch.fuse(*outer, no, mo)
    sch.parallel(task)
    sch.annotate(task, "pragma_import_llvm", _DPBF16_LLVM)
    acc = sch.cache_write(gemm, 0, "global")  # the register tile: under 1 KiB, so on the stack
    sch.reverse_compute_at(acc, task)
    sch.decompose_reduction(gemm, kp)
    sch.tensorize(lanes, DPBF16_INTRIN)
    sch.unroll(mi)
    sch.unroll(nvl)
    # Unroll the tile's zeroing and write-back too, so that LLVM keeps the tile in registers. (A
    # pragma rather than get_loops: how many loops they have depends on the sampled sizes, and a
    # trace whose loop counts change cannot be replayed.)
    sch.annotate(task, "pragma_auto_unroll_max_step", 512)
    sch.annotate(task, "pragma_unroll_explicit", 1)


def _schedule_amx(sch, gemm, outer, rows, n_loop, k_loop, n, kc, sample):
    # KT picks the intrinsic, so it stays fixed (a trace names its intrinsic; a resampled KT
    # could not replay); the column blocks per task are the decision.
    nb, kt = default_amx_knobs(n, kc)
    if sample:
        nb = _sample(sch, _divisors(n // 32, 1, 8))
    no, nbl, nl = sch.split(n_loop, [None, nb, 32])
    mo, ml = sch.split(rows, [None, 32])
    ko, kl = sch.split(k_loop, [None, kt])
    sch.reorder(*outer, no, mo, nbl, ko, ml, nl, kl)
    task = sch.fuse(*outer, no, mo)
    sch.parallel(task)
    sch.decompose_reduction(gemm, ko)
    sch.tensorize(ml, amx_intrin_name(kt))


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
    """s_tir.meta_schedule.cpu.autotune_gemm_bf16: the GEMM's design space, one sampled schedule."""
    apply_schedule(sch, sample=True)
    return [sch]


def register_rule() -> None:
    import tvm_ffi

    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{RULE_NAME}", _custom_rule, override=True)


def compile_standalone(m, n, k, isa, target):
    """The kernel alone, default schedule, compiled: `lib["main"](a, bp, c)`. For tests and benchmarks."""
    from tvm import s_tir

    func = make_primfunc(m, n, k, isa).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    apply_schedule(sch)
    return tvm.compile(sch.mod, target=target)


def pack_weight(b):
    """numpy (k, n) -> the packed (k/2, n, 2) layout the kernel reads."""
    import numpy as np

    k, n = b.shape
    return np.ascontiguousarray(b.reshape(k // 2, 2, n).transpose(0, 2, 1))


register_intrinsics()
register_rule()
