"""What this machine has: its CPU's instruction-set flags (read from /proc/cpuinfo, never from
LLVM's name for the CPU), what a TVM target needs of them, AMX tile permission, and the local CUDA
GPU (if any), and why not when there is none."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

from .errors import HardwareError

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

# The LLVM target features that decide what a CPU library may execute, and the flag Linux lists in
# /proc/cpuinfo for each. Most demanding first.
LLVM_FEATURE_FLAGS = {
    "amx-tile": "amx_tile",
    "amx-bf16": "amx_bf16",
    "amx-int8": "amx_int8",
    "avx512bf16": "avx512_bf16",
    "avx512vnni": "avx512_vnni",
    "avx512f": "avx512f",
    "avxvnni": "avx_vnni",
    "avx2": "avx2",
    "fma": "fma",
}

# Per cpuinfo flag: what people call it, and CPUs that have it (for "run it on ..." advice).
_FLAG_NAMES = {
    "amx_tile": ("AMX", "a Sapphire Rapids or later Xeon"),
    "amx_bf16": ("AMX-BF16", "a Sapphire Rapids or later Xeon"),
    "amx_int8": ("AMX-INT8", "a Sapphire Rapids or later Xeon"),
    "avx512_bf16": ("AVX512-BF16", "a Cooper Lake, Sapphire Rapids or later Xeon, or an AMD Zen 4 or later"),
    "avx512_vnni": ("AVX512-VNNI", "a Cascade Lake or later Xeon, or an AMD Zen 4 or later"),
    "avx512f": ("AVX-512", "a Skylake-SP or later Xeon, or an AMD Zen 4 or later"),
    "avx_vnni": ("AVX-VNNI", "an Alder Lake, Sapphire Rapids or later Intel CPU, or an AMD Zen 5 or later"),
    "avx2": ("AVX2", "a Haswell or later Intel CPU, or any AMD Zen"),
    "fma": ("FMA", "a Haswell or later Intel CPU, or any AMD Zen"),
}

# arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux >= 5.16 gives a process AMX tile state
# only on request; without it the first tile instruction kills the process (SIGILL).
_SYS_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def parse_cpuinfo(text: str) -> tuple[frozenset[str], str | None]:
    """(flags, model name) of the first processor in /proc/cpuinfo text; (empty, None) if it has none."""
    flags: frozenset[str] = frozenset()
    model = None
    for line in text.splitlines():
        if not line.strip():
            if flags or model:
                break  # the first processor's block ended
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and model is None:
            model = value.strip()
    return flags, model


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[frozenset[str], str | None]:
    if platform.system() != "Linux":
        return frozenset(), None
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError as exc:
        log.warning("cannot read %s (%s): this CPU's instruction-set flags are unknown", CPUINFO, exc)
        return frozenset(), None


def cpu_flags() -> frozenset[str]:
    """This CPU's flags from /proc/cpuinfo (e.g. "avx512_bf16", "amx_tile"); empty when unknown
    (not Linux, or no x86 "flags" line)."""
    return _cpuinfo()[0]


def cpu_model() -> str:
    """This CPU's model name, for messages."""
    return _cpuinfo()[1] or platform.processor() or "unknown CPU"


def host_llvm_features() -> list[str]:
    """The LLVM features ("+amx-bf16", ...) of LLVM_FEATURE_FLAGS this CPU's flags show."""
    flags = cpu_flags()
    return [f"+{feature}" for feature, flag in LLVM_FEATURE_FLAGS.items() if flag in flags]


def required_cpu_flags(target) -> list[str]:
    """The cpuinfo flags (of LLVM_FEATURE_FLAGS) a TVM target's CPU code needs, sorted. A CUDA
    target's host code counts; non-x86 targets need none of these."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        target = target.host
        if target is None or target.kind.name != "llvm":
            return []
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if not triple.startswith(("x86_64", "i386", "i686")):
        return []
    return sorted(flag for feature, flag in LLVM_FEATURE_FLAGS.items() if codegen.target_has_features(feature, target))


def missing_cpu_flags(required, flags: frozenset[str] | None = None) -> list[str]:
    """The flags of `required` that this CPU (or `flags`) lacks."""
    have = cpu_flags() if flags is None else flags
    return [flag for flag in required if flag not in have]


def describe_cpu_flags(flags) -> tuple[str, str]:
    """(what people call these flags, e.g. "AMX-BF16", CPUs that have them) for messages."""
    names = [_FLAG_NAMES.get(f, (f, ""))[0] for f in flags]
    if any(f.startswith("amx_") and f != "amx_tile" for f in flags):
        names = [n for n in names if n != "AMX"]  # AMX-BF16 says AMX already
    ordered = [f for f in _FLAG_NAMES if f in flags] + [f for f in flags if f not in _FLAG_NAMES]
    first = ordered[0] if ordered else None
    where = _FLAG_NAMES[first][1] if first in _FLAG_NAMES else f"a CPU with {', '.join(flags)}"
    return ", ".join(dict.fromkeys(names)), where


@functools.lru_cache(maxsize=1)
def request_amx_permission() -> None:
    """Ask Linux for AMX tile state for this process (once); HardwareError, saying why, if refused."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise HardwareError(
            f"AMX tile instructions need Linux on x86-64 (this is {platform.system()} {platform.machine()}); "
            "run the artifact on a Sapphire Rapids or later Xeon under Linux 5.16 or later, or rebuild it "
            "without AMX (--target x86 on the machine that runs it)"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(
        ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM), ctypes.c_long(_XFEATURE_XTILEDATA)
    )
    if result != 0:
        err = ctypes.get_errno()
        raise HardwareError(
            f"Linux refused this process AMX tile state: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) "
            f"failed with errno {err} ({os.strerror(err)}). AMX needs Linux 5.16 or later (this is "
            f"{platform.release()}) and a CPU with amx_tile (this one, {cpu_model()}, "
            f"{'has' if 'amx_tile' in cpu_flags() else 'lacks'} it). Upgrade the kernel, or rebuild the "
            "artifact without AMX (--target x86 on this machine)."
        )

DEFAULT_CUDA_ARCH = "sm_90"  # what the `cuda` preset builds for on a machine without a GPU


def cuda_device_arch() -> tuple[str | None, str | None]:
    """(the first visible GPU's arch, e.g. "sm_90", None), or (None, why no GPU is usable)."""
    import tvm

    from .tvm_compat import load_cuda_runtime

    why_not = load_cuda_runtime()
    if why_not is not None:
        return None, why_not
    device = tvm.cuda(0)
    if not device.exist:
        return None, "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return "sm_" + device.compute_version.replace(".", ""), None


@functools.lru_cache(maxsize=None)
def warn_default_cuda_arch(reason: str) -> None:
    """Say once per reason that the `cuda` preset fell back to DEFAULT_CUDA_ARCH."""
    log.warning(
        "target 'cuda' means this machine's GPU, and none is usable: %s. Building for %s (Hopper); to build for "
        "another GPU name it: --target cuda-sm80 | cuda-sm89 | cuda-sm90.",
        reason,
        DEFAULT_CUDA_ARCH,
    )
