"""Fused attention (issue 9): the Relax rewrite, the CPU flash kernel, its MetaSchedule design
space, the 32,760-token case (bounded memory on CPU, compile-only on CUDA).

Kept small: 2 shared cores. The full 32,760 x 32,760 single-head CPU run is marked slow.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from conftest import max_abs_diff, run_fresh
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms

import autotune  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
from autotune.frontend.importer import from_onnx, from_torch
from autotune.kernels import attention_cpu as kc
from autotune.passes.attention import (
    count_fused_attention,
    find_attention,
    fuse_attention,
    is_attention_kernel,
    schedule_attention,
)
from autotune.passes.pipeline import finalize_passes, fuse_for_target
from autotune.support.ir import prim_funcs

CPU = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2}
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})


def cpu_target():
    return tvm.target.Target(CPU)


def ref_attention(q, kt, v, scale):
    s = np.einsum("bid,bdj->bij", q.astype(np.float64), kt.astype(np.float64)) * scale
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bij,bjd->bid", p, v.astype(np.float64))


def compile_with_attention(mod, target, generic_fallback: bool = True):
    """What autotune.build.compile.compile_module does for an untuned build (attention fused and scheduled)."""
    from autotune.build.fallback import schedule_untuned

    fused = fuse_for_target(mod, target)
    fused, _ = schedule_attention(fused, target)
    if generic_fallback:
        fused, _ = schedule_untuned(fused, target)
    with target:
        lowered = tvm.transform.Sequential(finalize_passes(target))(fused)
    return tvm.compile(lowered, target=target, relax_pipeline=None), fused


def run_vm(executable, args):
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def build_kernel(bh, lq, lk, d, dv, scale=None, dtype="float32", tiles=None, knobs=None, k_layout="kt"):
    scale = 1 / math.sqrt(d) if scale is None else scale
    lib = kc.compile_standalone(bh, lq, lk, d, dv, cpu_target(), scale, dtype, tiles, knobs, k_layout)
    return lib, scale


def run_kernel(lib, q, kt, v, dv):
    out = tvm.runtime.tensor(np.zeros((q.shape[0], q.shape[1], dv), q.dtype))
    lib["main"](*(tvm.runtime.tensor(x) for x in (q, kt, v)), out)
    return out.numpy()


# --- the rewrite ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_tiny():
    from autotune.models import get_model_spec

    comp = get_model_spec("wan-i2v-tiny").component("transformer")
    module = comp.build_module()
    inputs = comp.example_inputs()
    with torch.no_grad():
        ref = module(*inputs.values()).numpy()
    return from_torch(module, inputs), inputs, ref


def test_rewrite_fires_on_wan_tiny_self_and_cross_attention(wan_tiny):
    imported, _, _ = wan_tiny
    assert imported.mod.script().count("R.nn.softmax") == 6
    mod = fuse_attention(imported.mod, cpu_target())
    # 2 layers x (self-attention, image cross-attention, text cross-attention)
    assert count_fused_attention(mod) == 6
    assert "R.nn.softmax" not in mod.script()
    kernels = {gv.name_hint: f for gv, f in mod.functions.items() if is_attention_kernel(f)}
    shapes = sorted((int(f.attrs["autotune.attention"]["lq"]), int(f.attrs["autotune.attention"]["lk"])) for f in kernels.values())
    # 48 video tokens attend to 48 (self), 17 image tokens and 512 text tokens (cross)
    assert shapes == [(48, 17), (48, 48), (48, 512)]
    for f in kernels.values():
        info = f.attrs["autotune.attention"]
        assert (int(info["bh"]), int(info["d"]), int(info["dv"])) == (2, 16, 16)
        # q·√s and kᵀ·√s were folded into the kernel's scale, K is read as the importer had it
        assert float(info["scale"]) == pytest.approx(16**-0.5) and int(info["k_transposed"]) == 0
    # Each kernel is its own tuning task after fusion: FuseOps does not merge it with neighbours.
    fused = fuse_for_target(mod, cpu_target())
    assert sorted(n for n, f in prim_funcs(fused).items() if is_attention_kernel(f)) == sorted(kernels)


def test_wan_tiny_fused_matches_torch(wan_tiny):
    imported, inputs, ref = wan_tiny
    # The generic fallback is skipped to keep this fast: the other kernels run unscheduled.
    executable, fused = compile_with_attention(imported.mod, cpu_target(), generic_fallback=False)
    assert sum(1 for f in prim_funcs(fused).values() if is_attention_kernel(f)) == 3
    out = run_vm(executable, [x.numpy() for x in inputs.values()] + list(imported.weights.values()))
    assert max_abs_diff(out, ref) < 1e-4


class CrossAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_rewrite_fires_on_onnx_attention_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    path = tmp_path / "sdpa.onnx"
    torch.onnx.export(CrossAttention().eval(), (q, k, v), str(path), dynamo=True, opset_version=18, input_names=["q", "k", "v"])
    imported = from_onnx(path)
    assert "R.nn.softmax" in imported.mod.script()
    mod = fuse_attention(imported.mod, cpu_target())
    assert count_fused_attention(mod) == 1 and "R.nn.softmax" not in mod.script()
    executable, _ = compile_with_attention(imported.mod, cpu_target())
    out = run_vm(executable, [q.numpy(), k.numpy(), v.numpy()] + list(imported.weights.values()))
    assert max_abs_diff(out, CrossAttention()(q, k, v).numpy()) < 1e-4


def test_relax_nn_attention_is_replaced_and_correct():
    b, s, sk, n, h = 2, 20, 33, 3, 16
    bb = relax.BlockBuilder()
    qv, kv, vv = (relax.Var(name, relax.TensorType((b, length, n, h), "float32")) for name, length in (("q", s), ("k", sk), ("v", sk)))
    with bb.function("main", [qv, kv, vv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.attention(qv, kv, vv))
        bb.emit_func_output(out)
    mod = bb.get()
    assert count_fused_attention(fuse_attention(mod, cpu_target())) == 1
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(x, dtype=np.float32) for x in ((b, s, n, h), (b, sk, n, h), (b, sk, n, h))]
    executable, _ = compile_with_attention(mod, cpu_target())
    ref = F.scaled_dot_product_attention(*(torch.from_numpy(a).transpose(1, 2) for a in args)).transpose(1, 2).numpy()
    assert max_abs_diff(run_vm(executable, args), ref) < 1e-4


def test_modules_without_attention_come_back_unchanged(mlp_block):
    module, inputs, _ = mlp_block
    imported = from_torch(module, inputs)
    assert fuse_attention(imported.mod, cpu_target()) is imported.mod
    assert find_attention(imported.mod["main"]) == []


def test_torch_block_through_build_and_load(tmp_path, attention_block):
    """build + autotune.load: the attention is fused and the output matches torch (tuned: test_spine's ONNX block)."""
    from autotune.build.compile import build

    module, inputs, ref = attention_block
    report = build(from_torch(module, inputs), CPU, tmp_path / "block.so")
    m = autotune.load(report.paths.library)
    assert max_abs_diff(m(x=inputs["x"].numpy()), ref) < 1e-4


# --- the CPU kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bh,lq,lk,d,dv",
    [
        (2, 64, 64, 64, 64),  # whole tiles
        (2, 100, 70, 32, 32),  # padded queries and keys
        (3, 37, 17, 16, 16),  # fewer keys than one tile (the Wan image context is 257)
        (1, 48, 200, 32, 16),  # head_dim of V != head_dim of Q
        (2, 100, 70, 40, 24),  # head_dims that are not a multiple of the vector width
    ],
)
def test_cpu_kernel_matches_reference(bh, lq, lk, d, dv):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((bh, lq, d), dtype=np.float32)
    kt = 3 * rng.standard_normal((bh, d, lk), dtype=np.float32)  # peaky softmax
    v = rng.standard_normal((bh, lk, dv), dtype=np.float32)
    lib, scale = build_kernel(bh, lq, lk, d, dv)
    assert max_abs_diff(run_kernel(lib, q, kt, v, dv), ref_attention(q, kt, v, scale)) < 1e-5


