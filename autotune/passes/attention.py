"""Fused attention: find softmax(Q·Kᵀ·scale)·V in an imported Relax module and replace it by one
flash-style kernel call.

    mod = fuse_attention(mod, target)        # before LegalizeOps (lowering.fuse_for_target)
    mod = schedule_attention(mod, target)    # after applying the tuning log, before fallback

What is recognised (static shapes, float32/float16/bfloat16):
  * the torch importer's decomposition of F.scaled_dot_product_attention (TVM 0.27 with
    `run_ep_decomposition=True` does not emit R.nn.attention): q·√s and kᵀ·√s, broadcast_to +
    reshape to 3-D, matmul, reshape to 4-D, softmax(axis=-1), the "all -inf row -> 0" guard
    (equal/-inf, max, where(..., full_like(0), P)), broadcast_to + reshape, matmul with V;
  * the ONNX importer's MatMul → [Mul/Div by a scalar] → Softmax(-1) → MatMul chains (the dynamo
    exporter at opset 18 writes SDPA that way; its scale is a weight input, i.e. a runtime scalar);
  * `R.nn.attention(q, k, v)` (BSNH layout, no bias, no causal mask).
Self- and cross-attention alike (Lq ≠ Lk): the Wan I2V cross-attention's image (257 tokens) and
text (512 tokens) branches each become one call. Everything between the two matmuls (scores,
probabilities) disappears; Q, Kᵀ and V are taken as the importer produced them (3-D views).

The kernel call is `call_tir` to a PrimFunc named `fused_attention_*`:
  * CPU (llvm): `autotune.kernels.attention_cpu`, unscheduled, with a MetaSchedule custom rule
    (block annotation `schedule_rule`) so tuning treats it as one more task with sampled tile
    sizes; `schedule_attention` gives untuned builds the default schedule.
  * CUDA: `autotune.kernels.attention_cuda`, already scheduled (thread-bound, shared-memory tiles).
Memory is O(tokens × head_dim) per head on both.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from autotune.support.ir import (
    ATTENTION_ATTR,
    is_scheduled,
    mark_scheduled,
    static_shape,
)

log = logging.getLogger(__name__)

FUNC_PREFIX = "fused_attention"
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
# module attribute (set in phase 1, read here): the dtype float32 attentions compute in on CPU
COMPUTE_DTYPE_ATTR = "autotune.attention_compute_dtype"
INT8_SCORES_ATTR = "autotune.attention_int8_scores"  # (w8a8) Q.K^T on the int8 engine where the kernel would use vdpbf16ps


def with_compute_dtype(mod: tvm.IRModule, dtype: str, int8_scores: bool = False) -> tvm.IRModule:
    """`mod`, its float32 attentions to be fused into kernels computing in `dtype` ("bfloat16":
    q, kᵀ, v cast on the way in, float32 accumulation, the output cast back to float32).
    `int8_scores`: where such a kernel would run on vdpbf16ps and the CPU has VNNI, its Q.K^T runs
    on vpdpbusd instead (`attention_cpu`'s int8-scores kernel)."""
    mod = mod.with_attr(COMPUTE_DTYPE_ATTR, dtype)
    return mod.with_attr(INT8_SCORES_ATTR, True) if int8_scores else mod


# --- helpers on Relax expressions ----------------------------------------------------------------


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _shape(expr) -> tuple[int, ...] | None:
    return static_shape(getattr(expr, "ty", None))


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if ty is not None and hasattr(ty, "dtype") else None


def _is_float(expr) -> bool:
    return _dtype(expr) in SUPPORTED_DTYPES


def _prod(xs) -> int:
    return int(math.prod(xs)) if xs else 1


def _scalar_const(expr) -> float | None:
    """The value of a constant with one element, else None."""
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr, "value"):
        data = expr.value.numpy()
        if data.size == 1:
            return float(data.reshape(()))
    return None


def _is_scalar(expr) -> bool:
    shape = _shape(expr)
    return shape is not None and _prod(shape) == 1


