"""Images in, videos out: loading, preprocessing for Wan I2V, writing mp4 / GIF / PNG frames.

Preprocessing follows what Wan2.1-I2V expects:
  * image encoder (CLIP ViT): the CLIP image processor's recipe (bicubic resize of the shortest
    edge to the encoder's image size, center crop to a square, /255, CLIP mean/std), as
    `transformers.CLIPImageProcessor` does for Wan's `image_processor`.
  * VAE: the image resized to cover (height, width) and center-cropped (aspect kept; diffusers'
    VideoProcessor stretches instead), scaled to [-1, 1].

Everything here is numpy / PIL; no torch, no tvm.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from autotune.support.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- images in
def load_image(image) -> "PIL.Image.Image":  # noqa: F821
    """An RGB PIL image from a path, a PIL image, or an (H, W, 3) uint8 / [0, 1] float array."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"--image {path}: no such file")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ...
            raise InputError(f"--image {path}: not an image PIL can read ({exc})") from exc
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InputError(f"image array has shape {array.shape}; expected (H, W, 3) RGB")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., :3], "RGB")


def image_digest(image: "PIL.Image.Image") -> str:  # noqa: F821
    """sha256 of the decoded RGB pixels and size: the same picture gives the same key whatever
    the file format, name or metadata."""
    h = hashlib.sha256()
    h.update(f"{image.width}x{image.height}:".encode())
    h.update(np.asarray(image.convert("RGB"), dtype=np.uint8).tobytes())
    return h.hexdigest()


def resize_cover_crop(image, height: int, width: int, resample) -> "PIL.Image.Image":  # noqa: F821
    """Resize so that (height, width) is covered, then center-crop to exactly that."""
    scale = max(height / image.height, width / image.width)
    h, w = max(height, round(image.height * scale)), max(width, round(image.width * scale))
    image = image.resize((w, h), resample=resample)
    top, left = (h - height) // 2, (w - width) // 2
    return image.crop((left, top, left + width, top + height))


def clip_pixels(image, size: int) -> np.ndarray:
    """(1, 3, size, size) float32 for the CLIP image encoder (CLIPImageProcessor's recipe)."""
    from PIL import Image

    # transformers' get_resize_output_image_size: the short edge -> size, the long edge floored
    short, long = min(image.width, image.height), max(image.width, image.height)
    new_long = int(size * long / short)
    w, h = (size, new_long) if image.width <= image.height else (new_long, size)
    resized = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    top, left = (h - size) // 2, (w - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    x = np.asarray(crop, dtype=np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def vae_pixels(image, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1] for the VAE encoder."""
    from PIL import Image

    crop = resize_cover_crop(image, height, width, Image.Resampling.LANCZOS)
    x = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


# ----------------------------------------------------------------------------- video out
def video_to_frames(video) -> np.ndarray:
    """(1, 3, F, H, W) in [-1, 1] (numpy or torch) -> (F, H, W, 3) uint8."""
    video = video.detach().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    frames = np.clip(video[0].transpose(1, 2, 3, 0) * 0.5 + 0.5, 0.0, 1.0)
    return (frames * 255.0).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path, fps: int = 16) -> Path:
    """H.264 mp4 (yuv420p; imageio-ffmpeg). Sizes not a multiple of 16 are written as-is."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(
        str(path), fps=fps, codec="libx264", quality=8, pixelformat="yuv420p", macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()
    return path


def write_gif(frames: np.ndarray, path, fps: int = 16) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_png_frames(frames: np.ndarray, directory) -> list[Path]:
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        p = directory / f"frame_{i:04d}.png"
        Image.fromarray(frame).save(p)
        paths.append(p)
    return paths


def frame_strip(rows: list[np.ndarray], path, scale: int = 2, gap: int = 2) -> Path:
    """One PNG: each entry of `rows` ((F, H, W, 3) uint8) is a row of frames, upscaled `scale`x."""
    from PIL import Image

    rows = [np.repeat(np.repeat(r, scale, axis=1), scale, axis=2) for r in rows]
    f = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + gap) - gap, f * (w + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, frame in enumerate(r):
            canvas[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = frame
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def read_video(path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file (imageio-ffmpeg)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two frame stacks (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)