def test_cpu_kernel_reads_untransposed_keys():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((2, 100, 32), (2, 70, 32), (2, 70, 32)))
    lib, scale = build_kernel(2, 100, 70, 32, 32, k_layout="k")
    kt = np.ascontiguousarray(k.transpose(0, 2, 1))
    assert max_abs_diff(run_kernel(lib, q, k, v, 32), ref_attention(q, kt, v, scale)) < 1e-5


def test_cpu_kernel_large_logits_are_stable():
    rng = np.random.default_rng(1)
    q = 40 * rng.standard_normal((1, 64, 32), dtype=np.float32)  # scores in the thousands
    kt = 40 * rng.standard_normal((1, 32, 96), dtype=np.float32)
    v = rng.standard_normal((1, 96, 32), dtype=np.float32)
    lib, scale = build_kernel(1, 64, 96, 32, 32)
    out = run_kernel(lib, q, kt, v, 32)
    assert np.isfinite(out).all()
    assert max_abs_diff(out, ref_attention(q, kt, v, scale)) < 1e-4


def test_cpu_kernel_float16_accumulates_in_float32():
    rng = np.random.default_rng(2)
    q, kt, v = (rng.standard_normal(s).astype("float16") for s in ((2, 70, 32), (2, 32, 50), (2, 50, 32)))
    lib, scale = build_kernel(2, 70, 50, 32, 32, dtype="float16")
    assert max_abs_diff(run_kernel(lib, q, kt, v, 32), ref_attention(q, kt, v, scale)) < 2e-3


