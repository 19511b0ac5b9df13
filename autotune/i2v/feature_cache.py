"""Image-feature cache: the CLIP embedding and the VAE latent of the conditioning video, on disk.

Both depend only on the picture, the resolution / frame count, the model and the exact encoder
weights and code, so they are computed once and stored under a key that hashes all of these:

    key = sha256(image pixel digest, height, width, frames, model name, engine digest)

The engine digest names the encoders exactly: for compiled artifacts the sha256 of the
image_encoder and vae_encoder libraries and weights (from their metadata); for torch eager the
model name and the seeded-weights recipe or the checkpoint files' sizes and mtimes. A rebuilt
artifact therefore never serves stale features.

Entries are one `.npz` each (image_embeds, latent_mean: the VAE posterior mean before the
latents_mean/std normalisation) plus a small JSON sidecar, written atomically (temp + rename),
so concurrent generations and a crash mid-write never leave a half entry. A corrupt entry is
treated as a miss and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path(os.environ.get("AUTOTUNE_FEATURE_CACHE", Path.home() / ".cache" / "autotune" / "features"))
FORMAT = 1


def feature_key(image_digest: str, height: int, width: int, frames: int, model: str, engine_digest: str) -> str:
    text = json.dumps(
        {"format": FORMAT, "image": image_digest, "height": height, "width": width, "frames": frames,
         "model": model, "engine": engine_digest},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


class FeatureCache:
    """Directory of cached (image_embeds, latent_mean) entries keyed by `feature_key`."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else DEFAULT_DIR
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            with np.load(path) as data:
                entry = {"image_embeds": data["image_embeds"], "latent_mean": data["latent_mean"]}
        except Exception:  # truncated / corrupt: a miss, rewritten by the next put
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, image_embeds: np.ndarray, latent_mean: np.ndarray, info: dict | None = None) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, image_embeds=np.asarray(image_embeds, np.float32), latent_mean=np.asarray(latent_mean, np.float32))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if info is not None:
            sidecar = path.with_suffix(".json")
            tmp_json = sidecar.with_suffix(f".{os.getpid()}.tmp")
            tmp_json.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp_json, sidecar)
        return path

    def clear(self) -> int:
        """Delete every entry; returns how many were removed."""
        removed = 0
        if self.directory.exists():
            for p in self.directory.glob("*/*.npz"):
                p.unlink(missing_ok=True)
                p.with_suffix(".json").unlink(missing_ok=True)
                removed += 1
        return removed

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"
