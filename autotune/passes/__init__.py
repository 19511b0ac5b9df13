"""Relax rewrites between import and scheduling, and `pipeline`, which declares their order per
target kind once for tune and build: attention fusion, causal-padding drop, fast math, weight
precompute and packing, quantization.

May import: support, frontend (ImportedModel), kernels.
"""
