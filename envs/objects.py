"""Object screen boxes from ViZDoom's labels buffer, for checking that a tokenizer keeps small objects.

ViZDoom labels every visible actor (``state.labels``: ``object_name`` and a screen box ``x, y, width,
height`` in pixels of the 160x120 screen); :func:`collect_object_frames` plays random episodes of a real env
and keeps the observation frames with their boxes scaled to the observation's resolution. Names seen
(printed from a few random episodes): HGS ``CustomMedikit``; Take Cover ``DoomImp`` (the monsters) and
``DoomImpBall`` (the fireballs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.vizdoom import VizdoomEnv

SCREEN_W, SCREEN_H = 160, 120
OBJECTS = {
    "vizdoom_hgs": ("CustomMedikit",),
    "vizdoom_take_cover": ("DoomImpBall",),
    "vizdoom_battle2": ("CustomMedikit",),
}
"""The small objects a policy reacts to, per env: medkits (HGS), fireballs (Take Cover)."""


@dataclass(frozen=True)
class ObjectBox:
    """One labelled object: ``name`` and its box in observation pixels, rows ``y0:y1``, columns ``x0:x1``
    (half-open, clipped to the frame); ``value`` is its id in the 160x120 labels buffer."""

    name: str
    value: int
    x0: int
    y0: int
    x1: int
    y1: int


def screen_boxes(labels: list, resolution: int) -> list[ObjectBox]:
    """ViZDoom labels -> boxes in a ``resolution`` x ``resolution`` observation (screen scaled 160x120 ->
    resolution x resolution; the box grows to whole pixels: floor of the start, ceil of the end)."""
    sx, sy = resolution / SCREEN_W, resolution / SCREEN_H
    out = []
    for lab in labels:
        x0, y0 = int(np.floor(lab.x * sx)), int(np.floor(lab.y * sy))
        x1, y1 = int(np.ceil((lab.x + lab.width) * sx)), int(np.ceil((lab.y + lab.height) * sy))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(resolution, x1), min(resolution, y1)
        if x1 > x0 and y1 > y0:
            out.append(ObjectBox(lab.object_name, int(lab.value), x0, y0, x1, y1))
    return out


@dataclass
class ObjectFrames:
    """Consecutive observation frames of real episodes and the object boxes of each frame."""

    frames: list[np.ndarray]  # per episode: uint8 (T, H, W, 3)
    boxes: list[list[list[ObjectBox]]]  # per episode, per frame: the boxes of the wanted objects


def collect_object_frames(
    env_name: str,
    *,
    episodes: int = 4,
    max_steps: int = 64,
    seed: int = 0,
    names: tuple[str, ...] | None = None,
    **env_kwargs,
) -> ObjectFrames:
    """Random-policy episodes (at most ``max_steps`` steps each) of the real env ``env_name`` with the labels
    buffer on; boxes of the objects in ``names`` (default :data:`OBJECTS`) for every frame. ``env_kwargs``:
    the env's settings (resolution, health_bar, frame_skip), as the store was collected with."""
    names = names or OBJECTS.get(env_name)
    if not names:
        raise ValueError(f"names: no default objects for env {env_name!r}; pass names=(...)")
    env = VizdoomEnv(env_name, labels=True, **env_kwargs)
    rng = np.random.default_rng(seed)
    out = ObjectFrames([], [])
    try:
        for ep in range(episodes):
            obs, info = env.reset(seed=seed + ep)
            frames, boxes = [obs], [[b for b in info["objects"] if b.name in names]]
            for _ in range(max_steps):
                obs, _, term, trunc, info = env.step(int(rng.integers(env.action_space.n)))
                if term or trunc:
                    break
                frames.append(obs)
                boxes.append([b for b in info["objects"] if b.name in names])
            out.frames.append(np.stack(frames))
            out.boxes.append(boxes)
    finally:
        env.close()
    return out


def box_mask(boxes: list[ObjectBox], resolution: int) -> np.ndarray:
    """bool (resolution, resolution): True inside any of ``boxes``."""
    m = np.zeros((resolution, resolution), bool)
    for b in boxes:
        m[b.y0 : b.y1, b.x0 : b.x1] = True
    return m