@dataclass
class AttentionMatch:
    """One attention found in a function: out_var := attention(q, kt, v)."""

    out_var: object  # the binding replaced (its var and struct info are kept)
    q: object  # (…, Lq, D)
    kt: object | None  # (…, D, Lk): keys transposed (matmul patterns)
    k: object | None  # (B, Lk, N, D): nn.attention
    v: object  # (…, Lk, Dv)
    bh: int
    lq: int
    lk: int
    d: int
    dv: int
    dtype: str
    scale: float = 1.0  # constant factor on the scores
    scale_exprs: list = field(default_factory=list)  # runtime scalars multiplying the scores
    scale_divisors: list = field(default_factory=list)  # runtime scalars dividing the scores
    kind: str = "matmul"  # "matmul" or "nn.attention"
    nn_heads: int = 0  # nn.attention: N
    k_is_kt: bool = True  # `kt` holds Kᵀ (…, D, Lk); False: it holds K (…, Lk, D)


class _Graph:
    """Bindings and uses of one Relax function (all its binding blocks)."""

    def __init__(self, func: relax.Function):
        self.value: dict = {}
        self.users: dict = {}
        self.order: list = []
        self.outputs: set = set()

        def note_uses(var, expr):
            for used in relax.analysis.free_vars(expr) if not isinstance(expr, relax.Var) else [expr]:
                self.users.setdefault(used, []).append(var)

        body = func.body
        for block in body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    self.value[binding.var] = binding.value
                    self.order.append(binding.var)
                    note_uses(binding.var, binding.value)
                    if not isinstance(binding.var, relax.DataflowVar):
                        self.outputs.add(binding.var)
                else:  # MatchCast
                    note_uses(binding.var, binding.value)
        for used in relax.analysis.free_vars(body.body):
            self.users.setdefault(used, []).append(None)  # used by the function result

    def producer(self, var):
        return self.value.get(var) if isinstance(var, relax.Var) else None

    def through_casts(self, var):
        """`var`, or what it is a float-to-float astype of (ToMixedPrecision puts casts everywhere)."""
        for _ in range(8):
            value = self.producer(var)
            if not (_op_name(value) == "relax.astype" and _is_float(value.args[0]) and _is_float(var)):
                break
            var = value.args[0]
        return var

    def uses(self, var) -> list:
        return self.users.get(var, [])


# --- pattern matching -----------------------------------------------------------------------------


def _match_scores(graph: _Graph, x):
    """From the softmax input back to matmul(A, B); returns (matmul var, scale, scale_exprs, divisors)."""
    scale, scale_exprs, divisors = 1.0, [], []
    for _ in range(16):
        x = graph.through_casts(x)
        value = graph.producer(x)
        name = _op_name(value)
        shape = _shape(x)
        if shape is None:
            return None
        if name in ("relax.reshape", "relax.broadcast_to"):
            src = value.args[0]
            s_src = _shape(src)
            if s_src is None or s_src[-2:] != shape[-2:] or _prod(s_src) != _prod(shape):
                return None
            x = src
            continue
        if name in ("relax.multiply", "relax.divide"):
            a, b = value.args
            if _shape(a) == shape and _is_scalar(b):
                data, factor = a, b
            elif name == "relax.multiply" and _shape(b) == shape and _is_scalar(a):
                data, factor = b, a
            else:
                return None
            c = _scalar_const(factor)
            if name == "relax.multiply":
                if c is not None:
                    scale *= c
                else:
                    scale_exprs.append(factor)
            else:
                if c is not None:
                    if c == 0:
                        return None
                    scale /= c
                else:
                    divisors.append(factor)
            x = data
            continue
        if name == "relax.matmul":
            return x, scale, scale_exprs, divisors
        return None
    return None