@pytest.mark.parametrize("knobs", [kc.CpuKnobs(2, 1, 2, 1), kc.CpuKnobs(16, 1, 8, 2), kc.CpuKnobs(4, 2, 16, 2)])
def test_every_register_tiling_is_correct(knobs):
    rng = np.random.default_rng(3)
    q, kt, v = (rng.standard_normal(s, dtype=np.float32) for s in ((2, 64, 32), (2, 32, 64), (2, 64, 32)))
    tiles = kc.CpuTiles(32, 32, kc.vector_lanes(cpu_target()))
    lib, scale = build_kernel(2, 64, 64, 32, 32, tiles=tiles, knobs=knobs)
    assert max_abs_diff(run_kernel(lib, q, kt, v, 32), ref_attention(q, kt, v, scale)) < 1e-5


def test_avx2_default_register_tiles_fit_its_sixteen_registers():
    """On AVX2 a float32 register tile of R rows x V vectors also needs V registers for the other
    operand and one for the broadcast: the default fits 16 (its P.V tile of 4 x 4 spilled and ran
    at half the speed), keeps as many accumulators as a tile that fits can; AVX-512's are as before."""
    for lq, lk, d in ((1560, 1560, 128), (1560, 257, 128), (48, 512, 16), (17, 17, 16), (257, 257, 64), (4096, 4096, 64)):
        tiles = kc.choose_tiles(lq, lk, d, d, 8)
        knobs = kc.default_knobs(tiles, d, d)
        for rows, vecs in ((knobs.qk_rows, knobs.qk_vecs), (knobs.pv_rows, knobs.pv_vecs)):
            assert rows * vecs + vecs + 1 <= kc.AVX2_REGISTERS and tiles.tq % rows == 0, (lq, lk, d, knobs)
    assert kc.default_knobs(kc.choose_tiles(1560, 1560, 128, 128, 8), 128, 128) == kc.CpuKnobs(6, 2, 6, 2)
    assert kc.default_knobs(kc.choose_tiles(1560, 1560, 128, 128, 16), 128, 128) == kc.CpuKnobs(6, 2, 4, 4)


def test_metaschedule_design_space_is_the_custom_rule():
    """post-order-apply (what tuning and the fallback use) hands the kernel to our rule; the
    sampled tiles replay on the unchanged workload, pass the postprocessors and compute right."""
    target = cpu_target()
    make = lambda: kc.annotate_for_metaschedule(  # noqa: E731
        kc.make_primfunc(2, 100, 70, 32, 32, 0.3, "float32", kc.CpuTiles(32, 32, kc.vector_lanes(target)))
    ).with_attr("global_symbol", "main")
    mod = tvm.IRModule({"main": make()})
    before = mod.script()
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                         search_strategy="replay-trace", task_name="attention", rand_state=7, num_threads=1)
    spaces = ctx.generate_design_space()
    assert len(spaces) == 1
    assert mod.script() == before  # the workload is not mutated (see make_primfunc's doc)
    trace = spaces[0].trace
    samples = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(samples) == 4  # rows and columns of the two register tiles
    rng = np.random.default_rng(4)
    q, kt, v = (rng.standard_normal(s, dtype=np.float32) for s in ((2, 100, 32), (2, 32, 70), (2, 70, 32)))
    for choice in (0, -1):
        t = trace
        for inst in samples:
            t = t.with_decision(inst, choice % len(inst.attrs[0]), remove_postproc=True)
        sch = s_tir.Schedule(tvm.IRModule({"main": make()}))
        t.apply_to_schedule(sch, remove_postproc=True)
        assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
        lib = tvm.compile(sch.mod, target=target)
        assert max_abs_diff(run_kernel(lib, q, kt, v, 32), ref_attention(q, kt, v, 0.3)) < 1e-5


