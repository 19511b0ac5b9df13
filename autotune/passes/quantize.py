"""Quantization and mixed precision: Relax passes over an imported model and its weights.

    from autotune.passes.quantize import quantize, MODES
    q, info = quantize(imported, "int8-weight", "x86")   # a NEW ImportedModel + what was done

Every mode keeps the model's external signature (its inputs and outputs stay float32) and keeps
the weights as function inputs: it rewrites `main` so that it takes the transformed weights
(int8 / fp8 / half tensors and their scales) and returns the transformed weight arrays with it.

Modes (`MODES`, each a small handler class in the style of gpt-fast's quantization handlers):

    fp16         all weights stored float16; matmul/conv inputs float16 with float32 accumulation,
                 elementwise work float16; softmax, mean/rsqrt (RMS norms) and reductions stay
                 float32 (TVM's ToMixedPrecision policy). Inputs/outputs cast at the edges.
                 x86 CPUs, which have no float16 arithmetic: the float32 build (its kernels, its
                 tuned records), with its weight matrices stored float16 in the artifact and
                 widened to float32 when loaded (FP16_ON_X86; `float16_storage`).
    bf16         the same with bfloat16 (ToMixedPrecision, then float16 -> bfloat16). On CPUs a
                 model whose linears and convolutions are all small (SMALL_LAYER: the tiny
                 configurations') is its float32 build: the conversions cost more than they save.
    int8-weight  per-output-channel symmetric int8 weights for every linear (`matmul(x,
                 permute_dims(W))` or `matmul(x, W)` with a 2-D weight) and every convolution;
                 the int8 -> float cast is fused into the matmul/conv kernel and the per-channel
                 scale is applied to the kernel's output (an epilogue), so weights stay int8 in
                 memory: 4x smaller than float32. On x86 CPUs the linears run on the bf16 engine
                 instead (passes/matrix_engine.py: AMX-BF16, AVX512-BF16, else AVX2 FMA; on ARM
                 CPUs BFDOT where they have +bf16, else NEON FMA):
                 activations rounded to bf16, the int8 weights converted inside the kernel to
                 bf16 (on AVX2: float32 activations, weights converted to float32).
    w8a8         int8 weights (per output channel) and per-token dynamic int8 activations for the
                 linears: one kernel per linear quantizes its activations (kernels/token_quant.py:
                 row maximum, scale and int8 values in one pass), `matmul(int8, int8,
                 out_dtype=int32)`, then rescale by both scales (the matmul kernel's epilogue); on
                 x86 CPUs the matmul runs on the int8 engine (AMX-INT8, AVX512-VNNI, else AVX2's
                 int16 multiply-add), on ARM CPUs with dot products on SDOT (without them w8a8 is
                 refused), and the quantizer writes the activations it multiplies (uint8 + 128;
                 int16 on AVX2; int8 on ARM).
                 Linears whose inputs have outlier channels are smoothed first (SmoothQuant,
                 passes/smooth_quant.py; needs a model imported from torch to measure them).
                 Convolutions get int8 weights as in int8-weight; on x86 CPUs, where the int8
                 engine takes their shape, they compute as int8 GEMMs over their im2col rows,
                 each row (an output position's receptive field) quantized with its own scale as
                 it is gathered (passes/conv_gemm.py), else on the bf16 engine as int8-weight's.
                 On AVX2 (no int8 dot product: its engine multiplies int16), a convolution whose
                 GEMM reads its rows in place quantizes its input per sample to int16 instead,
                 on the finest grid int32 sums allow (at least +-6,605 levels).
    int8-weight and w8a8 keep float32 the layers small in both arithmetic and weight (SMALL_LAYER),
    where int8's extra kernels cost more than it saves; the notes say how many. (bf16 on a CPU: only
    where every layer is small, see above.)
    fp8          float8_e4m3fn weights with a per-output-channel float32 scale for linears and
                 convolutions; cast inside the kernel, float32 accumulation (weight-only: 4x less
                 weight memory and bandwidth; no fp8 tensor-core math). CUDA sm_89 / sm_90 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from autotune.frontend.importer import ImportedModel
from autotune.kernels import gemm_cpu, token_quant
from autotune.support import ir
from autotune.support.cuda_library import sm_version
from autotune.support.errors import InputError
from autotune.support.targets import TargetPreset, list_presets, resolve_target

from . import smooth_quant
from .matrix_engine import isa_for_shapes, rescaled_int8_matmul

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_CONVS = {tvm.ir.Op.get(f"relax.nn.conv{d}d") for d in (1, 2, 3)}

INT8_MAX = token_quant.INT8_MAX
FP8_E4M3_MAX = 448.0
# int8-weight and w8a8 keep a layer float32 when it is small on both counts: its weight stays in
# cache (int8 saves no memory traffic) and its product is too short to repay the quantizer,
# rescale and cast kernels int8 adds. Measured (Zen 4, the tiny transformer, tuned): quantizing only
# its largest linears (0.3-1 MFLOP, 1-4K weights) left its build 1.12x (w8a8) / 1.04x (int8-weight) the
# float32 build's time. Every layer of the bench's 480p workloads and of Wan itself is far above.
SMALL_LAYER = {"flops": 1 << 21, "weights": 1 << 16}  # below both: kept float32


# ---------------------------------------------------------------------------------------------
# analysis: which weights feed only linears / convolutions
# ---------------------------------------------------------------------------------------------


@dataclass
class _Site:
    """A weight parameter all of whose uses are linears (or convolutions) of one kind."""

    name: str
    kind: str  # "linear_nt": matmul(x, permute_dims(W)); "linear_nn": matmul(x, W); "conv"
    out_axis: int  # the axis of W that indexes output channels (its scale's axis)
    shape: tuple[int, ...]


def _main_and_inputs(mod) -> tuple[relax.Function, int]:
    func = mod["main"]
    return func, ir.num_input(func)


def _bindings(func: relax.Function) -> list:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]


def _is_last_two_swap(call) -> bool:
    ndim = len(call.args[0].ty.shape.values) if call.args[0].ty.shape is not None else -1
    if ndim != 2:
        return False
    axes = call.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def _conv_layouts_ok(call) -> bool:
    attrs = call.attrs
    return (
        str(attrs.data_layout).startswith("NC")
        and str(attrs.kernel_layout).startswith("OI")
        and str(attrs.out_layout).startswith("NC")
    )


SMALL_REASON = "too small for int8 to pay"


def _product_flops(binding, uses: dict) -> int | None:
    """FLOPs of one call of the linear or convolution that `binding` binds (for a weight's
    permute_dims: the largest of its matmuls), None where a shape is not static."""
    call = binding.value
    if call.op.same_as(_PERMUTE):
        counts = [_product_flops(b, uses) for b, _ in uses.get(binding.var, [])]
        return None if None in counts or not counts else max(counts)
    x, w, y = ir.static_shape(call.args[0].ty), ir.static_shape(call.args[1].ty), ir.static_shape(call.ty)
    if x is None or w is None or y is None:
        return None
    if call.op.same_as(_MATMUL):  # (..., m, k) @ (k, n)
        return 2 * math.prod(y) * x[-1]
    return 2 * math.prod(y) * math.prod(w[1:])  # conv: each output value sums C_in x taps products


def _find_sites(func: relax.Function, num_input: int, linears: bool = True, convs: bool = True,
                small: dict | None = None) -> tuple[dict, dict]:
    """Map weight name -> _Site for weights used only by linears/convs, but those below both
    `small` bounds ({"flops": of the largest product a call, "weights": elements}); and reasons
    for the rest."""
    bindings = _bindings(func)
    uses: dict = {}  # var -> list[(binding, arg index)]
    for b in bindings:
        value = b.value
        args = value.args if isinstance(value, relax.Call) else (value.fields if isinstance(value, relax.Tuple) else [value])
        for i, arg in enumerate(args):
            if isinstance(arg, relax.Var):
                uses.setdefault(arg, []).append((b, i))
    # Uses outside bindings (e.g. the function's return value) disqualify a weight.
    body_result = func.body.body if isinstance(func.body, relax.SeqExpr) else None

    sites: dict[str, _Site] = {}
    skipped: dict[str, str] = {}
    for param in func.params[num_input:]:
        ty = param.ty
        name = param.name
        if not isinstance(ty, relax.TensorType) or ty.shape is None or str(ty.dtype) != "float32":
            skipped[name] = "not a static float32 tensor"
            continue
        shape = tuple(int(v) for v in ty.shape.values)
        if body_result is not None and body_result.same_as(param):
            skipped[name] = "returned directly"
            continue
        param_uses = uses.get(param, [])
        if not param_uses:
            skipped[name] = "unused"
            continue
        kinds = set()
        for b, i in param_uses:
            call = b.value
            if not isinstance(call, relax.Call):
                kinds.add(None)
            elif linears and call.op.same_as(_PERMUTE) and len(shape) == 2 and _is_last_two_swap(call):
                t_uses = uses.get(b.var, [])
                ok = t_uses and all(
                    isinstance(u.value, relax.Call) and u.value.op.same_as(_MATMUL) and j == 1 for u, j in t_uses
                )
                ok = ok and not (body_result is not None and body_result.same_as(b.var))
                kinds.add("linear_nt" if ok else None)
            elif linears and call.op.same_as(_MATMUL) and i == 1 and len(shape) == 2:
                kinds.add("linear_nn")
            elif convs and call.op in _CONVS and i == 1 and _conv_layouts_ok(call):
                kinds.add("conv")
            else:
                kinds.add(None)
        if len(kinds) == 1 and None not in kinds:
            kind = kinds.pop()
            counts = [_product_flops(use, uses) for use, _ in param_uses]
            flops = None if None in counts else max(counts)
            if small and flops is not None and flops < small["flops"] and math.prod(shape) < small["weights"]:
                skipped[name] = SMALL_REASON
                continue
            sites[name] = _Site(name, kind, 1 if kind == "linear_nn" else 0, shape)
        elif shape and len(shape) >= 2:
            skipped[name] = "used by something other than a linear/convolution"
        else:
            skipped[name] = "not a linear/convolution weight"
    return sites, skipped


# ---------------------------------------------------------------------------------------------
# the weight rewriter: matmul/conv read the quantized weight directly, the scale is an epilogue
# ---------------------------------------------------------------------------------------------


@dataclass
class _Scheme:
    """How the rewritten linears/convs compute."""

    weight_dtype: str  # "int8", "float8_e4m3fn"
    compute_dtype: str  # the activations' dtype at the matmul/conv (weights are cast inside the kernel)
    act_int8: bool = False  # w8a8: per-token dynamic int8 activations, int32 accumulation


def _conv_like(call, x, w):
    """`call` (a conv1d/2d/3d) on new operands, accumulating in float32."""
    a = call.attrs
    fn = {1: relax.op.nn.conv1d, 2: relax.op.nn.conv2d, 3: relax.op.nn.conv3d}[len(call.ty.shape.values) - 2]
    return fn(
        x,
        w,
        strides=a.strides,
        padding=a.padding,
        dilation=a.dilation,
        groups=a.groups,
        data_layout=a.data_layout,
        kernel_layout=a.kernel_layout,
        out_layout=a.out_layout,
        out_dtype="float32",
    )


def _same(a, b) -> bool:
    """Both None, or the same var."""
    return a is None and b is None or (a is not None and b is not None and a.same_as(b))


def _emit(builder, expr, final_var=None):
    """Emit `expr`; as the dataflow block's output when it replaces a non-dataflow var."""
    if final_var is not None and not isinstance(final_var, relax.DataflowVar):
        return builder.emit_output(expr)
    return builder.emit(expr)


