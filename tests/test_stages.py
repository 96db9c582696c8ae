"""End-to-end stages on real collected ViZDoom data: tokenizer -> token cache -> prior -> bundle."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from envs.collect import collect
from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import load_trainer_state, read_run_config
from worldmodel.config import DataConfig, ExperimentConfig, PriorConfig, TokenizerConfig, TrainConfig
from worldmodel.stages import encode_tokens, load_tokenizer, train_prior, train_tokenizer
from worldmodel.store import EpisodeStore
from worldmodel.token_cache import TokenCache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hgs")
    collect(
        "vizdoom_hgs",
        root,
        6,
        num_envs=1,
        asynchronous=False,
        progress=False,
        env_kwargs={"resolution": 32, "max_episode_steps": 24},
    )
    return root


def tiny_cfg(store: Path, **train) -> ExperimentConfig:
    tt = TrainConfig(
        steps=6, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=3, ckpt_every=3, **train
    )
    return ExperimentConfig(
        name="vizdoom_hgs",
        scale="tiny",
        env="vizdoom_hgs",
        data=DataConfig(store=str(store), clip_len=4),
        tokenizer=TokenizerConfig(
            resolution=32,
            stride=(1, 8, 8),
            channels=16,
            n_res_layers=1,
            n_heads=2,
            codebook_size=32,
            embedding_dim=8,
            max_frames=4,
        ),
        prior=PriorConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0, frames=4),
        tokenizer_train=tt,
        prior_train=tt,
    )


def test_pipeline_to_bundle(tmp_path, store):
    cfg = tiny_cfg(store)
    run = tmp_path / "run"
    res = train_tokenizer(cfg, run, progress=False)
    assert res.step == 6 and "psnr" in res.val_metrics
    img = Image.open(run / "recon.png")
    assert img.size[0] > 4 * 32 and img.size[1] > 2 * 32  # originals over reconstructions
    saved = read_run_config(run)
    assert saved["experiment"]["prior"]["vocab_size"] == 32 and saved["experiment"]["prior"]["n_actions"] == 5
    assert saved["store"]["action_spec"]["n"] == 5
    cache = TokenCache(encode_tokens(cfg, run, progress=False))
    st = EpisodeStore(store)
    assert len(cache) == len(st)
    eid = st.episode_ids()[0]
    tok = load_tokenizer(run)
    # cached tokens equal encoding the episode in clip_len windows
    frames = torch.from_numpy(st.load(eid).frames)
    expected = torch.cat([tok.encode(w[None])[0] for w in torch.split(frames, 4)])
    assert torch.equal(torch.from_numpy(cache.load_tokens(eid)), expected)
    mtime = (run / "tokens.h5").stat().st_mtime_ns
    encode_tokens(cfg, run, progress=False)  # up to date: not rewritten
    assert (run / "tokens.h5").stat().st_mtime_ns == mtime

    res = train_prior(cfg, run, progress=False)
    assert res.step == 6 and "nats_per_token" in res.val_metrics
    # TensorBoard: an open-loop video at every evaluation, 8 steps of 2 clips, real over dream
    ea = EventAccumulator(str(run / "tb" / "prior"), size_guidance={"images": 0})
    ea.Reload()
    videos = ea.Images("prior/open_loop")
    assert [v.step for v in videos] == [3, 6]
    gif = Image.open(io.BytesIO(videos[-1].encoded_image_string))
    assert gif.size == (2 * 32, 2 * 32) and gif.n_frames == 8
    encode_tokens(cfg, run, progress=False)  # saving the prior rewrote model.safetensors, not the tokenizer
    assert (run / "tokens.h5").stat().st_mtime_ns == mtime
    wm = WorldModel.from_pretrained(run)
    assert wm.action_spec.n == 5 and wm.obs_shape == (32, 32, 3)
    ro = wm.rollout(2)
    ep = st.load(eid)
    ro.reset(np.stack([ep.frames[:3]] * 2), np.stack([ep.actions[:2]] * 2))
    out = ro.step(np.array([0, 4]))
    assert out.frames.shape == (2, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.rewards.shape == (2,) and out.terminated.dtype == bool and np.all(out.entropy >= 0)
    with pytest.raises(ValueError, match="integer actions"):
        ro.step(np.array([0.5, 1.0]))


def test_tokenizer_stage_resumes_exactly(tmp_path, store):
    cfg = tiny_cfg(store)
    full = train_tokenizer(cfg, tmp_path / "a", progress=False)
    part = train_tokenizer(
        replace(cfg, tokenizer_train=replace(cfg.tokenizer_train, max_minutes=1e-9)),
        tmp_path / "b",
        progress=False,
    )
    assert part.step == 1 and load_trainer_state(tmp_path / "b", "tokenizer")["step"] == 1
    resumed = train_tokenizer(cfg, tmp_path / "b", progress=False)
    assert resumed.step == 6
    assert resumed.last_metrics["recon_loss"] == pytest.approx(full.last_metrics["recon_loss"], rel=1e-5)
    a, b = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b")
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k


def test_torchrun_two_processes(tmp_path, store):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(ROOT / "experiments" / "train.py"),
        "--env",
        "vizdoom_hgs",
        "--stage",
        "tokenizer",
        "--run-dir",
        str(run),
        "--device",
        "cpu",
        "--config.data.store",
        str(store),
        "--config.data.clip-len",
        "4",
        "--config.tokenizer.channels",
        "16",
        "--config.tokenizer.n-res-layers",
        "1",
        "--config.tokenizer.codebook-size",
        "32",
        "--config.tokenizer.embedding-dim",
        "8",
        "--config.tokenizer-train.steps",
        "3",
        "--config.tokenizer-train.batch-size",
        "2",
        "--config.tokenizer-train.eval-every",
        "3",
        "--config.tokenizer-train.ckpt-every",
        "3",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    state = load_trainer_state(run, "tokenizer")
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert bool(load_tokenizer(run).codebook.initialized)


def _train_cli(*argv: str) -> subprocess.CompletedProcess:
    """``experiments/train.py`` with ``argv`` in a subprocess, for what it refuses before any training."""
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_rejects_unknown_preset():
    res = _train_cli("--env", "nope")
    assert res.returncode != 0 and "unknown preset" in res.stderr


def test_cli_missing_store_is_a_clear_error(tmp_path):
    res = _train_cli(
        "--env",
        "ucf101",
        "--stage",
        "tokenizer",
        "--run-dir",
        str(tmp_path / "run"),
        "--config.data.store",
        str(tmp_path / "nope"),
    )
    assert (
        res.returncode != 0
        and "store directory does not exist" in res.stderr
        and "Traceback" not in res.stderr
    )


def test_budget_minutes_splits_what_is_left_and_refuses_single_stages(tmp_path):
    from worldmodel.stages import TOKENIZER_SHARE, VIDEO_RESERVE, stage_minutes

    assert stage_minutes(10.0, 0.5, "tokenizer") == pytest.approx(9.5 * TOKENIZER_SHARE)
    assert stage_minutes(10.0, 2.5, "prior") == pytest.approx(7.5 * (1 - VIDEO_RESERVE))
    with pytest.raises(ValueError, match="--budget-minutes 3: 3.5 minutes spent before the prior stage"):
        stage_minutes(3.0, 3.5, "prior")
    res = _train_cli(
        "--env", "ucf101", "--stage", "prior", "--budget-minutes", "5", "--run-dir", str(tmp_path / "run")
    )
    assert res.returncode != 0 and "--budget-minutes: got 5 with --stage prior" in res.stderr
    assert "fit-minutes" in res.stderr and not (tmp_path / "run").exists()
