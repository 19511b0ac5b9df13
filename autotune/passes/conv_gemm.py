"""Convolutions onto the CPU's matrix engine, as GEMMs over im2col rows (bf16 and int8 weights).

    conv(x: bf16, W: bf16 weight, out_dtype=float32)               (bf16)
    conv(x: float32 or bf16, W: int8 weight, out_dtype=float32)    (int8-weight; x rounded to bf16)
      -> A = im2col(channels_last(x))              (N * positions, taps * C_in)
         y = matmul(A, W as (taps * C_in, C_out))  (N * positions, C_out), float32
         -> channels first again

The matmul is then `matrix_engine.use_matrix_engine`'s to move onto AMX / AVX512-BF16, with its
weight packed at build time (the weight reshape is weight-only work, lifted with the packing).
TVM has no bf16 convolution schedule for CPUs (its generic kernel widens every load), so without
this the convolutions compute in float32 (`convolutions_in_float32`, which takes what is left).

Taken: conv1d/2d/3d, channels-first layouts, one group, static shapes, output channels and
reduction length the engine takes (`gemm_cpu.isa_for_shape`), and an im2col buffer of at most
MAX_IM2COL_BYTES: A is taps times the input (9x for 3x3), so at full 480p the largest VAE layers
stay on the float32 path rather than allocate gigabytes. A 1x1 convolution with unit strides and
no padding needs no im2col: its rows are the channels-last input itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.frontend.importer import ImportedModel
from autotune.kernels import gemm_cpu, im2col
from autotune.support import ir

from .matrix_engine import engine_precision

log = logging.getLogger(__name__)

MAX_IM2COL_BYTES = 1 << 30
_LAYOUTS = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}


class ConvGemmRewriter:
    """Rewrites one `main`; `count` says how many convolutions became GEMMs."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        self.mod = mod
        self.isa = gemm_cpu.target_isa(target, gemm_cpu.BF16)
        self.count = 0
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.builder = relax.BlockBuilder(mod)
        self.weight_vars = ir.weight_only_vars(mod["main"])

    def __call__(self, call: relax.Call, _matches) -> relax.Expr:
        x, w = call.args
        if self.isa is None or w not in self.weight_vars or engine_precision(call) not in (gemm_cpu.BF16, "int8-weight"):
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
        if gemm_cpu.isa_for_shape(self.isa, rows, c_out, k) is None:
            return call
        if rows * k * 2 > MAX_IM2COL_BYTES:
            return call
        strides, dilation = [int(v) for v in a.strides], [int(v) for v in a.dilation]
        padding = [int(v) for v in a.padding]  # all befores, then all afters
        self.count += 1
        x = relax.op.astype(x, "bfloat16") if ir.tensor_dtype(x) != "bfloat16" else x
        channels_last = relax.op.permute_dims(x, [0, *range(2, dims + 2), 1])
        if all(s == 1 for s in kernel) and all(s == 1 for s in strides) and not any(padding):
            rows_of = channels_last
        else:
            gather = self._im2col((n, *spatial, c_in), tuple(kernel), tuple(strides), tuple(padding[:dims]),
                                  tuple(dilation), tuple(out_spatial))
            rows_of = relax.call_tir(gather, [channels_last], relax.TensorType([n, *out_spatial, *kernel, c_in], "bfloat16"))
        lhs = relax.op.reshape(rows_of, [rows, k])
        # W (O, I, *taps) -> (*taps, I, O) -> (taps * I, O): the k order of A's rows
        rhs = relax.op.reshape(relax.op.permute_dims(w, [*range(2, dims + 2), 1, 0]), [k, c_out])
        y = relax.op.matmul(lhs, rhs, out_dtype="float32")
        y = relax.op.reshape(y, [n, *out_spatial, c_out])
        return relax.op.permute_dims(y, [0, dims + 1, *range(1, dims + 1)])

    def _im2col(self, x_shape, kernel, strides, pad_before, dilation, out_spatial) -> relax.GlobalVar:
        key = (x_shape, kernel, strides, pad_before, dilation, out_spatial)
        if key not in self.kernels:
            func = im2col.make_primfunc(x_shape, kernel, strides, pad_before, dilation, out_spatial, "bfloat16")
            self.kernels[key] = self.builder.add_func(func, im2col.kernel_name(x_shape, kernel, strides, out_spatial))
        return self.kernels[key]

    def rewrite(self) -> tvm.IRModule:
        convolution = is_op("relax.nn.conv1d") | is_op("relax.nn.conv2d") | is_op("relax.nn.conv3d")
        main = rewrite_call(convolution(wildcard(), wildcard()), self, self.mod["main"])
        mod = self.builder.get()
        mod[mod.get_global_var("main")] = main
        return relax.transform.Normalize()(mod)


def convolutions_as_gemm(imported: ImportedModel, target: tvm.target.Target) -> tuple[ImportedModel, int]:
    """Rewrite the convolutions a bf16 matrix engine of `target` can take into im2col + matmul
    (run `use_matrix_engine` after it). Returns (model, how many)."""
    rewriter = ConvGemmRewriter(imported.mod, target)
    if rewriter.isa is None:
        return imported, 0
    mod = rewriter.rewrite()
    if not rewriter.count:
        return imported, 0
    log.info("matrix engine: %d convolutions as im2col GEMMs", rewriter.count)
    note = f"{rewriter.count} convolutions computed as GEMMs over im2col rows (bf16)"
    moved = replace(imported, mod=mod, notes=imported.notes + [note])
    return moved, rewriter.count  # the weight reshapes are lifted with use_matrix_engine's packing
