"""Rollout videos: lockstep traces, panels, playable mp4/gif, the rollout and train_policy CLIs, the main job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from envs.dream import DreamEnv
from envs.policy import dream_trace, load_policy
from tests.conftest import TINY_RES, tiny_experiment
from worldmodel.bundle import WorldModel
from worldmodel.metrics.image import psnr
from worldmodel.rollout_video import lockstep_trace, render_trace, trace_frames
from worldmodel.store import EpisodeStore
from worldmodel.video import upscale

ROOT = Path(__file__).resolve().parents[1]


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _longest(store: EpisodeStore) -> str:
    return max(store.episode_ids(), key=store.length)


def test_lockstep_trace_replays_the_recorded_episode(tiny_bundle, hgs_store):
    wm, store = WorldModel.from_pretrained(tiny_bundle), EpisodeStore(hgs_store)
    eid = _longest(store)
    ep = store.load(eid)
    tr = lockstep_trace(wm, store, eid, start=1, context=2, steps=5, seed=3)
    assert tr.steps == 5 and tr.dream.shape == (6, TINY_RES, TINY_RES, 3)
    assert np.array_equal(tr.real, ep.frames[2:8]) and np.array_equal(tr.actions, ep.actions[2:7])
    assert np.array_equal(tr.dream[0], ep.frames[2])  # starts from the last real context frame
    assert np.allclose(tr.reward_real, ep.rewards[2:7])
    assert np.allclose(tr.psnr(), psnr(tr.dream[1:], ep.frames[3:8]))
    again = lockstep_trace(wm, store, eid, start=1, context=2, steps=5, seed=3)
    assert np.array_equal(again.dream, tr.dream)  # seeded
    with pytest.raises(ValueError, match="no step left"):
        lockstep_trace(wm, store, eid, start=store.length(eid) - 1)


def test_lockstep_video_panels_and_playable_files(tiny_bundle, hgs_store, tmp_path):
    wm, store = WorldModel.from_pretrained(tiny_bundle), EpisodeStore(hgs_store)
    tr = lockstep_trace(wm, store, _longest(store), steps=6)
    scale, pad = 4, 2
    frames = trace_frames(tr, scale)
    S = TINY_RES * scale
    assert frames[0].shape == (S + 2 * pad, 3 * (S + pad) + pad, 3)
    for t, f in enumerate(frames):
        real_panel = f[pad : pad + S, pad : pad + S]
        dream_panel = f[pad : pad + S, 2 * pad + S : 2 * pad + 2 * S]
        diff_panel = f[pad : pad + S, 3 * pad + 2 * S : 3 * pad + 3 * S]
        below = slice(S // 2, S)  # under the text overlays
        assert np.array_equal(real_panel[below], upscale(tr.real[t], scale)[below])
        assert np.array_equal(dream_panel[below], upscale(tr.dream[t], scale)[below])
        diff = np.abs(tr.real[t].astype(int) - tr.dream[t].astype(int))
        assert np.array_equal(diff_panel[below], upscale(diff.astype(np.uint8), scale)[below])
    paths = render_trace(tr, tmp_path / "lock", scale=scale, fps=wm.fps)
    decoded = _decode(paths["mp4"])
    assert len(decoded) == tr.steps + 1 and decoded[0].shape == frames[0].shape
    assert len(_decode(paths["gif"])) == tr.steps + 1
    assert paths["png"].stat().st_size > 1000


def test_policy_trace_stops_at_termination(tiny_bundle):
    env = DreamEnv(checkpoint=tiny_bundle, termination="threshold")
    tr = dream_trace(env, load_policy("random", env.action_space, 0), 40, seed=0)
    assert tr.real is None and tr.dream.shape[0] == tr.steps + 1
    assert tr.steps == 40 or tr.term_prob[-1] > 0.5  # ran out of steps or the dream predicted the end
    assert np.all(tr.term_prob[:-1] <= 0.5)


def test_rollout_cli_lockstep_and_policy(tiny_bundle64, tmp_path):
    policy = tmp_path / "ppo.safetensors"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "train_policy.py"),
            "--checkpoint",
            str(tiny_bundle64),
            "--timesteps",
            "64",
            "--num-envs",
            "2",
            "--ppo.n-steps",
            "32",
            "--ppo.batch-size",
            "32",
            "--ppo.n-epochs",
            "1",
            "--out",
            str(policy),
            "--no-progress",
            "--eval-real",
            "--eval-episodes",
            "1",
            "--max-episode-steps",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert policy.exists() and "dream return" in res.stdout and "random" in res.stdout
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["real_random"] > 0 and set(report) >= {"real_ppo", "dream_ppo", "real_return_vs_random"}
    for pol in ("episode", str(policy)):
        out = tmp_path / f"video-{Path(pol).stem}"
        res = subprocess.run(
            [
                sys.executable,
                str(ROOT / "experiments" / "rollout.py"),
                "--checkpoint",
                str(tiny_bundle64),
                "--policy",
                pol,
                "--steps",
                "5",
                "--upscale",
                "2",
                "--out",
                str(out),
                "--no-gif",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        frames = _decode(out.with_suffix(".mp4"))
        lockstep = pol == "episode"  # three padded panels vs the dream panel alone
        assert 2 <= len(frames) <= 6 and frames[0].shape[:2] == (
            (132, 3 * 130 + 2) if lockstep else (128, 128)
        )
    res = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "rollout.py"), "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "not a bundle" in res.stderr


def test_main_job_writes_bundle_videos_and_summary(hgs_store, tmp_path):
    cfg = tiny_experiment(hgs_store, steps=2)
    args = [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "--env",
        "vizdoom_hgs",
        "--run-dir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--config.data.store",
        str(hgs_store),
        "--config.data.clip-len",
        "4",
    ]
    for section in ("tokenizer", "prior"):
        for k, v in vars(getattr(cfg, section)).items():
            if k not in ("stride", "resolution") and not isinstance(v, bool):
                values = [str(x) for x in v] if isinstance(v, (tuple, list)) else [str(v)]
                args += [f"--config.{section}.{k.replace('_', '-')}", *values]
    for section in ("tokenizer-train", "prior-train"):
        args += [
            f"--config.{section}.steps",
            "2",
            f"--config.{section}.batch-size",
            "2",
            f"--config.{section}.eval-every",
            "2",
            f"--config.{section}.ckpt-every",
            "2",
        ]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = res.stdout.split("== summary ==")[1]
    assert "lockstep" in summary and "random policy" in summary and "VideoGPTDream-VizdoomHGS-v0" in summary
    videos = sorted((tmp_path / "run" / "rollouts").glob("*.mp4"))
    assert len(videos) == 2 and all(len(_decode(v)) >= 2 for v in videos)
