"""Our converters for the torch importer (autotune/frontend/converter_fixes.py), run against torch
eager: strided slice scatters (the Wan rotary embedding's `out[..., 0::2] = ...; out[..., 1::2] = ...`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from autotune.frontend.importer import from_torch

TOL = 1e-6  # the same float32 arithmetic as torch's; only the data movement differs


class _StridedScatters(torch.nn.Module):
    """`out[..., start::step] = part` for the given starts, over `base` (a copy of x, or zeros)."""

    def __init__(self, starts: list[int], step: int, zeros: bool):
        super().__init__()
        self.starts, self.step, self.zeros = starts, step, zeros

    def forward(self, x, cos, sin):
        out = torch.zeros_like(x) if self.zeros else x * 0.5
        parts = x.unflatten(-1, (-1, self.step)).unbind(-1)
        for i, start in enumerate(self.starts):
            out[..., start :: self.step] = parts[i] * cos[..., 0 :: self.step] - parts[-1 - i] * sin[..., 1 :: self.step]
        return out


def _import_and_run(module, inputs: dict) -> tuple[np.ndarray, list[str]]:
    imported = from_torch(module, inputs)
    ops = [b.value.op.name for block in imported.mod["main"].body.blocks for b in block.bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    executable = tvm.compile(imported.mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(v.numpy()) for v in inputs.values()], *[tvm.runtime.tensor(w) for w in imported.weights.values()])
    return out.numpy(), ops


@pytest.mark.parametrize(
    "starts, step, zeros, interleaved",
    [
        ([0, 1], 2, True, True),  # the rotary embedding: two parts cover the axis
        ([1, 0], 2, False, True),  # any order, over any base
        ([0, 2, 1], 3, True, True),  # three parts: the middle scatter stays a gather, the last interleaves
        ([0], 2, False, False),  # half the positions: the base keeps the rest
        ([1, 1], 2, True, False),  # the same part twice: the even positions keep zeros
    ],
)
def test_strided_scatters_match_torch_and_interleave_when_they_cover_the_axis(starts, step, zeros, interleaved):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 5, 3, 12), "cos": torch.randn(1, 5, 1, 12), "sin": torch.randn(1, 5, 1, 12)}
    module = _StridedScatters(starts, step, zeros).eval()
    out, ops = _import_and_run(module, inputs)
    expected = module(**inputs).numpy()
    assert out.shape == expected.shape
    assert np.max(np.abs(out - expected)) <= TOL
    assert ("relax.stack" in ops) == interleaved, ops
    # interleaved: the last scatter's gather and select are gone (the earlier ones are dead code)
    assert ops.count("relax.where") == len(starts) - (1 if interleaved else 0), ops


class _LinearOfTransposedView(torch.nn.Module):
    """A linear applied to a transposed view: torch's decomposition broadcasts the weight to (b, k, n)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 64)

    def forward(self, x):
        return self.linear(x.transpose(1, 2))


@pytest.mark.parametrize("batch", [1, 2])
def test_linear_of_a_transposed_view_keeps_a_2d_weight_and_goes_onto_the_matrix_engine(batch):
    from autotune.passes.pipeline import prepare_model
    from autotune.support.targets import resolve_target

    torch.manual_seed(0)
    module, inputs = _LinearOfTransposedView().eval(), {"x": torch.randn(batch, 32, 16)}
    out, ops = _import_and_run(module, inputs)
    assert np.max(np.abs(out - module(**inputs).detach().numpy())) <= 1e-5  # (a float32 GEMM's sums, reordered)
    imported = from_torch(module, inputs)
    [matmul] = [b.value for block in imported.mod["main"].body.blocks for b in block.bindings
                if isinstance(b.value, relax.Call) and b.value.op == tvm.ir.Op.get("relax.matmul")]
    assert [int(d) for d in matmul.args[1].ty.shape.values] == [32, 64], "the weight is broadcast again"
    _, info = prepare_model(imported, resolve_target("x86-avx512-bf16"), "bf16")
    assert info["matrix_engine"] == {"AVX512-BF16": 1}, info