def _is_neg_inf_guard(graph: _Graph, cond, scores) -> bool:
    """Does `cond` derive (within a few bindings) from equal(scores, -inf)?"""
    frontier, seen = [cond], 0
    while frontier and seen < 32:
        var = frontier.pop()
        seen += 1
        value = graph.producer(var)
        if value is None:
            continue
        if _op_name(value) == "relax.equal":
            a, b = value.args
            c = _scalar_const(b)
            if c is not None and c == -math.inf and graph.through_casts(a).same_as(graph.through_casts(scores)):
                return True
            continue
        if isinstance(value, relax.Call):
            frontier.extend(arg for arg in value.args if isinstance(arg, relax.Var))
    return False


def _peel(graph: _Graph, var, allow_scale: bool, allow_transpose: bool):
    """Follow the producers of a matmul operand back to the tensor the importer started from.

    Steps through reshapes that only regroup batch dims, broadcast_to that changes nothing,
    multiply/divide by a constant scalar (folded into the returned scale), one float-to-float
    astype (the caller casts the source back to the operand's dtype) and, if allowed, a
    permute_dims swapping the last two axes. Returns (source, scale, transposed): the operand,
    viewed as (BH, rows, cols), is scale * reshape(source) (transposed=False) or scale *
    swap_last_two(reshape(source)) (transposed=True), in the operand's dtype. Feeding the source
    instead of the operand lets the layout copies the importers emit (Q·√s, Kᵀ·√s, broadcast_to +
    reshape) die: a bf16 build's Kᵀ, cast to bf16 after the transpose, was a strided copy (17 ms
    of the DiT block's 460).
    """
    scale, transposed, cast = 1.0, False, False
    cur = var
    for _ in range(16):
        value = graph.producer(cur)
        name = _op_name(value)
        shape = _shape(cur)
        if shape is None or len(shape) < 2:
            break
        if name in ("relax.reshape", "relax.broadcast_to"):
            src = value.args[0]
            s_src = _shape(src)
            if s_src is None or len(s_src) < 2 or s_src[-2:] != shape[-2:] or _prod(s_src) != _prod(shape):
                break
            if name == "relax.broadcast_to" and s_src != shape:
                break
            cur = src
            continue
        if allow_scale and name in ("relax.multiply", "relax.divide"):
            a, b = value.args
            if _shape(a) == shape and _scalar_const(b) is not None:
                data, c = a, _scalar_const(b)
            elif name == "relax.multiply" and _shape(b) == shape and _scalar_const(a) is not None:
                data, c = b, _scalar_const(a)
            else:
                break
            if name == "relax.divide":
                if c == 0:
                    break
                c = 1.0 / c
            scale *= c
            cur = data
            continue
        if name == "relax.astype" and not cast and _is_float(value.args[0]) and _is_float(cur):
            cast = True  # (a second cast could round: stop there)
            cur = value.args[0]
            continue
        if allow_transpose and name == "relax.permute_dims":
            axes = value.attrs.axes
            n = len(shape)
            axes = list(range(n)) if axes is None else [int(a) for a in axes]
            if axes == list(range(n - 2)) + [n - 1, n - 2]:
                transposed = not transposed
                cur = value.args[0]
                continue
        break
    return cur, scale, transposed


