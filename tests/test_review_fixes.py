"""Defects found in review (issue 19, point 3), each with the behaviour it now has."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import max_abs_diff

import autotune
from autotune.build import fallback as fallback_module
from autotune.build.compile import build
from autotune.frontend.importer import from_torch
from autotune.support.errors import InputError, TargetError
from autotune.support.settings import BuildSettings, TuneSettings
from autotune.support.targets import resolve_target

TOL = 1e-4


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, s):
        return self.lin(x) * s


@pytest.fixture(scope="module")
def scale_artifact(tmp_path_factory):
    torch.manual_seed(0)
    module = Scale().eval()
    inputs = {"x": torch.randn(2, 4), "s": torch.tensor(2.0)}
    imported = from_torch(module, inputs)
    report = build(imported, "x86", tmp_path_factory.mktemp("scale") / "scale.so")
    return report, module


def test_list_and_python_scalar_inputs_are_accepted(scale_artifact):
    report, module = scale_artifact
    m = autotune.load(report.paths.library)
    x = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    out = m(x=np.asarray(x, dtype="float32").tolist(), s=np.float32(2.0))  # a nested list, a numpy scalar
    with torch.no_grad():
        ref = module(torch.tensor(x), torch.tensor(2.0)).numpy()
    assert isinstance(out, np.ndarray) and max_abs_diff(out, ref) <= TOL
    assert max_abs_diff(m(x, 2.0), ref) <= TOL  # Python numbers take the input's dtype
    with pytest.raises(InputError, match="float64"):  # a numpy array keeps its own, and a mismatch is named
        m(x=np.asarray(x), s=2.0)


def test_kernels_without_any_schedule_are_counted_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(fallback_module, "_cpu_schedule", lambda func, target, seed: None)
    torch.manual_seed(0)
    imported = from_torch(Scale().eval(), {"x": torch.randn(2, 4), "s": torch.tensor(2.0)})
    report = build(imported, "x86", tmp_path / "naive.so", settings=BuildSettings(shipped_log=False))
    assert report.naive_kernels == report.kernels > 0
    assert any("got no schedule" in n for n in report.notes), report.notes
    assert "unscheduled" in report.summary()
    meta = json.loads(report.paths.metadata.read_text())
    assert len(meta["kernels"]["naive"]) == report.kernels


def test_cuda_preset_without_a_gpu_says_so(caplog):
    from autotune.support import hardware

    if hardware.cuda_device_arch()[0] is not None:
        pytest.skip("this machine has a usable CUDA GPU")
    hardware.warn_default_cuda_arch.cache_clear()
    with caplog.at_level(logging.WARNING, logger="autotune"):
        arch = resolve_target("cuda").resolved_target_dict()["arch"]
    assert arch == hardware.DEFAULT_CUDA_ARCH
    message = caplog.text
    assert "none is usable" in message and "cuda-sm80" in message
    assert "libcuda" in message or "no CUDA device" in message


def test_attention_left_unfused_on_cuda_is_warned(monkeypatch, caplog):
    from autotune.kernels import attention_cuda
    from autotune.passes.attention import count_fused_attention, fuse_attention

    def unavailable():
        raise ImportError("no prefill kernels in this TVM")

    monkeypatch.setattr(attention_cuda, "attention_sequence_prefill", unavailable)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 16, 32)
    imported = from_torch(Attention().eval(), {"q": q, "k": q.clone(), "v": q.clone()})
    with caplog.at_level(logging.WARNING, logger="autotune"):
        mod = fuse_attention(imported.mod, resolve_target("cuda-sm90").tvm_target())
    assert count_fused_attention(mod) == 0
    assert "left unfused" in caplog.text and "no prefill kernels" in caplog.text


def test_fp8_is_offered_on_every_gpu_from_sm89_on():
    from autotune.passes.quantize import MODES

    fp8 = MODES["fp8"]()
    assert fp8.supports(resolve_target('{"kind": "cuda", "arch": "sm_100"}')) is None
    assert fp8.supports(resolve_target("cuda-sm89")) is None
    assert "sm_89" in fp8.supports(resolve_target("cuda-sm80"))


def test_records_apply_whatever_the_core_count(tmp_path):
    """A log tuned with 2 cores applies under `taskset` to 1 core (and on another CPU name of the same ISA)."""
    from autotune.support import hardware
    from autotune.tuning.log import read_log
    from autotune.tuning.tune import tune

    torch.manual_seed(0)
    imported = from_torch(Scale().eval(), {"x": torch.randn(2, 4), "s": torch.tensor(2.0)})
    # tuned (and so run) at this CPU's vector width; the same width under another CPU name, and the other width
    avx512, avx2 = ("skylake-avx512", "icelake-server"), ("haswell", "znver2")
    (cpu, same_width), (other_width, _) = (avx512, avx2) if "avx512f" in hardware.cpu_flags() else (avx2, avx512)
    two = {"kind": "llvm", "mcpu": cpu, "num-cores": 2}
    tune(imported, json.dumps(two), tmp_path, TuneSettings(trials=8, trials_per_iter=8, shipped_log=False, remeasure_rounds=0), progress=False)
    written = read_log(tmp_path, resolve_target(json.dumps(two)).tvm_target())[0].records
    assert written > 0
    for other in ({**two, "num-cores": 1}, {**two, "mcpu": same_width}):
        assert read_log(tmp_path, resolve_target(json.dumps(other)).tvm_target())[0].records == written, other
    report = read_log(tmp_path, resolve_target(json.dumps({**two, "mcpu": other_width})).tvm_target())[0]
    assert report.records == 0 and all("another target" in p.reason for p in report.problems)


@pytest.mark.parametrize("field,value", [("trials", -5), ("trials_per_iter", 0), ("run_timeout_s", 0.0)])
def test_invalid_tuning_settings_are_refused(field, value):
    with pytest.raises(InputError, match=field):
        TuneSettings(**{field: value})


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True, text=True, timeout=timeout)


def test_negative_trials_fail_at_once_on_the_command_line():
    started = time.time()
    result = _cli("tune", "--trials", "-5")
    assert result.returncode == 2 and "trials must be >= 0" in result.stderr
    assert "TuneSettings" not in result.stdout  # refused before the settings are printed or the model imported
    assert time.time() - started < 60


def test_unknown_llvm_cpu_is_refused():
    with pytest.raises(TargetError, match="does not know the CPU 'nope'"):
        resolve_target('{"kind": "llvm", "mcpu": "nope"}')


def test_generate_says_first_that_the_image_is_missing(tmp_path):
    result = _cli("generate", "--image", str(tmp_path / "missing.png"), "--artifacts", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "missing.png: no such file" in result.stderr and "artifacts directory" not in result.stderr


def test_component_names_take_either_spelling():
    from autotune.models import get_model_spec
    from autotune.models.workloads import get_workload

    spec = get_model_spec("wan-i2v-tiny")
    assert spec.component("vae-decoder").name == spec.component("vae_decoder").name == "vae_decoder"
    assert get_workload("tiny_image_encoder").name == get_workload("tiny-image-encoder").name


def test_listing_verbs_print_whole_names_and_json(capsys):
    piped = _cli("targets")  # stdout a pipe, not a terminal: names must not be cut
    assert piped.returncode == 0 and "aarch64-neon" in piped.stdout and "…" not in piped.stdout
    from autotune.cli.main import build_parser

    def listed(*argv):
        args = build_parser().parse_args(list(argv))
        assert args.func(args) == 0
        return json.loads(capsys.readouterr().out)

    models = listed("models", "--json")
    assert {"model", "component", "params", "flops_per_call", "inputs"} <= set(models[0])
    assert any(m["component"] == "vae_decoder" for m in models)
    assert any(t["name"] == "aarch64-neon" for t in listed("targets", "--json"))
