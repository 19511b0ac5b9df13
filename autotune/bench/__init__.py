"""`autotune bench`: every engine (torch eager, torch.compile, ONNX Runtime, OpenVINO, TVM untuned
and tuned) at each precision (fp32, bf16) on the same workloads, interleaved in one run, with the
machine's measured peak.

May import: support, models, frontend, build, runtime.
"""
