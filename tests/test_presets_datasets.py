"""Dataset presets end to end on real-format fixture files: convert -> tokenizer -> prior -> samples / dream env."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers the dream ids)
from tests.fixtures_formats import write_bair, write_robonet, write_tgif, write_ucf
from worldmodel.bundle import WorldModel
from worldmodel.config import get_preset, preset_names
from worldmodel.sources import bair, robonet, tgif, ucf101
from worldmodel.stages import train_prior, train_tokenizer
from worldmodel.store import EpisodeStore
from worldmodel.video_sampling import sample_videos

ROOT = Path(__file__).resolve().parents[1]


def shrink(cfg, store: Path, clip_len: int):
    """The preset at tiny scale, shrunk further so both stages take seconds; geometry and conditioning kept."""
    tt = replace(cfg.tokenizer_train, steps=2, batch_size=2, warmup_steps=1, log_every=1, eval_every=2, ckpt_every=2)
    st = cfg.tokenizer.stride[0]
    return replace(cfg, data=replace(cfg.data, store=str(store), clip_len=clip_len),
                   tokenizer=replace(cfg.tokenizer, channels=16, n_res_layers=1, codebook_size=32, embedding_dim=8),
                   prior=replace(cfg.prior, n_layer=1, n_head=2, n_embd=32, frames=clip_len // st),
                   tokenizer_train=tt, prior_train=tt)


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


def test_every_dataset_preset_has_three_scales():
    for name in ("bair", "robonet", "bair_paper", "ucf101", "ucf101_uncond", "tgif"):
        assert name in preset_names()
        tiny, paper = get_preset(name, "tiny"), get_preset(name, "paper")
        assert tiny.tokenizer.stride == paper.tokenizer.stride and get_preset(name, "small").name == name
    assert get_preset("ucf101", "paper").prior.n_classes == 101 and get_preset("ucf101_uncond", "paper").prior.n_classes == 0
    assert get_preset("ucf101", "paper").tokenizer.stride == (4, 4, 4) and get_preset("ucf101", "paper").tokenizer.resolution == 128
    assert get_preset("bair_paper", "paper").prior.n_cond_frames == 1 and not get_preset("bair_paper", "paper").data.use_actions
    assert get_preset("bair", "tiny").prior.action_dim == 4 and get_preset("robonet", "tiny").prior.action_dim == 5


@pytest.mark.parametrize("name", ["bair", "robonet", "bair_paper", "ucf101", "ucf101_uncond", "tgif"])
def test_preset_trains_and_samples(name, tmp_path):
    store = _convert(name, tmp_path)
    action = name in ("bair", "robonet")
    cfg = shrink(get_preset(name, "tiny"), store, clip_len=4 if action else 16)
    if name == "bair_paper":  # 1 conditioning latent frame (4 pixel frames) + 3 modelled = the paper's 16 frames
        cfg = replace(cfg, prior=replace(cfg.prior, frames=3))
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
        assert not np.array_equal(same[1, 4:], v[1, 4:])  # the generated frames depend on the conditioning frame
    elif not action:  # unconditional / class-conditional clips from nothing
        kw = {"class_ids": [0, 3]} if name == "ucf101" else {}
        v = sample_videos(wm, 2, seed=1, **kw)
        assert v.shape == (2, 16, 32, 32, 3) and v.dtype == np.uint8
        assert np.array_equal(v, sample_videos(wm, 2, seed=1, **kw))  # seeded
    out = tmp_path / "sample"
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "sample.py"), "--checkpoint", str(run), "--n", "2",
                          "--out", str(out), "--no-gif", "--upscale", "1"] + (["--from-store"] if action else []),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with av.open(str(out.with_suffix(".mp4"))) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    H = wm.obs_shape[0]
    from_store = action or name == "bair_paper"
    assert len(frames) == (4 if action else 16)
    assert frames[0].shape[:2] == ((2 * H + 6 if from_store else H + 4), 2 * H + 6)  # (real row +) sample row, 2 columns


def test_bair_converted_trained_and_stepped_as_dream_env(tmp_path):
    store = _convert("bair", tmp_path)
    cfg = shrink(get_preset("bair", "tiny"), store, clip_len=4)
    run = tmp_path / "bair-tiny"
    train_tokenizer(cfg, run, progress=False)
    train_prior(cfg, run, progress=False)
    env = gym.make("VideoGPTDream-BAIR-v0", checkpoint=run)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and env.action_space.shape == (4,)
    obs2, r, term, trunc, info = env.step(np.zeros(4, np.float32))
    assert obs2.shape == (64, 64, 3) and np.isfinite(r) and info["step"] == 1
    with pytest.raises(ValueError, match="is a 'bair' bundle"):
        gym.make("VideoGPTDream-RoboNet-v0", checkpoint=run)
