"""`autotune generate`: image-to-video on compiled artifacts (or torch eager, the reference).

"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autotune.support import defaults
from autotune.support.errors import ArtifactError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="image-to-video: generate a video from an image with the compiled pipeline (or torch eager)",
        description="Generate a video from an image with Wan2.1-I2V: CLIP image encoder, VAE encode of the "
        "conditioning video, the denoising loop (diffusers' scheduler) and VAE decode, on the four artifacts in "
        "--artifacts (image_encoder.so, vae_encoder.so, transformer.so, vae_decoder.so) or on torch eager "
        "(--engine torch) with the same weights, inputs and seeds. Text conditioning is precomputed UMT5 "
        "embeddings (--prompt-embeds, shape (1, 512, text_dim)); without them, seeded random embeddings "
        "(the tiny model's default). The image features are cached on disk per image and encoder.",
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--image", required=True, help="the conditioning (first) frame: any image PIL reads")
    g.add_argument("--prompt-embeds", metavar="FILE", help=".npy/.npz/.safetensors text embeddings (1, 512, text_dim); "
                   "default: seeded N(0,1) embeddings from --seed")
    g.add_argument("--negative-prompt-embeds", metavar="FILE", help="negative text embeddings for CFG (default zeros)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of the default text embeddings); default 0")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale; > 1 runs the transformer "
                   "twice per step (Wan's default is 5.0; default here 1.0: off)")
    g = p.add_argument_group("video")
    g.add_argument("--frames", type=int, help="frames (4k+1); default: what the artifacts were built for / the model's")
    g.add_argument("--height", type=int, help="height (multiple of 16); default: the artifacts' / the model's")
    g.add_argument("--width", type=int, help="width (multiple of 16)")
    g.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    g.add_argument("--scheduler", choices=("unipc", "euler"), default="unipc",
                   help="UniPCMultistepScheduler (Wan's) or FlowMatchEulerDiscreteScheduler (default unipc)")
    g.add_argument("--flow-shift", type=float, help="flow shift (default 3.0, Wan 480p; 5.0 for 720p)")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=("autotune", "torch"), default="autotune",
                   help="autotune: the compiled artifacts; torch: torch eager, the reference (default autotune)")
    g.add_argument("--artifacts", metavar="DIR", help=f"directory with the four artifacts (default out/MODEL-TARGET, "
                   f"e.g. out/{defaults.MODEL}-{defaults.TARGET}, where `autotune build` writes)")
    g.add_argument("--model", help=f"zoo model (default: the artifacts' model, else {defaults.MODEL})")
    g.add_argument("--weights", metavar="DIR", help="local diffusers checkpoint: torch engine weights, scheduler config, "
                   "and what --build-missing builds from")
    g.add_argument("--device", default="cpu", help="cpu | cuda[:N] for the artifacts (default cpu)")
    g.add_argument("--build-missing", action="store_true", help="build (untuned, or with --log) any missing artifact first")
    g.add_argument("--target", default=defaults.TARGET, help=f"target for --build-missing (default {defaults.TARGET})")
    g.add_argument("--log", help="tuning log directory for --build-missing")
    g = p.add_argument_group("caches")
    g.add_argument("--step-cache", type=float, metavar="THRESHOLD", help="skip the transformer while the accumulated "
                   "relative change of its input (latents + timestep) stays under THRESHOLD, reusing its last output "
                   "(e.g. 0.1-0.3; default off)")
    g.add_argument("--step-cache-reuse", choices=("output", "residual"), default="output",
                   help="what a skipped step reuses (default output)")
    g.add_argument("--feature-cache", metavar="DIR", help="image-feature cache directory (default ~/.cache/autotune/features)")
    g.add_argument("--no-feature-cache", action="store_true", help="always run the image and VAE encoders")
    g = p.add_argument_group("outputs")
    g.add_argument("-o", "--output", default="out.mp4", help="the mp4 to write (default out.mp4)")
    g.add_argument("--gif", action="store_true", help="also write OUTPUT with .gif")
    g.add_argument("--png-frames", metavar="DIR", help="also write every frame as DIR/frame_NNNN.png")
    g.add_argument("--fps", type=int, default=16, help="frames per second (default 16, Wan's)")
    g.add_argument("--compare", action="store_true", help="also run torch eager with the same inputs (and, with "
                   "--step-cache, the same engine without it) and report PSNR")
    g.add_argument("--json", metavar="FILE", help="write timings and cache statistics as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _make_pipeline(args, engine: str):
    from autotune.i2v.pipeline import (
        Pipeline,
        build_pipeline_artifacts,
        check_artifacts,
    )

    common = dict(scheduler=args.scheduler, flow_shift=args.flow_shift, feature_cache=_feature_cache(args))
    if engine == "torch":
        return Pipeline.from_torch(args.model or defaults.MODEL, args.height, args.width, args.frames,
                                   weights=args.weights, **common)
    artifacts = args.artifacts or f"out/{args.model or defaults.MODEL}-{args.target}"
    if args.build_missing:
        try:
            check_artifacts(artifacts, model=args.model, target=args.target)
        except ArtifactError as missing:  # the only error it raises: components are missing
            print(f"{missing.args[0].splitlines()[0]}\nbuilding the missing artifacts into {artifacts} ...", flush=True)
            build_pipeline_artifacts(args.model or defaults.MODEL, args.target, artifacts, log_dir=args.log,
                                     height=args.height, width=args.width, frames=args.frames, weights=args.weights,
                                     only_missing=True)
    pipe = Pipeline.from_artifacts(artifacts, device=args.device, model=args.model, weights=args.weights, **common)
    want = {"height": args.height, "width": args.width, "frames": args.frames}
    have = {"height": pipe.height, "width": pipe.width, "frames": pipe.frames}
    bad = [f"--{k} {v} (artifacts: {have[k]})" for k, v in want.items() if v is not None and v != have[k]]
    if bad:
        from autotune.support.errors import InputError

        raise InputError(
            f"{artifacts} was built for {pipe.height}x{pipe.width}, {pipe.frames} frames; asked for " + ", ".join(bad)
            + ". Compiled modules have static shapes: build a pipeline at that size into another directory, e.g. "
            f"`python -c \"from autotune.i2v.pipeline import build_pipeline_artifacts; build_pipeline_artifacts("
            f"'{pipe.spec.name}', '{args.target}', 'out/{pipe.spec.name}-{args.target}-"
            f"{args.height or pipe.height}x{args.width or pipe.width}x{args.frames or pipe.frames}', "
            f"height={args.height or pipe.height}, width={args.width or pipe.width}, frames={args.frames or pipe.frames})\"`"
        )
    return pipe


def _feature_cache(args):
    if args.no_feature_cache:
        return False
    return args.feature_cache if args.feature_cache else True


def run(args) -> int:
    from rich.console import Console

    from autotune.i2v.media import load_image, psnr
    from autotune.i2v.pipeline import Pipeline
    from autotune.i2v.step_cache import StepCache

    console = Console(highlight=False)
    load_image(args.image)  # a missing or unreadable image is said first, before any artifact is looked at
    pipe = _make_pipeline(args, args.engine)
    console.print(f"[bold]engine[/] {pipe.engine.describe()}")
    step_cache = StepCache(args.step_cache, args.step_cache_reuse) if args.step_cache is not None else None
    gen = dict(text_embeds=args.prompt_embeds, negative_text_embeds=args.negative_prompt_embeds, seed=args.seed,
               steps=args.steps, guidance=args.guidance)
    result = pipe.generate(args.image, step_cache=step_cache, output=args.output, gif=args.gif or None,
                           png_dir=args.png_frames, fps=args.fps, progress=not args.no_progress, **gen)
    if result.feature_cache == "hit":
        console.print("feature cache: [green]hit[/]: image encoder and VAE encoder skipped "
                      f"({pipe.feature_cache.directory})")
    elif result.feature_cache == "miss":
        console.print(f"feature cache: miss: image features computed and stored in {pipe.feature_cache.directory}")
    if result.step_cache is not None:
        console.print(result.step_cache.summary())
    console.print(result.table())
    report = {"result": result.to_json()}
    if args.compare:
        report["compare"] = {}
        if step_cache is not None:
            plain = pipe.generate(args.image, **gen)
            value = psnr(result.frames, plain.frames)
            report["compare"]["psnr_db_vs_no_step_cache"] = value
            console.print(f"step cache fidelity: frames PSNR {value:.1f} dB vs the same engine without the step cache "
                          f"({result.timings['denoise']:.3f} s vs {plain.timings['denoise']:.3f} s denoising)")
        if args.engine != "torch":
            ref = Pipeline.from_torch(pipe.spec.name, pipe.height, pipe.width, pipe.frames, weights=args.weights,
                                      scheduler=args.scheduler, flow_shift=args.flow_shift, feature_cache=_feature_cache(args))
            torch_result = ref.generate(args.image, progress=not args.no_progress, **gen)
            value = psnr(result.frames, torch_result.frames)
            report["compare"]["psnr_db_vs_torch"] = value
            report["compare"]["torch"] = torch_result.to_json()
            console.print(torch_result.table(title="torch eager (reference)"))
            console.print(f"frames PSNR vs torch eager: {value:.1f} dB; total {result.total_seconds:.3f} s vs torch "
                          f"{torch_result.total_seconds:.3f} s")
    for kind, path in result.outputs.items():
        console.print(f"wrote {kind}: {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0
