"""float32 3x3 convolutions as Winograd F(4x4, 3x3) on CPUs (kernels/winograd.py): a quarter of
the multiply-adds of the direct convolution, in a batch of 36 GEMMs.

    conv(x, W)  (3x3 or kt x 3 x 3, unit strides and dilation, one group, float32)
      -> V = winograd_input(channels_last(x))          (36, tiles, kt * C_in)
         U = kron(G, G) @ W as (9, kt * C_in * C_out)   (weight-only: computed and packed at build time)
         y = winograd_output(winograd_gemm(V, U))      (N, [frames,] H, W, C_out) channels-last

Taken where the CPU's matrix engines do not take the convolution first (conv_gemm: bf16, int8,
float32 on AVX2-only CPUs), both channel counts are at least MIN_CHANNELS and the output at least
one tile. With 16 channels the transforms cost about what the GEMM saves: taking the tiny VAE
decoder's 16-channel convolutions too (75 instead of 45) built in 109 s instead of 34 and ran no
faster (27.7 against 26.0 ms, 5 interleaved rounds on a Zen 4; each transform kernel is unrolled
code, ~1 s of LLVM). As with conv_gemm,
a model most of whose convolutions are taken goes channels-last first, and a zero `F.pad` in
front of one becomes its own padding (the input transform reads zeros outside the input).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from autotune.frontend.importer import ImportedModel
from autotune.kernels import winograd
from autotune.kernels.attention_cpu import vector_lanes
from autotune.support import ir

from .causal_padding import pads_into_convolutions
from .conv_gemm import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    channels_first,
    channels_last_pays,
    to_channels_last,
)

log = logging.getLogger(__name__)

MIN_CHANNELS = 32  # the tiny VAE decoder's 16-channel ones: no faster, 3x the build time (below)


class WinogradRewriter:
    """Rewrites one `main`; `count` says how many convolutions it took (of `seen`)."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, dry_run: bool = False):
        self.mod = mod
        self.lanes = vector_lanes(target)
        self.dry_run = dry_run
        self.seen = 0
        self.count = 0
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.builder = relax.BlockBuilder(mod)
        self.weight_vars = ir.weight_only_vars(mod["main"])

    def __call__(self, call: relax.Call, _matches) -> relax.Expr:
        self.seen += 1
        geometry = self.geometry(call)
        if geometry is None:  # (in a model made channels-last: channels-first between transposes, as conv_gemm's)
            return call if self.dry_run else channels_first(call)
        self.count += 1
        return call if self.dry_run else self._winograd(call, *geometry)

    def geometry(self, call: relax.Call):
        """(channels_last, x shape as (N, D, H, W, C), kt, pads before (D, H, W), output (Do, Ho, Wo),
        C_out) where `call` is a convolution this pass takes, else None."""
        x, w = call.args
        if w not in self.weight_vars or ir.tensor_dtype(x) != "float32" or ir.tensor_dtype(w) != "float32":
            return None
        if str(call.attrs.out_dtype) not in ("float32", "void", ""):
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
        if min(c_in, c_out) < MIN_CHANNELS or min(out[-2:]) < winograd.TILE:
            return None
        pads = [int(v) for v in a.padding][:dims]  # the befores (the afters: zeros past the input's end)
        if dims == 2:
            spatial, pads, out, kernel = [1, *spatial], [0, *pads], [1, *out], [1, *kernel]
        return last, (n, *spatial, c_in), kernel[0], tuple(pads), tuple(out), c_out

    def _winograd(self, call, last, x_shape, kt, pads, out, c_out) -> relax.Expr:
        x, w = call.args
        dims = len(ir.static_shape(x.ty)) - 2
        n, c_in = x_shape[0], x_shape[-1]
        if not last:
            x = relax.op.permute_dims(x, [0, *range(2, dims + 2), 1])
        if dims == 2:
            x = relax.op.expand_dims(x, [1])
        tiles = n * out[0] * winograd.tiles(out[1]) * winograd.tiles(out[2])
        points = winograd.ALPHA * winograd.ALPHA
        v = relax.call_tir(self._kernel("input", x_shape, kt, pads, out), [x],
                           relax.TensorType([points, tiles, kt, c_in], "float32"))
        v = relax.op.reshape(v, [points, tiles, kt * c_in])
        # W -> (3, 3, [kt,] C_in, C_out) -> (9, kt * C_in * C_out): the taps by rows, GEMM's (k, n) order after
        to_taps = ([1, 2, 3, 0] if dims == 2 else [2, 3, 1, 4, 0]) if last else ([2, 3, 1, 0] if dims == 2 else [3, 4, 2, 1, 0])
        taps = relax.op.reshape(relax.op.permute_dims(w, to_taps), [9, kt * c_in * c_out])
        u = relax.op.matmul(relax.const(winograd.weight_matrix()), taps)  # (36, kt C_in C_out)
        # packed in panels of w output channels, (36, C_out / w, kt C_in, w): the GEMM's layout
        w_ = winograd.panel_width(c_out, self.lanes)
        u = relax.op.permute_dims(relax.op.reshape(u, [points, kt * c_in, c_out // w_, w_]), [0, 2, 1, 3])
        m = relax.call_tir(self._kernel("gemm", tiles, kt * c_in, c_out), [v, u],
                           relax.TensorType([points, tiles, c_out], "float32"))
        frames = out[0] if dims == 3 else None
        y = relax.call_tir(self._kernel("output", (points, tiles, c_out), (n, frames, *out[1:])), [m],
                           relax.TensorType([n, *out[3 - dims:], c_out], "float32"))
        return y if last else relax.op.permute_dims(y, [0, dims + 1, *range(1, dims + 1)])

    def _kernel(self, which: str, *geometry) -> relax.GlobalVar:
        key = (which, *geometry)
        if key not in self.kernels:
            if which == "gemm":
                func = winograd.make_gemm_primfunc(*geometry, self.lanes)
                name = f"winograd_gemm_{'x'.join(map(str, geometry))}"
            elif which == "input":
                x_shape, kt, pads, out = geometry
                func = winograd.make_input_primfunc(x_shape, kt, pads, out, self.lanes)
                name = f"winograd_input_{'x'.join(map(str, x_shape))}_k{kt}"
            else:
                m_shape, out = geometry
                func = winograd.make_output_primfunc(m_shape, out, self.lanes)
                name = f"winograd_output_{'x'.join(str(v) for v in (*out, m_shape[-1]) if v is not None)}"
            self.kernels[key] = self.builder.add_func(func, name)
        return self.kernels[key]

    def rewrite(self) -> tvm.IRModule:
        convolution = is_op("relax.nn.conv2d") | is_op("relax.nn.conv3d")
        main = rewrite_call(convolution(wildcard(), wildcard()), self, self.mod["main"])
        mod = self.builder.get()
        mod[mod.get_global_var("main")] = main
        return relax.transform.Normalize()(mod)


def convolutions_as_winograd(imported: ImportedModel, target: tvm.target.Target) -> tuple[ImportedModel, int]:
    """Rewrite the float32 3x3 convolutions this pass takes (module docstring) on a CPU target.
    Run it after conv_gemm and before the weight transforms are precomputed. Returns (model, how many)."""
    if target.kind.name != "llvm":
        return imported, 0
    dry = WinogradRewriter(imported.mod, target, dry_run=True)
    dry.rewrite()
    if not dry.count:
        return imported, 0
    channels_last = channels_last_pays(dry.count, dry.seen)
    main, unpadded = pads_into_convolutions(imported.mod["main"], only=lambda conv: dry.geometry(conv) is not None)
    mod = ir.replace_main(imported.mod, main)
    rewriter = WinogradRewriter(to_channels_last(mod) if channels_last else mod, target)
    mod = rewriter.rewrite()
    log.info("winograd: %d convolutions", rewriter.count)
    note = f"{rewriter.count} 3x3 convolutions as Winograd F(4x4, 3x3): 36 GEMMs of a quarter of the multiply-adds"
    if unpadded:
        note += f", {unpadded} of them zero-padding their input as they transform it"
    if channels_last:
        note += "; channels-last from one to the next"
    return replace(imported, mod=mod, notes=imported.notes + [note]), rewriter.count
