"""Image-to-video generation (Wan2.1-I2V) on compiled artifacts or on torch eager.

    from autotune.i2v.pipeline import Pipeline, build_pipeline_artifacts
    build_pipeline_artifacts("wan-i2v-tiny", "x86", "out/wan-i2v-tiny-x86")       # once, untuned
    pipe = Pipeline.from_artifacts("out/wan-i2v-tiny-x86")                          # or:
    ref  = Pipeline.from_torch("wan-i2v-tiny", height=64, width=64, frames=9)       # the reference
    res = pipe.generate("cat.png", seed=0, steps=4, output="cat.mp4")
    res.frames            # (F, H, W, 3) uint8
    print(res.table())    # per-stage timing

The pipeline is diffusers' WanImageToVideoPipeline (pipeline_wan_i2v.py), step by step, with the
four networks behind an `Engine` (same four verbs for every engine: encode_image, encode_video,
denoise, decode), so that the compiled and the torch eager pipelines share every other line:

  1. preprocess (media.py): CLIP pixels (bicubic shortest-edge resize, center crop, CLIP mean/std,
     at the image encoder's size) and VAE pixels (cover-resize + center crop to height x width,
     [-1, 1]).
  2. encode_image: CLIP hidden_states[-2] -> image_embeds (1, image_tokens, image_dim).
  3. encode_video: the conditioning video (first frame = the image, the other frames zeros)
     -> VAE posterior mean, normalised with vae.config.latents_mean / latents_std; a 4-channel
     mask (1 on the first latent frame) is prepended -> condition (1, 20, T, h, w).
     2 and 3 are cached on disk per (image pixels, resolution, model, encoder digest): see
     pipeline_cache.py.
  4. denoise: noise latents (1, 16, T, h, w) from torch.randn with a CPU Generator seeded `seed`;
     the diffusers scheduler (UniPCMultistepScheduler, flow_prediction, flow sigmas, flow_shift
     3.0: Wan2.1-I2V-480P's scheduler config; or FlowMatchEulerDiscreteScheduler); per step the
     transformer sees cat(latents, condition) (36 channels); optional classifier-free guidance;
     optional step cache (step_cache.py).
  5. decode: latents * latents_std + latents_mean -> VAE decode -> frames in [-1, 1] -> uint8.
  6. write: mp4 (libx264 via imageio-ffmpeg), optional GIF and PNG frames.

Text conditioning: precomputed UMT5 embeddings (1, 512, text_dim) from a .npy / .safetensors file
(the 5B-parameter text encoder is not compiled here). Without a file the pipeline uses seeded
random embeddings, N(0, 1) from numpy's default_rng(seed): the tiny model's default, where the
weights are random anyway. The negative embeddings (CFG only) default to zeros, about what UMT5
gives for the empty prompt after its padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autotune.support.errors import ArtifactError, InputError

from . import media
from .feature_cache import FeatureCache, feature_key
from .step_cache import StepCache, StepCacheStats

log = logging.getLogger(__name__)

COMPONENTS = ("image_encoder", "vae_encoder", "transformer", "vae_decoder")
ENGINES = ("autotune", "torch")
SCHEDULERS = ("unipc", "euler")
DEFAULT_FLOW_SHIFT = 3.0  # Wan2.1-I2V-14B-480P's scheduler config (720p uses 5.0)
NUM_TRAIN_TIMESTEPS = 1000
STAGES = ("preprocess", "encode_image", "encode_video", "denoise", "decode", "write")


# =============================================================================== engines
class Engine:
    """Four networks behind four verbs; torch float32 CPU tensors in and out.

    encode_image(pixel_values (1,3,S,S))                      -> image_embeds (1, tokens, dim)
    encode_video(video (1,3,F,H,W) in [-1,1])                 -> latent mean (1,16,T,h,w), unnormalised
    denoise(latents (1,36,T,h,w), t (1,), text, image)        -> noise_pred (1,16,T,h,w)
    decode(latents (1,16,T,h,w), unnormalised)                -> video (1,3,F,H,W) in [-1,1]
    """

    name = "engine"
    model_name: str
    height: int
    width: int
    frames: int

    @property
    def encoder_digest(self) -> str:
        """Names the image and VAE encoders exactly (weights and code): part of the feature-cache key."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self.model_name}, {self.height}x{self.width}, {self.frames} frames)"


