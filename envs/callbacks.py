"""Stable-Baselines3 callbacks for training policies in dream environments.

:class:`DreamRealGapCallback` scores the policy in a dream env and in the real env every few
rollouts and logs both, so a run shows whether dream progress transfers. A policy trained in a
learned simulator can find states where the model is wrong in its favour (e.g. a reward head that
never predicts death) — then the dream return races ahead of the real one, and the callback warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, is_vecenv_wrapped

EnvLike = gym.Env | VecEnv | Callable[[], gym.Env | VecEnv]


class DreamExploitWarning(UserWarning):
    """The dream return exceeds the real return by more than the configured factor."""


def _as_monitored_vec_env(env: gym.Env | VecEnv) -> VecEnv:
    """``env`` as a VecEnv whose episode statistics come from a Monitor (so returns are the env's own)."""
    if isinstance(env, VecEnv):
        if is_vecenv_wrapped(env, VecMonitor) or env.env_is_wrapped(Monitor)[0]:
            return env
        return VecMonitor(env)
    if not isinstance(env, gym.Env):
        raise TypeError(f"expected a gymnasium.Env, an SB3 VecEnv or a factory returning one, got {type(env).__name__}")
    return DummyVecEnv([lambda: env if isinstance(env, Monitor) else Monitor(env)])


class DreamRealGapCallback(BaseCallback):
    """Every ``eval_every`` rollouts, evaluate the policy for ``n_eval_episodes`` in a dream env and in a
    real env, log both to the SB3 logger (TensorBoard when configured) and warn on a suspicious gap.

    Args:
        dream_env: the dream environment to score in — a ``gymnasium.Env`` (e.g.
            ``gym.make("VideoGPTDream-VizdoomHGS-v0", checkpoint=...)``), an SB3 ``VecEnv``, or a
            zero-argument factory of either. Use a separate instance from the training env: evaluation
            resets it.
        real_env: the real environment (same observation/action spaces), as for ``dream_env``.
        eval_every: evaluate after every this many rollouts (for on-policy algorithms such as PPO a
            rollout is followed by one policy update, so this counts updates).
        n_eval_episodes: episodes per evaluation in each env.
        exploit_factor: warn (:class:`DreamExploitWarning`) when mean dream return > ``exploit_factor``
            × mean real return.
        deterministic: act greedily during evaluation.
        seed: if set, both envs are seeded with ``seed + k`` before the k-th evaluation (reproducible scores).
        prefix: logger key prefix.
        verbose: 1 prints each evaluation.

    Logged keys (``<prefix>/...``): ``dream_return``, ``dream_return_std``, ``dream_ep_length``,
    ``real_return``, ``real_return_std``, ``real_ep_length``, ``return_gap`` (dream − real),
    ``token_entropy`` (mean of the dream env's ``info["entropy"]`` over the evaluation steps; NaN
    if it reports none) and ``exploit_warning`` (1.0 when the warning fired). Every evaluation is
    also appended to :attr:`history` as a dict with these keys plus ``timesteps``.
    """

    def __init__(self, dream_env: EnvLike, real_env: EnvLike, *, eval_every: int = 1, n_eval_episodes: int = 5,
                 exploit_factor: float = 2.0, deterministic: bool = True, seed: int | None = None,
                 prefix: str = "dream_real", verbose: int = 0) -> None:
        super().__init__(verbose)
        if eval_every < 1:
            raise ValueError(f"eval_every: got {eval_every}, expected >= 1 (rollouts between evaluations)")
        if n_eval_episodes < 1:
            raise ValueError(f"n_eval_episodes: got {n_eval_episodes}, expected >= 1")
        for name, e in (("dream_env", dream_env), ("real_env", real_env)):
            if not isinstance(e, gym.Env | VecEnv) and not callable(e):
                raise TypeError(f"{name}: got {type(e).__name__}, expected a gymnasium.Env, an SB3 VecEnv or a "
                                "zero-argument factory of either")
        self._sources = {"dream": dream_env, "real": real_env}
        self._envs: dict[str, VecEnv] = {}
        self._owned: set[str] = set()  # envs this callback built from a factory (and so closes)
        self.eval_every, self.n_eval_episodes = eval_every, n_eval_episodes
        self.exploit_factor, self.deterministic, self.seed = exploit_factor, deterministic, seed
        self.prefix = prefix
        self.n_rollouts = 0
        self.history: list[dict[str, float]] = []

    # -- environments -----------------------------------------------------------------------------
    def _env(self, name: str) -> VecEnv:
        if name not in self._envs:
            src = self._sources[name]
            if not isinstance(src, gym.Env | VecEnv):
                src = src()
                self._owned.add(name)
            self._envs[name] = _as_monitored_vec_env(src)
        return self._envs[name]

    def close(self) -> None:
        """Close the envs this callback created from factories (envs passed in are the caller's)."""
        for name in sorted(self._owned):
            self._envs.pop(name).close()
        self._owned.clear()

    # -- SB3 hooks --------------------------------------------------------------------------------
    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1
        if self.n_rollouts % self.eval_every == 0:
            self.evaluate()

    def _on_training_end(self) -> None:
        self.close()

    # -- evaluation -------------------------------------------------------------------------------
    def _score(self, name: str, entropies: list[float] | None = None) -> tuple[list[float], list[int]]:
        env = self._env(name)
        if self.seed is not None:
            env.seed(self.seed + len(self.history))

        def collect_entropy(locals_: dict[str, Any], _globals: dict[str, Any]) -> None:
            info = locals_.get("info") or {}
            e = info.get("entropy") if isinstance(info, dict) else None
            if e is not None:
                entropies.append(float(np.mean(e)))

        returns, lengths = evaluate_policy(self.model, env, n_eval_episodes=self.n_eval_episodes,
                                           deterministic=self.deterministic, return_episode_rewards=True,
                                           callback=collect_entropy if entropies is not None else None)
        return [float(r) for r in returns], [int(n) for n in lengths]

    def evaluate(self) -> dict[str, float]:
        """Score the current policy in both envs now, log the result and return it."""
        entropies: list[float] = []
        dream_r, dream_n = self._score("dream", entropies)
        real_r, real_n = self._score("real")
        res = {"dream_return": float(np.mean(dream_r)), "dream_return_std": float(np.std(dream_r)),
               "dream_ep_length": float(np.mean(dream_n)), "real_return": float(np.mean(real_r)),
               "real_return_std": float(np.std(real_r)), "real_ep_length": float(np.mean(real_n)),
               "token_entropy": float(np.mean(entropies)) if entropies else float("nan")}
        res["return_gap"] = res["dream_return"] - res["real_return"]
        exploit = res["dream_return"] > self.exploit_factor * res["real_return"]
        res["exploit_warning"] = float(exploit)
        for k, v in res.items():
            self.logger.record(f"{self.prefix}/{k}", v)
        if exploit:
            warnings.warn(f"dream return {res['dream_return']:.2f} > {self.exploit_factor} x real return "
                          f"{res['real_return']:.2f} at {self.num_timesteps} timesteps: the policy may be exploiting "
                          "errors of the world model", DreamExploitWarning, stacklevel=2)
        if self.verbose:
            print(f"[{self.prefix}] t={self.num_timesteps} dream {res['dream_return']:.2f} real {res['real_return']:.2f} "
                  f"entropy {res['token_entropy']:.3f}")
        self.history.append({"timesteps": float(self.num_timesteps), **res})
        return res
