"""The compile, declared once: which passes run, in which order, for each target kind.

Tuning and building must see the *same* kernels: MetaSchedule files records under the structural
hash of each fused PrimFunc, so a build that prepares or fuses differently (or re-fuses an already
fused module) silently misses every record. Both call the phases below, and nothing else does.

    phase      when                       what                                         target kinds
    prepare    before fusing (weights)    drop causal zero-padding taps; quantize (a   all
                                          --quantize mode); move weight matmuls, and
                                          convolutions as im2col GEMMs, onto the CPU's
                                          matrix engines (AMX / AVX512-BF16 / VNNI / AVX2;
                                          float32 on AVX2-only CPUs, ARM), weights packed;
                                          3x3 convolutions as Winograd GEMMs (CPU: bf16
                                          and int8-weight ones on the bf16 engines first,
                                          float32 ones left after);
                                          precompute weight-only work (transposes);
                                          int8 modes: attention in bf16 where the CPU
                                          multiplies bf16 (AMX / AVX512-BF16), w8a8's
                                          Q.K^T in int8 where VNNI is (not on AMX)
    fuse       the tuning tasks           fuse attention into one kernel; legalize     all; CPU adds fast
                                          (CPU: vectorisable fast math), annotate,     math and marks large
                                          fold constants, fuse, FuseTIR, DCE           weights layout-free
    -- tune: MetaSchedule searches these kernels | build: apply the log, fallback schedules --
               (search space: TVM's post-order-apply; CUDA: led by tensor-core tiling, tuning_space)
    pack       after scheduling           run the tuned kernels' weight packing once   CPU (marked weights)
    finalize   to VM code                 TVM's own lowering for the target kind       llvm: cpu_generic,
                                                                                       cuda: cuda backend,
                                                                                       CUDA graphs on
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tvm
from tvm import relax

from autotune.frontend.importer import ImportedModel
from autotune.kernels import gemm_cpu

from .attention import (  # also registers the attention schedule rule
    find_attention,
    fuse_attention,
    has_int8_scores,
    with_compute_dtype,
)
from .causal_padding import drop_causal_padding_in
from .conv_gemm import convolutions_as_gemm
from .fast_math import cpu_fast_math_legalizations
from .matrix_engine import (  # also registers the GEMM schedule rule and intrinsics
    convolutions_in_float32,
    use_matrix_engine,
)
from .weight_prepack import mark_layout_free, pack_weights
from .weight_transforms import precompute_weight_transforms
from .winograd import convolutions_as_winograd

ENGINE_MODES = ("bf16", "int8-weight", "w8a8")  # the --quantize modes the CPU's matrix engines take


def prepare_model(imported: ImportedModel, preset, quantize_mode: str | None,
                  winograd: bool = True) -> tuple[ImportedModel, dict | None]:
    """Phase 1. Returns the prepared model and the quantization's report (None without one).
    `winograd`: False leaves the 3x3 convolutions direct or im2col GEMMs (their weights at their own
    size: Winograd's transformed weights are 4x a 3x3 weight in float32, 16/9x on the engines).

    A quantization mode rewrites the linears and convolutions itself (its weights are stored
    pre-transposed and its dequantisation must stay inside the kernels), so the causal padding is
    dropped after it, on the quantized weights; otherwise weight transforms are precomputed."""
    target = preset.tvm_target()
    if quantize_mode:
        from .quantize import quantize

        quantized, info = quantize(imported, quantize_mode, preset)
        if "note" in info:  # nothing to quantize (no linear or convolution): the float32 build, notes aside
            unchanged = _prepare_float32(replace(imported, notes=quantized.notes), target, winograd)
            return unchanged, {**info, "weight_bytes_after": unchanged.weight_bytes()}
        quantized = drop_causal_padding_in(quantized)
        if quantize_mode in ENGINE_MODES and target.kind.name == "llvm":
            int8_activations = quantize_mode == "w8a8"
            taken = 0
            if winograd:
                quantized, taken = convolutions_as_winograd(quantized, target, engines=True, int8_activations=int8_activations)
            quantized, moved = _onto_matrix_engines(quantized, target, int8_activations=int8_activations)
            if taken:
                moved["winograd"] = taken
            if (taken or "convolutions_as_gemm" in moved) and "matrix_engine" not in moved:
                quantized = precompute_weight_transforms(quantized)  # (else its weight packing precomputed them too)
            quantized, convs = convolutions_in_float32(quantized)
            info = {**info, **moved}
            if convs:
                info = {**info, "convolutions_in_float32": convs}
            info["weight_bytes_after"] = quantized.weight_bytes()
            if quantize_mode != "bf16" and gemm_cpu.target_isa(target, gemm_cpu.BF16) in gemm_cpu.BF16_ARITHMETIC:
                quantized, attentions, int8_scores = _attention_in_bf16(quantized, quantize_mode == "w8a8", target)
                if attentions:
                    info["attention_dtype"] = "bfloat16"
                if int8_scores:
                    info["attention_scores"] = "int8"
        missing = _missing_engine(quantize_mode, target, preset)
        if missing:
            quantized = replace(quantized, notes=quantized.notes + [missing])
        return quantized, info
    return _prepare_float32(imported, target, winograd), None


def _onto_matrix_engines(model: ImportedModel, target: tvm.target.Target,
                         int8_activations: bool = False) -> tuple[ImportedModel, dict]:
    """Convolutions as im2col GEMMs (w8a8: on int8 rows), then weight matmuls onto the CPU target's
    matrix engines (their weight packing precomputed). Returns (model, what moved:
    convolutions_as_gemm, matrix_engine)."""
    model, conv_gemms = convolutions_as_gemm(model, target, int8_activations)
    model, engines = use_matrix_engine(model, target)
    moved = {"convolutions_as_gemm": conv_gemms} if conv_gemms else {}
    return model, {**moved, "matrix_engine": engines} if engines else moved


def _attention_in_bf16(model: ImportedModel, w8a8: bool, target) -> tuple[ImportedModel, int, bool]:
    """int8-weight and w8a8 on a CPU with bf16 arithmetic: the attentions (no weights to quantize)
    compute in bf16 as the bf16 build's do (float32 accumulation), not in float32: on a Zen 4 the
    DiT block's three took 119 ms in float32 against 75 ms in bf16. Under w8a8 on a CPU with VNNI,
    their Q.K^T runs on the int8 engine where the bf16 kernel would run it on vdpbf16ps (not on AMX
    tiles): queries quantized per row, keys per key after their mean is taken out (which softmax
    cannot see), P.V in bf16; the DiT block's three attentions 0.85x the bf16 kernel's time (Zen 4).
    Returns (model, how many, whether their scores are int8)."""
    found = sum(len(find_attention(f)) for f in model.mod.functions.values() if isinstance(f, relax.Function))
    if not found:
        return model, 0, False
    int8_scores = w8a8 and has_int8_scores(target) and gemm_cpu.target_isa(target, gemm_cpu.BF16) == gemm_cpu.AVX512
    note = f"{found} attention(s) computed in bf16 (float32 accumulation and softmax), as in the bf16 build"
    if int8_scores:
        note += ("; their Q.K^T in int8 on VNNI (queries per row, keys per key less the keys' mean, "
                 "int32 accumulation), P.V in bf16")
    mod = with_compute_dtype(model.mod, "bfloat16", int8_scores)
    return replace(model, mod=mod, notes=model.notes + [note]), found, int8_scores


def _prepare_float32(model: ImportedModel, target: tvm.target.Target, winograd: bool = True) -> ImportedModel:
    """The float32 build's phase 1: causal padding dropped, large matmuls and convolutions on the
    float32 engine where the CPU target has one (AVX2 without AVX-512; ARM), the 3x3 convolutions left
    as Winograd GEMMs (CPU), weight-only work precomputed."""
    model = drop_causal_padding_in(model)
    if target.kind.name == "llvm":
        # the float32 engine's 3x3 convolutions (AVX2) as Winograd GEMMs on it, conv_gemm taking the rest;
        # without a float32 engine (AVX-512), the 3x3 ones left as Winograd GEMMs of MetaSchedule's
        model, on_engine = convolutions_as_winograd(model, target, engines=True) if winograd else (model, 0)
        model, moved = _onto_matrix_engines(model, target)
        model, taken = convolutions_as_winograd(model, target) if winograd else (model, 0)
        if "matrix_engine" in moved and not taken and not on_engine:  # (its weight packing is precomputed with the transposes)
            return model
    return precompute_weight_transforms(model)


def _missing_engine(mode: str, target: tvm.target.Target, preset) -> str | None:
    """What a user should know when the CPU target has no matrix engine for `mode`'s matmuls."""
    if mode not in ENGINE_MODES or target.kind.name != "llvm":
        return None
    precision = gemm_cpu.INT8 if mode == "w8a8" else gemm_cpu.BF16
    if gemm_cpu.target_isa(target, precision) is not None:
        return None
    # (every ARM target has one: NEON FMA for bf16 and int8-weight; w8a8 without SDOT is refused)
    wanted = "AMX-INT8, AVX512-VNNI or AVX2" if mode == "w8a8" else "AMX-BF16, AVX512-BF16 or AVX2 with FMA"
    where = f"an x86 CPU with {wanted}"
    gain = "its int8 weights are 4x smaller than float32" if mode == "int8-weight" else "it shrinks the weights"
    return (f"{mode}: target {preset.name} has no {wanted} matrix engine, so its matmuls run on generic kernels, "
            f"about as fast as float32 or slower; {gain}. For its speed, build for {where}.")


def _module_pass(name: str, function):
    return tvm.transform.module_pass(lambda mod, _ctx: function(mod), opt_level=0, name=name)


def fuse_passes(target: tvm.target.Target) -> list:
    """Phase 2's passes for `target`: every operator becomes a PrimFunc (a tuning task)."""
    cpu = target.kind.name == "llvm"
    passes = [
        _module_pass("FuseAttention", lambda mod: fuse_attention(mod, target)),
        relax.transform.LegalizeOps(customize_legalize_map=cpu_fast_math_legalizations() if cpu else None),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    if cpu:
        passes.append(_module_pass("MarkLayoutFree", lambda mod: mark_layout_free(mod, target)))
    return passes


def fuse_for_target(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Phase 2: the module of kernels that tuning searches and the build schedules."""
    with target:
        return tvm.transform.Sequential(fuse_passes(target))(mod)


def tuning_space(target: tvm.target.Target):
    """The design space MetaSchedule searches for `target`'s kernels.

    CPU: TVM's default rules (ours, for attention and matrix-engine GEMMs, are registered custom
    rules it applies). CUDA: tensor-core tiling first, for bf16 and fp16 GEMMs, whose postprocessors
    and mutators are TVM's tensor-core ones."""
    if target.kind.name != "cuda":
        return "post-order-apply"
    from tvm.s_tir import meta_schedule as ms

    from autotune.kernels.matmul_cuda import tensor_core_search_rules

    return ms.space_generator.PostOrderApply(
        sch_rules=tensor_core_search_rules(), postprocs="cuda-tensorcore", mutator_probs="cuda-tensorcore"
    )


def pack_for_target(mod: tvm.IRModule, weights: dict[str, np.ndarray], num_input: int):
    """Phase 3: (module taking packed weights, the weights to ship, how many were packed)."""
    return pack_weights(mod, weights, num_input)


def finalize_passes(target: tvm.target.Target) -> list:
    """Phase 4: lower a scheduled module to VM code with TVM's own passes for the target kind."""
    # Taken from the backend modules: the re-export in relax.pipeline raises AttributeError in
    # TVM 0.27, and callers that catch it fall back quietly.
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    return backend.dataflow_lower_passes(target) + backend.finalize_passes(target)


# CUDA: the VM's kernel launches between allocations of static shape are captured once into a
# CUDA graph and replayed (TVM's RewriteCUDAGraph, in the CUDA finalize passes, reads this).
CUDA_GRAPH_CONFIG = {"relax.backend.use_cuda_graph": True}


def lower(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Phase 4 applied."""
    config = CUDA_GRAPH_CONFIG if target.kind.name == "cuda" else {}
    with target, tvm.transform.PassContext(config=config):
        return tvm.transform.Sequential(finalize_passes(target))(mod)
