"""Where the data autotune ships lives: target presets (`targets/`) and tuning logs (`schedules/`).

In the source tree (and an editable install) they are the top-level folders; a wheel carries
them inside the package as `autotune/_targets` and `autotune/_schedules` (pyproject.toml maps them).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent
_SOURCE_TREE = _PACKAGE.parent


def _find(name: str) -> Path | None:
    for candidate in (_PACKAGE / f"_{name}", _SOURCE_TREE / name):
        if candidate.is_dir():
            return candidate
    return None


def targets_dir() -> Path | None:
    """The folder of target presets (*.json), or None when autotune was installed without it."""
    return _find("targets")


def shipped_log_dir(family: str) -> Path | None:
    """The tuning log autotune ships for a target family ("x86", "arm", "cuda"), or None."""
    root = _find("schedules")
    log = root / family if root is not None else None
    return log if log is not None and any((log / name).is_file() for name in ("records.jsonl", "records.jsonl.gz")) else None
