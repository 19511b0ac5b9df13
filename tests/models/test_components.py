"""Every Wan component, imported from torch and compiled (untuned), matches torch eager."""

from __future__ import annotations

import pytest
from conftest import TINY_PIPELINE, max_abs_diff

import autotune
from autotune.frontend.sources import load_source
from autotune.support.errors import InputError
from autotune.support.resources import available_bytes

TOL = 1e-4  # fp32


@pytest.mark.parametrize("component", ["image_encoder", "vae_encoder", "vae_decoder"])
def test_component_compiled_matches_torch(tiny_pipeline_artifacts, component):
    """The pipeline's artifacts (conftest.TINY_PIPELINE: 9 frames, so the VAE decoder's causal-conv
    cache path from the 3rd latent frame on, where TVM 0.27's select.int(-1) read out of bounds until
    converter_fixes normalised it). The transformer: tests/build/test_blockwise.py (block-wise),
    tests/frontend/test_prune.py (whole, pruned)."""
    p = TINY_PIPELINE
    source = load_source(p["model"], component, height=p["height"], width=p["width"], frames=p["frames"])
    outs = autotune.load(tiny_pipeline_artifacts / f"{component}.so")(**source.example_inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for out, ref in zip(outs, source.reference_outputs()):
        assert out.shape == ref.shape
        assert max_abs_diff(out, ref) <= TOL


def test_14b_import_that_cannot_fit_is_refused_with_figures():
    """The 14B transformer needs ~3 fp32 copies of 16.4 B params at import: refused up front."""
    if available_bytes() > 200 * 2**30:
        pytest.skip("this machine has room for the 14B import")
    with pytest.raises(InputError) as err:
        load_source("wan2.1-i2v-14b-480p", "transformer")
    text = str(err.value)
    assert "16.39 B parameters" in text and "GiB of memory" in text and "available" in text
