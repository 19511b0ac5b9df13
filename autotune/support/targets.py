"""Target presets: data in `targets/*.json`, resolved to TVM targets.

A preset names a TVM target dict (placeholders `$host_cpu`, `$host_mattr`, `$host_cores`,
`$cuda_arch` are filled in from this machine), its host, the cross compiler that links its `.so`,
the device the runtime runs it on, and what must be installed. `--target` takes a preset name or a raw TVM
target dict as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import TargetError
from .hardware import (
    DEFAULT_CUDA_ARCH,
    cuda_device_arch,
    host_llvm_features,
    warn_default_cuda_arch,
)
from .package_data import targets_dir
from .threads import physical_thread_count


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict
    family: str  # "x86", "arm", "cuda"
    device: str  # runtime device kind: "cpu" or "cuda"
    host: dict | None = None
    cross_compiler: str | None = None
    needs: str = ""

    def resolved_target_dict(self) -> dict:
        return _fill_placeholders(self.target)

    def tvm_target(self):
        import tvm

        target = self.resolved_target_dict()
        if self.host is not None:
            return tvm.target.Target(target, host=_fill_placeholders(self.host))
        return tvm.target.Target(target)

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"


def _fill_placeholders(obj):
    if isinstance(obj, dict):
        return {k: _fill_placeholders(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill_placeholders(v) for v in obj]
    if obj == "$host_cpu":
        import tvm

        return tvm.target.codegen.llvm_get_system_cpu()
    if obj == "$host_mattr":
        # from /proc/cpuinfo flags: LLVM names some CPUs wrongly (an AMX Xeon "rocketlake", no AMX)
        return host_llvm_features()
    if obj == "$host_cores":
        return physical_thread_count()
    if obj == "$cuda_arch":
        arch, why_not = cuda_device_arch()
        if arch is None:
            warn_default_cuda_arch(why_not)
        return arch or DEFAULT_CUDA_ARCH
    return obj


def local_cuda_arch() -> str | None:
    """The local GPU's arch (e.g. "sm_90"), or None when no CUDA device is usable."""
    return cuda_device_arch()[0]


def _presets_dir() -> Path:
    found = targets_dir()
    if found is None:
        raise TargetError(
            "autotune's target presets (targets/*.json) are not installed beside the package; reinstall it "
            "(pip install . or pip install -e . from its source tree)"
        )
    return found


def list_presets() -> list[TargetPreset]:
    return [_load_preset(p) for p in sorted(_presets_dir().glob("*.json"))]


def _load_preset(path: Path) -> TargetPreset:
    data = json.loads(path.read_text())
    return TargetPreset(**data)


def resolve_target(spec: str | dict | TargetPreset) -> TargetPreset:
    """A preset name, a JSON TVM target dict, or a preset, to a TargetPreset."""
    if isinstance(spec, TargetPreset):
        return spec
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise TargetError(f"--target looks like JSON but does not parse: {exc}") from exc
    if isinstance(spec, dict):
        return _raw_preset(spec)
    path = _presets_dir() / f"{spec}.json"
    if not path.exists():
        known = ", ".join(p.name for p in list_presets())
        raise TargetError(f"unknown target '{spec}'. Known targets: {known}. Or pass a TVM target dict as JSON.")
    return _load_preset(path)


def _raw_preset(target: dict) -> TargetPreset:
    import tvm

    if target.get("kind") == "llvm" and "num-cores" not in target:
        # MetaSchedule (tuning and the CPU fallback schedules) refuses an llvm target without it.
        target = {**target, "num-cores": "$host_cores"}
    try:
        resolved = tvm.target.Target(_fill_placeholders(target))
    except Exception as exc:
        raise TargetError(f"TVM rejects target {json.dumps(target)}: {exc}") from exc
    if resolved.kind.name == "llvm" and "mcpu" in target:
        _check_llvm_cpu(resolved)
    kind = target.get("kind")
    if kind == "cuda":
        return TargetPreset("custom", "raw TVM target", target, "cuda", "cuda", host={"kind": "llvm"})
    arm = "aarch64" in str(target.get("mtriple", ""))
    return TargetPreset(
        "custom",
        "raw TVM target",
        target,
        "arm" if arm else "x86",
        "cpu",
        cross_compiler="aarch64-linux-gnu-g++" if arm else None,
    )


def _check_llvm_cpu(target) -> None:
    """TargetError when LLVM does not know the target's mcpu (it would ignore it without a word)."""
    from tvm.target import codegen

    cpu = str(target.attrs["mcpu"])
    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        names = [str(n) for n in codegen.llvm_get_cpu_archlist(target)]
        raise TargetError(
            f"LLVM does not know the CPU '{cpu}' for {triple}. Name one LLVM knows (e.g. "
            f"{', '.join(n for n in names if n in _COMMON_CPUS) or ', '.join(names[:8])}; {len(names)} in all), "
            "or use a preset: `autotune targets`."
        )


_COMMON_CPUS = {"x86-64-v3", "x86-64-v4", "skylake-avx512", "icelake-server", "sapphirerapids", "znver4",
                "cortex-a72", "neoverse-n1", "neoverse-v1", "apple-m1"}
