"""The shipped artifact: `NAME.so` + `NAME.weights.safetensors` + `NAME.json` (metadata).

The metadata says what the library was built for and from (target, device, signature, passes,
tvm/autotune versions, log digest) and the size and sha256 of the library and weights files, so
the runtime can refuse a mismatched pair before it touches native code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.support.errors import ArtifactError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArtifactPaths:
    library: Path
    weights: Path
    metadata: Path

    @staticmethod
    def for_library(library: str | Path) -> "ArtifactPaths":
        """Paths of an artifact given its `.so`, its metadata `.json`, or its stem."""
        library = Path(library)
        if library.suffix in (".so", ".json"):
            library = library.with_suffix("")
        stem = library
        return ArtifactPaths(
            library=stem.with_name(stem.name + ".so"),
            weights=stem.with_name(stem.name + ".weights.safetensors"),
            metadata=stem.with_name(stem.name + ".json"),
        )


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


FLOAT16_MAX = 65504.0  # the largest finite float16


def stored_in_float16(value: np.ndarray) -> bool:
    """Whether `save_weights(..., float16=True)` stores this array as float16: a float32 matrix (2-D
    or more: weights, not the biases, norm scales and tables beside them) whose finite values
    float16's range holds."""
    if value.dtype != np.float32 or value.ndim < 2:
        return False
    if max(float(value.max(initial=0.0)), -float(value.min(initial=0.0))) <= FLOAT16_MAX:  # (no copy; no inf or nan)
        return True
    finite = value[np.isfinite(value)]  # (a copy: only where an inf, a nan or a large value is there)
    return finite.size == 0 or float(np.abs(finite).max()) <= FLOAT16_MAX


def save_weights(path: Path, weights: dict[str, np.ndarray], float16: bool = False) -> int:
    """Save weights as safetensors (bf16 and fp8 stored via ml_dtypes-compatible raw views).

    `float16`: every array `stored_in_float16` takes is rounded to float16 in the file and widened
    back to float32 when read (x86 fp16 builds: float32 kernels, half the file). Returns the bytes
    of the arrays as stored."""
    from safetensors.numpy import save_file

    tensors, dtypes, widened = {}, {}, {}
    for name, value in weights.items():
        value = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
        if float16 and stored_in_float16(value):
            widened[name] = "float32"
            value = value.astype(np.float16)
        elif value.dtype.kind == "V" or value.dtype.name in ("bfloat16", "float8_e4m3fn"):
            dtypes[name] = value.dtype.name
            value = value.view(np.uint8 if value.dtype.itemsize == 1 else np.uint16)
        tensors[name] = value
    save_file(tensors, str(path), metadata={"autotune_dtypes": json.dumps(dtypes), "autotune_widened": json.dumps(widened)})
    return sum(int(v.nbytes) for v in tensors.values())


def iter_weights(path: Path, names: list[str]):
    """(name, array) for each of `names`, read one at a time from the (memory-mapped) file; arrays
    stored float16 for a float32 kernel come widened to float32."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        dtypes = json.loads(metadata.get("autotune_dtypes", "{}"))
        widened = json.loads(metadata.get("autotune_widened", "{}"))
        missing = [n for n in names if n not in f.keys()]
        if missing:
            raise ArtifactError(f"{path}: weights {missing[:5]} are missing ({len(missing)} in all); rebuild the artifact")
        for name in names:
            value = f.get_tensor(name)
            if name in dtypes:
                import ml_dtypes

                value = value.view(getattr(ml_dtypes, dtypes[name]))
            elif name in widened:
                value = value.astype(widened[name])
            yield name, value


def load_weights(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    return dict(iter_weights(path, names))


def write_metadata(paths: ArtifactPaths, metadata: dict) -> None:
    metadata = dict(metadata)
    metadata["format_version"] = FORMAT_VERSION
    metadata["files"] = {
        "library": {"name": paths.library.name, "bytes": paths.library.stat().st_size, "sha256": file_digest(paths.library)},
        "weights": {"name": paths.weights.name, "bytes": paths.weights.stat().st_size, "sha256": file_digest(paths.weights)},
    }
    paths.metadata.write_text(json.dumps(metadata, indent=2) + "\n")


def read_metadata(paths: ArtifactPaths) -> dict:
    if not paths.metadata.exists():
        raise ArtifactError(
            f"{paths.metadata}: metadata file missing; an autotune artifact is NAME.so + NAME.weights.safetensors + "
            "NAME.json side by side. Rebuild with `autotune build`."
        )
    try:
        metadata = json.loads(paths.metadata.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{paths.metadata}: metadata is not valid JSON ({exc}); rebuild the artifact") from exc
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{paths.metadata}: artifact format {metadata.get('format_version')}, this autotune reads format "
            f"{FORMAT_VERSION}; rebuild it with this version"
        )
    return metadata


def check_file(path: Path, role: str, expected: dict, verify_hashes: bool = False) -> None:
    """`path` exists and matches the size (and, on request, the hash) recorded at build."""
    if not path.exists():
        raise ArtifactError(f"{path}: {role} file missing (expected {expected['bytes']} bytes); copy the whole artifact")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise ArtifactError(
            f"{path}: {role} file is {size} bytes, the artifact was built with {expected['bytes']}: it was "
            "truncated or belongs to another build. Rebuild or copy the matching file."
        )
    if verify_hashes and file_digest(path) != expected["sha256"]:
        raise ArtifactError(f"{path}: {role} file content differs from the build (sha256 mismatch)")


def check_files(paths: ArtifactPaths, metadata: dict, verify_hashes: bool = False) -> None:
    """The library and weights exist and match the sizes (and, on request, hashes) recorded at build."""
    for role, path in (("library", paths.library), ("weights", paths.weights)):
        expected = metadata["files"][role]
        if expected is None:  # a block-wise unit's weights come per call (checked with the manifest)
            continue
        check_file(path, role, expected, verify_hashes)