# --- bf16 on vdpbf16ps -----------------------------------------------------------------------------

# bf16 inputs and output, P rounded to bf16: against float64 attention on the same bf16 inputs,
# an output element is off by bf16 rounding (2^-9 relative) plus P's (measured: max 2.5e-3 on
# values of about 1, cosine 0.999998).
BF16_ATOL, BF16_MIN_COSINE = 1e-2, 0.9999


def _bf16_operands(bh, lq, lk, d, dv, layout, seed=0):
    import ml_dtypes

    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in ((bh, lq, d), (bh, lk, d), (bh, lk, dv)))
    k_in = k if layout == "k" else np.ascontiguousarray(k.transpose(0, 2, 1))
    return q, k_in, v, ref_attention(q, np.ascontiguousarray(k.transpose(0, 2, 1)), v, d**-0.5)


def _run_bf16(lib, q, k_in, v, dv):
    out = tvm.runtime.empty((q.shape[0], q.shape[1], dv), "bfloat16")
    lib["main"](*(tvm.runtime.tensor(x) for x in (q, k_in, v)), out)
    return out.numpy().astype(np.float64)


@pytest.mark.parametrize(
    "bh, lq, lk, d, layout",
    [
        (2, 64, 64, 32, "k"),  # aligned: one query tile, one key tile
        (2, 100, 70, 64, "kt"),  # ragged: padded queries and keys, transposed keys
        (3, 37, 257, 128, "k"),  # the image cross-attention's 257 keys at head_dim 128
    ],
)
def test_bf16_attention_on_vdpbf16ps_matches_numpy(dpbf16_target, bh, lq, lk, d, layout):
    """Both GEMMs tensorized on vdpbf16ps (emulated in FMAs where the CPU lacks AVX512-BF16)."""
    target, emulated = dpbf16_target
    tiles = kc.choose_tiles(lq, lk, d, d, 16)
    lib = kc.compile_standalone(bh, lq, lk, d, d, target, None, "bfloat16", tiles, None, layout, engine="avx512bf16")
    if not emulated:
        assert "vdpbf16ps" in lib.mod.inspect_source("asm")
    q, k_in, v, ref = _bf16_operands(bh, lq, lk, d, d, layout)
    out = _run_bf16(lib, q, k_in, v, d)
    assert np.abs(out - ref).max() < BF16_ATOL
    assert float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)) >= BF16_MIN_COSINE


@pytest.mark.parametrize(
    "bh, lq, lk, d, layout",
    [
        (2, 64, 64, 32, "k"),  # aligned: one 64-row query tile, one key tile of two 32-key blocks
        (2, 100, 70, 64, "kt"),  # ragged: padded queries and keys, transposed keys
        (3, 37, 257, 128, "k"),  # the image cross-attention's 257 keys at head_dim 128
    ],
)
def test_bf16_attention_on_amx_tiles_matches_numpy(amx_target, bh, lq, lk, d, layout):
    """Both GEMMs on AMX tiles (tdpbf16ps; emulated in C where the CPU lacks AMX)."""
    target, emulated = amx_target
    tiles = kc.choose_amx_tiles(lq, lk)
    lib = kc.compile_standalone(bh, lq, lk, d, d, target, None, "bfloat16", tiles, None, layout, engine="amx")
    instruction = r"autotune_amx_tdpbf16ps" if emulated else r"^\s*tdpbf16ps\s"  # the emulation's function, or AMX's
    assert re.search(instruction, lib.mod.inspect_source("asm"), re.M)
    q, k_in, v, ref = _bf16_operands(bh, lq, lk, d, d, layout)
    out = _run_bf16(lib, q, k_in, v, d)
    assert np.abs(out - ref).max() < BF16_ATOL
    assert float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)) >= BF16_MIN_COSINE