class TorchEngine(Engine):
    """torch eager: the component modules of `autotune.models` (the same modules the artifacts are
    imported from), with the same seeded random weights, or the checkpoint in `weights`."""

    name = "torch"

    def __init__(self, model: str = "wan-i2v-tiny", height: int | None = None, width: int | None = None,
                 frames: int | None = None, weights: str | None = None, dtype: torch.dtype = torch.float32):
        from autotune.models import get_model_spec

        spec = get_model_spec(model)
        info = spec.derive_shapes(height, width, frames)
        self.model_name, self.spec = spec.name, spec
        self.height, self.width, self.frames = info["height"], info["width"], info["frames"]
        if weights is not None and not Path(weights).is_dir():
            raise InputError(f"--weights {weights}: not a directory; expected a local diffusers-format checkpoint")
        self.weights = weights
        self.dtype = dtype
        self.modules = {
            c: spec.component(c, self.height, self.width, self.frames).build_module(weights_dir=weights, dtype=dtype)
            for c in COMPONENTS
        }

    @property
    def encoder_digest(self) -> str:
        import diffusers
        import transformers

        if self.weights is None:
            # seeded random weights: the recipe (seeds, configs) and the library versions that init them
            seeds = {c: self.spec.component(c, self.height, self.width, self.frames).seed for c in ("image_encoder", "vae_encoder")}
            source = {"seeded": seeds, "vae": self.spec.vae_config, "clip": self.spec.image_encoder_config}
        else:
            source = {"checkpoint": _dir_fingerprint(self.weights, ("image_encoder", "vae"))}
        text = json.dumps(
            {"engine": "torch", "model": self.model_name, "dtype": str(self.dtype), "source": source,
             "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def _run(self, component: str, *args) -> torch.Tensor:
        module = self.modules[component]
        with torch.inference_mode():
            out = module(*[a.to(self.dtype) for a in args])
        return out.float()

    def encode_image(self, pixel_values):
        return self._run("image_encoder", pixel_values)

    def encode_video(self, video):
        return self._run("vae_encoder", video)

    def denoise(self, latents, t, text, image):
        return self._run("transformer", latents, t, text, image)

    def decode(self, latents):
        return self._run("vae_decoder", latents)


class CompiledEngine(Engine):
    """The four artifacts `build_pipeline_artifacts` (or `autotune build`) writes, run with autotune.load.

    The model and the resolution are read from the artifacts' metadata; the four must agree."""

    name = "autotune"

    def __init__(self, artifacts: str | Path, device: str = "cpu", model: str | None = None):
        self.directory = Path(artifacts)
        self.device = device
        check_artifacts(self.directory, model=model)
        from autotune.runtime.loader import load

        self.modules = {c: load(self.directory / f"{c}.so", device=device) for c in COMPONENTS}
        self.model_name = model or _artifact_model(self.modules["transformer"].metadata) or "wan-i2v-tiny"
        self.height, self.width, self.frames = self._resolution()
        from autotune.models import get_model_spec

        spec = get_model_spec(self.model_name)
        info = spec.derive_shapes(self.height, self.width, self.frames)
        self.spec = spec
        want = {
            "image_encoder": {"pixel_values": (1, 3, info["image_size"], info["image_size"])},
            "vae_encoder": {"video": info["video_shape"]},
            "vae_decoder": {"latents": info["latent_shape"]},
            "transformer": {
                "hidden_states": info["transformer_input_shape"],
                "encoder_hidden_states": (1, info["text_tokens"], info["text_dim"]),
                "encoder_hidden_states_image": (1, info["image_tokens"], info["image_dim"]),
            },
        }
        bad = []
        for comp, inputs in want.items():
            got = {s.name: tuple(s.shape) for s in self.modules[comp].inputs}
            for name, shape in inputs.items():
                if got.get(name) != tuple(shape):
                    bad.append(f"{comp}.so input {name} is {list(got.get(name, ()))}, expected {list(shape)}")
        if bad:
            raise ArtifactError(
                f"{self.directory}: the artifacts do not form one {self.model_name} pipeline at "
                f"{self.height}x{self.width}x{self.frames}: " + "; ".join(bad) + ". Rebuild all four with "
                f"build_pipeline_artifacts({self.model_name!r}, TARGET, {str(self.directory)!r}, height=H, width=W, frames=F)"
            )

    def _resolution(self) -> tuple[int, int, int]:
        video = {s.name: s.shape for s in self.modules["vae_encoder"].inputs}.get("video")
        if video is None or len(video) != 5:
            raise ArtifactError(f"{self.directory / 'vae_encoder.so'}: expected an input 'video' (1, 3, F, H, W)")
        return int(video[3]), int(video[4]), int(video[2])

    @property
    def encoder_digest(self) -> str:
        files = {c: self.modules[c].metadata["files"] for c in ("image_encoder", "vae_encoder")}
        text = json.dumps({"engine": "autotune", "device": self.device.split(":")[0], "files": files}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _run(self, component: str, **inputs) -> torch.Tensor:
        if self.device.startswith("cpu"):
            # torch in, torch out: DLPack shares the buffers, no copy
            return self.modules[component](**{k: v.contiguous() for k, v in inputs.items()})
        # another device: numpy in (copied to the device by the runtime), numpy out
        out = self.modules[component](**{k: v.detach().cpu().numpy() for k, v in inputs.items()})
        return torch.from_numpy(out)

    def encode_image(self, pixel_values):
        return self._run("image_encoder", pixel_values=pixel_values)

    def encode_video(self, video):
        return self._run("vae_encoder", video=video)

    def denoise(self, latents, t, text, image):
        return self._run("transformer", hidden_states=latents, timestep=t, encoder_hidden_states=text,
                         encoder_hidden_states_image=image)

    def decode(self, latents):
        return self._run("vae_decoder", latents=latents)

    def describe(self) -> str:
        return f"autotune ({self.directory}, {self.model_name}, {self.height}x{self.width}, {self.frames} frames, {self.device})"


def _artifact_model(metadata: dict) -> str | None:
    for key in ("model", "source"):
        value = metadata.get(key)
        if isinstance(value, str) and "/" in value:
            return value.split("/")[0]
    return None


def _dir_fingerprint(root: str, subfolders) -> list:
    rows = []
    for sub in subfolders:
        for p in sorted((Path(root) / sub).rglob("*")):
            if p.is_file():
                st = p.stat()
                rows.append([str(p.relative_to(root)), st.st_size, int(st.st_mtime)])
    return rows


def _artifact_present(directory: Path, component: str) -> bool:
    """COMPONENT.json and its library (COMPONENT.so, or a block-wise manifest's units directory)."""
    return (directory / f"{component}.json").exists() and (
        (directory / f"{component}.so").exists() or (directory / component).is_dir()
    )


def check_artifacts(directory: str | Path, model: str | None = None, target: str | None = None) -> None:
    """ArtifactError naming the missing components and the commands that build them."""
    directory = Path(directory)
    missing = [c for c in COMPONENTS if not _artifact_present(directory, c)]
    if not missing:
        return
    found = [c for c in COMPONENTS if c not in missing]
    model = model or "wan-i2v-tiny"
    height = width = frames = None
    unreadable = None
    if found:  # the artifacts already there tell the model, target and resolution to build the rest for
        path = directory / f"{found[0]}.json"
        try:
            meta = json.loads(path.read_text())
            model = _artifact_model(meta) or model
            target = target or meta.get("target", {}).get("preset")
            if found[0] == "vae_encoder":
                _, _, frames, height, width = next(s["shape"] for s in meta["inputs"] if s["name"] == "video")
        except (OSError, ValueError, KeyError, StopIteration, TypeError) as exc:
            unreadable = f"(could not read {path} for the model and resolution: {type(exc).__name__}: {exc}; check them)"
    target = target or "x86"
    res = "" if height is None else f", height={height}, width={width}, frames={frames}"
    res_cli = "" if height is None else f" --height {height} --width {width} --frames {frames}"
    lines = [
        f"{directory}: artifacts directory lacks {', '.join(f'{c}.so' for c in missing)}"
        + (f" (found {', '.join(f'{c}.so' for c in found)})" if found else (" (directory missing)" if not directory.exists() else "")),
        "an i2v pipeline needs all four: " + ", ".join(COMPONENTS) + ". Build the missing ones, untuned, with",
        f"  python -c \"from autotune.i2v.pipeline import build_pipeline_artifacts; "
        f"build_pipeline_artifacts('{model}', '{target}', '{directory}'{res})\"",
        "  (or pass --build-missing to `autotune generate`)",
    ] + ([unreadable] if unreadable else [])
    if directory.name == f"{model}-{target}":
        lines.append("or one at a time, with a tuning log:")
        lines += [
            f"  autotune build --model {model} --component {c} --target {target}{res_cli} --log LOGDIR -o {directory.parent}"
            for c in missing
        ]
    raise ArtifactError("\n".join(lines))


def build_pipeline_artifacts(
    model: str,
    target: str,
    out_dir: str | Path,
    log_dir: str | Path | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    weights: str | None = None,
    components=COMPONENTS,
    only_missing: bool = False,
    quiet: bool = False,
) -> dict:
    """Build the four pipeline artifacts into `out_dir` (out_dir/<component>.so + weights + json).

    Untuned (fallback schedules) unless `log_dir` holds tuning records for them. Returns
    {component: BuildReport} for what was built. `only_missing`: keep artifacts already there.
    """
    from autotune.build.blockwise import build_source
    from autotune.frontend.blockwise import load_component

    out_dir = Path(out_dir)
    reports = {}
    for comp in components:
        if only_missing and _artifact_present(out_dir, comp):
            continue
        started = time.perf_counter()
        source = load_component(model, comp, weights, height, width, frames)  # the transformer: block-wise
        report = build_source(source, target, out_dir / f"{comp}.so", log_dir=log_dir,
                              extra_metadata={"model": source.label}, progress=log.info)
        reports[comp] = report
        if not quiet:
            log.info("built %s (import + build %.1f s)", report.summary(), time.perf_counter() - started)
            for note in report.notes:
                log.info("  note: %s", note)
    return reports


# =============================================================================== inputs
def load_text_embeds(source, text_dim: int, label: str = "--prompt-embeds") -> torch.Tensor:
    """(1, 512, text_dim) float32 from a .npy / .npz / .safetensors file, an array or a tensor.

    Fewer than 512 tokens are zero-padded (as diffusers pads UMT5 output); more is an error."""
    from autotune.models.wan import TEXT_TOKENS

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{label} {path}: no such file")
        if path.suffix == ".npy":
            array = np.load(path)
        elif path.suffix == ".npz":
            with np.load(path) as data:
                array = data[_pick_key(list(data.files), path, label)]
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            array = tensors[_pick_key(list(tensors), path, label)]
        else:
            raise InputError(f"{label} {path}: expected a .npy, .npz or .safetensors file")
    elif isinstance(source, torch.Tensor):
        array = source.detach().cpu().float().numpy()
    else:
        array = np.asarray(source)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != 1 or array.shape[2] != text_dim or array.shape[1] > TEXT_TOKENS:
        raise InputError(
            f"{label}: text embeddings of shape {list(array.shape)}; expected (1, {TEXT_TOKENS}, {text_dim}) "
            f"(UMT5 output of this model's text_dim, at most {TEXT_TOKENS} tokens)"
        )
    if array.shape[1] < TEXT_TOKENS:
        array = np.concatenate([array, np.zeros((1, TEXT_TOKENS - array.shape[1], text_dim), np.float32)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _pick_key(keys: list[str], path: Path, label: str) -> str:
    for k in ("prompt_embeds", "text_embeds", "negative_prompt_embeds", "embeds"):
        if k in keys:
            return k
    if len(keys) == 1:
        return keys[0]
    raise InputError(f"{label} {path}: holds {keys}; expected one array or one named prompt_embeds")


def seeded_text_embeds(seed: int, text_dim: int) -> torch.Tensor:
    """The tiny-model default: N(0, 1) embeddings (1, 512, text_dim) from numpy default_rng(seed)."""
    from autotune.models.wan import TEXT_TOKENS

    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((1, TEXT_TOKENS, text_dim)).astype(np.float32))


def make_scheduler(kind: str = "unipc", flow_shift: float | None = None, weights: str | None = None):
    """The Wan2.1-I2V scheduler: UniPC (flow_prediction, flow sigmas, flow_shift) or flow-match Euler.

    With a checkpoint directory holding scheduler/scheduler_config.json its config is used
    (flow_shift, if given, overrides it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind not in SCHEDULERS:
        raise InputError(f"scheduler {kind!r}: expected one of {', '.join(SCHEDULERS)}")
    cls = UniPCMultistepScheduler if kind == "unipc" else FlowMatchEulerDiscreteScheduler
    if weights is not None and (Path(weights) / "scheduler" / "scheduler_config.json").is_file():
        config = cls.load_config(str(Path(weights) / "scheduler"))
        extra = {} if flow_shift is None else ({"flow_shift": flow_shift} if kind == "unipc" else {"shift": flow_shift})
        return cls.from_config(config, **extra)
    shift = DEFAULT_FLOW_SHIFT if flow_shift is None else flow_shift
    if kind == "unipc":
        # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers scheduler/scheduler_config.json
        return UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
            final_sigmas_type="zero", timestep_spacing="linspace",
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


# =============================================================================== results
@dataclass
class PreparedImage:
    """A decoded, preprocessed conditioning image (what may run ahead, off the critical path)."""

    source: str
    digest: str
    clip_pixels: np.ndarray
    vae_pixels: np.ndarray
    seconds: float


@dataclass
class GenerationResult:
    frames: np.ndarray  # (F, H, W, 3) uint8
    latents: torch.Tensor  # final latents (1, 16, T, h, w), normalised space
    timings: dict[str, float]  # stage -> seconds (see STAGES)
    step_seconds: list[float]
    step_computed: list[bool]  # False: the step cache skipped the transformer
    feature_cache: str  # "hit" | "miss" | "off"
    step_cache: StepCacheStats | None
    engine: str
    seed: int
    steps: int
    guidance: float
    outputs: dict[str, str] = field(default_factory=dict)
    image_embeds: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    _pending_write: Future | None = field(default=None, repr=False)

    def wait(self) -> "GenerationResult":
        """Block until an asynchronous write (generate_many with overlap) has finished."""
        if self._pending_write is not None:
            self._pending_write.result()
            self._pending_write = None
        return self

    @property
    def total_seconds(self) -> float:
        return float(sum(self.timings.get(s, 0.0) for s in STAGES))

    def to_json(self) -> dict:
        return {
            "engine": self.engine, "seed": self.seed, "steps": self.steps, "guidance": self.guidance,
            "frames": list(self.frames.shape), "timings_s": {k: round(v, 6) for k, v in self.timings.items()},
            "step_s": [round(s, 6) for s in self.step_seconds], "step_computed": self.step_computed,
            "feature_cache": self.feature_cache,
            "step_cache": self.step_cache.to_json() if self.step_cache else None, "outputs": self.outputs,
        }

    def table(self, title: str | None = None):
        """A rich Table of the per-stage times (print it with rich, or str() via `format_table`)."""
        from rich.table import Table

        table = Table(title=title or f"{self.engine}: {self.frames.shape[0]} frames, {self.steps} steps")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("note")
        notes = {
            "encode_image": f"feature cache {self.feature_cache}",
            "encode_video": f"feature cache {self.feature_cache}",
            "denoise": self._denoise_note(),
            "write": ", ".join(Path(p).name for p in self.outputs.values()),
        }
        for stage in STAGES:
            if stage in self.timings:
                table.add_row(stage, f"{self.timings[stage]:.3f}", notes.get(stage, ""))
        table.add_row("total", f"{self.total_seconds:.3f}", "")
        return table

    def _denoise_note(self) -> str:
        ran = [s for s, c in zip(self.step_seconds, self.step_computed) if c]
        per = f"{1e3 * float(np.median(ran)):.1f} ms/step (median of {len(ran)} run)" if ran else ""
        if self.step_cache is not None:
            per += f"; {self.step_cache.skipped}/{self.steps} skipped by the step cache"
        return per

    def format_table(self) -> str:
        from rich.console import Console

        console = Console(width=110, record=True, file=open(os.devnull, "w"))
        console.print(self.table())
        return console.export_text()


# =============================================================================== pipeline
class Pipeline:
    """Wan2.1 I2V on one engine. See the module docstring for the steps."""

    def __init__(self, engine: Engine, scheduler: str = "unipc", flow_shift: float | None = None,
                 feature_cache: FeatureCache | str | Path | bool | None = True, weights: str | None = None):
        from autotune.models import get_model_spec

        self.engine = engine
        self.spec = get_model_spec(engine.model_name)
        self.info = self.spec.derive_shapes(engine.height, engine.width, engine.frames)
        self.scheduler_kind, self.flow_shift, self.scheduler_weights = scheduler, flow_shift, weights
        make_scheduler(scheduler, flow_shift, weights)  # validate now
        if feature_cache is True:
            feature_cache = FeatureCache()
        elif feature_cache in (False, None):
            feature_cache = None
        elif not isinstance(feature_cache, FeatureCache):
            feature_cache = FeatureCache(feature_cache)
        self.feature_cache = feature_cache
        vae = self.spec.vae_config
        z = vae["z_dim"]
        mean, std = _vae_latent_stats(self.spec)
        self.latents_mean = torch.tensor(mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(std, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.calls: Counter = Counter()  # engine verb -> calls (tests, reports)

    # -------------------------------------------------------------------- constructors
    @classmethod
    def from_artifacts(cls, artifacts, device: str = "cpu", model: str | None = None, **kwargs) -> "Pipeline":
        return cls(CompiledEngine(artifacts, device=device, model=model), **kwargs)

    @classmethod
    def from_torch(cls, model: str = "wan-i2v-tiny", height=None, width=None, frames=None, weights=None, **kwargs) -> "Pipeline":
        return cls(TorchEngine(model, height, width, frames, weights=weights), weights=weights, **kwargs)

    @property
    def height(self) -> int:
        return self.engine.height

    @property
    def width(self) -> int:
        return self.engine.width

    @property
    def frames(self) -> int:
        return self.engine.frames

    # -------------------------------------------------------------------- stages
    def prepare_image(self, image) -> PreparedImage:
        """Decode + hash + preprocess (CPU-light; may run in a helper thread ahead of time)."""
        started = time.perf_counter()
        pil = media.load_image(image)
        prepared = PreparedImage(
            source=str(image) if isinstance(image, (str, Path)) else type(image).__name__,
            digest=media.image_digest(pil),
            clip_pixels=media.clip_pixels(pil, self.info["image_size"]),
            vae_pixels=media.vae_pixels(pil, self.height, self.width),
            seconds=0.0,
        )
        prepared.seconds = time.perf_counter() - started
        return prepared

    def _call(self, verb: str, *args) -> torch.Tensor:
        self.calls[verb] += 1
        out = getattr(self.engine, verb)(*args)
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))

    def encode(self, prepared: PreparedImage, timings: dict | None = None):
        """(image_embeds, condition (1, 20, T, h, w), "hit" | "miss" | "off")."""
        timings = {} if timings is None else timings
        key = None
        if self.feature_cache is not None:
            key = feature_key(prepared.digest, self.height, self.width, self.frames, self.spec.name,
                              self.engine.encoder_digest)
            entry = self.feature_cache.get(key)
            if entry is not None:
                timings["encode_image"] = timings["encode_video"] = 0.0
                image_embeds = torch.from_numpy(entry["image_embeds"])
                return image_embeds, self._condition(torch.from_numpy(entry["latent_mean"])), "hit"
        t0 = time.perf_counter()
        image_embeds = self._call("encode_image", torch.from_numpy(prepared.clip_pixels)).float()
        t1 = time.perf_counter()
        timings["encode_image"] = t1 - t0
        # the conditioning video: the image, then frames-1 zero frames (pipeline_wan_i2v.prepare_latents)
        image = torch.from_numpy(prepared.vae_pixels).unsqueeze(2)
        video = torch.cat([image, image.new_zeros(1, 3, self.frames - 1, self.height, self.width)], dim=2)
        latent_mean = self._call("encode_video", video).float()
        timings["encode_video"] = time.perf_counter() - t1
        if key is not None:
            self.feature_cache.put(key, image_embeds.numpy(), latent_mean.numpy(), info={
                "image": prepared.source, "image_digest": prepared.digest, "model": self.spec.name,
                "height": self.height, "width": self.width, "frames": self.frames, "engine": self.engine.name,
                "encoder_digest": self.engine.encoder_digest,
            })
        return image_embeds, self._condition(latent_mean), ("miss" if key is not None else "off")

    def _condition(self, latent_mean: torch.Tensor) -> torch.Tensor:
        """Normalised latent + the 4-channel first-frame mask: (1, 20, T, h, w)."""
        latent = (latent_mean - self.latents_mean) / self.latents_std
        t, h, w = latent.shape[2:]
        ft = self.spec.vae_temporal_factor
        mask = torch.ones(1, 1, self.frames, h, w)
        mask[:, :, 1:] = 0
        first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=ft)
        mask = torch.cat([first, mask[:, :, 1:]], dim=2).view(1, -1, ft, h, w).transpose(1, 2)
        return torch.cat([mask, latent], dim=1).contiguous()

    def initial_latents(self, seed: int) -> torch.Tensor:
        """The noise: torch.randn with a CPU Generator seeded `seed` (diffusers' randn_tensor on CPU)."""
        return torch.randn(self.info["latent_shape"], generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)

    def denoise(self, latents, condition, text, image_embeds, steps: int, guidance: float = 1.0,
                negative_text=None, step_cache: StepCache | None = None, progress: bool = False):
        """The denoising loop; returns (latents, step_seconds, step_computed, seconds).

        seconds: the loop's wall time (scheduler setup included, progress bar start/stop not)."""
        setup_started = time.perf_counter()
        scheduler = make_scheduler(self.scheduler_kind, self.flow_shift, self.scheduler_weights)
        scheduler.set_timesteps(steps, device="cpu")
        timesteps = scheduler.timesteps
        cfg = guidance > 1.0
        if cfg and negative_text is None:
            negative_text = torch.zeros_like(text)
        if step_cache is not None:
            step_cache.reset(len(timesteps))
        step_seconds, step_computed = [], []
        setup = time.perf_counter() - setup_started
        bar = _StepProgress(len(timesteps), self.engine.name) if progress else None
        loop_started = time.perf_counter()
        try:
            for i, t in enumerate(timesteps):
                started = time.perf_counter()
                model_input = torch.cat([latents, condition], dim=1)
                timestep = t.reshape(1).to(torch.float32)
                compute = step_cache is None or step_cache.should_compute(i, latents, float(t))
                if compute:
                    cond = self._call("denoise", model_input, timestep, text, image_embeds).float()
                    uncond = self._call("denoise", model_input, timestep, negative_text, image_embeds).float() if cfg else None
                    if step_cache is not None:
                        step_cache.store("cond", latents, cond)
                        if cfg:
                            step_cache.store("uncond", latents, uncond)
                else:
                    cond = step_cache.reuse("cond", latents)
                    uncond = step_cache.reuse("uncond", latents) if cfg else None
                noise_pred = uncond + guidance * (cond - uncond) if cfg else cond
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                step_seconds.append(time.perf_counter() - started)
                step_computed.append(compute)
                if bar is not None:
                    bar.advance(step_seconds[-1], compute)
            seconds = time.perf_counter() - loop_started + setup
        finally:
            if bar is not None:
                bar.close()
        return latents, step_seconds, step_computed, seconds

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        video = self._call("decode", (latents * self.latents_std + self.latents_mean).contiguous())
        return media.video_to_frames(video)

    # -------------------------------------------------------------------- generation
    def generate(self, image, text_embeds=None, negative_text_embeds=None, seed: int = 0, steps: int = 4,
                 guidance: float = 1.0, step_cache: float | StepCache | None = None, output=None, gif=None,
                 png_dir=None, fps: int = 16, progress: bool = False) -> GenerationResult:
        """One video from one image. `image`: a path, PIL image or array, or a PreparedImage.

        text_embeds: None (seeded random, see module docstring), a file path, array or tensor of
        (1, 512, text_dim). step_cache: a threshold (float) or a StepCache. output / gif / png_dir:
        where to write the mp4, GIF and PNG frames (gif=True: beside the mp4)."""
        prepared = image if isinstance(image, PreparedImage) else self.prepare_image(image)
        result = self._generate(prepared, text_embeds, negative_text_embeds, seed, steps, guidance, step_cache, progress)
        self.write(result, output, gif, png_dir, fps)
        return result

    def _generate(self, prepared, text_embeds, negative_text_embeds, seed, steps, guidance, step_cache, progress):
        if steps < 1:
            raise InputError(f"steps={steps}: expected at least 1")
        text_dim = self.info["text_dim"]
        text = seeded_text_embeds(seed, text_dim) if text_embeds is None else load_text_embeds(text_embeds, text_dim)
        negative = None
        if negative_text_embeds is not None:
            negative = load_text_embeds(negative_text_embeds, text_dim, "--negative-prompt-embeds")
        if step_cache is not None and not isinstance(step_cache, StepCache):
            step_cache = StepCache(float(step_cache))
        timings = {"preprocess": prepared.seconds}
        image_embeds, condition, fc = self.encode(prepared, timings)
        latents, step_seconds, computed, timings["denoise"] = self.denoise(
            self.initial_latents(seed), condition, text, image_embeds, steps, guidance, negative, step_cache, progress
        )
        started = time.perf_counter()
        frames = self.decode(latents)
        timings["decode"] = time.perf_counter() - started
        return GenerationResult(
            frames=frames, latents=latents, timings=timings, step_seconds=step_seconds, step_computed=computed,
            feature_cache=fc, step_cache=step_cache.stats if step_cache is not None else None,
            engine=self.engine.name, seed=seed, steps=steps, guidance=guidance,
            image_embeds=image_embeds, condition=condition,
        )

    def write(self, result: GenerationResult, output=None, gif=None, png_dir=None, fps: int = 16) -> GenerationResult:
        """Write the mp4 / GIF / PNG frames and record the time under timings["write"]."""
        started = time.perf_counter()
        if output is not None:
            result.outputs["mp4"] = str(media.write_mp4(result.frames, output, fps))
        if gif:
            path = Path(output).with_suffix(".gif") if gif is True else Path(gif)
            result.outputs["gif"] = str(media.write_gif(result.frames, path, fps))
        if png_dir is not None:
            media.write_png_frames(result.frames, png_dir)
            result.outputs["png"] = str(png_dir)
        if result.outputs:
            result.timings["write"] = time.perf_counter() - started
        return result

    def generate_many(self, requests: list[dict], overlap: bool = True, progress: bool = False) -> tuple[list[GenerationResult], float]:
        """Several videos back to back; returns (results, wall seconds).

        Each request is a dict of `generate` keyword arguments (image=... required). With
        `overlap`, a 2-thread pool decodes/preprocesses the next request's image and writes the
        previous video while the engine computes the current one; without, everything runs in
        order on this thread. The outputs are identical either way."""
        started = time.perf_counter()
        results: list[GenerationResult] = []
        if not overlap:
            for req in requests:
                results.append(self.generate(**req, progress=progress))
            return results, time.perf_counter() - started
        write_keys = ("output", "gif", "png_dir", "fps")
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="autotune-io") as pool:
            pending = pool.submit(self.prepare_image, requests[0]["image"]) if requests else None
            for i, req in enumerate(requests):
                prepared = pending.result()
                if i + 1 < len(requests):
                    pending = pool.submit(self.prepare_image, requests[i + 1]["image"])
                args = {k: v for k, v in req.items() if k not in write_keys and k != "image"}
                result = self._generate(
                    prepared, args.get("text_embeds"), args.get("negative_text_embeds"), args.get("seed", 0),
                    args.get("steps", 4), args.get("guidance", 1.0), args.get("step_cache"), progress,
                )
                writes = {k: req[k] for k in write_keys if k in req}
                result._pending_write = pool.submit(self.write, result, **writes)
                results.append(result)
            for r in results:
                r.wait()
        return results, time.perf_counter() - started


def _vae_latent_stats(spec) -> tuple[list[float], list[float]]:
    """vae.config.latents_mean / latents_std (AutoencoderKLWan's config; its defaults unless the
    model's VAE config overrides them)."""
    cfg = spec.vae_config
    if "latents_mean" in cfg and "latents_std" in cfg:
        return list(cfg["latents_mean"]), list(cfg["latents_std"])
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return list(params["latents_mean"].default), list(params["latents_std"].default)


class _StepProgress:
    """A rich progress bar: one tick per denoising step, with the time of the last step."""

    def __init__(self, total: int, label: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]denoise[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, info="")
        self.times: list[float] = []

    def advance(self, seconds: float, computed: bool) -> None:
        self.times.append(seconds)
        info = f"{1e3 * seconds:8.1f} ms/step" + ("" if computed else " (cached)")
        self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.times:
            self.progress.update(self.task, info=f"{1e3 * sum(self.times) / len(self.times):8.1f} ms/step avg")
        self.progress.stop()
