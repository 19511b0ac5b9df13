"""The runtime API: one call convention on every target.

    m = autotune.load("out/wan-i2v-tiny-x86/transformer.so", device="cpu")   # runtime.loader.load
    y = m(hidden_states=x, timestep=t, ...)     # numpy in → numpy out; torch in → torch out
    m.signature, m.metadata, m.benchmark(repeat=20)
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from autotune import __version__
from autotune.support.errors import ArtifactError, InputError
from autotune.support.hardware import (
    cpu_flags,
    cpu_model,
    describe_cpu_flags,
    missing_cpu_flags,
    request_amx_permission,
)
from autotune.support.signature import TensorSpec, format_signature

from .artifact import ArtifactPaths, check_files, iter_weights, read_metadata
from .devices import open_device

log = logging.getLogger(__name__)

_HOST_FAMILY = {"x86_64": "x86", "AMD64": "x86", "aarch64": "arm", "arm64": "arm"}


def _check_compatible(metadata: dict, paths: ArtifactPaths) -> None:
    versions = metadata.get("versions", {})
    if versions.get("tvm") != tvm.__version__:
        raise ArtifactError(
            f"{paths.library} was built with TVM {versions.get('tvm')}, this runtime is TVM {tvm.__version__}: "
            "the library's ABI may differ. Rebuild the artifact with this installation."
        )
    if versions.get("autotune", "").split(".")[0] != __version__.split(".")[0]:
        raise ArtifactError(
            f"{paths.library} was built by autotune {versions.get('autotune')}, incompatible with {__version__}; rebuild it"
        )
    family = metadata["target"]["family"]
    host = _HOST_FAMILY.get(platform.machine(), platform.machine())
    cpu_family = "x86" if family == "cuda" else family  # a CUDA library's host code is x86 here
    if cpu_family != host:
        raise ArtifactError(
            f"{paths.library} was built for target '{metadata['target']['preset']}' ({family}); this machine is "
            f"{platform.machine()}. Copy it to a {family} machine, or build for this one (--target x86)."
        )
    _check_cpu_flags(metadata, paths)


def _check_cpu_flags(metadata: dict, paths: ArtifactPaths) -> None:
    """ArtifactError when this CPU lacks an instruction set the library was built to use (it would
    die of SIGILL mid-call); ask Linux for AMX tile state when the library uses AMX."""
    required = metadata["target"].get("cpu_flags")
    if not required:  # artifacts from before the key, CUDA and ARM libraries
        return
    if not cpu_flags():
        log.warning(
            "%s needs CPU flags %s; this CPU's flags are unknown (no /proc/cpuinfo flags), so they are not checked",
            paths.library, ", ".join(required),
        )
    else:
        missing = missing_cpu_flags(required)
        if missing:
            names, where = describe_cpu_flags(missing)
            raise ArtifactError(
                f"{paths.library}: this artifact was built for a CPU with {names} ({', '.join(missing)}); this CPU "
                f"({cpu_model()}) lacks {', '.join(missing)}. Rebuild it for this machine with --target x86, or run it "
                f"on {where}."
            )
    if "amx_tile" in required:
        request_amx_permission()


class CompiledModule:
    """A loaded artifact. Call it with the named inputs; get outputs of the inputs' kind."""

    def __init__(self, path: str | Path, device: str = "cpu", verify_hashes: bool = False, check_finite: bool = False):
        self.paths = ArtifactPaths.for_library(path)
        self.metadata = read_metadata(self.paths)
        check_files(self.paths, self.metadata, verify_hashes=verify_hashes)
        _check_compatible(self.metadata, self.paths)
        self.device = open_device(device, self.metadata["target"]["device"])
        self.inputs = [TensorSpec.from_json(s) for s in self.metadata["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in self.metadata["outputs"]]
        self.check_finite = check_finite
        try:
            library = tvm.runtime.load_module(str(self.paths.library))
        except Exception as exc:
            raise ArtifactError(f"{self.paths.library}: cannot load the library: {exc}") from exc
        self._vm = VirtualMachine(library, self.device)  # tvm.runtime's: a runtime-only TVM has no tvm.relax
        self._main = self._vm["main"]
        per_call = self.metadata["files"]["weights"] is None  # a block-wise unit: weights given per call
        self._weights = [] if per_call else self.load_weight_tensors(self.paths.weights)

    def load_weight_tensors(self, path: str | Path) -> list:
        """The weights file `path` (of this library's weight names) as device tensors, read one by one."""
        return [tvm.runtime.tensor(w, self.device) for _, w in iter_weights(Path(path), self.metadata["weights"])]

    # -- introspection ----------------------------------------------------------------------
    @property
    def signature(self) -> str:
        return format_signature(self.inputs, self.outputs)

    def __repr__(self) -> str:
        return f"<autotune module {self.paths.library.name} on {self.device}: {self.signature}>"

    # -- calling ----------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> list:
        if len(args) > len(self.inputs):
            raise InputError(f"got {len(args)} positional inputs, expected at most {len(self.inputs)}.\n{self._expected()}")
        bound = dict(zip((s.name for s in self.inputs), args))
        for name, value in kwargs.items():
            if name in bound:
                raise InputError(f"input '{name}' given twice (positionally and by name).\n{self._expected()}")
            bound[name] = value
        unknown = [n for n in bound if n not in {s.name for s in self.inputs}]
        if unknown:
            raise InputError(f"unknown input(s) {unknown}.\n{self._expected()}")
        missing = [s.name for s in self.inputs if s.name not in bound]
        if missing:
            raise InputError(f"missing input(s) {missing}.\n{self._expected()}")
        return [bound[s.name] for s in self.inputs]

    def _expected(self) -> str:
        return f"expected signature: {self.signature}"

    def _to_tvm(self, spec: TensorSpec, value):
        kind = type(value).__module__.split(".")[0]
        if kind == "torch":
            import torch

            if not isinstance(value, torch.Tensor):
                raise InputError(f"input '{spec.name}': expected a tensor, got {type(value).__name__}")
            dtype = str(value.dtype).replace("torch.", "")
            device_ok = (value.device.type == "cpu") == (self.device.dlpack_device_type() == 1)
            if not device_ok:
                raise InputError(
                    f"input '{spec.name}' is on torch device {value.device}, the module runs on {self.device}; "
                    "move it first (tensor.to(...))"
                )
            shape = tuple(value.shape)
        else:
            if not isinstance(value, np.ndarray):
                if isinstance(value, np.generic):  # a numpy scalar keeps its dtype
                    value = np.asarray(value)
                elif not isinstance(value, (str, bytes)) and (np.isscalar(value) or isinstance(value, (list, tuple))):
                    value = np.asarray(value, dtype=spec.dtype)  # Python numbers have no dtype: take the input's
                else:
                    raise InputError(f"input '{spec.name}': expected a numpy array or torch tensor, got {type(value).__name__}")
            kind = "numpy"  # lists and Python scalars went in as numpy arrays; numpy comes back out
            dtype, shape = str(value.dtype), tuple(value.shape)
        if shape != spec.shape or dtype != spec.dtype:
            raise InputError(f"input '{spec.name}' is {dtype}{list(shape)}, expected {spec.dtype}{list(spec.shape)}.\n{self._expected()}")
        if self.check_finite:
            array = value.detach().cpu().numpy() if kind == "torch" else value
            if not np.all(np.isfinite(array)):
                raise InputError(f"input '{spec.name}' contains NaN or Inf (check_finite=True)")
        if kind == "torch":
            value = value.contiguous()
            pointer = value.data_ptr()
        else:
            value = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
            pointer = value.ctypes.data
        # DLPack shares memory without a copy when the buffer is where the module runs and
        # 64-byte aligned (TVM's requirement); otherwise copy once.
        on_host = self.device.dlpack_device_type() == 1
        shareable = pointer % 64 == 0 and (on_host == (kind == "numpy" or value.device.type == "cpu"))
        if shareable:
            return tvm.runtime.from_dlpack(value), kind
        host = value.detach().cpu().numpy() if kind == "torch" else value
        return tvm.runtime.tensor(host, self.device), kind

    def _from_tvm(self, value, kind: str):
        if kind == "torch":
            import torch

            return torch.from_dlpack(value)
        return value.numpy()

    def __call__(self, *args, **kwargs):
        values = self._bind(args, kwargs)
        converted = [self._to_tvm(spec, v) for spec, v in zip(self.inputs, values)]
        kind = converted[0][1] if converted else "numpy"
        result = self._invoke([c[0] for c in converted])
        if isinstance(result, tvm.runtime.Tensor):
            return self._from_tvm(result, kind)
        outs = tuple(self._from_tvm(r, kind) for r in result)
        return outs[0] if len(outs) == 1 else outs

    def _invoke(self, args: list):
        """One call on device tensors; returns the VM's result (a tensor or a tuple of them)."""
        return self.run(args)

    def run(self, args: list, weights: list | None = None):
        """Low level: call on device tensors with `weights` (default: the artifact's own)."""
        return self._main(*args, *(self._weights if weights is None else weights))

    # -- timing -----------------------------------------------------------------------------
    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in self.inputs}

    def benchmark(self, inputs: dict | None = None, repeat: int = 20, warmup: int = 3) -> dict:
        """Median/min/max milliseconds of `repeat` calls after `warmup` (inputs already on device)."""
        inputs = inputs or self.random_inputs()
        args = [tvm.runtime.tensor(np.asarray(inputs[s.name]), self.device) for s in self.inputs]
        for _ in range(warmup):
            self._invoke(args)
        times = []
        for _ in range(repeat):
            self.device.sync()
            t0 = time.perf_counter()
            self._invoke(args)
            self.device.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeat": repeat}


    def profile(self, inputs: dict | None = None, repeat: int = 5):
        """Per-kernel times of one call (autotune.runtime.profiler.Profile), slowest kernel first."""
        from .profiler import profile_vm

        inputs = inputs or self.random_inputs()
        args = [tvm.runtime.tensor(np.asarray(inputs[s.name]), self.device) for s in self.inputs]
        flops = self.metadata.get("kernels", {}).get("flops", {})
        return profile_vm(self._vm, [*args, *self._weights], self.device, flops, repeat=repeat)
