"""Dataset presets end to end on real-format fixture files: convert -> tokenizer -> prior -> samples / dream env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers the dream ids)
from tests.fixtures_formats import UCF_CLASSES, write_bair, write_robonet, write_tgif, write_ucf
from worldmodel.bundle import WorldModel
from worldmodel.config import SCALES, get_preset, preset_names
from worldmodel.sources import bair, robonet, tgif, ucf101
from worldmodel.stages import train_prior, train_tokenizer
from worldmodel.store import EpisodeStore
from worldmodel.token_cache import TOKENS_FILE, TokenCache
from worldmodel.video_sampling import sample_videos

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}  # CLIs in subprocesses: no oversubscription


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def shrink(cfg, store: Path, clip_len: int):
    """The preset at tiny scale, shrunk further so both stages take seconds; geometry and conditioning kept."""
    tt = replace(
        cfg.tokenizer_train, steps=2, batch_size=2, warmup_steps=1, log_every=1, eval_every=2, ckpt_every=2
    )
    st = cfg.tokenizer.stride[0]
    return replace(
        cfg,
        data=replace(cfg.data, store=str(store), clip_len=clip_len),
        tokenizer=replace(cfg.tokenizer, channels=16, n_res_layers=1, codebook_size=32, embedding_dim=8),
        prior=replace(
            cfg.prior, n_layer=1, n_head=2, n_embd=32, frames=clip_len // st - cfg.prior.n_cond_frames
        ),
        tokenizer_train=tt,
        prior_train=tt,
    )


def _convert(name: str, tmp: Path) -> Path:
    out = tmp / f"{name}_store"
    if name in ("bair", "bair_paper"):
        write_bair(tmp / "raw", train_files=2, per_file=2, test_files=1)
        bair.convert(tmp / "raw", out, val_fraction=0.3, progress=False)
    elif name == "robonet":
        for i in range(4):
            write_robonet(tmp / "raw" / "hdf5" / f"traj{i}.hdf5", T=12, seed=i)
        robonet.convert(tmp / "raw", out, resolution=32, val_fraction=0.25, test_fraction=0.0, progress=False)
    elif name.startswith("ucf101"):
        write_ucf(tmp / "raw", T=16, H=40, W=48)
        ucf101.convert(tmp / "raw", out, resolution=32, val_fraction=0.25, progress=False)
    else:
        write_tgif(tmp / "raw", T=16, present=(0, 1, 2, 3))
        tgif.convert(tmp / "raw", out, resolution=32, progress=False)
    return out


def _latents(cfg) -> tuple[int, int, int]:
    st, sh, sw = cfg.tokenizer.stride
    return cfg.data.clip_len // st, cfg.tokenizer.resolution // sh, cfg.tokenizer.resolution // sw


def test_dataset_presets_follow_the_paper_at_paper_scale_and_stay_consistent_at_every_scale():
    paper = {name: get_preset(name, "paper") for name in ("bair_paper", "ucf101", "ucf101_uncond", "tgif")}
    # the paper's configs: BAIR 16x64x64 -> 8x32x32 with gpt_small; UCF-101 16x128x128 and TGIF 16x64x64 -> 4x32x32 with gpt_large
    assert _latents(paper["bair_paper"]) == (8, 32, 32) and paper["bair_paper"].tokenizer.resolution == 64
    assert _latents(paper["ucf101"]) == (4, 32, 32) and paper["ucf101"].tokenizer.resolution == 128
    assert _latents(paper["tgif"]) == (4, 32, 32) and paper["tgif"].tokenizer.resolution == 64
    gpt = {n: (c.prior.n_layer, c.prior.n_head, c.prior.n_embd) for n, c in paper.items()}
    assert gpt == {
        "bair_paper": (8, 4, 512),
        "ucf101": (20, 8, 1024),
        "ucf101_uncond": (20, 8, 1024),
        "tgif": (20, 8, 1024),
    }
    for c in paper.values():
        t = c.tokenizer
        assert (t.channels, t.n_res_layers, t.codebook_size, t.embedding_dim) == (
            240,
            4,
            1024,
            256,
        ) and c.prior.dropout == 0.2
    for name in ("bair", "robonet", "bair_paper", "ucf101", "ucf101_uncond", "tgif"):
        assert name in preset_names()
        for scale in SCALES:
            c = get_preset(name, scale)
            assert (c.name, c.scale) == (name, scale) and c.prior.vocab_size == c.tokenizer.codebook_size
            T, h, w = _latents(c)
            assert (c.prior.tokens_h, c.prior.tokens_w) == (
                h,
                w,
            ) and c.data.resolution == c.tokenizer.resolution
            # the modelled latent frames (after any conditioning frames) fill the clip exactly
            assert (0 if c.prior.cond_pixels else c.prior.n_cond_frames) + c.prior.frames == T
            if name == "robonet" and scale == "paper":  # the paper's protocol: whole-clip actions, 8x32x32
                assert c.tokenizer.stride == (2, 2, 2) and not c.tokenizer.causal_time
                assert (c.prior.action_cond, c.prior.clip_actions, c.prior.action_dim) == ("clip", 15, 5)
            elif name in ("bair", "robonet"):  # action-conditioned dreams: one latent frame per action
                assert c.tokenizer.stride[0] == 1 and c.tokenizer.causal_time and c.data.use_actions
                assert (c.prior.action_kind, c.prior.action_dim) == ("continuous", 4 if name == "bair" else 5)
            else:  # the paper's action-free setups, 16-frame clips
                assert c.data.clip_len == 16 and not c.data.use_actions and c.prior.action_kind == "none"
                assert c.prior.n_classes == (101 if name == "ucf101" else 0)
                assert c.prior.n_cond_frames == (1 if name == "bair_paper" else 0)
                assert c.prior.cond_pixels == (name == "bair_paper" and scale == "paper")


@pytest.mark.parametrize("name", ["bair", "robonet", "bair_paper", "ucf101", "ucf101_uncond", "tgif"])
def test_preset_trains_and_samples(name, tmp_path, one_thread):
    store = _convert(name, tmp_path)
    action = name in ("bair", "robonet")
    cfg = shrink(get_preset(name, "tiny"), store, clip_len=4 if action else 16)
    run = tmp_path / "run"
    assert train_tokenizer(cfg, run, progress=False).step == 2
    res = train_prior(cfg, run, progress=False)
    assert res.step == 2 and np.isfinite(res.val_metrics["nats_per_token"])
    wm = WorldModel.from_pretrained(run)
    assert wm.cfg.prior.action_kind == ("continuous" if action else "none")
    assert wm.cfg.prior.n_classes == (101 if name == "ucf101" else 0)
    if name == "bair_paper":  # the first latent frame of real context conditions through cross-attention
        st_ = EpisodeStore(store)
        a, b = (st_.read_clip(e, 0, 16)["frames"][:4] for e in st_.episode_ids()[:2])
        v = sample_videos(wm, 2, context=np.stack([a, b]), seed=1)
        assert v.shape == (2, 16, 64, 64, 3)
        same = sample_videos(wm, 2, context=np.stack([a, a]), seed=1)
        assert np.array_equal(same[0], v[0])  # seeded, row 0 unchanged
        assert not np.array_equal(
            same[1, 4:], v[1, 4:]
        )  # the generated frames depend on the conditioning frame
        with pytest.raises(
            ValueError, match="max_frames=16; ask for at most 3"
        ):  # whole clips decode at once
            sample_videos(wm, 2, context=np.stack([a, b]), frames=4)
    elif not action:  # unconditional / class-conditional clips from nothing
        kw = {"class_ids": [0, 3]} if name == "ucf101" else {}
        v = sample_videos(wm, 2, seed=1, **kw)
        assert v.shape == (2, 16, 32, 32, 3) and v.dtype == np.uint8
        assert np.array_equal(v, sample_videos(wm, 2, seed=1, **kw))  # seeded
    out = tmp_path / "sample"
    extra = (
        (["--from-store"] if action else [])
        + (["--class-name", "basketball"] if name == "ucf101" else [])
        + ([] if name == "tgif" else ["--no-gif"])
    )
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "sample.py"),
            "--checkpoint",
            str(run),
            "--n",
            "2",
            "--out",
            str(out),
            "--upscale",
            "1",
        ]
        + extra,
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    frames = _decode(out.with_suffix(".mp4"))
    H = wm.obs_shape[0]
    from_store = action or name == "bair_paper"
    assert len(frames) == (4 if action else 16)
    assert frames[0].shape[:2] == (
        (2 * H + 6 if from_store else H + 4),
        2 * H + 6,
    )  # (real row +) sample row, 2 columns
    if name == "tgif":  # the grid and each sample as gifs
        paths = json.loads(res.stdout.strip().splitlines()[-1])
        for i in range(2):
            gif = _decode(Path(paths[f"gif{i}"]))
            assert len(gif) == 16 and gif[0].shape == (H, H, 3)
        assert len(_decode(out.with_suffix(".gif"))) == 16


def test_sample_cli_class_names_and_bad_labels(tmp_path, one_thread):
    store = _convert("ucf101", tmp_path)
    run = tmp_path / "run"
    cfg = shrink(get_preset("ucf101", "tiny"), store, clip_len=16)
    train_tokenizer(cfg, run, progress=False)
    train_prior(cfg, run, progress=False)
    wm = WorldModel.from_pretrained(run)
    assert [c.lower() for c in wm.store_meta["extra"]["class_names"]] == [c.lower() for c in UCF_CLASSES]
    cli = [
        sys.executable,
        str(ROOT / "experiments" / "sample.py"),
        "--checkpoint",
        str(run),
        "--n",
        "2",
        "--no-gif",
    ]
    bad = subprocess.run(
        cli + ["--class-name", "Juggling"], capture_output=True, text=True, timeout=120, env=ONE_THREAD
    )
    assert bad.returncode != 0 and "Juggling" in bad.stderr and "not among the store's classes" in bad.stderr
    bad = subprocess.run(
        cli + ["--class-id", "101"], capture_output=True, text=True, timeout=120, env=ONE_THREAD
    )
    assert bad.returncode != 0 and "class_ids" in bad.stderr
    with pytest.raises(ValueError, match="class_ids"):
        sample_videos(wm, 2)  # a class-conditional prior needs labels
    ok = subprocess.run(
        cli + ["--class-name", "HandstandPushups", "basketball"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["class_ids"] == "2 1"  # classInd order
    ok = subprocess.run(cli + ["--from-store"], capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = json.loads(
        ok.stdout.strip().splitlines()[-1]
    )  # each real clip is continued under its own label (0..2)
    assert set(out["class_ids"].split()) <= {"0", "1", "2"} and len(_decode(Path(out["mp4"]))) == 16


def _flags(section: str, **kw) -> list[str]:
    return [x for k, v in kw.items() for x in (f"--config.{section}.{k.replace('_', '-')}", str(v))]


def test_bair_documented_commands_convert_train_and_gym_make(tmp_path, one_thread):
    """The README's BAIR path: convert.py on the tar's layout -> train.py --env bair -> gym.make(VideoGPTDream-BAIR-v0)."""
    write_bair(tmp_path / "bair_robot_pushing_dataset_v0", train_files=2, per_file=2, test_files=1)
    store, run = tmp_path / "data" / "bair", tmp_path / "runs" / "bair-tiny"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "convert.py"),
            "bair",
            str(tmp_path / "bair_robot_pushing_dataset_v0"),
            "--out",
            str(store),
            "--val-fraction",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converted 6 bair episodes (180 frames" in res.stdout
    train = dict(steps=2, batch_size=2, warmup_steps=1, log_every=1, eval_every=2, ckpt_every=2)
    small = (
        _flags("data", store=store, clip_len=4)
        + _flags("tokenizer", channels=16, n_res_layers=1, codebook_size=32, embedding_dim=8)
        + _flags("prior", n_layer=1, n_head=2, n_embd=32, frames=4)
        + _flags("tokenizer-train", **train)
        + _flags("prior-train", **train)
    )
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "train.py"),
            "--env",
            "bair",
            "--scale",
            "tiny",
            "--run-dir",
            str(run),
            "--threads",
            "1",
            "--no-rollout-videos",
        ]
        + small,
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gym.make('VideoGPTDream-BAIR-v0'" in res.stdout
    env = gym.make("VideoGPTDream-BAIR-v0", checkpoint=run)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and env.action_space.shape == (4,)
    obs2, r, term, trunc, info = env.step(env.action_space.sample())
    assert obs2.shape == (64, 64, 3) and np.isfinite(r) and info["step"] == 1
    assert env.spec.max_episode_steps == 30  # BAIR trajectories
    with pytest.raises(ValueError, match="is a 'bair' bundle"):
        gym.make("VideoGPTDream-RoboNet-v0", checkpoint=run)


@pytest.mark.parametrize("name", ["bair_paper", "robonet"])
def test_paper_protocols_train_from_the_token_cache_and_sample(name, tmp_path, one_thread):
    """The paper's BAIR (one pixel frame through a ResNet, every latent frame modelled) and whole-clip action
    conditioning, at a shrunk width: the token cache stores the conditioning pixels / pixel-rate actions, the
    prior trains on them, and clips sample from them."""
    store = _convert(name, tmp_path)
    clip_len = 16 if name == "bair_paper" else 4
    cfg = shrink(get_preset(name, "tiny"), store, clip_len=clip_len)
    st = cfg.tokenizer.stride[0]
    if name == "bair_paper":
        prior = replace(cfg.prior, n_cond_frames=1, cond_pixels=True, frames=clip_len // st, resnet_depth=18)
        prior = replace(prior, resnet_dim=24, resnet_out=(1, 8, 8))
    else:
        prior = replace(cfg.prior, action_cond="clip", clip_actions=clip_len - 1, frames=clip_len // st)
    cfg = replace(cfg, prior=prior)
    run = tmp_path / "run"
    train_tokenizer(cfg, run, progress=False)
    res = train_prior(cfg, run, progress=False)
    assert res.step == 2 and np.isfinite(res.val_metrics["nats_per_token"])
    cache = TokenCache(run / TOKENS_FILE)
    eid = cache.episode_ids()[0]
    item = cache.read_clip(eid, 1, cfg.prior.frames)
    ep = EpisodeStore(store).load(eid)
    wm = WorldModel.from_pretrained(run)
    if name == "bair_paper":
        assert np.array_equal(
            item["cond_frames"][0], ep.frames[st]
        )  # latent frame 1 starts at pixel frame st
        frames = np.stack([ep.frames[:1], ep.frames[5:6]])
        v = sample_videos(wm, 2, context=frames, seed=1)
        assert v.shape == (2, 16, 64, 64, 3)
    else:
        assert np.array_equal(item["clip_actions"], ep.actions[st : (1 + cfg.prior.frames) * st - 1])
        acts = np.stack([ep.actions[: clip_len - 1]] * 2).astype(np.float32)
        v = sample_videos(wm, 2, actions=acts, seed=1)
        assert v.shape[:2] == (2, clip_len)
        with pytest.raises(ValueError, match="action_cond='clip'"):
            from envs.dream import DreamEnv

            DreamEnv(world_model=wm)