def _match_softmax(graph: _Graph, p_var) -> AttentionMatch | None:
    value = graph.producer(p_var)
    x = value.args[0]
    shape = _shape(x)
    if shape is None or len(shape) < 2:
        return None
    axis = int(value.attrs.axis)
    if axis not in (-1, len(shape) - 1):
        return None
    found = _match_scores(graph, x)
    if found is None:
        return None
    s_var, scale, scale_exprs, divisors = found
    mm = graph.producer(s_var)
    a, b = mm.args
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return None
    lq, d = sa[-2:]
    d2, lk = sb[-2:]
    if d != d2 or shape[-2:] != (lq, lk):
        return None

    # Forward: P -> [where guard] -> views -> matmul(P', V)
    cur = p_var
    users = list(graph.uses(cur))
    guard_users = [u for u in users if u is not None and _op_name(graph.producer(u)) == "relax.where"]
    if guard_users:
        if len(guard_users) != 1:
            return None
        w = guard_users[0]
        cond, then_, else_ = graph.producer(w).args
        if not else_.same_as(p_var):
            return None
        zeros = graph.producer(then_)
        if _op_name(zeros) not in ("relax.full_like", "relax.zeros_like", "relax.zeros", "relax.full"):
            return None
        if _op_name(zeros) in ("relax.full_like", "relax.full"):
            fill = _scalar_const(zeros.args[1])
            if fill != 0.0:
                return None
        if not _is_neg_inf_guard(graph, cond, x):
            return None
        # P may feed only the where and the zeros' shape source.
        for u in users:
            if u is None or (not u.same_as(w) and not u.same_as(then_)):
                return None
        cur = w
    for _ in range(8):
        us = graph.uses(cur)
        if len(us) != 1 or us[0] is None:
            return None
        nxt = us[0]
        value = graph.producer(nxt)
        name = _op_name(value)
        if name == "relax.astype" and _is_float(nxt):
            cur = nxt
            continue
        if name in ("relax.reshape", "relax.broadcast_to"):
            s_cur, s_nxt = _shape(cur), _shape(nxt)
            if s_nxt is None or s_nxt[-2:] != (lq, lk) or _prod(s_nxt) != _prod(s_cur):
                return None
            cur = nxt
            continue
        if name == "relax.matmul" and value.args[0].same_as(cur):
            out = nxt
            v = value.args[1]
            break
        return None
    else:
        return None
    sv, so = _shape(v), _shape(out)
    if sv is None or so is None or len(sv) < 2 or sv[-2] != lk:
        return None
    dv = sv[-1]
    bh = _prod(_shape(cur)[:-2])
    if so[-2:] != (lq, dv) or _prod(so[:-2]) != bh:
        return None
    # Batch dims: Q, Kᵀ, V must each hold BH matrices (no broadcasting across heads).
    if _prod(sa[:-2]) != bh or _prod(sb[:-2]) != bh or _prod(sv[:-2]) != bh:
        return None
    dtype = _dtype(a)  # half-precision operands may give float32 results (out_dtype): cast after the kernel
    if dtype not in SUPPORTED_DTYPES or any(_dtype(t) != dtype for t in (b, v)) or not _is_float(out):
        return None
    q_src, q_scale, q_t = _peel(graph, a, allow_scale=True, allow_transpose=False)
    k_src, k_scale, k_t = _peel(graph, b, allow_scale=True, allow_transpose=True)
    v_src, _, _ = _peel(graph, v, allow_scale=False, allow_transpose=False)
    return AttentionMatch(
        out, q_src, k_src, None, v_src, bh, lq, lk, d, dv, dtype, scale * q_scale * k_scale, scale_exprs, divisors,
        k_is_kt=not k_t,
    )


def _match_nn_attention(graph: _Graph, var) -> AttentionMatch | None:
    value = graph.producer(var)
    args = value.args
    if len(args) != 3:  # bias given
        return None
    attrs = value.attrs
    if getattr(attrs, "causal_mask", None) not in (None, "", "None"):
        return None
    q, k, v = args
    sq, sk, sv = _shape(q), _shape(k), _shape(v)
    if sq is None or sk is None or sv is None or len(sq) != 4:
        return None
    b, lq, n, d = sq
    if sk[0] != b or sk[2] != n or sk[3] != d or sv[:3] != sk[:3]:
        return None
    dtype = _dtype(var)
    if dtype not in SUPPORTED_DTYPES:
        return None
    scale = getattr(attrs, "scale", None)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    return AttentionMatch(var, q, None, k, v, b * n, lq, sk[1], d, sv[3], dtype, scale, kind="nn.attention", nn_heads=n, k_is_kt=False)


def find_attention(func: relax.Function) -> list[AttentionMatch]:
    """Every attention in `func` that `fuse_attention` would replace."""
    graph = _Graph(func)
    matches, taken = [], set()
    for var in graph.order:
        value = graph.value[var]
        name = _op_name(value)
        m = None
        if name == "relax.nn.softmax":
            m = _match_softmax(graph, var)
        elif name == "relax.nn.attention":
            m = _match_nn_attention(graph, var)
        if m is not None and m.out_var not in taken:
            taken.add(m.out_var)
            matches.append(m)
    return matches


