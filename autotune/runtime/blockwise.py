"""A block-wise artifact: prologue -> one block library run once per layer -> epilogue.

Called like any artifact (`autotune.load(".../transformer.so")`, the manifest `transformer.json`
says it is block-wise). Each layer's weights are read from their file when the layer runs and
dropped after it: resident memory is about one layer's weights plus activations, whatever the
layer count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autotune.support.errors import ArtifactError
from autotune.support.signature import TensorSpec

from .artifact import ArtifactPaths, check_file, read_metadata
from .module import CompiledModule

KIND = "blockwise"
LAYER_MODES = ("auto", "stream", "resident")


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; free pages elsewhere).
    Not psutil: the runtime runs on boards with tvm, numpy and safetensors only."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def is_blockwise(path: str | Path) -> bool:
    """Whether `path` (a .so, .json or stem) names a block-wise manifest."""
    metadata = ArtifactPaths.for_library(path).metadata
    if not metadata.is_file():
        return False
    try:
        return json.loads(metadata.read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return False  # CompiledModule reports an unreadable metadata file


class BlockwiseModule(CompiledModule):
    """A loaded block-wise artifact; same calls as CompiledModule (inputs, outputs, benchmark)."""

    def __init__(self, path: str | Path, device: str = "cpu", verify_hashes: bool = False, check_finite: bool = False,
                 layers: str = "auto"):
        """layers: "stream" reads each layer's weights when it runs and drops them after; "resident"
        reads them all once; "auto" keeps them resident when they take under half the memory available."""
        if layers not in LAYER_MODES:
            raise ArtifactError(f"layers={layers!r}: expected one of {', '.join(LAYER_MODES)}")
        self.paths = ArtifactPaths.for_library(path)
        self.metadata = read_metadata(self.paths)
        root = self.paths.metadata.parent
        missing = [u for u in ("prologue", "block", "epilogue") if u not in self.metadata.get("units", {})]
        if missing or not self.metadata.get("layers"):
            raise ArtifactError(f"{self.paths.metadata}: block-wise manifest without units {missing} or layers; rebuild it")
        self.units = {name: CompiledModule(root / rel, device, verify_hashes, check_finite=False)
                      for name, rel in self.metadata["units"].items()}
        self.layer_files = []
        for entry in self.metadata["layers"]:
            path = root / entry["name"]
            check_file(path, "layer weights", entry, verify_hashes)
            self.layer_files.append(path)
        self.device = self.units["prologue"].device
        self.inputs = [TensorSpec.from_json(s) for s in self.metadata["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in self.metadata["outputs"]]
        self.check_finite = check_finite
        total = sum(entry["bytes"] for entry in self.metadata["layers"])
        if layers == "auto":
            layers = "resident" if total < available_memory() // 2 else "stream"
        self.layer_mode = layers
        block = self.units["block"]
        self._resident = [block.load_weight_tensors(p) for p in self.layer_files] if layers == "resident" else None

    @property
    def num_layers(self) -> int:
        return len(self.layer_files)

    def __repr__(self) -> str:
        return f"<autotune block-wise module {self.paths.metadata.name} ({self.num_layers} layers, {self.layer_mode}) on {self.device}: {self.signature}>"

    def _invoke(self, args: list):
        tokens, context, timestep_proj, temb, rotary_cos, rotary_sin = self.units["prologue"].run(args)
        block = self.units["block"]
        for layer, path in enumerate(self.layer_files):
            weights = self._resident[layer] if self._resident is not None else block.load_weight_tensors(path)
            tokens = block.run([tokens, context, timestep_proj, rotary_cos, rotary_sin], weights)
            del weights  # streamed: dropped before the next layer's are read
        return self.units["epilogue"].run([tokens, temb])

    def profile(self, inputs: dict | None = None, repeat: int = 5):
        """Per-kernel times of one block call (layer 0's weights): the part that runs num_layers times."""
        import numpy as np
        import tvm

        from .profiler import profile_vm

        inputs = inputs or self.random_inputs()
        args = [tvm.runtime.tensor(np.asarray(inputs[s.name]), self.device) for s in self.inputs]
        tokens, context, timestep_proj, _, rotary_cos, rotary_sin = self.units["prologue"].run(args)
        block = self.units["block"]
        flops = block.metadata.get("kernels", {}).get("flops", {})
        weights = block.load_weight_tensors(self.layer_files[0])
        return profile_vm(block._vm, [tokens, context, timestep_proj, rotary_cos, rotary_sin, *weights],
                          self.device, flops, repeat=repeat)
