"""Video decoding (PyAV) and frame resizing (Pillow) shared by the dataset converters.

All frames are RGB uint8 ``(H, W, 3)``. Decoding goes through PyAV (FFmpeg), so any container and
codec FFmpeg reads works: mp4/H.264 blobs (RoboNet), avi/Xvid (UCF-101), gif (TGIF).

Resizing uses Pillow: antialiased bilinear when shrinking (close to OpenCV's ``INTER_AREA``, which
RoboNet's own loader uses) and bicubic when enlarging (RoboNet's ``INTER_CUBIC``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

VideoSource = str | os.PathLike | bytes
"""A path to a video file, or the bytes of one (e.g. an mp4 stored inside an HDF5 dataset)."""


class VideoDecodeError(Exception):
    """FFmpeg could not open or decode a video."""


@dataclass
class Video:
    """Decoded frames and the source's timing.

    Attributes:
        frames: uint8 ``(T, H, W, 3)`` after subsampling/transform.
        fps: frames per second of the *source* stream (0.0 if unknown).
        decoded: frames decoded from the source before subsampling.
    """

    frames: np.ndarray
    fps: float
    decoded: int


def iter_frames(
    src: VideoSource,
    *,
    every: int = 1,
    max_frames: int | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    stats: dict[str, float] | None = None,
) -> Iterator[np.ndarray]:
    """Yield RGB frames of ``src``: every ``every``-th decoded frame, at most ``max_frames``.

    Args:
        src: file path or the bytes of a video file.
        every: keep frames 0, every, 2*every, ... (frame-rate subsampling by an integer factor).
        max_frames: stop after yielding this many (None: all).
        transform: applied to each kept frame (e.g. resizing), so full-size frames are never stacked.
        stats: if given, filled with ``fps`` (source rate, 0.0 if unknown) and ``decoded`` (count).

    Raises:
        VideoDecodeError: FFmpeg cannot open the container, finds no video stream, or fails mid-stream.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    where = f"{len(src)}-byte video blob" if isinstance(src, (bytes, bytearray)) else str(src)
    try:
        container = av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{where}: cannot open as a video ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{where}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stats is not None:
            stats["fps"], stats["decoded"] = fps, 0
        kept = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                if stats is not None:
                    stats["decoded"] = i + 1
                if i % every:
                    continue
                img = frame.to_ndarray(format="rgb24")
                yield transform(img) if transform is not None else img
                kept += 1
                if max_frames is not None and kept >= max_frames:
                    return
        except av.FFmpegError as e:
            raise VideoDecodeError(f"{where}: decoding failed after {kept} frames ({e})") from None


def decode_video(
    src: VideoSource,
    *,
    every: int = 1,
    max_frames: int | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Video:
    """Decode ``src`` into a :class:`Video` (see :func:`iter_frames` for the arguments)."""
    stats: dict[str, float] = {}
    frames = list(iter_frames(src, every=every, max_frames=max_frames, transform=transform, stats=stats))
    arr = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return Video(arr, float(stats.get("fps", 0.0)), int(stats.get("decoded", 0)))


def resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 ``(H, W, 3)`` frame to ``size = (height, width)``; no-op if already that size."""
    h, w = size
    if frame.shape[:2] == (h, w):
        return frame
    shrink = h * w < frame.shape[0] * frame.shape[1]
    method = Image.Resampling.BILINEAR if shrink else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(frame).resize((w, h), method))


def resize_center_crop(frame: np.ndarray, resolution: int) -> np.ndarray:
    """Resize so the short side is ``resolution``, then crop the centre ``resolution × resolution``.

    The same geometry as VideoGPT's ``preprocess`` (scale by ``resolution / min(H, W)``, round the
    long side up, centre crop).
    """
    h, w = frame.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = (resolution, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), resolution)
    frame = resize(frame, (nh, nw))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return frame[top : top + resolution, left : left + resolution]


def parse_size(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``64`` -> ``(64, 64)``; ``(48, 64)`` -> ``(48, 64)`` (height, width); validated > 0."""
    hw = (
        (int(resolution), int(resolution))
        if isinstance(resolution, (int, np.integer))
        else tuple(int(x) for x in resolution)
    )
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"resolution: expected a positive int or (height, width), got {resolution!r}")
    return hw  # type: ignore[return-value]


def as_path(p: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(p)))