# --- kernels --------------------------------------------------------------------------------------


def _target_kind(target) -> str:
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    return "cpu" if target is None else ("cuda" if target.kind.name == "cuda" else "cpu" if target.kind.name == "llvm" else target.kind.name)


def _cpu_kernel(m: AttentionMatch, scale: float, target, int8_scores: bool = False):
    from autotune.kernels import attention_cpu as kc
    from autotune.kernels import gemm_cpu

    tiles = kc.choose_tiles(m.lq, m.lk, m.d, m.dv, kc.vector_lanes(target))
    layout = "kt" if m.k_is_kt else "k"
    # bf16 on a CPU with a bf16 engine: both GEMMs on AMX tiles where the shapes fit them, else on
    # AVX512-BF16's vdpbf16ps (every AMX CPU has it too)
    isa, engine = gemm_cpu.target_isa(target, gemm_cpu.BF16), None
    amx_tiles = kc.choose_amx_tiles(m.lq, m.lk)
    if isa == gemm_cpu.AMX and kc.amx_engine_fits(m.dtype, m.d, m.dv, amx_tiles):
        engine, tiles = gemm_cpu.AMX, amx_tiles
    elif isa in (gemm_cpu.AMX, gemm_cpu.AVX512) and kc.dot_engine_fits(m.dtype, m.d, m.dv, tiles):
        engine = gemm_cpu.AVX512
        if int8_scores and kc.int8_scores_fit(m.dtype, m.d, m.dv, tiles):  # (set where the CPU has VNNI)
            engine = gemm_cpu.VNNI
    func = kc.make_primfunc(m.bh, m.lq, m.lk, m.d, m.dv, scale, m.dtype, tiles, k_layout=layout, engine=engine)
    func = kc.annotate_for_metaschedule(func)
    name = f"{FUNC_PREFIX}_cpu_{m.bh}x{m.lq}x{m.lk}x{m.d}x{m.dv}_{m.dtype}_{layout}_s{scale:.6g}".replace(".", "p").replace("-", "m")
    name += {gemm_cpu.AVX512: "_vdpbf16ps", gemm_cpu.AMX: "_amx", gemm_cpu.VNNI: "_int8qk", None: ""}[engine]
    return name, func.with_attr("op_pattern", 8)  # kOpaque: FuseOps leaves it alone


def has_int8_scores(target) -> bool:
    """Whether the CPU target multiplies int8 with VNNI (every AMX-INT8 CPU has it too)."""
    from autotune.kernels import gemm_cpu

    return gemm_cpu.target_isa(target, gemm_cpu.INT8) in (gemm_cpu.VNNI, gemm_cpu.AMX_INT8)


def _widens_bf16(target) -> bool:
    """Whether a bf16 attention on this CPU target computes in float32 on float32 inputs: x86 without
    bf16 arithmetic (its bf16 GEMMs on the AVX2 FMA engine), where TVM would widen every bf16 load in
    the kernel's inner loops (the DiT block's three attentions: 250 ms at bf16 against 183 in
    float32, untuned, on a Zen 3). The values are bf16's, so only the summation is more exact."""
    from autotune.kernels import gemm_cpu

    return gemm_cpu.target_isa(target, gemm_cpu.BF16) == gemm_cpu.AVX2_BF16