def _int8_scores_reference(q, k, v, scale):
    """numpy (float64) of the int8-scores kernel's arithmetic: Q per row and K per key (less the keys'
    mean) quantized to int8, their exact integer product rescaled, softmax, P rounded to bf16, P.V."""
    import ml_dtypes

    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    k = k - k.mean(axis=1, keepdims=True)
    sq, sk = (np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8) / 127 for x in (q, k))
    qq, kq = np.round(q / sq), np.round(k / sk)
    s = np.einsum("bid,bjd->bij", qq, kq) * sq * sk.transpose(0, 2, 1) * scale
    p = np.exp(s - s.max(-1, keepdims=True)).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.einsum("bij,bjd->bid", p, v) / p.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "bh, lq, lk, d, layout",
    [
        (2, 64, 64, 32, "k"),  # aligned: one query tile, one key tile
        (2, 100, 70, 64, "kt"),  # ragged: padded queries and keys, transposed keys
        (3, 37, 257, 128, "k"),  # the image cross-attention's 257 keys at head_dim 128
    ],
)
def test_int8_scores_attention_matches_its_arithmetic_and_the_bf16_reference(dpbf16_target, vnni_target, bh, lq, lk, d, layout):
    """Q.K^T on vpdpbusd, P.V on vdpbf16ps (each emulated where the CPU lacks it). Against numpy doing
    the same quantization: within bf16's rounding of P and O; against float64 attention on the bf16
    inputs: cosine >= 0.9995, with the keys sharing a large per-channel offset (the keys' mean, taken
    out before quantizing, would otherwise take most of each key's 8 bits)."""
    import ml_dtypes

    target, emulated = dpbf16_target
    tiles = kc.choose_tiles(lq, lk, d, d, 16)
    lib = kc.compile_standalone(bh, lq, lk, d, d, target, None, "bfloat16", tiles, None, layout, engine="avx512vnni")
    if not emulated and not vnni_target[1]:
        asm = lib.mod.inspect_source("asm")
        assert "vpdpbusd" in asm and "vdpbf16ps" in asm
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s) for s in ((bh, lq, d), (bh, lk, d), (bh, lk, d)))
    k = k + 4 * rng.standard_normal((1, 1, d))
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    k_in = k if layout == "k" else np.ascontiguousarray(k.transpose(0, 2, 1))
    out = _run_bf16(lib, q, k_in, v, d)
    assert np.abs(out - _int8_scores_reference(q, k, v, d**-0.5)).max() < BF16_ATOL
    ref = ref_attention(q, np.ascontiguousarray(k.transpose(0, 2, 1)), v, d**-0.5)
    assert float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)) >= 0.9995


def test_amx_attention_design_space_passes_metaschedule_and_computes(amx_target):
    """What tuning does with the AMX kernel: post-order-apply hands it to our rule, the schedule
    passes MetaSchedule's CPU postprocessors and still computes right."""
    target, _ = amx_target
    tiles = kc.choose_amx_tiles(100, 70)
    func = kc.annotate_for_metaschedule(
        kc.make_primfunc(2, 100, 70, 64, 64, 64**-0.5, "bfloat16", tiles, k_layout="kt", engine="amx")
    ).with_attr("global_symbol", "main")
    ctx = ms.TuneContext(mod=tvm.IRModule({"main": func}), target=target, space_generator="post-order-apply",
                         search_strategy="replay-trace", task_name="attention", rand_state=7, num_threads=1)
    (space,) = ctx.generate_design_space()
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    space.trace.apply_to_schedule(sch, remove_postproc=True)
    assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
    q, k_in, v, ref = _bf16_operands(2, 100, 70, 64, 64, "kt")
    out = _run_bf16(tvm.compile(sch.mod, target=target), q, k_in, v, 64)
    assert np.abs(out - ref).max() < BF16_ATOL


