"""Convolutions onto the CPU's matrix engine, as GEMMs over im2col rows (bf16, int8 weights, and
float32 on AVX2-only CPUs).

    conv(x: bf16, W: bf16 weight, out_dtype=float32)               (bf16)
    conv(x: float32 or bf16, W: int8 weight, out_dtype=float32)    (int8-weight; x rounded to bf16
                                                                     on the bf16 engines)
    conv(x: float32, W: float32 weight)                           (float32 on AVX2-only CPUs)
      -> A = im2col(channels_last(x))              (N * positions, taps * C_in)
         y = matmul(A, W as (taps * C_in, C_out))  (N * positions, C_out), float32
         -> channels first again

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
reduction length the engine takes (`gemm_cpu.isa_for_shape`). A is taps times the input (27x for
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
from autotune.kernels import gemm_cpu, im2col
from autotune.support import ir

from .matrix_engine import engine_precision

log = logging.getLogger(__name__)

MAX_IM2COL_BYTES = 1 << 30  # one im2col buffer; a larger convolution is gathered and multiplied in chunks
_BYTES = {"bfloat16": 2, "float32": 4}
_LAYOUTS = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}


class ConvGemmRewriter:
    """Rewrites one `main`; `count` says how many convolutions became GEMMs."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        self.mod = mod
        self.isas = {precision: gemm_cpu.target_isa(target, precision) for precision in (gemm_cpu.BF16, gemm_cpu.F32)}
        self.count = 0
        self.chunked = 0  # of them, computed in row chunks
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.builder = relax.BlockBuilder(mod)
        self.weight_vars = ir.weight_only_vars(mod["main"])

    def __call__(self, call: relax.Call, _matches) -> relax.Expr:
        x, w = call.args
        precision = {"int8-weight": gemm_cpu.BF16}.get(engine_precision(call), engine_precision(call))
        isa = self.isas.get(precision)
        if isa is None or w not in self.weight_vars:
            return call
        x_shape, w_shape, y_shape = ir.static_shape(x.ty), ir.static_shape(w.ty), ir.static_shape(call.ty)
        if x_shape is None or w_shape is None or y_shape is None:
            return call
        dims = len(x_shape) - 2
        a = call.attrs
        if (str(a.data_layout), str(a.kernel_layout)) != _LAYOUTS.get(dims) or str(a.out_layout) != str(a.data_layout):
            return call
        if int(a.groups) != 1:
            return call
        n, c_in, *spatial = x_shape
        c_out, _, *kernel = w_shape
        out_spatial = y_shape[2:]
        rows, k = n * math.prod(out_spatial), c_in * math.prod(kernel)
        if gemm_cpu.isa_for_shape(isa, rows, c_out, k) is None:
            return call
        # A's dtype: the engine's. The FMA engine multiplies float32, so its im2col widens bf16 values
        # as it gathers them (a cast of A afterwards was a pass over 27x the input); int8-weight's
        # float32 activations are not rounded there, as in its matmuls.
        dtype = "float32" if gemm_cpu.activation_dtype(isa) == "float32" else "bfloat16"
        strides, dilation = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        padding = [int(v) for v in a.padding]  # all befores, then all afters
        self.count += 1
        x = relax.op.astype(x, dtype) if ir.tensor_dtype(x) != dtype else x
        channels_last = relax.op.permute_dims(x, [0, *range(2, dims + 2), 1])
        # W (O, I, *taps) -> (*taps, I, O) -> (taps * I, O): the k order of A's rows
        rhs = relax.op.reshape(relax.op.permute_dims(w, [*range(2, dims + 2), 1, 0]), [k, c_out])
        geometry = ((n, *spatial, c_in), tuple(kernel), tuple(strides), tuple(padding[:dims]), tuple(dilation),
                    tuple(out_spatial), dtype)
        if all(s == 1 for s in kernel) and all(s == 1 for s in strides) and not any(padding):
            y = relax.op.matmul(relax.op.reshape(channels_last, [rows, k]), rhs, out_dtype="float32")
        elif rows * k * _BYTES[dtype] <= MAX_IM2COL_BYTES:
            a_rows = relax.call_tir(self._im2col(geometry), [channels_last],
                                    relax.TensorType([n, *out_spatial, *kernel, c_in], dtype))
            y = relax.op.matmul(relax.op.reshape(a_rows, [rows, k]), rhs, out_dtype="float32")
        else:
            self.chunked += 1
            parts = []
            for starts, sizes in output_chunks((n, *out_spatial), k * _BYTES[dtype], MAX_IM2COL_BYTES):
                first = relax.const(np.array(starts, dtype="int32"))
                a_rows = relax.call_tir(self._im2col(geometry, tuple(sizes)), [channels_last, first],
                                        relax.TensorType([*sizes, *kernel, c_in], dtype))
                parts.append(relax.op.matmul(relax.op.reshape(a_rows, [math.prod(sizes), k]), rhs, out_dtype="float32"))
            y = relax.op.concat(parts, axis=0)
        y = relax.op.reshape(y, [n, *out_spatial, c_out])
        return relax.op.permute_dims(y, [0, dims + 1, *range(1, dims + 1)])

    def _im2col(self, geometry: tuple, box: tuple[int, ...] | None = None) -> relax.GlobalVar:
        """geometry: (channels-last input shape, kernel, strides, padding before, dilation, output
        spatial shape, dtype); box: a chunk's sizes (see `im2col.make_primfunc`)."""
        key = (*geometry, box)
        if key not in self.kernels:
            x_shape, kernel, strides, _, _, out_spatial, _ = geometry
            func = im2col.make_primfunc(*geometry, box=box)
            self.kernels[key] = self.builder.add_func(func, im2col.kernel_name(x_shape, kernel, strides, out_spatial, box))
        return self.kernels[key]

    def rewrite(self) -> tvm.IRModule:
        convolution = is_op("relax.nn.conv1d") | is_op("relax.nn.conv2d") | is_op("relax.nn.conv3d")
        main = rewrite_call(convolution(wildcard(), wildcard()), self, self.mod["main"])
        mod = self.builder.get()
        mod[mod.get_global_var("main")] = main
        return relax.transform.Normalize()(mod)


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


def convolutions_as_gemm(imported: ImportedModel, target: tvm.target.Target) -> tuple[ImportedModel, int]:
    """Rewrite the convolutions a matrix engine of `target` can take (bf16, int8-weight; float32 on
    AVX2-only CPUs) into im2col + matmul (run `use_matrix_engine` after it). Returns (model, how many)."""
    rewriter = ConvGemmRewriter(imported.mod, target)
    if not any(rewriter.isas.values()):
        return imported, 0
    mod = rewriter.rewrite()
    if not rewriter.count:
        return imported, 0
    log.info("matrix engine: %d convolutions as im2col GEMMs", rewriter.count)
    note = f"{rewriter.count} convolutions computed as GEMMs over im2col rows"
    if rewriter.chunked:
        note += f", {rewriter.chunked} of them in chunks of output rows (a whole im2col would exceed {MAX_IM2COL_BYTES / 2**20:g} MiB)"
    moved = replace(imported, mod=mod, notes=imported.notes + [note])
    return moved, rewriter.count  # the weight reshapes are lifted with use_matrix_engine's packing
