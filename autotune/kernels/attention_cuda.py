"""Flash-style attention for CUDA: the tensor-core kernel (attention_cuda_tc.py) for bf16/fp16, else
TVM's CUDA-core one.

The CUDA-core kernel is TVM's own tiled online-softmax prefill kernel (the one MLC-LLM ships,
`tvm.relax.frontend.nn.llm._prefill_kernels._attention_sequence_prefill`): one thread block per
(head, query tile), Q/K/V tiles staged in shared memory, S = Q.K^T and O += P.V as thread-bound
register-tiled GEMMs, fp32 accumulation, exp2-based online softmax. Nothing of size Lq x Lk is
ever allocated, so 32,760-token heads fit.

Layout: q (BH, Lq, 1, D), k (BH, Lk, 1, D), v (BH, Lk, 1, D) -> o (BH, Lq, 1, D) plus the
log-sum-exp (BH, Lq, 1), which the rewrite drops. Shapes are symbolic in the kernel, so one
PrimFunc serves every sequence length of a (D, dtype).

It is returned already scheduled (`tirx.is_scheduled`): MetaSchedule does not tune it, dlight
leaves it alone. Validated upstream on NVIDIA GPUs; here (no GPU) it is only compiled.
"""

from __future__ import annotations

import tvm

from autotune.support.cuda_library import sm_version
from autotune.support.ir import ATTENTION_ATTR as KERNEL_ATTR
from autotune.support.tvm_compat import attention_sequence_prefill


def make_primfunc(d: int, dtype: str, scale: float, target) -> "tvm.tirx.PrimFunc":
    """The scheduled CUDA kernel for head_dim `d`: (q, k, v, o, lse), scale applied inside.

    bf16 / fp16 at head_dim 64 or 128 get the tensor-core kernel (attention_cuda_tc.py); the rest
    (float32, other head dims, GPUs before sm_80 for bf16) TVM's CUDA-core one below."""
    from . import attention_cuda_tc

    if attention_cuda_tc.supports(d, dtype, sm_version(target.attrs.get("arch", "")) or 0):
        return attention_cuda_tc.make_primfunc(d, dtype, scale)
    try:
        prefill = attention_sequence_prefill()
    except ImportError as exc:  # a private TVM module; pinned TVM 0.27 has it
        raise NotImplementedError(
            f"this TVM ({tvm.__version__}) has no sequence-prefill attention kernel: {exc}"
        ) from exc
    func = prefill(1, 1, d, dtype, target, causal=0, sm_scale=float(scale))
    return func.with_attr(KERNEL_ATTR, {"d": d, "scale": float(scale), "layout": "BL1D"})
