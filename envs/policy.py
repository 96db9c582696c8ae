"""Policies in the dream: PPO trained in the batched dream env, scored in the dream and the real env.

The dream–real gap (mean dream return minus mean real return of the same policy) is the number
to watch: a policy that scores well only in the dream is exploiting the model's errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

from envs.dream import DreamEnv
from envs.gym_source import GYM_KWARGS
from envs.planner import FrameStackActor, is_frame_policy, load_frame_policy
from envs.policy_file import open_policy, save_policy_file
from envs.real import check_real_env, make_real_env_fn
from envs.sb3_vec import DreamVecEnv
from worldmodel.bundle import WorldModel
from worldmodel.rollout_video import RolloutTrace


@dataclass
class Score:
    """Mean ± std of episode returns (and mean length) over ``episodes`` episodes."""

    mean: float
    std: float
    mean_length: float
    episodes: int

    def __str__(self) -> str:
        return (
            f"{self.mean:8.1f} ± {self.std:6.1f}  (length {self.mean_length:.0f}, {self.episodes} episodes)"
        )


def return_ratio(ours: float, baseline: float) -> float | None:
    """``ours / baseline`` of two mean returns, or None when the baseline's mean is not positive: a ratio of
    returns means nothing where they can be zero or negative (Pong -21..21, CarRacing's per-tile penalties);
    report the difference there."""
    return ours / baseline if baseline > 0 else None


def _score(model: BaseAlgorithm | None, venv: VecEnv, episodes: int, deterministic: bool, seed: int) -> Score:
    venv.seed(seed)
    if model is None:  # uniform random actions

        class _Random:
            def predict(
                self, obs: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False
            ):
                return np.array([venv.action_space.sample() for _ in range(venv.num_envs)]), None

        venv.action_space.seed(seed)
        policy: Any = _Random()
    else:
        policy = model
    returns, lengths = evaluate_policy(
        policy,
        venv,
        n_eval_episodes=episodes,
        deterministic=deterministic,
        return_episode_rewards=True,
        warn=False,
    )
    return Score(float(np.mean(returns)), float(np.std(returns)), float(np.mean(lengths)), len(returns))


def real_env_kwargs(wm: WorldModel) -> dict[str, Any]:
    """The real-env settings the bundle's data was collected with, so that a policy trained in the dream is
    scored in the same real env; resolution is the bundle's (callers pass it). ViZDoom: frame skip and health
    bar. ``gym:`` envs: every recorded setting (module, gym.make kwargs, pixel source, frame skip, sticky
    actions, episode cap; :meth:`envs.gym_source.GymPixelEnv.settings`)."""
    extra = wm.store_meta.get("extra", {})
    recorded = extra.get("env_kwargs", {})
    if str(extra.get("env", "")).startswith("gym:"):
        return {k: v for k, v in recorded.items() if k in GYM_KWARGS and k != "resolution"}
    out: dict[str, Any] = {}
    if "frame_skip" in recorded:
        out["frame_skip"] = int(recorded["frame_skip"])
    # stores from before the health bar was recorded were collected without it
    out["health_bar"] = str(recorded.get("health_bar", False)) == "True"
    return out


def real_vec_env(env: str, resolution: int, num_envs: int = 1, **env_kwargs: Any) -> VecEnv:
    """The real env ``env`` (a ViZDoom scenario or ``gym:<ID>``, :mod:`envs.real`) at the bundle's resolution, as an
    SB3 VecEnv (in-process)."""
    check_real_env(env)
    fn = make_real_env_fn(env, resolution=resolution, **env_kwargs)
    made: list[Any] = []
    try:  # if the k-th engine fails to start, the ones already started are closed
        for _ in range(num_envs):
            made.append(fn())
    except BaseException:
        for e in made:
            e.close()
        raise
    return DummyVecEnv([lambda e=e: e for e in made])


def score_real(
    model: BaseAlgorithm | None,
    env: str,
    resolution: int,
    episodes: int = 10,
    *,
    deterministic: bool = False,
    seed: int = 0,
    wrap: Callable[[VecEnv], VecEnv] | None = None,
    **env_kwargs: Any,
) -> Score:
    """Mean return of ``model`` (None = uniform random actions) in the real env ``env``, seen through ``wrap``
    (e.g. :class:`envs.sb3_vec.VecLatentObservation` for a latent-reading controller) when given."""
    venv = real_vec_env(env, resolution, **env_kwargs)
    try:
        return _score(model, venv if wrap is None else wrap(venv), episodes, deterministic, seed)
    finally:
        venv.close()


def score_dream(
    model: BaseAlgorithm | None,
    venv: VecEnv,
    episodes: int = 10,
    *,
    deterministic: bool = False,
    seed: int = 0,
) -> Score:
    """Mean return of ``model`` (None = random) in the dream ``venv`` (a :class:`DreamVecEnv`, or one wrapped, e.g.
    in :class:`envs.sb3_vec.VecLatentObservation`)."""
    return _score(model, venv, episodes, deterministic, seed)


@dataclass
class PPOConfig:
    """PPO settings for training in the dream (SB3 names; Atari-like defaults scaled to short CPU runs)."""

    n_steps: int = 128
    """Steps per env between updates (rollout length)."""
    batch_size: int = 256
    """Minibatch size of each gradient step."""
    n_epochs: int = 4
    """Passes over each rollout."""
    learning_rate: float = 2.5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.1
    ent_coef: float = 0.01
    vf_coef: float = 0.5


def train_ppo(
    wm: WorldModel,
    timesteps: int,
    *,
    num_envs: int = 16,
    ppo: PPOConfig | None = None,
    seed: int = 0,
    max_episode_steps: int | None = 525,
    tensorboard_log: str | os.PathLike | None = None,
    callbacks: list[BaseCallback] | None = None,
    progress_bar: bool = True,
    **dream_kw: Any,
) -> tuple[PPO, DreamVecEnv]:
    """Train SB3 PPO (``CnnPolicy``) for ``timesteps`` env steps in ``num_envs`` batched dream envs.

    ``dream_kw`` go to :class:`envs.dream.DreamCore` (temperature, top_k, context_frames, ...).
    Returns the model and the dream VecEnv it trained in.
    """
    venv = DreamVecEnv(num_envs, world_model=wm, max_episode_steps=max_episode_steps, **dream_kw)
    venv.seed(seed)
    # Returns are in the hundreds (HGS: +4 per step alive): unnormalised, the value loss swamps the
    # policy gradient and the policy collapses to one action within a few updates. Normalise the
    # rewards by a running std of the discounted return (SB3's VecNormalize), as for Atari/MuJoCo.
    train_env = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=(ppo or PPOConfig()).gamma)
    model = PPO(
        "CnnPolicy",
        train_env,
        seed=seed,
        device=str(wm.device),
        verbose=0,
        tensorboard_log=None if tensorboard_log is None else str(tensorboard_log),
        **asdict(ppo or PPOConfig()),
    )
    model.learn(total_timesteps=timesteps, callback=callbacks, progress_bar=progress_bar)
    return model, venv


def save_policy(model: BaseAlgorithm, path: str | os.PathLike) -> Path:
    """Save an SB3 PPO/A2C model as a policy file atomically: safetensors + a JSON of its settings and spaces,
    no pickle (:mod:`envs.policy_file`). ``path`` must end in ``.safetensors``."""
    return save_policy_file(model, path)


def load_policy(
    spec: str, action_space: Any, seed: int = 0, *, trust_pickle: bool = False
) -> Callable[[np.ndarray], Any]:
    """An ``obs (H, W, 3) -> action`` function for one episode: ``"random"``, the path of an SB3 policy file
    (stochastic actions) or of a frame-policy file (:mod:`envs.planner`: greedy over its window of the newest
    frames, which the first frame fills).

    An SB3 PPO ``.zip`` is accepted only with ``trust_pickle=True``: loading it runs any code it holds.
    """
    if spec == "random":
        action_space.seed(seed)
        return lambda obs: action_space.sample()
    if is_frame_policy(spec):
        actor = FrameStackActor(load_frame_policy(spec)[0])
        return lambda obs: actor.predict(obs)[0]
    pol = open_policy(spec, trust_pickle=trust_pickle)
    return lambda obs: pol.predict(obs, deterministic=False)[0]


def dream_trace(
    env: DreamEnv,
    policy: Callable[[np.ndarray], Any],
    steps: int,
    *,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> RolloutTrace:
    """Run ``policy`` in a dream env for up to ``steps`` steps (stops at predicted termination) and record it."""
    obs, _ = env.reset(seed=seed, options=options)
    frames, acts, rew, term, ent = [obs], [], [], [], []
    for _ in range(steps):
        a = policy(obs)
        obs, r, terminated, truncated, info = env.step(a)
        frames.append(obs)
        acts.append(np.asarray(a))
        rew.append(r)
        term.append(info["terminated_prob"])
        ent.append(info["entropy"])
        if terminated or truncated:
            break
    names = env.core.spec.names
    return RolloutTrace(
        dream=np.stack(frames),
        actions=np.stack(acts),
        reward_pred=np.array(rew, np.float32),
        term_prob=np.array(term, np.float32),
        entropy=np.array(ent, np.float32),
        action_names=tuple(names) if names else None,
    )
