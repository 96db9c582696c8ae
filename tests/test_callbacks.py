"""DreamRealGapCallback: PPO trained in the tiny dream env, scored in the dream and in the real HGS env."""

from __future__ import annotations

import csv
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure

import envs  # noqa: F401  (registers the dream ids)
from envs.callbacks import DreamExploitWarning, DreamRealGapCallback
from envs.vizdoom import make_real_env

STEPS = 6  # episode cap in both envs
HGS_LIVING_REWARD = 4.0  # +1 per tic at frame skip 4; no agent dies within 6 steps of a fresh HGS episode


def dream(bundle):
    return gym.make("VideoGPTDream-VizdoomHGS-v0", checkpoint=str(bundle), max_episode_steps=STEPS)


def test_gap_callback_logs_both_returns_entropy_and_warns(tiny_bundle, tmp_path, one_thread):
    model = PPO("MlpPolicy", dream(tiny_bundle), n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu")
    model.set_logger(configure(str(tmp_path), ["csv"]))
    cb = DreamRealGapCallback(
        dream(tiny_bundle),
        lambda: make_real_env("vizdoom_hgs", resolution=32, max_episode_steps=STEPS),
        eval_every=1,
        n_eval_episodes=2,
        exploit_factor=-1.0,
        seed=0,
    )
    with pytest.warns(DreamExploitWarning, match="exploiting"):
        model.learn(total_timesteps=16, callback=cb)  # 2 rollouts -> 2 evaluations

    assert len(cb.history) == 2 and [h["timesteps"] for h in cb.history] == [8.0, 16.0]
    for h in cb.history:
        assert 1 <= h["dream_ep_length"] <= STEPS and h["real_ep_length"] == STEPS
        assert h["real_return"] == pytest.approx(HGS_LIVING_REWARD * STEPS)
        # the tiny prior's token logits are zero-initialised: every dream frame has entropy ln(codebook size)
        assert h["token_entropy"] == pytest.approx(math.log(32), abs=1e-4)
        assert h["return_gap"] == pytest.approx(h["dream_return"] - h["real_return"])
        assert h["exploit_warning"] == 1.0  # dream > -1 x real (dream returns are tiny, real ones positive)
    assert not cb._owned  # the real env made by the factory was closed at the end of training

    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("dream_real/real_return")]
    assert len(logged) == 2
    for row, h in zip(logged, cb.history):
        for key in ("dream_return", "real_return", "token_entropy", "return_gap", "exploit_warning"):
            assert float(row[f"dream_real/{key}"]) == pytest.approx(h[key], rel=1e-6)

    cb.exploit_factor = 1e9  # a sane factor: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", DreamExploitWarning)
        res = cb.evaluate()
    assert res["exploit_warning"] == 0.0 and np.isfinite(res["dream_return"])
    cb.close()
    model.logger.close()


def test_gap_callback_rejects_bad_arguments():
    env = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match="eval_every"):
        DreamRealGapCallback(env, env, eval_every=0)
    with pytest.raises(ValueError, match="n_eval_episodes"):
        DreamRealGapCallback(env, env, n_eval_episodes=0)
    with pytest.raises(TypeError, match="real_env"):
        DreamRealGapCallback(env, 42)
