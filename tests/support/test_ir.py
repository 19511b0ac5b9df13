"""support/ir.py's rewrites that several passes share, against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from autotune.support import ir


@pytest.mark.parametrize("dtype, low, high", [("float32", -0.5, 0.75), ("float16", 0.25, math.inf), ("float32", -math.inf, 0), ("float32", 0, 1)])
def test_clip_as_min_max_clamps_as_numpy_does(dtype, low, high):
    """clip with scalar bounds (float, infinite, or integer) as maximum / minimum on constants of
    x's dtype: the same values as numpy's clip, exactly; tensor bounds are left to the caller."""
    x = relax.Var("x", relax.TensorType([7], dtype))
    call = relax.op.clip(x, low, high)  # (scalar bounds: FloatImm, or IntImm for integers)
    rewritten = ir.clip_as_min_max(call)
    assert rewritten is not None and "clip" not in str(rewritten)
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        builder.emit_func_output(builder.emit(rewritten))
    vm = relax.VirtualMachine(tvm.compile(builder.get(), "llvm"), tvm.cpu())
    values = np.linspace(-2, 2, 7).astype(dtype)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(values)).numpy(), np.clip(values, low, high))
    bound = relax.Var("bound", relax.TensorType([], dtype))
    assert ir.clip_as_min_max(relax.Call(call.op, [x, bound, bound])) is None
