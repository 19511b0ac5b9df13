"""Weight matmuls onto the CPU's matrix engine: bf16 (AMX-BF16, AVX512-BF16; ARM BFDOT, else FMA), int8
(AMX-INT8, VNNI, AVX2; ARM SDOT), and float32 on AVX2-only CPUs and ARM (FMA).

    matmul(x: bf16 (..., m, k), W: bf16 (k, n), out_dtype=float32)      (x float32: rounded to bf16 first)
      -> call_tir(gemm, [x, pack(W)])                pack(W)[k // 2, n, k % 2] = W[k, n]
    matmul(x: float32 or bf16, W: int8 (k, n), out_dtype=float32)        (int8-weight)
      -> call_tir(gemm, [bf16(x), pack(W)])          int8 weights, converted to bf16 in the kernel
    matmul(x: int8 (..., m, k), W: int8 (k, n), out_dtype=int32)          (w8a8)
      -> call_tir(gemm, [uint8(x + 128), pack(W)]) - 128 * sum_k W[k, :]    pack(W)[k // 4, n, k % 4]
    matmul(x: uint8 (..., m, k), W: int8 (k, n), out_dtype=int32)         (w8a8, already shifted)
      -> call_tir(gemm, [x, pack(W)])
    matmul(x: int16 or int8 (..., m, k), W: int8 (k, n), out_dtype=int32)  (w8a8 on AVX2)
      -> call_tir(gemm, [int16(x), pack(W)])         pack(W)[k // 2, n, k % 2]
    matmul(x: int8 (..., m, k), W: int8 (k, n), out_dtype=int32)           (w8a8 on ARM SDOT: signed, no shift)
      -> call_tir(gemm, [x, pack(W)])                pack(W)[k // 4, n, k % 4]
    bf16 and int8-weight on AVX2 (no bf16 arithmetic): as above with A = float32(x); int8-weight's
      float32 activations are not rounded to bf16 there (the FMA multiplies float32 anyway)
    matmul(x: float32, W: float32 (k, n)), AVX2 without AVX-512 or ARM, 2mnk >= MIN_F32_FLOPS or x    (float32)
           the im2col rows of a convolution (conv_gemm)
      -> call_tir(gemm, [x, pack(W)])                pack(W)[k // 2, n, k % 2], as bf16's

The int8 engines multiply unsigned by signed bytes, so signed activations are shifted by 128
and the shift is taken back out with the weight's column sums, an exact int32 correction. w8a8's
quantizer (passes/quantize.py) does both itself where it knows the engine takes the matmul: its
kernel writes the shifted uint8 activations and the graph subtracts the correction. AVX2 multiplies
signed int16 by signed int16 (no shift); the quantizer writes its activations as int16. `W` is any
expression of the weights alone (a parameter, or its transpose), so the packing and the column
sums are weight-only work: LiftTransformParams lifts them and the build runs them once, shipping
packed weights. The kernel
(`kernels/gemm_cpu.py`) is a MetaSchedule task with its own design space.

Shapes an engine cannot take are left to the generic path, never computed wrong: n not a multiple
of 16, k not a multiple of the engine's group (2 bf16, 4 int8), activations whose shape is not
static. Rows the kernel needs in whole blocks (AMX: 32; AVX-512: a register tile of 3+ rows) are
padded with zeros and sliced off again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.frontend.importer import ImportedModel
from autotune.kernels import gemm_cpu as kernel
from autotune.kernels import im2col
from autotune.support import ir

from .weight_transforms import precompute_weight_transforms

log = logging.getLogger(__name__)


class MatrixEngineRewriter:
    """Rewrites one `main`; `count` says how many matmuls moved onto which engine."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        self.mod = mod
        self.isas = {precision: kernel.target_isa(target, precision) for precision in (kernel.BF16, kernel.INT8, kernel.F32)}
        self.count: dict[str, int] = {}  # engine name -> matmuls
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.builder = relax.BlockBuilder(mod)  # holds the kernels added
        self.weight_vars = ir.weight_only_vars(mod["main"])
        self.convolution_rows = im2col_row_vars(mod["main"])

    def __call__(self, call: relax.Call, _matches) -> relax.Expr:
        x, w = call.args
        precision = engine_precision(call)
        if precision is None or w not in self.weight_vars:
            return call
        x_shape, w_shape = ir.static_shape(x.ty), ir.static_shape(w.ty)
        if precision == kernel.F32 and x not in self.convolution_rows and not big_enough_for_float32(x_shape, w_shape):
            return call
        isa = isa_for_shapes(self.isas[kernel.BF16 if precision == "int8-weight" else precision], x_shape, w_shape)
        have = ir.tensor_dtype(x)
        if isa is None or (have == "int16" and kernel.activation_dtype(isa) != "int16"):
            return call
        k, n = w_shape
        lead, rows = tuple(x_shape[:-2]), math.prod(x_shape[:-1])
        if precision == "int8-weight":
            isa = kernel.INT8_WEIGHTS[isa]
        want = kernel.activation_dtype(isa)
        if want == "bfloat16" and have != "bfloat16":  # (float32 activations, bf16 or int8 weights)
            x = relax.op.astype(x, "bfloat16")
        engine = kernel.ENGINE_NAMES[isa]
        self.count[engine] = self.count.get(engine, 0) + 1
        g = kernel.group(isa)
        flat = relax.op.reshape(x, [rows, k]) if lead else x
        shift = precision == kernel.INT8 and have == "int8" and want == "uint8"
        if shift:  # (uint8: the quantizer shifted it)
            flat = relax.op.astype(relax.op.add(relax.op.astype(flat, "int32"), relax.const(128, "int32")), "uint8")
        elif precision == kernel.INT8 and have != want:
            flat = relax.op.astype(flat, want)  # int8 or uint8 -> AVX2's int16: same values
        elif want == "float32" and have != want:  # AVX2 FMA: bf16 values widened (fused into their producer)
            flat = relax.op.astype(flat, want)
        padded = kernel.padded_rows(isa, rows)
        if padded != rows:
            flat = relax.op.nn.pad(flat, [0, padded - rows, 0, 0])
        packed = packed_weight(w, k, n, g)
        acc = "int32" if precision == kernel.INT8 else "float32"
        out = relax.call_tir(self._kernel(padded, n, k, isa), [flat, packed], relax.TensorType([padded, n], acc))
        if padded != rows:
            out = relax.op.strided_slice(out, axes=[0], begin=[0], end=[rows])
        if shift:
            out = relax.op.subtract(out, unsigned_shift_correction(w))
        return relax.op.reshape(out, [*x_shape[:-1], n]) if lead else out

    def _kernel(self, rows: int, n: int, k: int, isa: str) -> relax.GlobalVar:
        key = (rows, n, k, isa)
        if key not in self.kernels:
            self.kernels[key] = self.builder.add_func(kernel.make_primfunc(rows, n, k, isa), kernel.kernel_name(rows, n, k, isa))
        return self.kernels[key]

    def rewrite(self) -> tvm.IRModule:
        pattern = is_op("relax.matmul")(wildcard(), wildcard())
        main = rewrite_call(pattern, self, self.mod["main"])
        mod = self.builder.get()
        mod[mod.get_global_var("main")] = main
        return relax.transform.Normalize()(mod)


