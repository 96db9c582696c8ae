"""Rendering and writing of frames: image grids (PNG), mp4/gif (moviepy), upscaling, text overlays.

All frames are uint8 ``(H, W, 3)`` RGB arrays; a video is a sequence of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from worldmodel.atomic import atomic_file


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``(..., H, W, 3)`` by an integer ``factor`` (>= 1)."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"upscale factor must be a whole number >= 1, got {factor}")
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def grid(rows: Sequence[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile ``rows`` (each ``(N, H, W, 3)`` uint8, same N/H/W) into one ``(R*(H+pad), N*(W+pad), 3)`` image."""
    if not rows:
        raise ValueError("grid needs at least one row")
    n, h, w, _ = rows[0].shape
    out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), pad_value, np.uint8)
    for r, row in enumerate(rows):
        if row.shape != rows[0].shape:
            raise ValueError(f"grid row {r} has shape {row.shape}, expected {rows[0].shape}")
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y : y + h, x : x + w] = row[c]
    return out


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 ``(H, W, 3)`` image as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def save_figure(fig: object, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi)  # type: ignore[attr-defined]
    finally:
        plt.close(fig)
    return path


def write_video(
    frames: Sequence[np.ndarray] | np.ndarray, path: str | os.PathLike, fps: float = 10.0
) -> Path:
    """Write frames to ``path`` (``.mp4`` with H.264 or ``.gif``) with moviepy (ffmpeg from imageio-ffmpeg).

    H.264 in yuv420p needs even sizes, so frames are padded by one pixel where needed.
    """
    from moviepy import VideoClip

    path = Path(path)
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError("write_video needs at least one frame")
    for i, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape != frames[0].shape:
            raise ValueError(f"frame {i}: got {f.dtype}{f.shape}, expected uint8 {frames[0].shape} (H, W, 3)")
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"{path}: unsupported video format {suffix!r}; use .mp4 or .gif")
    if suffix == ".mp4":
        h, w = frames[0].shape[:2]
        frames = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0))) for f in frames]
    if suffix == ".gif":  # GIF delays are whole centiseconds: use the nearest representable rate
        fps = 100.0 / max(2, round(100.0 / fps))
    # moviepy's ImageSequenceClip looks frames up by comparing float times (0.1 * 10 < 1.0), which
    # drops or repeats frames at most rates; round the time to the nearest frame index instead.
    n = len(frames)
    clip = VideoClip(lambda t: frames[min(n - 1, int(round(t * fps)))], duration=n / fps).with_fps(fps)
    try:
        with atomic_file(path, suffix=f".tmp{suffix}") as tmp:  # moviepy picks the format from the name
            if suffix == ".mp4":
                clip.write_videofile(
                    str(tmp), codec="libx264", audio=False, logger=None, ffmpeg_params=["-pix_fmt", "yuv420p"]
                )
            else:
                clip.write_gif(str(tmp), fps=fps, logger=None)
    finally:
        clip.close()
    return path


def annotate(
    frame: np.ndarray, lines: Sequence[str], color: tuple[int, int, int] = (255, 255, 0)
) -> np.ndarray:
    """Draw text ``lines`` on a copy of ``frame`` (top-left, with a dark backing for legibility)."""
    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y = 1
    for line in lines:
        box = draw.textbbox((2, y), line, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((2, y), line, fill=color, font=font)
        y = box[3] + 1
    return np.asarray(img)


def tensorboard_video(writer: object, tag: str, frames: np.ndarray, step: int, fps: float = 4.0) -> None:
    """Log ``frames`` uint8 (T, H, W, 3) as an animated GIF image summary to a ``SummaryWriter``.

    TensorBoard shows GIF-encoded image summaries as videos. torch's ``add_video`` builds that GIF
    with moviepy 1.x's ``moviepy.editor``, which moviepy 2 removed, so we encode it with Pillow.
    """
    import io

    from tensorboard.compat.proto.summary_pb2 import Summary

    buf = io.BytesIO()
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    T, H, W, _ = frames.shape
    image = Summary.Image(height=H, width=W, colorspace=3, encoded_image_string=buf.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)  # type: ignore[attr-defined]
