"""Convolutions onto the CPU's matrix engine, as GEMMs over im2col rows (bf16, int8 weights, w8a8,
and float32 on AVX2-only CPUs and on ARM).

    conv(x: bf16, W: bf16 weight, out_dtype=float32)               (bf16)
    conv(x: float32 or bf16, W: int8 weight, out_dtype=float32)    (int8-weight; x rounded to bf16
                                                                     on the bf16 engines)
    conv(x: float32, W: float32 weight)                           (float32 on AVX2-only CPUs, ARM)
      -> A = im2col(channels_last(x))              (N * positions, taps * C_in)
         y = matmul(A, W as (taps * C_in, C_out))  (N * positions, C_out), float32
         -> channels first again
    the same int8-weight convolution under w8a8 (int8_activations), where the int8 engine takes it
      -> Aq, sA = im2col_quant(channels_last(x))   int8 rows (uint8 + 128, AVX2 int16, ARM SDOT int8), a scale per row
         y = (matmul(Aq, W, int32) [- 128 * column sums of W]) * sA
      -> on AVX2, read in place: Xq, sX = sample_quant(channels_last(x))   int16, a scale per sample, padded
         y = implicit_gemm(Xq, W, int32) * sX

On AVX2's FMA engines (float32, bf16, int8 weights) a convolution whose reduction is one pass is
an implicit GEMM instead (`gemm_cpu.reads_rows_in_place`): the kernel reads each row's taps in place
from the input zero-padded once (`relax.op.nn.pad`, at 1/taps of im2col's bytes), so no im2col
matrix goes through memory; same arithmetic in the same order as the GEMM of im2col rows.
Measured on a Zen 2 (2 threads, default tiles): 16384 x 8 x 216 (the tiny VAE decoder's largest)
1.04 ms as im2col + GEMM, 0.44 ms implicit; 4096 x 16 x 432 0.52 -> 0.37 ms; the tiny VAE
decoder's float32 build 0.82x. So is w8a8's on AVX2's int16 engine, whose rows cannot keep a scale
each (a row's taps are other rows' taps): its input is quantized once per sample to int16, as
finely as exact int32 sums allow (`_implicit_int16_product`; the tiny VAE decoder's w8a8 build
1.18x -> 0.87x its float32 build, cosine to float32 torch 0.9978 -> 0.9995).

The matmul is then `matrix_engine.use_matrix_engine`'s to move onto AMX / AVX512-BF16 / AVX2 FMA,
with its weight packed at build time (the weight reshape is weight-only work, lifted with the
packing). TVM has no bf16 convolution schedule for CPUs (its generic kernel widens every load), so
without this the convolutions compute in float32 (`convolutions_in_float32`, which takes what is
left). Float32 convolutions without a tuning record run on a sampled fallback schedule of TVM's
direct loop nest: on AVX2 the VAE up-block's were 15x slower than the same arithmetic on the FMA
engine, and even the tiny VAE decoder's convolutions (0.4-40 MFLOP each) are faster as GEMMs, so
unlike float32 matmuls (matrix_engine's MIN_F32_FLOPS) every im2col GEMM takes the engine (a 1x1
convolution, a plain matmul of its input, follows the matmuls' rule).

Taken: conv1d/2d/3d, channels-first layouts, one group, static shapes, output channels and
reduction length the engine takes (`gemm_cpu.isa_for_shape`); output channels short of whole
vectors are zero-padded up to them where at most half the columns are padding
(`gemm_cpu.padded_columns`: the tiny VAE decoder's 8-channel convolutions take 16 columns, its
3-channel output convolution none). A zero `F.pad` in front of a convolution taken (the Wan VAE's
causal padding) becomes the convolution's own padding, gathered as zeros by its im2col
(`causal_padding.pads_into_convolutions`). Where more convolutions are taken than left (a VAE at
bf16 or int8), the model goes channels-last first (`to_channels_last`: TVM's ConvertLayout, the
layout carried through the norms, activations, adds and concatenations between the
convolutions), so that one GEMM's rows feed the next im2col as they are, without the transposes
back to channels-first and forth again (the VAE up-block at bf16: 0.94x, w8a8 0.88x, on a Zen 4);
a convolution left runs channels-first between transposes (`channels_first`). A is taps times the input (27x for
3x3x3): at full 480p the VAE's last layers would need gigabytes, so an im2col over
MAX_IM2COL_BYTES is cut into chunks of output rows (boxes along one axis), each gathered and
multiplied in turn by one kernel per chunk size (memory planning reuses their buffers), the
products concatenated. A 1x1 convolution with unit strides and no padding needs no im2col: its
rows are the channels-last input itself.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.frontend.importer import ImportedModel
from autotune.kernels import gemm_cpu, im2col, token_quant
from autotune.support import ir

from .causal_padding import convolution_like, pads_into_convolutions
from .layout_carriers import carry_layouts
from .matrix_engine import engine_precision, packed_weight, rescaled_int8_matmul

log = logging.getLogger(__name__)

MAX_IM2COL_BYTES = 1 << 30  # one im2col buffer; a larger convolution is gathered and multiplied in chunks
_BYTES = {"bfloat16": 2, "float32": 4}
CHANNELS_FIRST = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}
CHANNELS_LAST = {1: ("NWC", "OWI"), 2: ("NHWC", "OHWI"), 3: ("NDHWC", "ODHWI")}


class ConvGemmRewriter:
    """Rewrites one `main`; `count` says how many convolutions became GEMMs (`quantized` of them
    on int8 activations)."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, int8_activations: bool = False,
                 dry_run: bool = False):
        self.mod = mod
        self.dry_run = dry_run  # count the convolutions it would take, rewrite none
        precisions = (gemm_cpu.BF16, gemm_cpu.F32, gemm_cpu.INT8)
        self.isas = {precision: gemm_cpu.target_isa(target, precision) for precision in precisions}
        self.int8_activations = int8_activations
        self.seen = 0  # convolutions looked at
        self.saw_channels_last = False  # a model made channels-last already (the engines' Winograd pass)
        self.count = 0
        self.chunked = 0  # of them, computed in row chunks
        self.quantized = 0  # of them, int8 x int8 (w8a8)
        self.padded = 0  # of them, with output channels padded to whole vectors
        self.in_place = 0  # of them, implicit GEMMs reading their rows in place (no im2col)
        self.per_sample = 0  # of those, w8a8's on activations quantized to int16 per sample (AVX2)
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.builder = relax.BlockBuilder(mod)
        self.weight_vars = ir.weight_only_vars(mod["main"])

    def __call__(self, call: relax.Call, _matches) -> relax.Expr:
        self.seen += 1
        self.saw_channels_last |= is_channels_last(call)
        gemm = self._as_gemm(call)
        if gemm is not None:
            return gemm
        return call if self.dry_run else channels_first(call)

    def takes(self, call: relax.Call) -> bool:
        """Whether this rewriter (a dry run's) would take the convolution `call`."""
        return self._as_gemm(call) is not None

    def _as_gemm(self, call: relax.Call) -> relax.Expr | None:
        """The GEMM `call` becomes (dry run: `call` itself), or None where no engine takes it."""
        x, w = call.args
        precision = engine_precision(call)
        if w not in self.weight_vars or precision is None:
            return None
        x_shape, w_shape, y_shape = ir.static_shape(x.ty), ir.static_shape(w.ty), ir.static_shape(call.ty)
        if x_shape is None or w_shape is None or y_shape is None:
            return None
        dims = len(x_shape) - 2
        a = call.attrs
        layouts = (str(a.data_layout), str(a.kernel_layout))
        last = layouts == CHANNELS_LAST.get(dims)  # (convolutions_as_gemm's ConvertLayout made it so)
        if (layouts != CHANNELS_FIRST.get(dims) and not last) or str(a.out_layout) != str(a.data_layout):
            return None
        if int(a.groups) != 1:
            return None
        if last:
            n, *spatial, c_in = x_shape
            c_out, *kernel, _ = w_shape
            out_spatial = y_shape[1:-1]
        else:
            n, c_in, *spatial = x_shape
            c_out, _, *kernel = w_shape
            out_spatial = y_shape[2:]
        rows, k = n * math.prod(out_spatial), c_in * math.prod(kernel)
        # w8a8: int8 x int8 where the int8 engine takes the shape, else int8-weight's bf16 engine
        # columns: c_out, or c_out rounded up to whole vectors (`gemm_cpu.padded_columns`)
        int8_isa, columns = None, None
        if precision == "int8-weight" and self.int8_activations:
            columns = gemm_cpu.padded_columns(self.isas[gemm_cpu.INT8], rows, c_out, k)
            int8_isa = gemm_cpu.isa_for_shape(self.isas[gemm_cpu.INT8], rows, columns, k) if columns else None
        values = gemm_cpu.activation_dtype(int8_isa) if int8_isa is not None else None
        if values is None:
            isa = self.isas.get({"int8-weight": gemm_cpu.BF16}.get(precision, precision))
            columns = gemm_cpu.padded_columns(isa, rows, c_out, k)
            if columns is None:
                return None
            # A's dtype: the engine's. The FMA engine multiplies float32, so its im2col widens bf16 values
            # as it gathers them (a cast of A afterwards was a pass over 27x the input); int8-weight's
            # float32 activations are not rounded there, as in its matmuls.
            dtype = "float32" if gemm_cpu.activation_dtype(isa) == "float32" else "bfloat16"
            engine = gemm_cpu.INT8_WEIGHTS[isa] if precision == "int8-weight" else isa  # (matrix_engine's choice)
            x = relax.op.astype(x, dtype) if ir.tensor_dtype(x) != dtype else x
        else:
            dtype = ir.tensor_dtype(x)  # gathered as it is, quantized as it is gathered
            self.quantized += 1
        if self.dry_run:
            self.count += 1
            return call
        strides, dilation = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        padding = [int(v) for v in a.padding]  # all befores, then all afters
        self.count += 1
        channels_last = x if last else relax.op.permute_dims(x, [0, *range(2, dims + 2), 1])
        # W (O, I, *taps) or (O, *taps, I) -> (*taps, I, O) -> (taps * I, O): the k order of A's rows
        to_taps_in_out = [*range(1, dims + 1), dims + 1, 0] if last else [*range(2, dims + 2), 1, 0]
        rhs = relax.op.reshape(relax.op.permute_dims(w, to_taps_in_out), [k, c_out])
        if columns != c_out:
            self.padded += 1
            rhs = relax.op.nn.pad(rhs, [0, 0, 0, columns - c_out])
        geometry = ((n, *spatial, c_in), tuple(kernel), tuple(strides), tuple(padding[:dims]), tuple(dilation),
                    tuple(out_spatial), dtype)
        row_bytes = k * (1 if values else _BYTES[dtype])
        in_place = im2col.Geometry(*geometry[:-1])
        if all(s == 1 for s in kernel) and all(s == 1 for s in strides) and not any(padding):
            y = self._rows_product(relax.op.reshape(channels_last, [rows, k]), rows, k, dtype, rhs, values)
        elif values is None and gemm_cpu.reads_rows_in_place(engine, in_place, columns):
            self.in_place += 1
            y = self._implicit_product(channels_last, in_place, rhs, columns, engine)
        elif values is not None and gemm_cpu.reads_rows_in_place(int8_isa, in_place, columns):
            self.in_place += 1
            self.per_sample += 1
            y = self._implicit_int16_product(channels_last, in_place, rhs, columns, int8_isa)
        elif rows * row_bytes <= MAX_IM2COL_BYTES:
            y = self._gathered_product(channels_last, geometry, rhs, values)
        else:
            self.chunked += 1
            parts = []
            for starts, sizes in output_chunks((n, *out_spatial), row_bytes, MAX_IM2COL_BYTES):
                first = relax.const(np.array(starts, dtype="int32"))
                parts.append(self._gathered_product(channels_last, geometry, rhs, values, tuple(sizes), first))
            y = relax.op.concat(parts, axis=0)
        if columns != c_out:
            y = relax.op.strided_slice(y, axes=[1], begin=[0], end=[c_out])
        y = relax.op.reshape(y, [n, *out_spatial, c_out])
        return y if last else relax.op.permute_dims(y, [0, dims + 1, *range(1, dims + 1)])

    def _gathered_product(self, x, geometry: tuple, rhs, values: str | None, box=None, first=None) -> relax.Expr:
        """im2col(x) @ rhs (float32), for the chunk `box` from output position `first` when given.
        geometry: (channels-last input shape, kernel, strides, padding before, dilation, output
        spatial shape, dtype); values: see `_rows_product`."""
        x_shape, kernel, _, _, _, out_spatial, dtype = geometry
        lead = list(box) if box is not None else [x_shape[0], *out_spatial]
        shape, rows, k = [*lead, *kernel, x_shape[-1]], math.prod(lead), math.prod(kernel) * x_shape[-1]
        inputs = [x] if first is None else [x, first]
        if values is None:
            a_rows = relax.call_tir(self._im2col(geometry, box), inputs, relax.TensorType(shape, dtype))
            return relax.op.matmul(relax.op.reshape(a_rows, [rows, k]), rhs, out_dtype="float32")
        quant = relax.call_tir(self._im2col(geometry, box, values), inputs,
                               [relax.TensorType(shape, values), relax.TensorType([*lead, 1], "float32")])
        return self._int8_product(quant, rows, k, rhs, values)

    def _implicit_product(self, x, geometry: im2col.Geometry, rhs, columns: int, isa: str,
                          padded: bool = False) -> relax.Expr:
        """x (channels-last; `padded`: padded already) convolved with rhs (taps * C_in, columns) as
        one implicit GEMM on `isa` (`gemm_cpu.reads_rows_in_place`): its rows read from x zero-padded,
        never gathered. float32, or int32 on the int8 engine."""
        k = geometry.taps * geometry.channels
        key = (geometry, columns, isa)
        if key not in self.kernels:
            func = gemm_cpu.make_primfunc(geometry.rows, columns, k, isa, rows_from=geometry)
            name = gemm_cpu.kernel_name(geometry.rows, columns, k, isa) + "_implicit_" + "x".join(map(str, geometry.x_shape))
            self.kernels[key] = self.builder.add_func(func, name)
        if not padded and any(geometry.pad_width()):
            x = relax.op.nn.pad(x, geometry.pad_width())
        packed = packed_weight(rhs, k, columns, gemm_cpu.group(isa))
        out_dtype = gemm_cpu.DTYPES[gemm_cpu.PRECISION[isa]][2]
        return relax.call_tir(self.kernels[key], [x, packed], relax.TensorType([geometry.rows, columns], out_dtype))

    def _implicit_int16_product(self, x, geometry: im2col.Geometry, rhs, columns: int, isa: str) -> relax.Expr:
        """w8a8 on AVX2's int16 engine, read in place: x quantized to int16 and zero-padded in one kernel
        (`token_quant.make_sample_primfunc`), one scale per sample (per row cannot be: a row's taps are
        other rows' taps too) on as fine a grid as the int32 sums allow (`gemm_cpu.int16_levels`),
        the implicit int32 GEMM, rescaled."""
        n, pad_width = geometry.x_shape[0], geometry.pad_width()
        levels = gemm_cpu.int16_levels(geometry.taps * geometry.channels)
        key = ("sample_quant", geometry.x_shape, tuple(pad_width), levels)
        if key not in self.kernels:
            self.kernels[key] = self.builder.add_func(token_quant.make_sample_primfunc(geometry.x_shape, pad_width, levels),
                                                      token_quant.sample_kernel_name(geometry.x_shape, pad_width, levels))
        xf = x if ir.tensor_dtype(x) == "float32" else relax.op.astype(x, "float32")
        quant = relax.call_tir(self.kernels[key], [xf], [relax.TensorType(list(geometry.padded_shape()), "int16"),
                                                        relax.TensorType([n, 1], "float32")])
        acc = self._implicit_product(relax.TupleGetItem(quant, 0), geometry, rhs, columns, isa, padded=True)
        y = relax.op.multiply(relax.op.reshape(relax.op.astype(acc, "float32"), [n, geometry.rows // n, columns]),
                              relax.op.reshape(relax.TupleGetItem(quant, 1), [n, 1, 1]))
        return relax.op.reshape(y, [geometry.rows, columns])

    def _rows_product(self, a_rows, rows: int, k: int, dtype: str, rhs, values: str | None) -> relax.Expr:
        """a_rows (rows, k) @ rhs (float32); with `values` (w8a8: the int8 engine's activation
        dtype) the rows quantized per row first and the int32 product rescaled."""
        if values is None:
            return relax.op.matmul(a_rows, rhs, out_dtype="float32")
        key = ((rows, k), dtype, values)
        if key not in self.kernels:
            self.kernels[key] = self.builder.add_func(token_quant.make_primfunc((rows, k), dtype, False, values),
                                                      token_quant.kernel_name((rows, k), dtype, False, values))
        quant = relax.call_tir(self.kernels[key], [a_rows],
                               [relax.TensorType([rows, k], values), relax.TensorType([rows, 1], "float32")])
        return self._int8_product(quant, rows, k, rhs, values)

    @staticmethod
    def _int8_product(quant, rows: int, k: int, rhs, values: str) -> relax.Expr:
        """(quantized rows, their scales) @ rhs, rescaled to float32 (as w8a8's linears)."""
        return rescaled_int8_matmul(relax.op.reshape(relax.TupleGetItem(quant, 0), [rows, k]), values, rhs,
                                    relax.op.reshape(relax.TupleGetItem(quant, 1), [rows, 1]))

    def _im2col(self, geometry: tuple, box: tuple[int, ...] | None = None, values: str | None = None) -> relax.GlobalVar:
        """The im2col kernel for `geometry` and `box` (a chunk's sizes, see `im2col.make_primfunc`);
        with `values`, its quantizing variant (`im2col.make_quant_primfunc`)."""
        key = (*geometry, box, values)
        if key not in self.kernels:
            x_shape, kernel, strides, _, _, out_spatial, _ = geometry
            if values is None:
                func = im2col.make_primfunc(*geometry, box=box)
                name = im2col.kernel_name(x_shape, kernel, strides, out_spatial, box)
            else:
                func = im2col.make_quant_primfunc(*geometry, values, box=box)
                name = im2col.quant_kernel_name(x_shape, kernel, strides, out_spatial, values, box)
            self.kernels[key] = self.builder.add_func(func, name)
        return self.kernels[key]

    def rewrite(self) -> tvm.IRModule:
        convolution = is_op("relax.nn.conv1d") | is_op("relax.nn.conv2d") | is_op("relax.nn.conv3d")
        main = rewrite_call(convolution(wildcard(), wildcard()), self, self.mod["main"])
        mod = self.builder.get()
        mod[mod.get_global_var("main")] = main
        return relax.transform.Normalize()(mod)


def channels_first(call: relax.Call) -> relax.Call:
    """A channels-last convolution no engine takes, computed channels-first between transposes, as
    in a channels-first model (its direct convolution, as TVM's schedules and the logs' records know
    it; one measurement, untuned both ways: the tiny VAE decoder's 3-channel output convolution ran
    at 25 GFLOP/s channels-last, 27 channels-first, so the layout is kept for the records, not for
    speed); any other `call` as it is."""
    if not is_channels_last(call):
        return call
    dims = len(str(call.attrs.data_layout)) - 2
    first = [0, dims + 1, *range(1, dims + 1)]  # N*C or O*I: the channel axis (last) moves to 1
    data_layout, kernel_layout = CHANNELS_FIRST[dims]
    y = convolution_like(call, relax.op.permute_dims(call.args[0], first), relax.op.permute_dims(call.args[1], first),
                         data_layout=data_layout, kernel_layout=kernel_layout)
    return relax.op.permute_dims(y, [0, *range(2, dims + 2), 1])


def channels_last_pays(taken: int, convolutions: int) -> bool:
    """Whether a model whose convolutions the rewriter takes `taken` of goes channels-last: in a
    channels-first model each one taken is transposed to channels-last and back, in a channels-last
    model each one left is transposed to channels-first and back (`channels_first`)."""
    return taken > 1 and taken > convolutions - taken


def _unit_axis_reshapes(func: relax.Function) -> relax.Function:
    """reshape that inserts or removes one unit axis -> expand_dims / squeeze, which ConvertLayout
    carries a layout through (it stops at reshape): the causal-padding rewrite's conv2d on one
    frame sits between such reshapes. (Done here, for the channels-last models only: written so in
    the causal rewrite, float32 builds' fused convolution kernels would change and lose their
    tuning records.)"""

    def rewrite(call, _matches):
        src, dst = ir.static_shape(call.args[0].ty), ir.static_shape(call.ty)
        if src is None or dst is None or abs(len(src) - len(dst)) != 1:
            return call
        longer, shorter = (dst, src) if len(dst) > len(src) else (src, dst)
        axis = next((i for i in range(len(longer)) if longer[:i] + longer[i + 1:] == shorter and longer[i] == 1), None)
        if axis is None:
            return call
        if len(dst) > len(src):
            return relax.op.expand_dims(call.args[0], [axis])
        return relax.op.squeeze(call.args[0], [axis])

    return rewrite_call(is_op("relax.reshape")(wildcard(), wildcard()), rewrite, func)


def is_channels_last(call: relax.Call) -> bool:
    """Whether the convolution `call` is channels-last (data, weight and output)."""
    a = call.attrs
    dims = len(str(a.data_layout)) - 2
    return (str(a.data_layout), str(a.kernel_layout)) == CHANNELS_LAST.get(dims) and str(a.out_layout) == str(a.data_layout)


def to_channels_last(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with its convolutions channels-last and the layout carried through the operators
    between them (TVM's ConvertLayout), so that their GEMMs' rows (channels-last) feed the next
    im2col without a transpose back and forth."""
    mod = ir.replace_main(mod, carry_layouts(_unit_axis_reshapes(mod["main"])))
    desired = {f"relax.nn.conv{d}d": list(CHANNELS_LAST[d]) for d in (1, 2, 3)}
    return relax.transform.ConvertLayout(desired)(mod)


def output_chunks(out_shape: tuple[int, ...], row_bytes: int, limit: int) -> list[tuple[list[int], list[int]]]:
    """(starts, sizes) of boxes of the output (batch, *spatial) whose im2col rows (`row_bytes`
    each) take about `limit` bytes at most, in row-major order: one axis is cut into equal ranges,
    the axes before it into single indices, the axes after it left whole."""
    axis = next((a for a in range(len(out_shape)) if math.prod(out_shape[a + 1:]) * row_bytes <= limit), len(out_shape) - 1)
    after = math.prod(out_shape[axis + 1:])
    count = -(-out_shape[axis] // max(1, limit // (after * row_bytes)))
    size = -(-out_shape[axis] // count)
    boxes = []
    for lead in itertools.product(*[range(e) for e in out_shape[:axis]]):
        for first in range(0, out_shape[axis], size):
            starts = [*lead, first, *[0] * (len(out_shape) - axis - 1)]
            sizes = [1] * axis + [min(size, out_shape[axis] - first), *out_shape[axis + 1:]]
            boxes.append((starts, sizes))
    return boxes


def convolutions_as_gemm(imported: ImportedModel, target: tvm.target.Target,
                         int8_activations: bool = False) -> tuple[ImportedModel, int]:
    """Rewrite the convolutions a matrix engine of `target` can take (bf16, int8-weight; float32 on
    AVX2-only CPUs and on ARM) into im2col + matmul (run `use_matrix_engine` after it). `int8_activations`
    (w8a8): int8-weight convolutions whose shape the int8 engine takes multiply int8 rows, quantized
    per row as they are gathered. Returns (model, how many)."""
    dry = ConvGemmRewriter(imported.mod, target, int8_activations, dry_run=True)
    if not any(dry.isas.values()):
        return imported, 0
    dry.rewrite()
    if not dry.count:
        return imported, 0
    # (a model the engines' Winograd pass made channels-last already: converting again would wrap its
    # input and output in redundant transpose pairs)
    channels_last = channels_last_pays(dry.count, dry.seen) and not dry.saw_channels_last
    main, unpadded = pads_into_convolutions(imported.mod["main"], only=dry.takes)
    mod = ir.replace_main(imported.mod, main)
    rewriter = ConvGemmRewriter(to_channels_last(mod) if channels_last else mod, target, int8_activations)
    mod = rewriter.rewrite()
    log.info("matrix engine: %d convolutions as im2col GEMMs", rewriter.count)
    note = f"{rewriter.count} convolutions computed as GEMMs over im2col rows"
    if rewriter.quantized - rewriter.per_sample:
        note += (f", {rewriter.quantized - rewriter.per_sample} of them on int8 rows quantized per output position as"
                 " they are gathered (w8a8)")
    if rewriter.in_place:
        note += f", {rewriter.in_place} of them implicit GEMMs reading their rows in place from the padded input (no im2col)"
    if rewriter.per_sample:
        note += (f", {rewriter.per_sample} of those w8a8's: int16 activations quantized per sample (at least"
                 f" {gemm_cpu.int16_levels(gemm_cpu.MAX_PANEL_K):,} levels each side) x int8 weights on AVX2's int16 multiply-add")
    if rewriter.chunked:
        note += f", {rewriter.chunked} of them in chunks of output rows (a whole im2col would exceed {MAX_IM2COL_BYTES / 2**20:g} MiB)"
    if unpadded:
        note += f", {unpadded} of them taking the zero F.pad in front of them as their own padding"
    if rewriter.padded:
        note += f", {rewriter.padded} of them with their output channels zero-padded to whole vectors"
    if channels_last:
        note += "; channels-last from one to the next (no transposes between them)"
    moved = replace(imported, mod=mod, notes=imported.notes + [note])
    return moved, rewriter.count  # the weight reshapes are lifted with use_matrix_engine's packing