@mutator
class _QuantRewriter(PyExprMutator):
    """Replaces each linear/conv on a quantized weight by its quantized form (see _rewrite)."""

    def __init__(self, mod, sites: dict, scheme: _Scheme, target=None):
        super().__init__(mod)
        self.sites = sites  # old weight Var -> (_Site, q Var, scale Var)
        self.scheme = scheme
        self.transposed = {}  # permute_dims(W) var -> old weight var (dropped: q is stored transposed)
        self.int8_engine = gemm_cpu.target_isa(target, gemm_cpu.INT8) if target is not None else None
        self.quant_kernels: dict[tuple, relax.GlobalVar] = {}
        self.quantized: list[tuple] = []  # ((source var, shape, smooth, values dtype), (values, scales)) of this block

    def visit_dataflow_block_(self, block):
        self.quantized = []  # (a dataflow block's vars are not visible outside it)
        return super().visit_dataflow_block_(block)

    def visit_binding_block_(self, block):
        self.quantized = []
        return super().visit_binding_block_(block)

    def _site_of(self, arg):
        if not isinstance(arg, relax.Var):
            return None
        for old, entry in self.sites.items():
            if arg.same_as(old):
                return entry
        for t, old in self.transposed.items():
            if arg.same_as(t):
                return self.sites[old]
        return None

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.Call) and value.op.same_as(_PERMUTE) and isinstance(value.args[0], relax.Var):
            for old in self.sites:
                if value.args[0].same_as(old) and self.sites[old][0].kind == "linear_nt":
                    self.transposed[binding.var] = old
                    return  # emitted (transposed, dequantised) at each matmul that uses it
        if isinstance(value, relax.Call) and (value.op.same_as(_MATMUL) or value.op in _CONVS):
            entry = self._site_of(value.args[1])
            if entry is not None:
                x = self.visit_expr(value.args[0])
                new_var = self._rewrite(value, x, entry, binding.var)
                self.set_var_remap(binding.var, new_var)
                return
        super().visit_var_binding_(binding)

    def _rewrite(self, call, x, entry, out_var):
        site, q, scale, smooth = entry
        bb = self.builder_
        s = self.scheme
        in_dtype = str(x.ty.dtype)
        if site.kind == "conv":
            # conv(x, int8 W, out_dtype=float32): TOPI casts W inside the reduction, so the int8
            # weight is what the kernel reads; the per-channel scale is an output epilogue.
            xc = x if in_dtype == "float32" else bb.emit(relax.op.astype(x, "float32"))
            y = bb.emit(_conv_like(call, xc, q))
            ndim = len(call.ty.shape.values)
            ys = relax.op.multiply(y, relax.op.reshape(scale, [1, site.shape[0]] + [1] * (ndim - 2)))
            return self._finish(ys, call, out_var)
        # `q` is stored [in, out] (pre-transposed for "linear_nt"): no transpose kernel at run time.
        if s.act_int8:
            xq, sx = self._quantize_activations(x, q, smooth)
            y = relax.op.multiply(rescaled_int8_matmul(xq, ir.tensor_dtype(xq), q, sx), scale)
            return self._finish(y, call, out_var)
        # matmul(x, int8/fp8 W, out_dtype=float32): the cast happens inside the reduction.
        xc = x if in_dtype == s.compute_dtype else bb.emit(relax.op.astype(x, s.compute_dtype))
        y = bb.emit(relax.op.matmul(xc, q, out_dtype="float32"))
        return self._finish(relax.op.multiply(y, scale), call, out_var)

    def _quantize_activations(self, x, q, smooth) -> tuple:
        """Per-token (last-axis) symmetric dynamic quantization of x: (values, scales).

        One kernel (kernels/token_quant.py), whose values are what the int8 engine that takes
        matmul(x, q) multiplies (uint8 shifted by 128, or AVX2's int16), else int8; the same
        arithmetic in Relax ops (three kernels) where x's shape is not static."""
        bb = self.builder_
        in_dtype = str(x.ty.dtype)
        shape = ir.static_shape(x.ty)
        if shape is not None:
            shape = list(shape)
            values = self._engine_values(shape, q)
            key = (self._source(x), tuple(shape), smooth, values)
            for known, result in self.quantized:  # q, k and v projections read one activation: quantize it once
                if key[0].same_as(known[0]) and key[1] == known[1] and _same(key[2], known[2]) and key[3] == known[3]:
                    return result
            quant = bb.emit(relax.call_tir(
                self._token_quant(tuple(shape), in_dtype, smooth is not None, values),
                [x] + ([smooth] if smooth is not None else []),
                [relax.TensorType(shape, values), relax.TensorType(shape[:-1] + [1], "float32")],
            ))
            result = (bb.emit(relax.TupleGetItem(quant, 0)), bb.emit(relax.TupleGetItem(quant, 1)))
            self.quantized.append((key, result))
            return result
        xf = x if in_dtype == "float32" else bb.emit(relax.op.astype(x, "float32"))
        if smooth is not None:  # SmoothQuant: x / s (the weight was quantized as W * s)
            xf = bb.emit(relax.op.multiply(xf, smooth))
        amax = bb.emit(relax.op.max(relax.op.abs(xf), axis=-1, keepdims=True))
        sx = bb.emit(
            relax.op.divide(relax.op.maximum(amax, relax.const(token_quant.MIN_SCALE, "float32")), relax.const(INT8_MAX, "float32"))
        )
        xq = relax.op.round(relax.op.divide(xf, sx))
        return bb.emit(relax.op.astype(relax.op.clip(xq, -INT8_MAX, INT8_MAX), "int8")), sx

    def _source(self, x):
        """The var x reshapes (each linear reshapes its input to rows itself), or x."""
        value = self.lookup_binding(x)
        while isinstance(value, relax.Call) and value.op.same_as(_RESHAPE) and isinstance(value.args[0], relax.Var):
            x = value.args[0]
            value = self.lookup_binding(x)
        return x

    def _engine_values(self, x_shape: list[int], q) -> str:
        """The dtype of the activations the int8 engine that passes/matrix_engine.py puts matmul(x, q)
        on multiplies (uint8, int16), or int8 where no engine takes it."""
        isa = isa_for_shapes(self.int8_engine, x_shape, ir.static_shape(q.ty))
        return "int8" if isa is None else gemm_cpu.activation_dtype(isa)

    def _token_quant(self, shape: tuple, in_dtype: str, smooth: bool, values: str) -> relax.GlobalVar:
        key = (shape, in_dtype, smooth, values)
        if key not in self.quant_kernels:
            self.quant_kernels[key] = self.builder_.add_func(
                token_quant.make_primfunc(shape, in_dtype, smooth, values), token_quant.kernel_name(*key))
        return self.quant_kernels[key]

    def _finish(self, expr, call, out_var):
        want = str(call.ty.dtype)
        if want != "float32":
            expr = relax.op.astype(self.builder_.emit(expr), want)
        return _emit(self.builder_, expr, out_var)


