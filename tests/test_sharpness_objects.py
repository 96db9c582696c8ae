"""Issue 23 measurements: sharpness ratio and pixels-off on constructed images, object boxes from ViZDoom's
labels buffer (real game), and bench_tokenizer.py --checkpoint on a tiny bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worldmodel.metrics.image import fraction_off, laplacian_variance, sharpness_ratio

ROOT = Path(__file__).resolve().parents[1]


def _textured(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def _blur(x: np.ndarray) -> np.ndarray:
    f = x.astype(np.float64)
    p = np.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(p[:, i : i + 32, j : j + 32] for i in range(3) for j in range(3)) / 9
    return out.round().astype(np.uint8)


def test_sharpness_ratio_on_constructed_images():
    x = _textured()
    assert sharpness_ratio(x, x) == pytest.approx(1.0)
    r = sharpness_ratio(_blur(x), x)
    assert 0 < r < 0.2  # a 3x3 box blur keeps little of white noise's Laplacian energy
    assert sharpness_ratio(_blur(_blur(x)), x) < r
    flat = np.full_like(x, 77)
    assert np.all(laplacian_variance(flat) == 0)
    with pytest.raises(ValueError, match="real"):
        sharpness_ratio(x, flat)


def test_fraction_off_counts_pixels_beyond_48_grey_levels():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    b = a.copy()
    b[0, :4, :4, 1] = 49  # 16 of 256 pixels off by 49 in one channel
    b[1, :4, :4] = 48  # exactly 48: not counted
    assert fraction_off(b, a).tolist() == [16 / 256, 0.0]


@pytest.mark.parametrize(
    "env,name", [("vizdoom_hgs", "CustomMedikit"), ("vizdoom_take_cover", "DoomImpBall")]
)
def test_object_boxes_lie_in_the_frame_and_cover_the_labelled_pixels(env, name):
    from envs.objects import SCREEN_H, SCREEN_W, collect_object_frames
    from envs.vizdoom import VizdoomEnv

    R = 64
    e = VizdoomEnv(env, resolution=R, labels=True)
    rng = np.random.default_rng(0)
    seen, checked = set(), 0
    try:
        for ep in range(3):
            _, info = e.reset(seed=ep)
            for _ in range(40):
                state = e.game.get_state()
                buf = state.labels_buffer  # (120, 160): each object's pixels hold its label value
                for box in info["objects"]:
                    seen.add(box.name)
                    assert 0 <= box.x0 < box.x1 <= R and 0 <= box.y0 < box.y1 <= R
                    ys, xs = np.nonzero(buf == box.value)
                    if len(ys):  # every labelled screen pixel falls inside the scaled box
                        assert (np.floor(xs * R / SCREEN_W) >= box.x0).all() and (
                            np.floor(xs * R / SCREEN_W) < box.x1
                        ).all()
                        assert (np.floor(ys * R / SCREEN_H) >= box.y0).all() and (
                            np.floor(ys * R / SCREEN_H) < box.y1
                        ).all()
                        checked += 1
                _, _, term, trunc, info = e.step(int(rng.integers(e.action_space.n)))
                if term or trunc:
                    break
    finally:
        e.close()
    assert name in seen and checked > 0
    data = collect_object_frames(env, episodes=1, max_steps=30, resolution=32)
    assert len(data.frames[0]) == len(data.boxes[0]) and data.frames[0].shape[1:] == (32, 32, 3)
    assert all(b.name == name for frame in data.boxes[0] for b in frame)


def test_bench_tokenizer_checkpoint_json(tiny_bundle):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_tokenizer.py"),
            "--skip-speed",
            "--checkpoint",
            str(tiny_bundle),
            "--n-clips",
            "3",
            "--objects",
            "--object-episodes",
            "1",
            "--i3d-weights",
            str(tiny_bundle / "no-such-i3d.ckpt"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for k in (
        "tokens_per_frame",
        "recon",
        "fvd_recon",
        "fvd_real_real",
        "fvd_info",
        "train_minutes",
        "dream",
        "dream_frames_per_s",
        "objects",
    ):
        assert k in out, k
    assert out["tokens_per_frame"] == 16
    assert set(out["recon"]) == {"psnr", "ssim", "sharpness", "frac_off_48"}
    assert set(out["dream"]) == {"1", "4", "8"} and all(
        set(v) == set(out["recon"]) for v in out["dream"].values()
    )
    assert out["fvd_recon"] is None and "I3D" in out["fvd_info"]["reason"]  # no weights: null with the reason
    assert 0 <= out["recon"]["frac_off_48"] <= 1 and out["recon"]["sharpness"] > 0
    assert "ratio" in out["objects"] or out["objects"]["n_frames"] == 0
