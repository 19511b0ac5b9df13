"""`autotune.load`: an artifact's metadata says which kind of module runs it."""

from __future__ import annotations

from pathlib import Path

from .blockwise import BlockwiseModule, is_blockwise
from .module import CompiledModule


def load(path: str | Path, device: str = "cpu", **kwargs) -> CompiledModule:
    """A CompiledModule, or a BlockwiseModule (same calls) when `path` names a block-wise manifest."""
    if is_blockwise(path):
        return BlockwiseModule(path, device=device, **kwargs)
    return CompiledModule(path, device=device, **kwargs)
