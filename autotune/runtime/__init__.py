"""Running artifacts: the artifact format (library, weights, metadata), loading with checks,
the one call convention on every device, per-kernel profiling.

May import: support. Nothing that needs torch or the compiler: an ARM board runs this package
with tvm, numpy and safetensors only.
"""
