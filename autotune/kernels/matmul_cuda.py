"""Tensor-core GEMMs for CUDA: bf16 and fp16 matmuls on wmma (16x16x16 fragments, float32 accumulation).

TVM 0.27 registers wmma intrinsics for float16 and int8 only, and dlight's tensor-core rule
(`dlight.gpu.MatmulTensorization`, used by `dlight.gpu.Matmul` for float16 inputs) asks for the
float16 group by name. bfloat16 fragments are the same 16x16x16 shapes on sm_80+, with the same
`nvcuda::wmma` calls, so this module registers the bfloat16 intrinsics under TVM's naming scheme
(`wmma_load_16x16x16_bf16_a_shared_dyn`, ...) and `TensorCoreMatmul` runs dlight's rule with the
group of the kernel's input dtype (support.tvm_compat.dlight_wmma_tensorization). Kernels without a tuning record get it as their fallback, so an
untuned CUDA build already computes its GEMMs on tensor cores.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from autotune.support.cuda_library import sm_version
from autotune.support.tvm_compat import (
    dlight_wmma_tensorization,
    fast_tvmscript,
    import_tensor_intrin_fast,
)

import_tensor_intrin_fast()
from tvm.s_tir.tensor_intrin import cuda as cuda_intrin  # noqa: E402 - after the fast import above
from tvm.s_tir.tensor_intrin.cuda import TensorIntrin  # noqa: E402

# A GEMM whose static M, N or K is below one 16x16x16 fragment is a GEMV or a dot product: memory
# bound, left to dlight's GEMV/reduction rules. dlight's Matmul tensorizes only above 64; smaller
# GEMMs are padded to the tile here (a few idle fragments, but the math stays on tensor cores).
MIN_EXTENT = 16
# input dtype -> (TVM's short name in intrinsic names, the lowest sm that has its wmma fragments)
TENSOR_CORE_DTYPES = {"float16": ("f16", 70), "bfloat16": ("bf16", 80)}


def _register_bf16_intrinsics() -> None:
    short = "bf16"
    for scope in ("shared", "shared.dyn"):
        suffix = scope.replace(".", "_")
        for operand, is_b in (("a", False), ("b", True)):
            for trans in (False, True):
                name = f"wmma_load_16x16x16_{short}_{operand}{'_trans' if trans else ''}_{suffix}"
                TensorIntrin.register(  # column-major exactly when transposed, as TVM's float16 ones
                    name, *cuda_intrin.get_wmma_load_intrin(16, 16, 16, "bfloat16", scope, is_b, trans), override=True
                )
    for trans in (False, True):
        name = f"wmma_sync_16x16x16_{short}{short}f32{'_trans' if trans else ''}"
        TensorIntrin.register(
            name, *cuda_intrin.get_wmma_sync_intrin(16, 16, 16, "bfloat16", "float32", trans), override=True
        )


with fast_tvmscript():
    _register_bf16_intrinsics()


# TVM's own, kept: while dlight tensorizes, tensor_intrin.cuda's name points at ours.
_TVM_WMMA_GROUP = cuda_intrin.get_wmma_intrin_group


def wmma_intrin_group(load_scope: str, store_scope: str, in_dtype: str, out_dtype: str, trans_b: bool) -> dict[str, str]:
    """`tensor_intrin.cuda.get_wmma_intrin_group`, for bfloat16 inputs too."""
    if in_dtype != "bfloat16":
        return _TVM_WMMA_GROUP(load_scope, store_scope, in_dtype, out_dtype, trans_b)
    group = _TVM_WMMA_GROUP(load_scope, store_scope, "float16", out_dtype, trans_b)
    # bfloat16 accumulates in float32 only: a float16-output group names an intrinsic nobody
    # registered, so tensorizing with it fails and dlight gives up on the kernel, as it should.
    group["load_a"] = group["load_a"].replace("_f16_", "_bf16_")
    group["load_b"] = group["load_b"].replace("_f16_", "_bf16_")
    group["compute"] = group["compute"].replace("f16f16", "bf16bf16")
    return group


def gemm_shape(func: tirx.PrimFunc):
    """(in_dtype, out_dtype, [I, J, K] extents) of a kernel's GEMM, normalized as dlight does; None if none."""
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks

    sch = s_tir.Schedule(func)
    blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if not blocks:
        return None
    main = blocks[0]
    stmt = sch.get(main)
    if len(stmt.reads) < 2 or get_index_map(stmt) is None:
        return None
    in_dtype, out_dtype = stmt.reads[0].source.dtype, stmt.writes[0].source.dtype
    try:
        for i, kind in ((0, "read"), (1, "read")):
            sch.reindex(main, (kind, i))
        sch.reindex(main, ("write", 0))
        matmul_map = get_index_map(sch.get(main))[0]
        sch.transform_block_layout(main, matmul_map)
    except Exception:  # noqa: BLE001 - not a GEMM dlight can normalize: no tensor-core schedule
        return None
    extents = [iv.dom.extent for iv in sch.get(main).iter_vars[1:]]
    return in_dtype, out_dtype, extents


def tensor_core_gemm_dtype(func: tirx.PrimFunc) -> str | None:
    """The input dtype of `func`'s GEMM when it is one tensor cores serve (static M, N, K all
    MIN_EXTENT or more; a batch of them counts), else None: a GEMV, a dot product or no GEMM."""
    shape = gemm_shape(func)
    if shape is None:
        return None
    in_dtype, _, extents = shape
    if any(isinstance(e, tirx.IntImm) and e.value < MIN_EXTENT for e in extents):
        return None
    return str(in_dtype)


class TensorCoreMatmul(GPUScheduleRule):
    """dlight's wmma matmul schedule for float16 and bfloat16 GEMMs with M, N, K of MIN_EXTENT or more."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        in_dtype = tensor_core_gemm_dtype(func)
        if in_dtype not in TENSOR_CORE_DTYPES or (sm_version(target.attrs.get("arch", "")) or -1) < TENSOR_CORE_DTYPES[in_dtype][1]:
            return None
        kernel_dtype = in_dtype

        def group(load_scope, store_scope, in_dtype, out_dtype, trans_b):  # dlight asks for float16's
            return wmma_intrin_group(load_scope, store_scope, kernel_dtype, out_dtype, trans_b)

        return dlight_wmma_tensorization(func, target, group)


def tensor_core_search_rules() -> list:
    """MetaSchedule's CUDA schedule rules led by tensor-core tiling of float16 and bfloat16 GEMMs
    (wmma fragments, float32 accumulation): what `autotune tune` searches for a CUDA target."""
    from tvm.s_tir import meta_schedule as ms

    groups = [
        wmma_intrin_group("shared.dyn", "shared.dyn", dtype, "float32", trans_b)
        for dtype in TENSOR_CORE_DTYPES
        for trans_b in (False, True)
    ]
    tensor_cores = ms.schedule_rule.MultiLevelTilingTensorCore(
        intrin_groups=groups,
        structure="SSSRRSRS",
        tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"],
        max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=ms.schedule_rule.ReuseType(req="must", levels=[4], scope="shared.dyn"),
        reuse_write=ms.schedule_rule.ReuseType(req="must", levels=[2], scope="shared.dyn"),
    )
    # shared.dyn as dlight uses: with static "shared" TVM 0.27 fails to lower nearly every sample
    # (tvm_access_ptr dtype check); with it about a third of the valid samples lower, the rest are
    # build errors MetaSchedule skips.
    return [tensor_cores, *ms.ScheduleRule.create("cuda")]