@pytest.mark.parametrize("engine", ["avx512bf16", "avx512vnni"])
def test_bf16_dot_design_space_replays_every_decision(dpbf16_target, engine, request):
    """The rule's sampled register tiles (rows and vectors of both GEMMs) each replay and compute right,
    on vdpbf16ps and with int8 scores (against the float reference: int8's tolerance)."""
    import itertools

    target, _ = dpbf16_target
    if engine == "avx512vnni":
        request.getfixturevalue("vnni_target")
    tiles = kc.CpuTiles(32, 32, 16)
    func = kc.make_primfunc(2, 64, 40, 32, 32, 32**-0.5, "bfloat16", tiles, k_layout="k", engine=engine)
    func = func.with_attr("global_symbol", "main")
    sampled = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    kc.apply_schedule(sampled, sample=True)
    trace = sampled.trace
    decisions = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(decisions) == 4
    q, k_in, v, ref = _bf16_operands(2, 64, 40, 32, 32, "k")
    for picks in itertools.product(*[(0, len(inst.attrs[0]) - 1) for inst in decisions]):
        for inst, pick in zip(decisions, picks):
            trace = trace.with_decision(inst, pick, remove_postproc=True)
        replayed = s_tir.Schedule(tvm.IRModule({"main": func}))
        trace.apply_to_schedule(replayed, remove_postproc=True)
        out = _run_bf16(tvm.compile(replayed.mod, target=target), q, k_in, v, 32)
        assert np.abs(out - ref).max() < (3 * BF16_ATOL if engine == "avx512vnni" else BF16_ATOL), picks


def test_bf16_attention_takes_the_engine_the_target_has():
    from autotune.passes.quantize import quantize
    from autotune.support.targets import resolve_target

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    inputs = {name: torch.randn(1, 2, 48, 32) for name in "qkv"}
    # (no bf16 arithmetic, AVX-512 or AVX2: the kernel computes float32 on the bf16 values). Every
    # kernel reads K as it is (`_k_`), the scale 32^-0.5 folded in, though the bf16 import casts Kᵀ
    # after the transpose (read as Kᵀ, it cost the DiT block a 17 ms strided copy)
    for preset, suffix in (("x86-amx", "_bfloat16_k_s0p176777_amx"), ("x86-avx512-bf16", "_bfloat16_k_s0p176777_vdpbf16ps"),
                           ("x86-avx512", "_float32_k_s0p176777")):
        bf16, _ = quantize(from_torch(module, inputs), "bf16", preset)
        fused = fuse_attention(bf16.mod, resolve_target(preset).tvm_target())
        names = [n for n, f in prim_funcs(fused).items() if is_attention_kernel(f)]
        assert len(names) == 1 and names[0].endswith(suffix), (preset, names)


def test_profile_counts_the_attention_kernels_gemm_flops_at_every_precision():
    """The profiler's GFLOP/s: TVM's estimator cannot see into the bf16 kernels' tensorized dot
    products (it counted 1.99 of the DiT self-attention's 15 GFLOP); both GEMMs are counted instead."""
    from autotune.build.compile import count_kernel_flops
    from autotune.passes.quantize import quantize
    from autotune.support.targets import resolve_target

    module = torch.nn.Module()
    module.forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    inputs = {name: torch.randn(1, 2, 48, 32) for name in "qkv"}
    for preset, mode in (("x86-avx512-bf16", "bf16"), ("x86-avx512", None)):
        imported = from_torch(module, inputs)
        mod = quantize(imported, mode, preset)[0].mod if mode else imported.mod
        fused = fuse_attention(mod, resolve_target(preset).tvm_target())
        flops = {n: f for n, f in count_kernel_flops(fused).items() if is_attention_kernel(prim_funcs(fused)[n])}
        assert list(flops.values()) == [2.0 * 2 * 48 * 48 * (32 + 32)], (preset, flops)


@pytest.mark.slow
# --- 32,760 tokens ---------------------------------------------------------------------------------


