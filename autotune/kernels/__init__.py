"""Hand-written TIR kernels (templates + schedules) that MetaSchedule cannot find by itself.

attention_cpu:  flash-style attention for LLVM CPU targets (a structured PrimFunc, a default
                schedule, and a MetaSchedule custom rule whose tile sizes are sampled decisions).
attention_cuda: flash-style attention for CUDA (a scheduled, thread-bound PrimFunc), which picks
                attention_cuda_tc: the bf16/fp16 one on wmma tensor cores (CUDA C++ device code).
matmul_cuda:    bf16/fp16 GEMMs on wmma tensor cores: dlight's rule with bf16 intrinsics, and the
                tensor-core search rules MetaSchedule tunes CUDA with.
gemm_cpu:       bf16 and int8 GEMMs with a packed weight on x86 matrix engines (AMX tiles, AVX512-BF16
                and VNNI dot products, AVX2's int16 multiply-add): tensor intrinsics, a default
                schedule, a MetaSchedule custom rule.
im2col:         the rows of a convolution computed as a GEMM.
token_quant:    w8a8's per-token activation quantizer, one pass per row (a default schedule; tuned
                by MetaSchedule's generic rules).

May import: support.
"""
