"""`autotune bench`: every engine (torch eager, torch.compile, ONNX Runtime, TVM untuned and
tuned) on the same workloads, interleaved in one run, with the machine's measured peak.

May import: support, models, frontend, build, runtime.
"""
