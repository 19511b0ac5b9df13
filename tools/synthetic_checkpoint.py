"""Write a diffusers-format Wan2.1-I2V checkpoint with seeded random bf16 weights, shard by shard.

    python tools/synthetic_checkpoint.py --model wan2.1-i2v-14b-480p [--layers N] -o DIR

No real weights can be downloaded where autotune is developed; this writes the exact layout of
Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (transformer/ as sharded safetensors with an index,
vae/ and image_encoder/ with save_pretrained) so the full-size path can be built and measured.
`--layers N` keeps every width and writes N transformer blocks. Memory stays bounded by one shard:
each tensor is generated (seeded by its name), cast to bf16 and written with its shard. Shards are
written to a temporary name and renamed when complete; re-running skips the complete ones.

The values are random (normal, scaled by 1/sqrt(fan-in); norms 1, biases small): they exercise
the compute and the numerics of a real checkpoint's shapes, not its outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

SHARD_BYTES = 4 << 30  # the Hugging Face checkpoints' ~5 GB shards


def tensor_for(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The seeded random bf16 value of checkpoint tensor `name` (same name, seed -> same value)."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(digest)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    fan_in = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else shape[0]
    return (torch.randn(shape, generator=gen) * fan_in**-0.5).to(torch.bfloat16)


def transformer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the transformer's state dict and its shape, from a meta-device model."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensor names in state-dict order, cut into shards of about `shard_bytes` (bf16)."""
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + ([current] if current else [])


def write_transformer(config: dict, out: Path, seed: int, shard_bytes: int, log=print) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shapes = transformer_shapes(config)
    shards = plan_shards(shapes, shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = out / f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update({n: file.name for n in names})
        total += sum(2 * int(torch.Size(shapes[n]).numel()) for n in names)
        if file.exists():
            with safe_open(str(file), framework="pt") as f:
                if set(f.keys()) == set(names):
                    log(f"{file.name}: complete, kept")
                    continue
        started = time.time()
        tensors = {n: tensor_for(n, shapes[n], seed) for n in names}
        partial = file.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        partial.rename(file)  # a shard is either complete or absent
        log(f"{file.name}: {len(names)} tensors, {sum(t.numel() for t in tensors.values()) / 1e6:.0f} M params "
            f"in {time.time() - started:.1f} s")
        del tensors
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    diffusers_config = {"_class_name": "WanTransformer3DModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    (out / "config.json").write_text(json.dumps(diffusers_config, indent=2) + "\n")


def write_small_component(spec, component: str, out: Path) -> None:
    """The VAE or the image encoder (127 M / 632 M params): the seeded model, saved in bf16."""
    model = spec.component(component).build_model(dtype=torch.bfloat16)
    model.save_pretrained(str(out))


def main(argv=None) -> int:
    from autotune.models import get_model_spec, list_models

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan2.1-i2v-14b-480p", help=f"one of: {', '.join(m.name for m in list_models())}")
    p.add_argument("--layers", type=int, help="transformer blocks to write (default: the model's; every width is kept)")
    p.add_argument("--components", default="transformer,vae,image_encoder",
                   help="which subfolders to write (default: all three)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gib", type=float, default=SHARD_BYTES / 2**30, help="transformer shard size (default 4 GiB)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write (created)")
    args = p.parse_args(argv)
    spec = get_model_spec(args.model)
    config = dict(spec.transformer_config)
    if args.layers is not None:
        if args.layers < 1:
            p.error(f"--layers {args.layers}: at least 1")
        config["num_layers"] = args.layers
    out = Path(args.output)
    wanted = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = set(wanted) - {"transformer", "vae", "image_encoder"}
    if unknown:
        p.error(f"--components: unknown {sorted(unknown)}; choose from transformer, vae, image_encoder")
    if "transformer" in wanted:
        write_transformer(config, out / "transformer", args.seed, int(args.shard_gib * 2**30))
    if "vae" in wanted:
        write_small_component(spec, "vae_decoder", out / "vae")
    if "image_encoder" in wanted:
        write_small_component(spec, "image_encoder", out / "image_encoder")
    print(f"wrote {args.model} ({config['num_layers']} layers) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