def isa_for_shapes(engine_isa: str | None, x_shape, w_shape) -> str | None:
    """The ISA a matmul of activations `x_shape` (..., m, k) by a weight `w_shape` (k, n) runs on
    with `engine_isa`, or None: shapes not static, a weight not 2-D, or a shape the engine cannot
    take. (w8a8's quantizer asks the same, to write the activations the engine multiplies.)"""
    if engine_isa is None or x_shape is None or w_shape is None or len(w_shape) != 2 or len(x_shape) < 2:
        return None
    k, n = w_shape
    return kernel.isa_for_shape(engine_isa, math.prod(x_shape[:-1]), n, k)


def im2col_row_vars(main) -> set:
    """The variables holding a convolution's im2col rows reshaped for its GEMM (conv_gemm)."""
    gathered, rows = set(), set()
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if im2col.is_im2col_call(value):
                gathered.add(binding.var)
            elif isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.reshape")) and value.args[0] in gathered:
                rows.add(binding.var)
    return rows


def packed_weight(w, k: int, n: int, g: int) -> relax.Expr:
    """The weight w (k, n) in the engines' layout, Bp[k // g, n, k % g] (weight-only work: lifted and
    done at build time)."""
    return relax.op.permute_dims(relax.op.reshape(w, [k // g, g, n]), [0, 2, 1])


def big_enough_for_float32(x_shape, w_shape) -> bool:
    """Whether a float32 matmul has the arithmetic (`gemm_cpu.MIN_F32_FLOPS`) to take the engine."""
    if x_shape is None or w_shape is None or len(w_shape) != 2:
        return False
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1] >= kernel.MIN_F32_FLOPS


def unsigned_shift_correction(w, axis: int = 0) -> relax.Expr:
    """128 x the column sums of the int8 weight w (k, n) (its reduction along `axis`): what
    (x + 128) . w adds to x . w (int32)."""
    return relax.op.multiply(relax.op.sum(relax.op.astype(w, "int32"), axis=[axis]), relax.const(128, "int32"))


def rescaled_int8_matmul(values, values_dtype: str, w, row_scales) -> relax.Expr:
    """values (rows, k) @ int8 w (k, n) in int32, exact, times the rows' float32 scales: a w8a8
    product. values_dtype: int8, int16, or uint8 (x + 128, whose shift is taken back out here)."""
    acc = relax.op.matmul(values, w, out_dtype="int32")
    if values_dtype == "uint8":  # (x + 128) . W - 128 * column sums of W: exact; the sums are weight-only work
        acc = relax.op.subtract(acc, unsigned_shift_correction(w))
    return relax.op.multiply(relax.op.astype(acc, "float32"), row_scales)


def engine_precision(call: relax.Call) -> str | None:
    """A matmul's (or convolution's) precision on the engines: "bfloat16" for bf16 (or float32) x bf16 ->
    float32, "int8" for int8 (or shifted uint8, or int16) x int8 -> int32, "int8-weight" for float32/bf16 x
    int8 -> float32, "float32" for float32 x float32 -> float32, else None."""
    x, w = call.args
    out = str(call.attrs.out_dtype)
    if ir.tensor_dtype(x) in ("bfloat16", "float32") and _is_bf16(w) and out == "float32":
        return kernel.BF16  # (float32 x: conv_gemm's im2col rows for the FMA engine)
    if ir.tensor_dtype(x) == "float32" and ir.tensor_dtype(w) == "float32" and out in ("float32", "void", ""):
        return kernel.F32
    if ir.tensor_dtype(x) in ("int8", "uint8", "int16") and ir.tensor_dtype(w) == "int8" and out == "int32":
        return kernel.INT8
    if ir.tensor_dtype(x) in ("float32", "bfloat16") and ir.tensor_dtype(w) == "int8" and out == "float32":
        return "int8-weight"
    return None


def _is_bf16(expr) -> bool:
    return ir.tensor_dtype(expr) == "bfloat16"


def use_matrix_engine(imported: ImportedModel, target: tvm.target.Target) -> tuple[ImportedModel, dict | None]:
    """Move the bf16, int8-weight, w8a8 (and, on AVX2-only CPUs and ARM, large float32) weight matmuls
    onto the target's matrix engines; pack their weights once.

    Returns (model, {engine name: matmuls}), or the model unchanged and None on targets without
    an engine for them (or without such matmuls). The weight-only work lifted with the packing
    includes the casts of bias vectors to float32: they ship pre-cast."""
    rewriter = MatrixEngineRewriter(imported.mod, target)
    if not any(rewriter.isas.values()):
        return imported, None
    mod = rewriter.rewrite()
    if not rewriter.count:
        return imported, None
    said = ", ".join(f"{count} matmuls on {engine}" for engine, count in rewriter.count.items())
    log.info("matrix engine: %s", said)
    moved = replace(imported, mod=mod, notes=imported.notes + [f"matrix engine: {said}, their weights packed at build time"])
    return precompute_weight_transforms(moved), dict(rewriter.count)


MAX_WIDENED_INT8_WEIGHTS = 1 << 16  # an int8 convolution weight no engine takes, up to this size, ships float32


def convolutions_in_float32(imported: ImportedModel) -> tuple[ImportedModel, int]:
    """conv(x: bf16, W: bf16 weights, out_dtype=float32) -> conv(float32(x), float32(W)) (CPU targets),
    and likewise conv(x, W: int8 weights of at most MAX_WIDENED_INT8_WEIGHTS values) (int8-weight).

    For the convolutions `conv_gemm.convolutions_as_gemm` leaves (no bf16 matrix engine on the
    target, or a shape it cannot take): TVM has no bf16 convolution schedule on CPUs (its generic
    kernels widen every bf16 load on the fly), so they compute in float32 on bf16-rounded inputs,
    the kind of kernel the shipped log tunes well at float32. Its int8-weight convolution widens
    every int8 weight load too: the tiny VAE decoder's 3-channel output convolution took 2.55 ms
    there against 0.47 in float32 (Zen 2); a weight that small (its 648 values) costs nothing in
    float32. The weight cast is precomputed (those weights ship float32; the int8 weights' scale
    stays on the output, exact integers widened). Returns (model, how many convolutions)."""
    weight_vars = ir.weight_only_vars(imported.mod["main"])
    count = 0

    def small_int8(w) -> bool:
        shape = ir.static_shape(w.ty)
        return ir.tensor_dtype(w) == "int8" and shape is not None and math.prod(shape) <= MAX_WIDENED_INT8_WEIGHTS

    def to_float32(call: relax.Call, _matches) -> relax.Expr:
        nonlocal count
        x, w = call.args
        takes = (_is_bf16(x) and _is_bf16(w)) or (ir.tensor_dtype(x) in ("float32", "bfloat16") and small_int8(w))
        if not (takes and w in weight_vars and str(call.attrs.out_dtype) == "float32"):
            return call
        count += 1
        return relax.Call(call.op, [relax.op.astype(a, "float32") for a in call.args], call.attrs)

    convolution = is_op("relax.nn.conv1d") | is_op("relax.nn.conv2d") | is_op("relax.nn.conv3d")
    main = rewrite_call(convolution(wildcard(), wildcard()), to_float32, imported.mod["main"])
    if count == 0:
        return imported, 0
    log.info("%d convolutions in float32 (no matrix engine takes them on this target)", count)
    mod = relax.transform.Normalize()(ir.replace_main(imported.mod, main))
    note = f"{count} convolutions no matrix engine takes computed in float32 (bf16 inputs rounded, small int8 weights widened at build time)"
    moved = replace(imported, mod=mod, notes=imported.notes + [note])
    return precompute_weight_transforms(moved), count
