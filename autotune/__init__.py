"""autotune: hardware-aware auto-tuning of image-to-video diffusion models on TVM.

    import autotune
    m = autotune.load("out/wan-i2v-tiny-x86/transformer", device="cpu")
    y = m(hidden_states=x, timestep=t, encoder_hidden_states=txt, encoder_hidden_states_image=img)
"""

from autotune.support.threads import configure_threads

configure_threads()  # before anything imports tvm

__version__ = "0.1.0"


def load(path, device: str = "cpu", **options):
    """Load a built artifact (its `.so`, `.json` or stem) for `device` ("cpu", "cuda", "cuda:1").

    options: verify_hashes=True checks the sha256 of library and weights; check_finite=True
    rejects inputs with NaN/Inf; layers="stream" | "resident" | "auto" for a block-wise artifact
    (the Wan transformer): read each layer's weights as it runs, or keep them all in memory
    (auto: resident when they take under half the memory available).
    """
    from autotune.runtime.loader import load as _load

    return _load(path, device=device, **options)


__all__ = ["load", "__version__"]
