"""The runtime API: one call convention, and errors that name the expected signature."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import max_abs_diff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autotune
from autotune.build.compile import build
from autotune.frontend.importer import from_torch
from autotune.support.errors import ArtifactError, InputError
from autotune.support.hardware import cpu_flags, required_cpu_flags
from autotune.support.targets import resolve_target

TOL = 1e-4


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x, scale):
        y = self.lin(x) * scale
        return y, y.sum(dim=-1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    module = TwoInputs().eval()
    inputs = {"x": torch.randn(2, 16), "scale": torch.randn(2, 1)}
    imported = from_torch(module, inputs)
    out = tmp_path_factory.mktemp("artifact") / "two.so"
    report = build(imported, "x86", out)
    with torch.no_grad():
        ref = [t.numpy() for t in module(*inputs.values())]
    return report.paths, inputs, ref


def test_numpy_in_numpy_out_positional_and_keyword(artifact):
    paths, inputs, ref = artifact
    m = autotune.load(paths.library)
    x, s = inputs["x"].numpy(), inputs["scale"].numpy()
    for outs in (m(x, s), m(x=x, scale=s), m(x, scale=s)):
        assert all(isinstance(o, np.ndarray) for o in outs)
        assert max(max_abs_diff(o, r) for o, r in zip(outs, ref)) <= TOL


def test_torch_in_torch_out(artifact):
    paths, inputs, ref = artifact
    m = autotune.load(paths.library)
    outs = m(**inputs)
    assert all(isinstance(o, torch.Tensor) for o in outs)
    assert max(max_abs_diff(o.numpy(), r) for o, r in zip(outs, ref)) <= TOL
    # a strided (non-contiguous) tensor is accepted too
    xt = torch.randn(16, 2).t()
    assert not xt.is_contiguous()
    assert max_abs_diff(m(xt, inputs["scale"])[0].numpy(), (TwoInputs_ref(paths, xt, inputs["scale"]))) <= TOL


def TwoInputs_ref(paths, x, scale):
    m = autotune.load(paths.library)
    return m(x.contiguous().numpy(), scale.numpy())[0]


def test_signature_and_metadata(artifact):
    paths, _, _ = artifact
    m = autotune.load(paths.library)
    assert m.signature == "(x: float32[2, 16], scale: float32[2, 1]) -> (output0: float32[2, 8], output1: float32[2])"
    assert m.metadata["target"]["preset"] == "x86"
    timing = m.benchmark(repeat=5, warmup=1)
    assert timing["repeat"] == 5 and 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x, s: m(x), "missing input(s) ['scale']"),
        (lambda m, x, s: m(x, s, s), "got 3 positional inputs"),
        (lambda m, x, s: m(x, scale=s, bias=s), "unknown input(s) ['bias']"),
        (lambda m, x, s: m(x, x=x, scale=s), "given twice"),
        (lambda m, x, s: m(x[:1], s), "input 'x' is float32[1, 16], expected float32[2, 16]"),
        (lambda m, x, s: m(x[None], s), "expected float32[2, 16]"),
        (lambda m, x, s: m(x.astype(np.float64), s), "input 'x' is float64[2, 16]"),
        (lambda m, x, s: m("x", s), "expected a numpy array or torch tensor"),
    ],
)
def test_bad_inputs_name_the_expected_signature(artifact, call, message):
    paths, inputs, _ = artifact
    m = autotune.load(paths.library)
    with pytest.raises(InputError) as err:
        call(m, inputs["x"].numpy(), inputs["scale"].numpy())
    assert message in str(err.value)
    if "expected a numpy" not in message:
        assert "expected signature: (x: float32[2, 16], scale: float32[2, 1])" in str(err.value)


def test_nan_check_on_request(artifact):
    paths, inputs, _ = artifact
    x = inputs["x"].numpy().copy()
    x[0, 0] = np.nan
    autotune.load(paths.library)(x, inputs["scale"].numpy())  # off by default: runs
    with pytest.raises(InputError, match="NaN or Inf"):
        autotune.load(paths.library, check_finite=True)(x, inputs["scale"].numpy())


def test_wrong_device_is_refused(artifact):
    paths, _, _ = artifact
    with pytest.raises(ArtifactError, match="built for device 'cpu', not 'cuda'"):
        autotune.load(paths.library, device="cuda")
    with pytest.raises(ArtifactError, match="unknown device 'tpu'"):
        autotune.load(paths.library, device="tpu")


def _copy(paths, tmp_path):
    for p in (paths.library, paths.weights, paths.metadata):
        shutil.copy(p, tmp_path / p.name)
    return autotune.runtime.artifact.ArtifactPaths.for_library(tmp_path / paths.library.name)


def test_missing_or_mismatched_weights_are_refused(artifact, tmp_path):
    copy = _copy(artifact[0], tmp_path)
    data = copy.weights.read_bytes()
    copy.weights.write_bytes(data[:-7])
    with pytest.raises(ArtifactError, match="truncated or belongs to another build"):
        autotune.load(copy.library)
    copy.weights.unlink()
    with pytest.raises(ArtifactError, match="weights file missing"):
        autotune.load(copy.library)


def test_same_size_corruption_is_caught_with_hash_verification(artifact, tmp_path):
    copy = _copy(artifact[0], tmp_path)
    data = bytearray(copy.weights.read_bytes())
    data[-1] ^= 0xFF
    copy.weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        autotune.load(copy.library, verify_hashes=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["versions"].update(tvm="0.19.0"), "built with TVM 0.19.0"),
        (lambda m: m["versions"].update(autotune="7.0.0"), "incompatible"),
        (lambda m: m["target"].update(family="arm", preset="aarch64-neon"), "built for target 'aarch64-neon'"),
        (lambda m: m.update(format_version=99), "artifact format 99"),
        (lambda m: m["target"].update(cpu_flags=["avx2", "not_a_real_flag"]), r"lacks not_a_real_flag\. Rebuild it"),
    ],
)
def test_incompatible_metadata_is_refused(artifact, tmp_path, edit, message):
    copy = _copy(artifact[0], tmp_path)
    meta = json.loads(copy.metadata.read_text())
    edit(meta)
    copy.metadata.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        autotune.load(copy.library)


def test_cpu_flags_are_recorded_and_checked_before_the_library_is_loaded(artifact, tmp_path):
    copy = _copy(artifact[0], tmp_path)
    meta = json.loads(copy.metadata.read_text())
    assert meta["target"]["cpu_flags"] == required_cpu_flags(resolve_target("x86").tvm_target())
    copy.library.write_bytes(b"\0" * copy.library.stat().st_size)  # loading this would fail differently
    meta["target"]["cpu_flags"] = ["amx_tile", "not_a_real_flag"] if "amx_tile" in cpu_flags() else ["amx_bf16", "amx_tile"]
    copy.metadata.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"built for a CPU with .*; this CPU \(.*\) lacks .*--target x86") as err:
        autotune.load(copy.library)
    assert "cannot load the library" not in str(err.value)
    del meta["target"]["cpu_flags"]  # an artifact from before the key: loads as it did
    copy.metadata.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="cannot load the library"):
        autotune.load(copy.library)


def test_an_amx_build_runs_only_where_the_cpu_has_amx(tmp_path):
    """A real x86-amx library: refused on a CPU without AMX, run (after asking Linux for tile state) on one with it."""
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    report = build(from_torch(module, {"x": x}), "x86-amx", tmp_path / "amx.so")
    required = json.loads(report.paths.metadata.read_text())["target"]["cpu_flags"]
    assert {"amx_tile", "amx_bf16", "amx_int8"} <= set(required)
    missing = [f for f in required if f not in cpu_flags()]
    if missing:
        with pytest.raises(ArtifactError, match=f"this CPU \\(.*\\) lacks {', '.join(missing)}\\. .*Sapphire Rapids"):
            autotune.load(report.paths.library)
    else:
        with torch.no_grad():
            assert max_abs_diff(autotune.load(report.paths.library)(x.numpy()), module(x).numpy()) <= TOL


def test_missing_metadata_and_garbage_library(artifact, tmp_path):
    copy = _copy(artifact[0], tmp_path)
    copy.library.write_bytes(b"\0" * copy.library.stat().st_size)  # same size, not a library
    with pytest.raises(ArtifactError, match="cannot load the library"):
        autotune.load(copy.library)
    copy.metadata.unlink()
    with pytest.raises(ArtifactError, match="metadata file missing"):
        autotune.load(copy.library)


_DTYPES = st.sampled_from(["float32", "float64", "float16", "int32", "int64", "bool"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    dtype=_DTYPES,
    as_torch=st.booleans(),
    name=st.sampled_from(["x", "scale", "y"]),
)
def test_fuzz_input_validation(artifact, shape, dtype, as_torch, name):
    """Any input either matches the signature exactly and runs, or raises InputError: never a crash."""
    paths, inputs, _ = artifact
    m = _fuzz_module(paths)
    value = np.zeros(shape, dtype=dtype)
    if as_torch:
        value = torch.from_numpy(value)
    kwargs = {"x": inputs["x"].numpy(), "scale": inputs["scale"].numpy()}
    kwargs[name] = value
    if as_torch:  # one call, one kind: make the other input torch too
        kwargs = {k: torch.as_tensor(v) for k, v in kwargs.items()}
    spec = {"x": ((2, 16), "float32"), "scale": ((2, 1), "float32")}.get(name)
    if spec is not None and tuple(shape) == spec[0] and dtype == spec[1]:
        outs = m(**kwargs)
        assert outs[0].shape == (2, 8)
    else:
        with pytest.raises(InputError):
            m(**kwargs)


_FUZZ_CACHE = {}


def _fuzz_module(paths):
    if paths not in _FUZZ_CACHE:
        _FUZZ_CACHE[paths] = autotune.load(paths.library)
    return _FUZZ_CACHE[paths]


def test_profile_times_every_kernel_and_counts_its_flops(artifact):
    paths, inputs, ref = artifact
    module = autotune.load(paths.library)
    counted = module.metadata["kernels"]["flops"]
    profile = module.profile({k: v.numpy() for k, v in inputs.items()}, repeat=3)
    timed = {k.name: k for k in profile.kernels}
    assert set(counted) <= set(timed), "a compiled kernel was never timed"
    largest = profile.largest()
    # the linear 16 -> 8 on 2 rows: 2*2*16*8 multiply-adds at least, plus its bias/scale epilogue
    assert largest.calls == 1 and 2 * 2 * 16 * 8 <= largest.gflop * 1e9 < 2 * 2 * 16 * 8 + 200
    assert all(k.ms >= 0 for k in profile.kernels) and profile.total_ms > 0
    assert largest.name in profile.format()
    # the instrument is removed afterwards: a plain call still gives torch's result
    assert max_abs_diff(module(**{k: v.numpy() for k, v in inputs.items()})[0], ref[0]) < TOL


def test_float16_storage_rounds_matrices_and_reads_them_back_as_float32(tmp_path):
    """save_weights(float16=True): a float32 matrix is stored float16 (rounded) and read back float32;
    vectors, matrices float16 cannot hold (|x| > 65504) and other dtypes are stored as they are."""
    import ml_dtypes
    from safetensors import safe_open

    from autotune.runtime.artifact import load_weights, save_weights

    rng = np.random.default_rng(0)
    weights = {
        "matrix": rng.standard_normal((8, 16)).astype(np.float32),
        "conv": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "bias": rng.standard_normal(16).astype(np.float32),
        "huge": np.array([[1.0, 7.0e4]], np.float32),
        "half": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16),
        "int8": rng.integers(-127, 128, (4, 4)).astype(np.int8),
    }
    path = tmp_path / "w.safetensors"
    stored = save_weights(path, weights, float16=True)
    with safe_open(str(path), framework="numpy") as f:
        in_file = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert in_file == {"matrix": np.float16, "conv": np.float16, "bias": np.float32, "huge": np.float32,
                       "half": np.uint16, "int8": np.int8}
    assert stored == sum(w.nbytes // (2 if in_file[n] == np.float16 else 1) for n, w in weights.items())
    read = load_weights(path, list(weights))
    for name, w in weights.items():
        assert read[name].dtype == w.dtype, name
        expected = w.astype(np.float16).astype(np.float32) if in_file[name] == np.float16 else w
        np.testing.assert_array_equal(read[name], expected, err_msg=name)  # exact: one rounding, then widened
    save_weights(path, weights)  # the default stores every array as it is
    assert all(read.dtype == weights[n].dtype and np.array_equal(read, weights[n]) for n, read in load_weights(path, list(weights)).items())