def _quantize_array(w: np.ndarray, out_axis: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantisation; returns (quantised, float32 scale per channel)."""
    reduce_axes = tuple(a for a in range(w.ndim) if a != out_axis)
    amax = np.max(np.abs(w), axis=reduce_axes).astype(np.float32)
    qmax = INT8_MAX if dtype == "int8" else FP8_E4M3_MAX
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[out_axis] = -1
    scaled = w / scale.reshape(shape)
    if dtype == "int8":
        q = np.clip(np.rint(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)
    else:
        import ml_dtypes

        q = np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def _quantize_weights(
    imported: ImportedModel, scheme: _Scheme, linears: bool, convs: bool, target=None, small: dict | None = None
) -> tuple[ImportedModel, dict]:
    """Quantize the weights of the linears (and convolutions) `scheme` covers and rewrite their
    uses; `target` (w8a8) says which matmuls the int8 engine takes."""
    func, num_input = _main_and_inputs(imported.mod)
    found, skipped = _find_sites(func, num_input, linears=linears, convs=convs, small=small)
    existing = set(imported.weights)
    new_params = list(func.params[:num_input])
    new_weights: dict[str, np.ndarray] = {}
    entries = {}
    smoothing = _Smoothing(imported) if scheme.act_int8 else None
    for param in func.params[num_input:]:
        name = param.name
        site = found.get(name)
        if site is None:
            new_params.append(param)
            new_weights[name] = imported.weights[name]
            continue
        w, inv_s = smoothing.apply(site, imported.weights[name]) if smoothing else (imported.weights[name], None)
        q, scale = _quantize_array(w, site.out_axis, scheme.weight_dtype)
        if site.kind == "linear_nt":
            q = np.ascontiguousarray(q.T)  # stored [in, out]: the matmul reads it without a transpose
        q_name, s_name = f"{name}_q", f"{name}_scale"
        if {q_name, s_name, f"{name}_smooth"} & existing:
            raise InputError(f"cannot quantize {name}: the model already has a weight named {q_name}, {s_name} or {name}_smooth")
        q_var = relax.Var(q_name, relax.TensorType(list(q.shape), scheme.weight_dtype))
        s_var = relax.Var(s_name, relax.TensorType([scale.shape[0]], "float32"))
        new_params += [q_var, s_var]
        new_weights[q_name] = q
        new_weights[s_name] = scale
        smooth = None
        if inv_s is not None:
            smooth = relax.Var(f"{name}_smooth", relax.TensorType([inv_s.shape[0]], "float32"))
            new_params.append(smooth)
            new_weights[smooth.name] = inv_s
        entries[param] = (site, q_var, s_var, smooth)

    rewriter = _QuantRewriter(imported.mod, entries, scheme, target)
    body = rewriter.visit_with_new_scope(func.body)
    new_func = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    mod = ir.replace_main(rewriter.builder_.get(), new_func)  # (the builder's module holds the kernels added)
    # A weight we meant to replace that is still referenced would make the module ill-formed.
    if not relax.analysis.check_well_formed(mod):
        relax.analysis.well_formed(mod)  # raises with the offending node
        raise RuntimeError("quantize: the rewritten module is not well formed")
    out = ImportedModel(mod, new_weights, list(imported.inputs), list(imported.outputs), imported.source, list(imported.notes))
    kinds = [s.kind for s in found.values()]
    info = {
        "layers": len(found),
        "linear_layers": sum(k != "conv" for k in kinds),
        "conv_layers": kinds.count("conv"),
        "weight_dtype": scheme.weight_dtype,
        "compute_dtype": "int8 x int8 -> int32" if scheme.act_int8 else scheme.compute_dtype,
        "kept_float32": sorted(n for n, why in skipped.items() if imported.weights[n].ndim >= 2),
    }
    small_layers = sum(why == SMALL_REASON for why in skipped.values())
    said = f"{_small_bounds(small)}: int8 would cost more than it saves" if small_layers else ""
    if small_layers:
        info["kept_float32_small"] = small_layers
    if not found:
        info["note"] = ("no " + ("linear" if not convs else "linear or convolution") + " weights found" if not small_layers
                        else f"all {small_layers} linears/convolutions are small ({said})") + ": nothing was quantized"
    elif small_layers:
        out.notes.append(f"{small_layers} small linears/convolutions kept float32 ({said})")
    if smoothing is not None:
        info["smoothing"] = smoothing.report()
        if smoothing.smoothed:
            out.notes.append(f"SmoothQuant: {len(smoothing.smoothed)} of {len(smoothing.ratios)} linears had outlier "
                             f"input channels (max/median range >= {smooth_quant.OUTLIER_RATIO:g}) and were smoothed")
    return out, info


class _Smoothing:
    """SmoothQuant for w8a8's linears (passes/smooth_quant.py), where the activations have outliers."""

    def __init__(self, imported: ImportedModel):
        self.ranges = imported.calibration() if imported.calibration is not None else None
        self.ratios: dict[str, float] = {}  # weight name -> its input's outlier ratio
        self.smoothed: list[str] = []

    def apply(self, site: _Site, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(the weight to quantize, 1 / s for the activations, or None where nothing is smoothed)."""
        x_range = None if self.ranges is None else self.ranges.get(site.name)
        in_axis = 1 - site.out_axis
        if site.kind == "conv" or x_range is None or x_range.shape != (w.shape[in_axis],):
            return w, None
        self.ratios[site.name] = ratio = smooth_quant.outlier_ratio(x_range)
        if ratio < smooth_quant.OUTLIER_RATIO:
            return w, None
        s = smooth_quant.smoothing_factors(x_range, np.abs(w).max(axis=site.out_axis))
        self.smoothed.append(site.name)
        shape = [1, 1]
        shape[in_axis] = -1
        return (w * s.reshape(shape)).astype(w.dtype), (1.0 / s).astype(np.float32)

    def report(self) -> dict | str:
        if self.ranges is None:
            return "no activation statistics (the model was not imported from torch): no linear smoothed"
        worst = max(self.ratios, key=self.ratios.get, default=None)
        return {
            "linears_smoothed": len(self.smoothed),
            "linears_measured": len(self.ratios),
            "threshold": f"max/median input channel range >= {smooth_quant.OUTLIER_RATIO:g}, alpha {smooth_quant.ALPHA:g}",
            "worst_outlier_ratio": round(self.ratios[worst], 2) if worst else None,
            "worst_layer": worst,
        }


# ---------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------


# Ops whose TOPI lowering rejects bfloat16 (norms accept float32/float16 only; pow checks
# IsFloatType, which bfloat16 fails): computed in float32 between casts under bf16.
_F32_ONLY_NORMS = {
    tvm.ir.Op.get(n) for n in ("relax.nn.layer_norm", "relax.nn.group_norm", "relax.nn.rms_norm", "relax.power")
}


@mutator
class _HalfToBf16(PyExprMutator):
    """float16 -> bfloat16 everywhere in a ToMixedPrecision output (casts and parameters)."""

    def visit_call_(self, call):
        if call.op in _F32_ONLY_NORMS:
            # TOPI's norms take float32/float16 only (group_norm's type inference rejects bf16
            # data outright, so the call is never rebuilt on bf16 operands): float32 between casts.
            args = [self.visit_expr(a) for a in call.args]
            if not any(ir.tensor_dtype(a) == "bfloat16" for a in args):
                return relax.Call(call.op, args, call.attrs)
            y = self.builder_.emit(relax.Call(call.op, [self._to_float32(a) if ir.tensor_dtype(a) == "bfloat16" else a
                                                         for a in args], call.attrs))
            return relax.op.astype(y, "bfloat16")
        new = super().visit_call_(call)
        if not isinstance(new, relax.Call):
            return new
        if new.op.same_as(_ASTYPE):
            dtype = "bfloat16" if str(new.attrs.dtype) == "float16" else str(new.attrs.dtype)
            folded = self._cast_constant(new.args[0], dtype)
            return relax.op.astype(new.args[0], dtype) if folded is None else folded
        return new

    def visit_constant_(self, const):
        if str(const.value.dtype) == "float16":
            return relax.const(const.value.numpy().astype(np.float32).astype(_numpy_dtype("bfloat16")), "bfloat16")
        return super().visit_constant_(const)

    def _to_float32(self, arg) -> relax.Expr:
        folded = self._cast_constant(arg, "float32")
        return self.builder_.emit(relax.op.astype(arg, "float32")) if folded is None else folded

    def _cast_constant(self, arg, dtype: str) -> relax.Expr | None:
        """A cast constant, folded (ToMixedPrecision casts scalars such as RMSNorm's exponent in
        `x ** 2` to half: left as a cast, fast_math's `x * x` would not see a constant)."""
        value = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
        if not isinstance(value, tvm.ir.expr.Constant):
            return None
        data = value.value.numpy()
        return relax.const(data.astype(np.float32).astype(_numpy_dtype(dtype)) if dtype == "bfloat16" else data.astype(dtype), dtype)


_CLIP = tvm.ir.Op.get("relax.clip")


@mutator
class _ClipToMinMax(PyExprMutator):
    """clip(x, a, b) with scalar bounds -> minimum(maximum(x, a), b) on tensor constants.

    TVM 0.27's ToMixedPrecision expects every call argument to be a tensor and fails on clip's
    PrimValue bounds ("Expected TensorType, but got T.float64"; torch's F.normalize exports one).
    """

    def visit_call_(self, call):
        new = super().visit_call_(call)
        if not (isinstance(new, relax.Call) and new.op.same_as(_CLIP)):
            return new
        bounded = ir.clip_as_min_max(new, self.builder_.emit)
        return new if bounded is None else bounded


def _mixed_precision(imported: ImportedModel, half: str) -> tuple[ImportedModel, dict]:
    names = list(imported.weights)
    mod = imported.mod
    func, _ = _main_and_inputs(mod)
    mod = ir.replace_main(mod, _ClipToMinMax(mod).visit_expr(func))
    mod = relax.transform.ToMixedPrecision(out_dtype="float32", fp16_input_names=names)(mod)
    func, num_input = _main_and_inputs(mod)
    if half == "bfloat16":
        params = list(func.params[:num_input])
        rewriter = _HalfToBf16(mod)
        for p in func.params[num_input:]:
            if str(p.ty.dtype) == "float16":
                new = relax.Var(p.name, relax.TensorType(list(p.ty.shape.values), "bfloat16"))
                rewriter.set_var_remap(p, new)
                params.append(new)
            else:
                params.append(p)
        body = rewriter.visit_with_new_scope(func.body)
        func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        mod = ir.replace_main(mod, func)
        if "float16" in func.script().replace("bfloat16", ""):
            raise RuntimeError("bf16: a float16 value survived the float16 -> bfloat16 rewrite")
    # External signature stays float32: ToMixedPrecision casts inputs in and outputs out.
    for spec, var in zip(imported.inputs, func.params[:num_input]):
        if str(var.ty.dtype) != spec.dtype:
            raise RuntimeError(f"{half}: input {spec.name} changed dtype to {var.ty.dtype}")
    if any(t.dtype != o.dtype for t, o in zip(_ret_types(func), imported.outputs)):
        raise RuntimeError(f"{half}: the outputs changed dtype ({func.ret_ty})")
    weights: dict[str, np.ndarray] = {}
    np_half = _numpy_dtype(half)
    for p in func.params[num_input:]:
        w = imported.weights[p.name]
        weights[p.name] = w.astype(np_half) if str(p.ty.dtype) == half else w
    out = ImportedModel(mod, weights, list(imported.inputs), list(imported.outputs), imported.source, list(imported.notes))
    converted = sum(1 for p in func.params[num_input:] if str(p.ty.dtype) == half)
    return out, {
        "layers": _count_matmul_conv(imported),
        "weights_converted": converted,
        "weight_dtype": half,
        "compute_dtype": f"{half} (matmul/conv accumulate float32; softmax, norms' statistics float32)",
    }


def _ret_types(func):
    ret = func.ret_ty
    return list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _count_matmul_conv(imported: ImportedModel) -> int:
    func, _ = _main_and_inputs(imported.mod)
    return sum(
        1
        for b in _bindings(func)
        if isinstance(b.value, relax.Call) and (b.value.op.same_as(_MATMUL) or b.value.op in _CONVS)
    )


# ---------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------


class QuantMode:
    """One quantization mode. `supports(preset)` -> None if it can run there, else the reason."""

    name: str = ""
    description: str = ""

    def supports(self, preset: TargetPreset) -> str | None:
        return None

    def apply(self, imported: ImportedModel, preset: TargetPreset) -> tuple[ImportedModel, dict]:
        raise NotImplementedError


MODES: dict[str, type[QuantMode]] = {}


def register(cls: type[QuantMode]) -> type[QuantMode]:
    MODES[cls.name] = cls
    return cls


def _cuda_arch(preset: TargetPreset) -> int | None:
    if preset.family != "cuda":
        return None
    return sm_version(preset.resolved_target_dict().get("arch", ""))


FP16_ON_X86 = (
    "x86 CPUs have no float16 arithmetic autotune's kernels could use (converting every float16 value to "
    "float32 and back made the tiny model's builds 1.1-2.4x slower than float32), so fp16 computes in float32: "
    "the float32 build's kernels and tuned records, at its speed; its weight matrices ship in float16 (rounded, "
    "half their bytes in the file) and are widened to float32 when loaded, so memory at run time is float32's. "
    "For half the memory and the matrix engines' speed: --precision bf16"
)


def float16_storage(mode: str | None, preset: TargetPreset) -> bool:
    """Whether a `mode` build for `preset` is the float32 build with its weight matrices stored
    float16 (fp16 on an x86 CPU: FP16_ON_X86)."""
    return mode == "fp16" and preset.family == "x86"


@register
class Fp16(QuantMode):
    name = "fp16"
    description = ("float16 weights and compute, float32 accumulation; softmax/norm statistics float32. On x86 "
                   "CPUs: the float32 build, weight matrices shipped float16 and widened when loaded")

    def apply(self, imported, preset):
        if float16_storage(self.name, preset):
            unchanged = replace(imported, notes=list(imported.notes))
            return unchanged, {"layers": 0, "weight_dtype": "float16 (stored; float32 when loaded)",
                               "compute_dtype": "float32", "weight_storage": "float16", "note": FP16_ON_X86}
        return _mixed_precision(imported, "float16")


@register
class Bf16(QuantMode):
    name = "bf16"
    description = "bfloat16 weights and compute, float32 accumulation; softmax/norm statistics float32"

    def supports(self, preset):
        arch = _cuda_arch(preset)
        if preset.family == "cuda" and arch is not None and arch < 80:
            return f"bfloat16 needs CUDA sm_80 or newer, {preset.name} is sm_{arch}"
        return None

    def apply(self, imported, preset):
        if preset.family != "cuda" and SMALL_LAYER:
            small = _all_small(imported)
            if small:
                unchanged = replace(imported, notes=list(imported.notes))
                return unchanged, {"layers": 0, "kept_float32_small": small, "note": (
                    f"all {small} linears/convolutions are small ({_small_bounds(SMALL_LAYER)}): bf16's conversions would "
                    "cost more than its matrix engine saves (the tiny models' bf16 builds measured 1.09-1.18x their "
                    "float32 builds' time): nothing was converted")}
        return _mixed_precision(imported, "bfloat16")


def _small_bounds(small: dict) -> str:
    """SMALL_LAYER's bounds for a note."""
    return f"under {small['flops'] / 1e6:.1f} MFLOP a call with under {small['weights']:,} weights"


def _all_small(imported: ImportedModel) -> int:
    """How many linears/convolutions the model has if every one is under SMALL_LAYER's bounds (a
    tiny model's), else 0: a CPU bf16 build of such a model is its float32 build."""
    func, num_input = _main_and_inputs(imported.mod)
    found, skipped = _find_sites(func, num_input, linears=True, convs=True, small=SMALL_LAYER)
    small = sum(why == SMALL_REASON for why in skipped.values())
    return small if small and not found else 0


@register
class Int8Weight(QuantMode):
    name = "int8-weight"
    description = ("int8 per-output-channel weights for linears and convolutions; linears compute on the "
                   "CPU's bf16 engine (AMX-BF16, AVX512-BF16, else AVX2 FMA on widened values) where there is one, else float32")

    def apply(self, imported, preset):
        return _quantize_weights(imported, _Scheme("int8", "float32"), linears=True, convs=True,
                                 small=SMALL_LAYER)


@register
class W8A8(QuantMode):
    name = "w8a8"
    description = ("int8 weights + per-token dynamic int8 activations for linears and convolutions (per output "
                   "position), int32 accumulation (on AMX-INT8 / AVX512-VNNI where the CPU has them, else AVX2's "
                   "int16 multiply-add; ARM: SDOT)")

    def supports(self, preset):
        if preset.family == "cuda":
            return "w8a8 is a CPU mode; on CUDA use fp8 (sm_89/sm_90) or int8-weight"
        if preset.family == "arm" and gemm_cpu.target_isa(preset.tvm_target(), gemm_cpu.INT8) is None:
            # Measured: MetaSchedule's own int8 design space for aarch64 (its sdot/neon tensor-intrinsic
            # rule, which does not match this layout) yields schedules that TVM 0.27 cannot lower
            # ("VectorizeLoop before LiftStorageAlloc"); autotune's SDOT kernels need +dotprod.
            return ("w8a8 on ARM needs int8 dot products (ARMv8.2 +dotprod, e.g. aarch64-dotprod, aarch64-sve): without "
                    "them TVM 0.27 cannot lower the int8 matmul schedules MetaSchedule makes; use int8-weight")
        return None

    def apply(self, imported, preset):
        return _quantize_weights(imported, _Scheme("int8", "float32", act_int8=True), linears=True, convs=True,
                                 target=preset.tvm_target(), small=SMALL_LAYER)


@register
class Fp8(QuantMode):
    name = "fp8"
    description = "float8_e4m3fn weights + per-channel scale for linears and convolutions (CUDA sm_89 and newer)"

    def supports(self, preset):
        arch = _cuda_arch(preset)
        from tvm.support.nvcc import have_fp8

        if arch is None or not have_fp8(f"{arch // 10}.{arch % 10}"):
            where = f"CUDA sm_{arch}" if arch is not None else f"an {preset.family} CPU target"
            return f"fp8 (e4m3) needs an NVIDIA GPU of CUDA sm_89 or sm_90 (Ada, Hopper) or newer; {preset.name} is {where}"
        return None

    def apply(self, imported, preset):
        return _quantize_weights(imported, _Scheme("float8_e4m3fn", "float32"), linears=True, convs=True)


def _targets_for(mode: QuantMode) -> list[str]:
    return [p.name for p in list_presets() if mode.supports(p) is None]


def quantize(imported: ImportedModel, mode: str, preset: str | dict | TargetPreset) -> tuple[ImportedModel, dict]:
    """Apply quantization `mode` for `preset`; returns (a new ImportedModel, info dict).

    The input is left as it was. The result's `mod` takes the same named inputs (float32 stays
    float32) and returns the same outputs; its weights are the transformed arrays, in `main`'s
    new parameter order (int8/fp8 modes replace W by `W_q` [+ `W_scale`], stored [in, out] for
    linears).

    info: {"mode", "weight_bytes_before", "weight_bytes_after",
           "layers": weight-quantized matmuls/convs (int8-weight, w8a8, fp8), or matmul/conv ops
                     computing in half (fp16, bf16),
           "weight_dtype", "compute_dtype", ...; int8/fp8 add "linear_layers", "conv_layers",
           "kept_float32" (2-D+ weights left alone) and "note" when nothing was quantized}.
    Unknown mode, or a mode the target cannot run: InputError saying what is known / where it runs.
    """
    if mode not in MODES:
        raise InputError(f"unknown quantization mode '{mode}'. Known modes: {', '.join(MODES)}")
    handler = MODES[mode]()
    preset = resolve_target(preset)
    reason = handler.supports(preset)
    if reason is not None:
        targets = _targets_for(handler)
        raise InputError(
            f"--quantize {mode} cannot run on target {preset.name}: {reason}."
            + (f" Targets that can run it: {', '.join(targets)}." if targets else "")
        )
    before = imported.weight_bytes()
    out, info = handler.apply(imported, preset)
    out.notes.append(f"quantized: {mode}" + (f" ({info['note']})" if "note" in info else ""))
    return out, {"mode": mode, "weight_bytes_before": before, "weight_bytes_after": out.weight_bytes(), **info}


def describe_modes() -> str:
    return "\n".join(f"  {name:<12} {cls.description}" for name, cls in MODES.items())
