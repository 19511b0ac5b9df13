"""3x3 convolutions as Winograd GEMMs on CPUs (kernels/winograd.py): float32 ones as F(4x4, 3x3),
a quarter of the direct convolution's multiply-adds in 36 GEMMs; bf16 and int8-weight ones, on a
CPU that multiplies bf16 (AMX-BF16, AVX512-BF16), as F(2x2, 3x3) on the bf16 engine, 4/9 of them
in 16 GEMMs (gemm_cpu's batched kernel; F(4x4)'s transforms amplify bf16 rounding 7x); w8a8's on
the int8 engine (VNNI, AMX-INT8), F(2x2, 3x3) on int8: the input transform quantizes V per
(point, tile) row, U is quantized per (point, output channel) at build time, the output transform
dequantizes the int32 product (F(4x4) on int8: 5x the error; F(2x2) ~1.2x the im2col w8a8's
relative RMS error in a numpy model, 128 channels). On AVX2 (no bf16 or int8 dot product) the
engines' pass takes float32 and bf16 ones as F(4x4) on the float32 FMA engine (U float32: AVX2's
bf16 engine multiplies float32 anyway) and int8-weight / w8a8 ones as F(4x4) on its int16-weight
variant (U quantized again to int16, INT16_U_ENGINES), from 64 channels each way
(MIN_FMA_CHANNELS): the VAE up-block's float32 build 0.32x (869 -> 278 ms on a Zen 2).

    conv(x, W)  (3x3 or kt x 3 x 3, unit strides and dilation, one group)
      -> V = winograd_input(channels_last(x))          (points, tiles, kt * C_in)   float32 / bf16
         U = kron(G, G) @ W as (9, kt * C_in * C_out)   (weight-only: computed and packed at build time)
         y = winograd_output(gemm(V, U))                (N, [frames,] H, W, C_out) channels-last, float32

An int8-weight convolution's U is computed from its int8 values and quantized again, to int8 per
(point, output channel) (the bf16 engine's int8-weight kernel converts it in the kernel; the output
transform applies its scales, the weight's per-channel scale still multiplies the output), so that
its weight ships as 16/9 bytes per weight instead of 1 (bf16 U: 16/9 x 2; AVX2's int16 U in F(4x4):
36/9 x 2, half the float32 build's U, whose scales its GEMM applies). The float32 ones are taken
where the CPU's matrix engines do not take the convolution first (conv_gemm: float32 on ARM and AVX2-only
CPUs), the engines' ones before conv_gemm, which takes what is left (1x1, strided, too few
channels). Both channel counts must be at least MIN_CHANNELS and the output at least one tile. With 16 channels
the transforms cost about what the GEMM saves: taking the tiny VAE decoder's 16-channel
convolutions too (75 instead of 45) built in 109 s instead of 34 and ran no faster (27.7 against
26.0 ms, 5 interleaved rounds on a Zen 4; each transform kernel is unrolled code, ~1 s of LLVM).
As with conv_gemm, a model most of whose convolutions are taken goes channels-last first, and a
zero `F.pad` in front of one becomes its own padding (the input transform reads zeros outside the
input).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import replace

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.frontend.importer import ImportedModel
from autotune.kernels import gemm_cpu, token_quant, winograd
from autotune.kernels.attention_cpu import vector_lanes
from autotune.support import ir

from .causal_padding import pads_into_convolutions
from .conv_gemm import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    ConvGemmRewriter,
    channels_first,
    channels_last_pays,
    to_channels_last,
)
from .matrix_engine import engine_precision, unsigned_shift_correction

log = logging.getLogger(__name__)

MIN_CHANNELS = 32  # the tiny VAE decoder's 16-channel ones: no faster, 3x the build time (below)
WINOGRAD_F32_ENGINES = (gemm_cpu.AVX2_F32,)  # float32 engines whose 3x3 convolutions are F(4x4) Winograd GEMMs
# On AVX2's FMA engines: the tiny VAE decoder's 45 32-channel ones (8x8 to 16x16) ran no faster as
# Winograd (1.00x, float32 and bf16; w8a8 1.03x: Zen 2, 7 rounds) at lower fidelity (int8-weight
# cosine 0.99947 -> 0.99894); the VAE up-block's 384-channel ones 0.40x (float32)
MIN_FMA_CHANNELS = 64
# int8-weight (and w8a8, no int8 engine takes them there) on AVX2: F(4x4) with U quantized again to
# int16 per (point, output channel), widened to float32 and scaled in the GEMM (gemm_cpu.AVX2_W16).
# On the VAE up-block (Zen 2) against F(2x2) with int8 U: 1.48x -> 1.00x the float32 build's time,
# PSNR to float32 torch 59.3 -> 67.7 dB (the im2col int8-weight build: 67.8); weights 14.8 -> 66.2 MiB
# (float32 build: 131.6)
INT16_U_ENGINES = {gemm_cpu.AVX2_F32: gemm_cpu.AVX2_W16}
INT16_MAX = 32767


class WinogradRewriter:
    """Rewrites one `main`; `count` says how many convolutions it took (of `seen`; `isas`: how many
    on each of the engines' GEMMs). `engines`: take the convolutions of the matrix engines' precisions (bf16,
    int8-weight: F(2x2) on the bf16 engine; with `int8_activations` (w8a8) on the int8 engine where
    it takes them; on AVX2 all four as F(4x4) on the float32 engine, int8 weights with U int16), else the float32 ones
    (F(4x4), MetaSchedule's GEMM)."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, engines: bool = False,
                 int8_activations: bool = False, dry_run: bool = False):
        self.mod = mod
        self.lanes = vector_lanes(target)
        engine = gemm_cpu.target_isa(target, gemm_cpu.BF16)
        self.engine = engine if engines and engine in (*gemm_cpu.BF16_ARITHMETIC, gemm_cpu.AVX2_BF16) else None
        f32 = gemm_cpu.target_isa(target, gemm_cpu.F32)
        self.f32 = f32 if engines and f32 in WINOGRAD_F32_ENGINES else None  # float32 engine: F(4x4) on it
        int8 = gemm_cpu.target_isa(target, gemm_cpu.INT8)  # (unsigned x signed engines: VNNI, AMX-INT8)
        unsigned = int8 is not None and gemm_cpu.activation_dtype(int8) == "uint8"
        self.int8 = int8 if engines and int8_activations and unsigned else None
        self.isas: collections.Counter = collections.Counter()  # the engines' convolutions, per GEMM ISA
        self.tiles: collections.Counter = collections.Counter()  # the convolutions, per output tile (2: F(2x2), 4: F(4x4))
        self.engines = engines
        self.dry_run = dry_run
        self.seen = 0
        self.count = 0
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.builder = relax.BlockBuilder(mod)
        self.weight_vars = ir.weight_only_vars(mod["main"])

    def __call__(self, call: relax.Call, _matches) -> relax.Expr:
        self.seen += 1
        geometry = self.geometry(call)
        if geometry is None:  # (in a model made channels-last: channels-first between transposes, as conv_gemm's;
            # the engines' pass leaves them to conv_gemm, which takes them as they are or does the same)
            return call if self.dry_run or self.engines else channels_first(call)
        self.count += 1
        return call if self.dry_run else self._winograd(call, *geometry)

    def geometry(self, call: relax.Call):
        """(channels_last, x shape as (N, D, H, W, C), kt, pads before (D, H, W), output (Do, Ho, Wo),
        C_out, tile m, the GEMM's engine (gemm_cpu's bf16 or int8 ISA; None: float32)) where `call` is
        a convolution this pass takes, else None."""
        x, w = call.args
        precision = engine_precision(call)
        taken = ("bfloat16", "int8-weight") if self.engine else ()
        if w not in self.weight_vars or precision not in ((*taken, *(("float32",) if self.f32 else ()))
                                                          if self.engines else ("float32",)):
            return None
        x_shape, y_shape = ir.static_shape(x.ty), ir.static_shape(call.ty)
        if x_shape is None or y_shape is None:
            return None
        dims = len(x_shape) - 2
        a = call.attrs
        layouts = (str(a.data_layout), str(a.kernel_layout))
        last = layouts == CHANNELS_LAST.get(dims)
        if dims not in (2, 3) or (layouts != CHANNELS_FIRST[dims] and not last) or str(a.out_layout) != str(a.data_layout):
            return None
        if int(a.groups) != 1 or any(int(v) != 1 for v in (*a.strides, *a.dilation)):
            return None
        w_shape = ir.static_shape(w.ty)
        kernel = w_shape[1:-1] if last else w_shape[2:]
        if tuple(kernel[-2:]) != (winograd.KERNEL, winograd.KERNEL):
            return None
        if last:
            n, *spatial, c_in = x_shape
            out, c_out = y_shape[1:-1], y_shape[-1]
        else:
            n, c_in, *spatial = x_shape
            out, c_out = y_shape[2:], y_shape[1]
        depth = (kernel[0] if dims == 3 else 1) * c_in
        isa = self._engine(precision, c_out, depth) if self.engines else None
        if self.engines and isa is None:
            return None
        # F(2x2) where U is bf16 or int8 (AMX / AVX-512 multiply bf16-rounded V and U: F(4x4)'s
        # transforms amplify that rounding 7x; int8 U quantized again: F(4x4) took int8-weight's PSNR to
        # float32 torch on the VAE up-block from 67.8 to 47.5 dB on AVX2); F(4x4) where U is float32 or int16
        tile = winograd.TILE if isa is None or gemm_cpu.weight_dtype(isa) in ("float32", "int16") else winograd.ENGINE_TILE
        minimum = MIN_FMA_CHANNELS if isa in gemm_cpu.AVX2 else MIN_CHANNELS
        if min(c_in, c_out) < minimum or min(out[-2:]) < tile:
            return None
        pads = [int(v) for v in a.padding][:dims]  # the befores (the afters: zeros past the input's end)
        if dims == 2:
            spatial, pads, out, kernel = [1, *spatial], [0, *pads], [1, *out], [1, *kernel]
        return last, (n, *spatial, c_in), kernel[0], tuple(pads), tuple(out), c_out, tile, isa

    def _engine(self, precision: str, c_out: int, depth: int) -> str | None:
        """The GEMM's engine (gemm_cpu ISA) for a convolution of `precision`: w8a8's int8 engine, else
        the bf16 engine (int8 weights: its int8-weight variant); float32 on the float32 engine, and
        bf16 too where the bf16 engine is AVX2's FMA (which multiplies float32 anyway: with U in
        float32 it is F(4x4) at the direct convolution's fidelity, the VAE up-block 0.83x F(2x2)'s
        time), int8 weights there on its int16-weight variant (INT16_U_ENGINES)."""
        if precision == "float32" or (precision == "bfloat16" and self.engine in gemm_cpu.FMA and self.f32):
            return gemm_cpu.isa_for_shape(self.f32, 1, c_out, depth)
        int8_weights = precision == "int8-weight"
        isa = gemm_cpu.isa_for_shape(self.int8, 1, c_out, depth) if int8_weights else None
        if int8_weights and self.engine in gemm_cpu.FMA and self.f32:  # (int8 U: F(2x2), or F(4x4) at 47.5 dB)
            return isa or gemm_cpu.isa_for_shape(INT16_U_ENGINES[self.f32], 1, c_out, depth)
        bf16 = gemm_cpu.INT8_WEIGHTS.get(self.engine) if int8_weights else self.engine
        return isa or gemm_cpu.isa_for_shape(bf16, 1, c_out, depth)

    def _winograd(self, call, last, x_shape, kt, pads, out, c_out, tile, isa) -> relax.Expr:
        x, w = call.args
        dims, x_dtype = len(ir.static_shape(x.ty)) - 2, ir.tensor_dtype(x)
        n, c_in = x_shape[0], x_shape[-1]
        if not last:
            x = relax.op.permute_dims(x, [0, *range(2, dims + 2), 1])
        if dims == 2:
            x = relax.op.expand_dims(x, [1])
        tiles = n * out[0] * winograd.tiles(out[1], tile) * winograd.tiles(out[2], tile)
        rows = gemm_cpu.padded_rows(isa, tiles) if isa else tiles
        points, depth = winograd.points(tile), kt * c_in
        quantized = isa is not None and gemm_cpu.PRECISION[isa] == gemm_cpu.INT8
        u_dtype = gemm_cpu.weight_dtype(isa) if isa else "float32"
        requantized = u_dtype in ("int8", "int16")  # int8-weight's U quantized again (w8a8's too)
        column_scaled = isa in gemm_cpu.COLUMN_SCALED  # (the GEMM applies U's scales: M comes out dequantized)
        v_dtype = gemm_cpu.activation_dtype(isa) if isa else "float32"
        v_type = relax.TensorType([points, rows, kt, c_in], v_dtype)
        v = relax.call_tir(self._kernel("input", x_shape, kt, pads, out, tile, x_dtype, v_dtype, rows), [x],
                           [v_type, relax.TensorType([points, rows, 1], "float32")] if quantized else v_type)
        if quantized:
            v, row_scales = relax.TupleGetItem(v, 0), relax.TupleGetItem(v, 1)
        v = relax.op.reshape(v, [points, rows, depth])
        # W -> (3, 3, [kt,] C_in, C_out) -> (9, kt * C_in * C_out): the taps by rows, GEMM's (k, n) order after
        to_taps = ([1, 2, 3, 0] if dims == 2 else [2, 3, 1, 4, 0]) if last else ([2, 3, 1, 0] if dims == 2 else [3, 4, 2, 1, 0])
        taps = relax.op.reshape(relax.op.permute_dims(w, to_taps), [9, depth * c_out])
        if ir.tensor_dtype(w) != "float32":  # bf16 or int8 (int8-weight: its scale multiplies the output)
            taps = relax.op.astype(taps, "float32")
        u = relax.op.reshape(relax.op.matmul(relax.const(winograd.weight_matrix(tile)), taps), [points, depth, c_out])
        m_type = relax.TensorType([points, rows, c_out], "int32" if quantized else "float32")
        if requantized:  # U quantized per (point, output channel), packed in gemm_cpu's layout
            u, u_scales = _quantized_columns(u, u_dtype)
            operands = [v, _packed(u, points, depth, c_out, gemm_cpu.group(isa))]
            m = relax.call_tir(self._kernel("gemm", rows, depth, c_out, isa, points),
                               [*operands, u_scales] if column_scaled else operands, m_type)
            inputs = ([m, row_scales, u_scales, unsigned_shift_correction(u, axis=1)] if quantized
                      else [m] if column_scaled else [m, u_scales])
        elif isa:  # bf16 (float32 on the float32 engine), gemm_cpu's packed layout (points, kt C_in / 2, C_out, 2)
            packed = _packed(u, points, depth, c_out, gemm_cpu.group(isa))
            if gemm_cpu.weight_dtype(isa) != "float32":
                packed = relax.op.astype(packed, gemm_cpu.weight_dtype(isa))
            inputs = [relax.call_tir(self._kernel("gemm", rows, depth, c_out, isa, points), [v, packed], m_type)]
        else:  # packed in panels of w output channels, (36, C_out / w, kt C_in, w): the GEMM's layout
            w_ = winograd.panel_width(c_out, self.lanes)
            packed = relax.op.permute_dims(relax.op.reshape(u, [points, depth, c_out // w_, w_]), [0, 2, 1, 3])
            inputs = [relax.call_tir(self._kernel("gemm", rows, depth, c_out, isa, points), [v, packed], m_type)]
        frames = out[0] if dims == 3 else None
        scales = "both" if quantized else "weight" if requantized and not column_scaled else ""
        self.isas[isa] += isa is not None
        self.tiles[tile] += 1
        y = relax.call_tir(self._kernel("output", (points, rows, c_out), (n, frames, *out[1:]), tile, scales), inputs,
                           relax.TensorType([n, *out[3 - dims:], c_out], "float32"))
        return y if last else relax.op.permute_dims(y, [0, dims + 1, *range(1, dims + 1)])

    def _kernel(self, which: str, *geometry) -> relax.GlobalVar:
        key = (which, *geometry)
        if key not in self.kernels:
            if which == "gemm":
                rows, depth, c_out, isa, points = geometry
                if isa:
                    func = gemm_cpu.make_primfunc(rows, c_out, depth, isa, batch=points)
                    name = gemm_cpu.kernel_name(rows, c_out, depth, isa, batch=points)
                else:
                    func = winograd.make_gemm_primfunc(rows, depth, c_out, self.lanes)
                    name = f"winograd_gemm_{rows}x{depth}x{c_out}"
            elif which == "input":
                x_shape, kt, pads, out, tile, x_dtype, v_dtype, rows = geometry
                func = winograd.make_input_primfunc(x_shape, kt, pads, out, self.lanes, tile, x_dtype, v_dtype, rows)
                name = f"winograd_input_{'x'.join(map(str, x_shape))}_k{kt}_m{tile}"
            else:
                m_shape, out, tile, scales = geometry
                func = winograd.make_output_primfunc(m_shape, out, self.lanes, tile, scales)
                name = f"winograd_output_{'x'.join(str(v) for v in (*out, m_shape[-1]) if v is not None)}_m{tile}"
            self.kernels[key] = self.builder.add_func(func, name)
        return self.kernels[key]

    def rewrite(self) -> tvm.IRModule:
        convolution = is_op("relax.nn.conv2d") | is_op("relax.nn.conv3d")
        main = rewrite_call(convolution(wildcard(), wildcard()), self, self.mod["main"])
        mod = self.builder.get()
        mod[mod.get_global_var("main")] = main
        return relax.transform.Normalize()(mod)


def _packed(u: relax.Expr, points: int, depth: int, c_out: int, group: int) -> relax.Expr:
    """U (points, depth, C_out) -> gemm_cpu's packed layout (points, depth / g, C_out, g)."""
    return relax.op.permute_dims(relax.op.reshape(u, [points, depth // group, group, c_out]), [0, 1, 3, 2])


def _quantized_columns(u: relax.Expr, dtype: str) -> tuple[relax.Expr, relax.Expr]:
    """U (points, depth, C_out) float32 -> (U quantized to `dtype` (int8 or int16) per (point, output
    channel) as token_quant quantizes a row, the scales (points, C_out)). Weight-only: build time."""
    limit = token_quant.INT8_MAX if dtype == "int8" else INT16_MAX
    amax = relax.op.max(relax.op.abs(u), axis=[1], keepdims=True)
    scales = relax.op.divide(relax.op.maximum(amax, relax.const(token_quant.MIN_SCALE, "float32")),
                             relax.const(limit, "float32"))
    q = relax.op.astype(relax.op.clip(relax.op.round(relax.op.divide(u, scales)), -limit, limit), dtype)
    return q, relax.op.squeeze(scales, [1])


def convolutions_as_winograd(imported: ImportedModel, target: tvm.target.Target, engines: bool = False,
                             int8_activations: bool = False) -> tuple[ImportedModel, int]:
    """Rewrite the 3x3 convolutions this pass takes (module docstring) on a CPU target: the float32
    ones (run after conv_gemm, before the weight transforms are precomputed), or with `engines` the
    bf16 and int8-weight ones on a CPU that multiplies bf16 or has AVX2's FMA engine (w8a8's,
    `int8_activations`, on the int8 engine where it takes them), and the float32 ones on AVX2's
    float32 engine (run before conv_gemm, which takes the rest). Returns (model,
    how many)."""
    if target.kind.name != "llvm":
        return imported, 0
    dry = WinogradRewriter(imported.mod, target, engines, int8_activations, dry_run=True)
    if engines and dry.engine is None and dry.int8 is None and dry.f32 is None:
        return imported, 0
    dry.rewrite()
    if not dry.count:
        return imported, 0
    taken, takes = dry.count, lambda conv: dry.geometry(conv) is not None
    if engines:  # one layout and padding for the engines' convolutions, Winograd or not (conv_gemm takes the rest after)
        rest = ConvGemmRewriter(imported.mod, target, int8_activations, dry_run=True)
        rest.rewrite()
        taken = max(taken, rest.count)  # (it counts the 3x3 ones too: it would take them all)
        takes = lambda conv: dry.geometry(conv) is not None or rest.takes(conv)  # noqa: E731
    channels_last = channels_last_pays(taken, dry.seen)
    main, unpadded = pads_into_convolutions(imported.mod["main"], only=takes)
    mod = ir.replace_main(imported.mod, main)
    rewriter = WinogradRewriter(to_channels_last(mod) if channels_last else mod, target, engines, int8_activations)
    mod = rewriter.rewrite()
    log.info("winograd: %d convolutions", rewriter.count)
    if engines:
        on = ", ".join(f"{count} on {gemm_cpu.ENGINE_NAMES[isa]}" for isa, count in rewriter.isas.items())
        forms = {2: "F(2x2, 3x3): 16 GEMMs of 4/9 of the multiply-adds", 4: "F(4x4, 3x3): 36 GEMMs of 1/4 of the multiply-adds"}
        note = (f"{rewriter.count} 3x3 convolutions as Winograd "
                + ", ".join(forms[tile] + (f" ({count})" if len(rewriter.tiles) > 1 else "")
                            for tile, count in sorted(rewriter.tiles.items())) + f" ({on})")
        if any(gemm_cpu.PRECISION[isa] == gemm_cpu.INT8 for isa in rewriter.isas):
            note += "; their transformed inputs quantized per (point, tile) row on the int8 engine"
        again = sorted({gemm_cpu.weight_dtype(isa) for isa in rewriter.isas} & {"int8", "int16"})
        if again:
            note += f"; the transformed int8 weights quantized to {' / '.join(again)} again, per (point, output channel)"
    else:
        note = f"{rewriter.count} 3x3 convolutions as Winograd F(4x4, 3x3): 36 GEMMs of a quarter of the multiply-adds"
    if unpadded and engines:  # (the pads merged for conv_gemm's convolutions too)
        note += f"; {unpadded} convolutions (these and the im2col GEMMs') zero-pad their input as they read it"
    elif unpadded:
        note += f", {unpadded} of them zero-padding their input as they transform it"
    if channels_last:
        note += "; channels-last from one to the next"
    return replace(imported, mod=mod, notes=imported.notes + [note]), rewriter.count