def _cuda_kernel(m: AttentionMatch, scale: float, target):
    from autotune.kernels import attention_cuda as kg

    func = kg.make_primfunc(m.d, m.dtype, scale, target)
    name = f"{FUNC_PREFIX}_cuda_d{m.d}_{m.dtype}_s{scale:.6g}".replace(".", "p").replace("-", "m")
    return name, func.with_attr("op_pattern", 8)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, target, kind: str):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.kind = kind
        self.matches: dict = {}
        self.kernels: dict = {}
        self.count = 0
        self.unfused: dict[str, int] = {}  # why an attention was left as it is -> how many
        attrs = mod.attrs or {}
        self.compute_dtype = str(attrs[COMPUTE_DTYPE_ATTR]) if COMPUTE_DTYPE_ATTR in attrs else None
        self.int8_scores = bool(attrs[INT8_SCORES_ATTR]) if INT8_SCORES_ATTR in attrs else False

    def run(self) -> tvm.IRModule:
        for gv, func in list(self.mod_.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            found = find_attention(func)
            if not found:
                continue
            self.matches = {m.out_var: m for m in found}
            new = self.visit_expr(func)
            self.builder_.update_func(gv, new)
        return self.builder_.get()

    def _kernel(self, m: AttentionMatch, scale: float):
        if self.kind == "cuda":
            name, func = _cuda_kernel(m, scale, self.target)
        else:
            name, func = _cpu_kernel(m, scale, self.target, self.int8_scores)
        if name not in self.kernels:
            self.kernels[name] = self.builder_.add_func(func, name)
        return self.kernels[name]

    def _emit(self, expr):
        return self.builder_.emit(expr)

    def visit_var_binding_(self, binding):
        m = self.matches.get(binding.var)
        if m is None:
            return super().visit_var_binding_(binding)
        try:
            new_value = self._replacement(m)
        except NotImplementedError as exc:  # this target has no kernel for it: said by fuse_attention
            self.unfused[str(exc)] = self.unfused.get(str(exc), 0) + 1
            return super().visit_var_binding_(binding)
        self.count += 1
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new_value)))

    def _replacement(self, m: AttentionMatch):
        op = relax.op
        bh, lq, lk, d, dv = m.bh, m.lq, m.lk, m.d, m.dv
        if m.kind == "nn.attention":
            b, n = bh // m.nn_heads, m.nn_heads
            q3 = self._emit(op.reshape(op.permute_dims(self.visit_expr(m.q), [0, 2, 1, 3]), (bh, lq, d)))
            kt3 = self._emit(op.reshape(op.permute_dims(self.visit_expr(m.k), [0, 2, 1, 3]), (bh, lk, d)))
            v3 = self._emit(op.reshape(op.permute_dims(self.visit_expr(m.v), [0, 2, 1, 3]), (bh, lk, dv)))
        else:
            q3 = self._view(self.visit_expr(m.q), (bh, lq, d))
            kt3 = self._view(self.visit_expr(m.kt), (bh, d, lk) if m.k_is_kt else (bh, lk, d))
            v3 = self._view(self.visit_expr(m.v), (bh, lk, dv))
            # (a source _peel found behind a cast is cast back)
            q3, kt3, v3 = (t if _dtype(t) == m.dtype else self._emit(op.astype(t, m.dtype)) for t in (q3, kt3, v3))
        if self.kind == "cpu" and m.dtype == "bfloat16" and _widens_bf16(self.target):
            q3, kt3, v3 = (self._emit(op.astype(t, "float32")) for t in (q3, kt3, v3))
            m = replace(m, dtype="float32")  # the output is cast back below
        elif self.kind == "cpu" and m.dtype == "float32" and self.compute_dtype == "bfloat16":
            q3, kt3, v3 = (self._emit(op.astype(t, "bfloat16")) for t in (q3, kt3, v3))
            m = replace(m, dtype="bfloat16")  # (likewise)
        scale = m.scale
        for s in m.scale_exprs:  # runtime scalars on the scores: fold into Q
            q3 = self._emit(op.multiply(q3, op.astype(op.reshape(self.visit_expr(s), ()), m.dtype)))
        for s in m.scale_divisors:
            q3 = self._emit(op.divide(q3, op.astype(op.reshape(self.visit_expr(s), ()), m.dtype)))
        if not scale > 0 or not math.isfinite(scale):
            q3 = self._emit(op.multiply(q3, relax.const(scale, m.dtype)))
            scale = 1.0
        if self.kind == "cuda":
            if dv != d:
                raise NotImplementedError("CUDA kernel needs head_dim(V) == head_dim(Q)")
            gv = self._kernel(m, scale)
            q4 = self._emit(op.reshape(q3, (bh, lq, 1, d)))
            k3 = op.permute_dims(kt3, [0, 2, 1]) if m.k_is_kt else kt3
            k4 = self._emit(op.reshape(k3, (bh, lk, 1, d)))
            v4 = self._emit(op.reshape(v3, (bh, lk, 1, d)))
            call = self._emit(
                relax.call_tir(
                    gv,
                    [q4, k4, v4],
                    [relax.TensorType((bh, lq, 1, d), m.dtype), relax.TensorType((bh, lq, 1), m.dtype)],
                )
            )
            o3 = self._emit(op.reshape(relax.TupleGetItem(call, 0), (bh, lq, dv)))
        else:
            gv = self._kernel(m, scale)
            o3 = self._emit(relax.call_tir(gv, [q3, kt3, v3], relax.TensorType((bh, lq, dv), m.dtype)))
        if m.kind == "nn.attention":
            b, n = bh // m.nn_heads, m.nn_heads
            return op.permute_dims(op.reshape(o3, (b, n, lq, dv)), [0, 2, 1, 3])
        out_shape = _shape(m.out_var)
        if _dtype(m.out_var) != m.dtype:
            o3 = self._emit(op.astype(o3, _dtype(m.out_var)))
        return op.reshape(o3, out_shape) if out_shape != (bh, lq, dv) else o3

    def _view(self, expr, shape):
        if _shape(expr) == tuple(shape):
            return expr
        return self._emit(relax.op.reshape(expr, shape))


