"""Which CUDA kernels of a built library run on tensor cores, read from their SASS (no GPU needed).

`cuobjdump -sass` disassembles the fatbins embedded in the `.so` (support/cuda_library.py puts them there); a
kernel's tensor-core instructions are its HMMA (fp16/bf16 mma, wmma), HGMMA (Hopper wgmma), IMMA /
IGMMA (int8) and QMMA / QGMMA (fp8) lines. Each kernel of a TVM build is named after the PrimFunc
it came from (`<name>_kernel`, `<name>_kernel_1`, ...), which ties the SASS back to the kernels
the compiler saw: GEMMs (matmuls, batch matmuls, convolutions as implicit GEMM) and attention.

cuobjdump and nvdisasm come with the CUDA toolkit, or from PyPI (`pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`, the `cuda` extra of autotune).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from autotune.support.cuda_library import embedded_fatbins
from autotune.support.errors import BuildFailed

TENSOR_CORE_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QMMA", "QGMMA")
_OPCODE = re.compile(r"\b(" + "|".join(TENSOR_CORE_OPCODES) + r")\b")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
INSTALL_HINT = "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (or put the CUDA toolkit's bin/ on PATH)"


def find_cuda_tool(name: str) -> str | None:
    """`name` (cuobjdump, nvdisasm) on PATH, in $CUDA_HOME/bin, or from the nvidia-cuda-* wheels."""
    found = shutil.which(name)
    if found:
        return found
    roots = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for site in map(Path, sys.path):
        roots += sorted(site.glob("nvidia/*/bin"))
    for root in roots:
        if (root / name).is_file() and os.access(root / name, os.X_OK):
            return str(root / name)
    return None


def sass_of(fatbin: bytes) -> str:
    """The SASS listing of one fatbin image (cuobjdump -sass)."""
    cuobjdump, nvdisasm = find_cuda_tool("cuobjdump"), find_cuda_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        raise FileNotFoundError(f"reading SASS needs cuobjdump and nvdisasm: {INSTALL_HINT}")
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="autotune-sass-") as tmp:
        image = Path(tmp) / "kernels.fatbin"
        image.write_bytes(fatbin)
        proc = subprocess.run([cuobjdump, "-sass", str(image)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise BuildFailed(f"cuobjdump -sass failed on the built library's fatbin: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def tensor_core_counts(sass: str) -> dict[str, int]:
    """{kernel: number of tensor-core instructions} for every kernel in a SASS listing."""
    counts: dict[str, int] = {}
    starts = list(_FUNCTION.finditer(sass))
    for i, match in enumerate(starts):
        body = sass[match.end() : starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
        counts[match.group(1)] = counts.get(match.group(1), 0) + len(_OPCODE.findall(body))
    return counts


def _kernels_of(name: str) -> str:
    """The regex of a PrimFunc's kernel names: `<name>_kernel`, `<name>_kernel_1`, ..."""
    return re.escape(name) + r"_kernel(_\d+)?$"


def per_prim_func(counts: dict[str, int], names: list[str]) -> dict[str, int]:
    """Sum the counts of each PrimFunc's kernels (`<name>_kernel`, `<name>_kernel_1`, ...)."""
    out = {}
    for name in names:
        pattern = re.compile(_kernels_of(name))
        out[name] = sum(n for kernel, n in counts.items() if pattern.match(kernel))
    return out


@dataclass
class TensorCoreReport:
    """Per kernel class: {PrimFunc name: tensor-core instructions in its SASS}."""

    gemm: dict[str, int]
    attention: dict[str, int]
    other_with_tensor_cores: dict[str, int] = field(default_factory=dict)

    def missing(self, kind: str) -> list[str]:
        return sorted(k for k, n in getattr(self, kind).items() if n == 0)

    def lines(self) -> list[str]:
        rows = [f"  {'kernel':<64} {'class':<10} tensor-core instructions"]
        for kind in ("gemm", "attention", "other_with_tensor_cores"):
            label = {"other_with_tensor_cores": "other"}.get(kind, kind)
            rows += [f"  {name:<64} {label:<10} {n}" for name, n in sorted(getattr(self, kind).items())]
        return rows

    def to_json(self) -> dict:
        return {"gemm": self.gemm, "attention": self.attention, "other": self.other_with_tensor_cores}


def inspect_library(library: str | Path, gemm_kernels: list[str], attention_kernels: list[str]) -> TensorCoreReport:
    """Count tensor-core instructions per kernel in every fatbin the library embeds."""
    counts: dict[str, int] = {}
    for fatbin in embedded_fatbins(library):
        for kernel, n in tensor_core_counts(sass_of(fatbin)).items():
            counts[kernel] = counts.get(kernel, 0) + n
    gemm, attention = per_prim_func(counts, gemm_kernels), per_prim_func(counts, attention_kernels)
    named = re.compile("|".join(map(_kernels_of, gemm_kernels + attention_kernels)) or "$^")
    other = {k: n for k, n in counts.items() if n and not named.match(k)}
    return TensorCoreReport(gemm, attention, other)


HALF_PRECISIONS = ("bf16", "fp16")


def check_tensor_cores(
    library: str | Path, gemm_kernels: dict[str, str], attention_kernels: list[str], precision: str | None
) -> tuple[TensorCoreReport | None, list[str]]:
    """Inspect a CUDA build; (report or None when the tools are missing, notes).

    A bf16/fp16 build whose GEMM kernel has no tensor-core instruction fails: it would run
    10-15x below the GPU's half-precision peak, which is a compiler bug, not a user's choice."""
    try:
        report = inspect_library(library, list(gemm_kernels), attention_kernels)
    except FileNotFoundError as exc:
        return None, [f"tensor cores not checked: {exc}"]
    notes = []
    missing = report.missing("gemm")
    if precision in HALF_PRECISIONS and missing:
        listed = ", ".join(f"{name} ({gemm_kernels[name]})" for name in missing)
        raise BuildFailed(
            f"{len(missing)} of {len(gemm_kernels)} GEMM kernels of this {precision} CUDA build have no tensor-core "
            f"instruction in their SASS and would run on CUDA cores: {listed}. The library was written to {library} "
            "for inspection (`cuobjdump -sass`), but do not ship it; please report this with the model and target."
        )
    if precision not in HALF_PRECISIONS and gemm_kernels:
        dtypes = ", ".join(sorted(set(gemm_kernels.values())))
        notes.append(
            f"{len(gemm_kernels)} GEMM kernels compute in {dtypes} on CUDA cores ({precision or 'fp32'} build); "
            "--precision bf16 (or fp16) puts them on tensor cores"
        )
    if report.missing("attention"):
        notes.append(
            f"attention runs on CUDA cores ({', '.join(report.missing('attention'))}): the tensor-core kernel takes "
            "bf16/fp16 with head_dim 16, 32, 64 or 128"
        )
    return report, notes


def merge_reports(reports: dict[str, TensorCoreReport | None]) -> TensorCoreReport | None:
    """Several compile units' reports as one, kernels named UNIT/KERNEL; None if none was checked."""
    present = {unit: r for unit, r in reports.items() if r is not None}
    if not present:
        return None

    def joined(kind: str) -> dict[str, int]:
        return {f"{unit}/{k}": n for unit, r in present.items() for k, n in getattr(r, kind).items()}

    return TensorCoreReport(joined("gemm"), joined("attention"), joined("other_with_tensor_cores"))