def _allocations(func, target) -> list[int]:
    """Bytes of every buffer the lowered kernel allocates."""
    passes = [s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
              s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation()]
    lowered = tvm.transform.Sequential(passes)(tvm.IRModule({"main": func}))
    sizes = []
    for dims, dtype in re.findall(r'T\.sblock_alloc_buffer\(\(([^)]*)\)(?:, "(\w+)")?', lowered.script()):
        elems = math.prod(int(x) for x in dims.replace("T.int64", "").replace("(", "").replace(")", "").split(",") if x.strip())
        sizes.append(elems * tvm.runtime.DataType(dtype or "float32").bits // 8)
    assert sizes
    return sizes


def test_32760_tokens_cpu_kernel_allocates_o_tokens_x_head_dim():
    target = cpu_target()
    tokens, d = 32760, 128
    func = kc.make_primfunc(1, tokens, tokens, d, d, d**-0.5, "float32", kc.choose_tiles(tokens, tokens, d, d, kc.vector_lanes(target)))
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    kc.apply_schedule(sch)
    sizes = _allocations(sch.mod["main"], target)
    scores = tokens * tokens * 4  # 4.3 GB: what a materialised score matrix needs
    assert max(sizes) <= 2 * tokens * d * 4  # the packed/padded K or V copy, 16.8 MB
    assert sum(sizes) < scores / 50


def test_32760_key_tokens_cpu_run_in_bounded_memory():
    """A few query tiles against all 32,760 keys (d=128, one head), in a fresh process; peak RSS
    growth stays far below the 4.3 GB of a 32,760^2 score matrix (and below its 256-row slice)."""
    result = run_fresh(
        """
        import resource, numpy as np, autotune, tvm
        from autotune.kernels import attention_cpu as kc
        LQ, LK, D = 256, 32760, 128
        target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
        lib = kc.compile_standalone(1, LQ, LK, D, D, target)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, LQ, D), dtype=np.float32)
        kt = rng.standard_normal((1, D, LK), dtype=np.float32)
        v = rng.standard_normal((1, LK, D), dtype=np.float32)
        args = [tvm.runtime.tensor(x) for x in (q, kt, v)] + [tvm.runtime.tensor(np.zeros((1, LQ, D), np.float32))]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lib["main"](*args)
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        s = (q[0, :32].astype(np.float64) @ kt[0].astype(np.float64)) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        print("GROWTH_KB", growth, "ERR", float(np.abs(args[3].numpy()[0, :32] - p @ v[0]).max()))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fields = result.stdout.split()
    growth_kb, err = int(fields[fields.index("GROWTH_KB") + 1]), float(fields[fields.index("ERR") + 1])
    assert err < 1e-5
    assert growth_kb < 96 * 1024, f"peak RSS grew by {growth_kb / 1024:.0f} MiB"


@pytest.mark.slow
def test_32760_tokens_full_single_head_cpu_run_in_bounded_memory():
    result = run_fresh(
        """
        import resource, numpy as np, autotune, tvm
        from autotune.kernels import attention_cpu as kc
        L, D = 32760, 128
        target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
        lib = kc.compile_standalone(1, L, L, D, D, target)
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.standard_normal(s, dtype=np.float32)) for s in ((1, L, D), (1, D, L), (1, L, D), (1, L, D))]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lib["main"](*args)
        print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fields = result.stdout.split()
    assert int(fields[fields.index("GROWTH_KB") + 1]) < 256 * 1024


def test_32760_tokens_compile_for_cuda_sm90():
    tokens, d = 32760, 128
    q, k, v = (torch.randn(1, 1, tokens, d) for _ in range(3))
    imported = from_torch(CrossAttention(), {"q": q, "k": k, "v": v})
    mod = fuse_attention(imported.mod, CUDA)
    assert count_fused_attention(mod) == 1
    # Nothing of size tokens x tokens is left anywhere in the module.
    assert f"{tokens}, {tokens}" not in mod.script()
    from autotune.build.fallback import schedule_untuned

    fused = fuse_for_target(mod, CUDA)
    fused, _ = schedule_untuned(fused, CUDA)
    with CUDA:
        lowered = tvm.transform.Sequential(finalize_passes(CUDA))(fused)
    executable = tvm.compile(lowered, target=CUDA, relax_pipeline=None)

    def find(module, kind):
        if module.kind == kind:
            return module
        for sub in module.imports:
            found = find(sub, kind)
            if found is not None:
                return found
        return None

    cuda = find(executable.mod, "cuda")
    assert cuda is not None
    source = cuda.inspect_source()
    assert "fused_attention_cuda" in source and "__shared__" in source
