"""Hand-written TIR kernels (templates + schedules) that MetaSchedule cannot find by itself.

attention_cpu:  flash-style attention for LLVM CPU targets (a structured PrimFunc, a default
                schedule, and a MetaSchedule custom rule whose tile sizes are sampled decisions).
attention_cuda: flash-style attention for CUDA (a scheduled, thread-bound PrimFunc).

May import: support.
"""
