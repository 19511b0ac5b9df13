"""The CPU as /proc/cpuinfo describes it (never LLVM's name for it), what targets need of it, and
AMX tile permission."""

from __future__ import annotations

import pytest
import tvm
from tvm.target import codegen

from autotune.support import hardware
from autotune.support.targets import resolve_target

# Two processors of a Sapphire Rapids Xeon (trimmed): only the first one's block counts.
XEON_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: something else
flags\t\t: fpu sse2
"""
ZEN4_FLAGS = frozenset(["fpu", "sse2", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"])


@pytest.fixture
def fake_cpu(monkeypatch):
    """Make this process believe it runs on a CPU with the given flags."""

    def use(flags, model="a fake CPU"):
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: (frozenset(flags), model))

    return use


def test_cpuinfo_flags_and_model_of_the_first_processor():
    flags, model = hardware.parse_cpuinfo(XEON_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "fpu"} <= flags
    assert hardware.parse_cpuinfo("Features\t: fp asimd\n") == (frozenset(), None)  # aarch64: no x86 flags
    assert isinstance(hardware.cpu_flags(), frozenset)


def test_host_llvm_features_follow_the_flags(fake_cpu):
    fake_cpu(hardware.parse_cpuinfo(XEON_CPUINFO)[0])
    assert hardware.host_llvm_features() == [
        "+amx-tile", "+amx-bf16", "+amx-int8", "+avx512bf16", "+avx512vnni", "+avx512f", "+avxvnni", "+avx2", "+fma",
    ]
    fake_cpu(ZEN4_FLAGS)
    assert hardware.host_llvm_features() == ["+avx512bf16", "+avx512vnni", "+avx512f", "+avx2", "+fma"]
    fake_cpu(())
    assert hardware.host_llvm_features() == []


def test_x86_preset_takes_amx_from_the_flags_when_llvm_misnames_the_cpu(fake_cpu, monkeypatch):
    """LLVM calls the AMX Xeon "rocketlake" (no AMX): the flags put AMX in the target anyway."""
    monkeypatch.setattr(codegen, "llvm_get_system_cpu", lambda: "rocketlake")
    fake_cpu(hardware.parse_cpuinfo(XEON_CPUINFO)[0])
    target = resolve_target("x86").tvm_target()
    assert str(target.attrs["mcpu"]) == "rocketlake"
    assert codegen.target_has_features(["amx-tile", "amx-bf16", "amx-int8", "avx512bf16"], target)
    assert not codegen.target_has_features("amx-bf16", tvm.target.Target({"kind": "llvm", "mcpu": "rocketlake"}))


def test_presets_need_the_flags_they_are_named_for():
    amx = resolve_target("x86-amx").tvm_target()
    assert codegen.target_has_features(["amx-tile", "amx-bf16", "amx-int8"], amx)
    assert {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16"} <= set(hardware.required_cpu_flags(amx))
    bf16 = resolve_target("x86-avx512-bf16").tvm_target()
    assert codegen.target_has_features("avx512bf16", bf16) and not codegen.target_has_features("amx-tile", bf16)
    assert hardware.missing_cpu_flags(hardware.required_cpu_flags(bf16), ZEN4_FLAGS) == []
    assert hardware.missing_cpu_flags(hardware.required_cpu_flags(amx), ZEN4_FLAGS) == [
        "amx_bf16", "amx_int8", "amx_tile", "avx_vnni",
    ]
    for other in ("aarch64-neon", "cuda-sm90"):  # no x86 CPU code of their own
        assert hardware.required_cpu_flags(resolve_target(other).tvm_target()) == []


def test_missing_flags_are_described_for_people():
    assert hardware.describe_cpu_flags(["amx_bf16", "amx_tile"]) == ("AMX-BF16", "a Sapphire Rapids or later Xeon")
    assert hardware.describe_cpu_flags(["not_a_real_flag"]) == ("not_a_real_flag", "a CPU with not_a_real_flag")


def test_amx_permission_where_the_cpu_has_amx():
    flags = hardware.cpu_flags()
    if "amx_tile" not in flags:
        relevant = sorted(flags & set(hardware.LLVM_FEATURE_FLAGS.values()))
        pytest.skip(f"CPU has no AMX (flags: {' '.join(relevant) if flags else 'unknown'})")
    hardware.request_amx_permission()
    hardware.request_amx_permission()  # once per process; a second call is a no-op