# --- public API -----------------------------------------------------------------------------------


def fuse_attention(mod: tvm.IRModule, target=None) -> tvm.IRModule:
    """Replace every recognised attention in `mod` by a fused kernel call (see module doc).

    target: a tvm.target.Target (or None: the current target, else a generic CPU). Call before
    LegalizeOps. Modules without attention come back unchanged.
    """
    if isinstance(target, (str, dict)):
        target = tvm.target.Target(target)
    kind = _target_kind(target)
    if kind not in ("cpu", "cuda"):
        return mod
    rewriter = _Rewriter(mod, target, kind)
    new = rewriter.run()
    for reason, count in rewriter.unfused.items():
        log.warning(
            "%d attention(s) left unfused for %s: %s. They run as separate kernels that materialise the "
            "tokens x tokens scores (slower, O(tokens^2) memory).", count, target, reason
        )
    if rewriter.count == 0:
        return mod
    return relax.transform.DeadCodeElimination()(new)


def count_fused_attention(mod: tvm.IRModule) -> int:
    """How many call sites of fused attention kernels the module's Relax functions have."""
    calls = 0

    @relax.expr_functor.visitor
    class _Count(relax.PyExprVisitor):
        def visit_call_(self, call):
            nonlocal calls
            if _op_name(call) == "relax.call_tir" and isinstance(call.args[0], relax.GlobalVar):
                if call.args[0].name_hint.startswith(FUNC_PREFIX):
                    calls += 1
            super().visit_call_(call)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            _Count().visit_expr(func)
    return calls


def is_attention_kernel(func) -> bool:
    return isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and ATTENTION_ATTR in func.attrs


def schedule_attention(mod: tvm.IRModule, target) -> tuple[tvm.IRModule, int]:
    """Give unscheduled CPU attention kernels their default schedule (untuned builds).

    Call after the tuning log was applied (tuned kernels are already `tirx.is_scheduled`) and
    before the generic fallback. Returns (module, how many kernels were scheduled)."""
    from tvm import s_tir

    from autotune.kernels import attention_cpu as kc

    if _target_kind(target) != "cpu":
        return mod, 0
    count = 0
    for gv, func in list(mod.functions.items()):
        if not is_attention_kernel(func):
            continue
        if is_scheduled(func):
            continue
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        kc.apply_schedule(sch)
        mod[gv] = mark_scheduled(sch.mod["main"])
        count += 1
    return mod, count
