"""Stable-Baselines3 callbacks for training policies in dream environments.

:class:`DreamRealGapCallback` scores the policy in a dream env and in the real env every few
rollouts and logs both, so a run shows whether dream progress transfers. A policy trained in a
learned simulator can find states where the model is wrong in its favour (e.g. a reward head that
never predicts death) — then the dream return races ahead of the real one, and the callback warns.

:class:`LockstepVideoCallback` shows *where* they part: every N timesteps the current policy drives the
real game with the dream following (:mod:`envs.follow`), and the lockstep video (real · dream · |diff|
with the policy's probabilities) and the dream-optimism figure go to TensorBoard.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import TensorBoardOutputFormat
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor, is_vecenv_wrapped

from envs.follow import follow_trace
from envs.policy_probe import SB3Probe
from worldmodel.bundle import WorldModel
from worldmodel.rollout_summary import DEFAULT_PSNR_THRESHOLD, optimism_figure, summarize
from worldmodel.rollout_video import RolloutTrace, lockstep_trace, trace_frames
from worldmodel.store import EpisodeStore
from worldmodel.video import tensorboard_video

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
        raise TypeError(
            f"expected a gymnasium.Env, an SB3 VecEnv or a factory returning one, got {type(env).__name__}"
        )
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

    def __init__(
        self,
        dream_env: EnvLike,
        real_env: EnvLike,
        *,
        eval_every: int = 1,
        n_eval_episodes: int = 5,
        exploit_factor: float = 2.0,
        deterministic: bool = True,
        seed: int | None = None,
        prefix: str = "dream_real",
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if eval_every < 1:
            raise ValueError(f"eval_every: got {eval_every}, expected >= 1 (rollouts between evaluations)")
        if n_eval_episodes < 1:
            raise ValueError(f"n_eval_episodes: got {n_eval_episodes}, expected >= 1")
        for name, e in (("dream_env", dream_env), ("real_env", real_env)):
            if not isinstance(e, gym.Env | VecEnv) and not callable(e):
                raise TypeError(
                    f"{name}: got {type(e).__name__}, expected a gymnasium.Env, an SB3 VecEnv or a "
                    "zero-argument factory of either"
                )
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

        returns, lengths = evaluate_policy(
            self.model,
            env,
            n_eval_episodes=self.n_eval_episodes,
            deterministic=self.deterministic,
            return_episode_rewards=True,
            callback=collect_entropy if entropies is not None else None,
        )
        return [float(r) for r in returns], [int(n) for n in lengths]

    def evaluate(self) -> dict[str, float]:
        """Score the current policy in both envs now, log the result and return it."""
        entropies: list[float] = []
        dream_r, dream_n = self._score("dream", entropies)
        real_r, real_n = self._score("real")
        res = {
            "dream_return": float(np.mean(dream_r)),
            "dream_return_std": float(np.std(dream_r)),
            "dream_ep_length": float(np.mean(dream_n)),
            "real_return": float(np.mean(real_r)),
            "real_return_std": float(np.std(real_r)),
            "real_ep_length": float(np.mean(real_n)),
            "token_entropy": float(np.mean(entropies)) if entropies else float("nan"),
        }
        res["return_gap"] = res["dream_return"] - res["real_return"]
        exploit = res["dream_return"] > self.exploit_factor * res["real_return"]
        res["exploit_warning"] = float(exploit)
        for k, v in res.items():
            self.logger.record(f"{self.prefix}/{k}", v)
        if exploit:
            warnings.warn(
                f"dream return {res['dream_return']:.2f} > {self.exploit_factor} x real return "
                f"{res['real_return']:.2f} at {self.num_timesteps} timesteps: the policy may be exploiting "
                "errors of the world model",
                DreamExploitWarning,
                stacklevel=2,
            )
        if self.verbose:
            print(
                f"[{self.prefix}] t={self.num_timesteps} dream {res['dream_return']:.2f} real {res['real_return']:.2f} "
                f"entropy {res['token_entropy']:.3f}"
            )
        self.history.append({"timesteps": float(self.num_timesteps), **res})
        return res


class LockstepVideoCallback(BaseCallback):
    """Every ``every`` timesteps (checked at the end of each rollout), let the policy being trained drive the real
    env for up to ``steps`` steps with the dream following (:func:`envs.follow.follow_trace`: open loop and
    re-synced every ``resync_every`` steps), and write to TensorBoard:

    * ``<prefix>/video``: the lockstep video (real · dream · |diff|, the policy's action probabilities as bars),
      an animated GIF image summary, which TensorBoard plays;
    * ``<prefix>/optimism``: the dream-optimism figure (cumulative predicted vs real reward);
    * scalars through the SB3 logger: ``<prefix>/mean_psnr_db``, ``optimism``, ``first_divergence_step``
      (``steps + 1`` when the dream never fell below ``psnr_threshold``), ``disagreement_rate``, ``real_return``,
      ``predicted_return``.

    Args:
        wm: the world model the policy trains in (shared; the callback starts its own dreams).
        real_env: the real env (a ``gymnasium.Env`` or a zero-argument factory; one the callback made from a
            factory it closes at the end of training), e.g. ``lambda: envs.follow.make_bundle_real_env(wm)``.
            ``None`` for a dataset-only bundle: then each video replays a held-out recorded episode in the dream
            (no policy in it), as ``rollout.py`` falls back to.
        every: timesteps between videos (>= 1).
        steps, resync_every, seed, psnr_threshold: as :func:`envs.follow.follow_trace` / the summary; the k-th
            video is seeded ``seed + k``.
        scale: upscaling of the video panels; fps: its frame rate.
        log_dir: where to write the TensorBoard events; default: the TensorBoard writer of the model's SB3
            logger (``tensorboard_log=...``), and an error at the start of training if it has none.
        prefix: tag prefix.

    Every video's summary is appended to :attr:`history` (a dict with ``timesteps`` and the summary's fields).
    """

    def __init__(
        self,
        wm: WorldModel,
        real_env: gym.Env | Callable[[], gym.Env] | None,
        *,
        every: int = 10_000,
        steps: int = 32,
        resync_every: int = 1,
        seed: int = 0,
        psnr_threshold: float = DEFAULT_PSNR_THRESHOLD,
        scale: int = 2,
        fps: float | None = None,
        log_dir: str | None = None,
        prefix: str = "lockstep",
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if every < 1:
            raise ValueError(f"every: got {every}, expected >= 1 (timesteps between videos)")
        if steps < 1:
            raise ValueError(f"steps: got {steps}, expected >= 1")
        if real_env is not None and not isinstance(real_env, gym.Env) and not callable(real_env):
            raise TypeError(
                f"real_env: got {type(real_env).__name__}, expected a gymnasium.Env, a zero-argument "
                "factory of one, or None (dataset-only bundle)"
            )
        self.wm, self.every, self.steps, self.resync_every = wm, every, steps, resync_every
        self.seed, self.psnr_threshold, self.scale = seed, psnr_threshold, scale
        self.fps = fps or wm.fps
        self.log_dir, self.prefix = log_dir, prefix
        self._source = real_env
        self._env: gym.Env | None = real_env if isinstance(real_env, gym.Env) else None
        self._owns_env = False
        self._writer: Any = None
        self._owns_writer = False
        self._next = every
        self.history: list[dict[str, Any]] = []

    def _init_callback(self) -> None:
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer, self._owns_writer = SummaryWriter(self.log_dir), True
            return
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                self._writer = fmt.writer
                return
        raise ValueError(
            "LockstepVideoCallback: the model's logger writes no TensorBoard events; create the model "
            "with tensorboard_log=DIR or pass log_dir=DIR to the callback"
        )

    def _real_env(self) -> gym.Env:
        if self._env is None:
            self._env = self._source()
            self._owns_env = True
        return self._env

    def _trace(self, k: int) -> RolloutTrace:
        if self._source is None:  # dataset-only bundle: a held-out recorded episode, replayed in the dream
            store = EpisodeStore(self.wm.store_path)
            ids = store.episode_ids("test") + store.episode_ids("val") or store.episode_ids()
            ids = [e for e in ids if store.length(e) > 1]
            if not ids:
                raise ValueError(f"{self.wm.store_path}: no episode of 2 frames or more to replay")
            eid = ids[k % len(ids)]
            return lockstep_trace(self.wm, store, eid, steps=self.steps, seed=self.seed + k)
        probe = SB3Probe(self.model.policy, name=f"{type(self.model).__name__} at {self.num_timesteps}")
        return follow_trace(
            self.wm,
            self._real_env(),
            probe,
            steps=self.steps,
            resync_every=self.resync_every,
            seed=self.seed + k,
        )

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.num_timesteps >= self._next:
            self.log_video()
            self._next = (self.num_timesteps // self.every + 1) * self.every

    def log_video(self) -> dict[str, Any]:
        """Run one lockstep rollout with the current policy now and write it to TensorBoard; returns its summary."""
        k = len(self.history)
        trace = self._trace(k)
        summary = summarize(trace, self.psnr_threshold)
        step = self.num_timesteps
        frames = np.stack(trace_frames(trace, self.scale))  # (T+1, H', W', 3)
        tensorboard_video(self._writer, f"{self.prefix}/video", frames, step, fps=self.fps)
        self._writer.add_figure(f"{self.prefix}/optimism", optimism_figure(trace), step, close=True)
        self._writer.flush()
        first = summary.first_divergence_step
        scalars = {
            "mean_psnr_db": summary.mean_psnr_db,
            "optimism": summary.optimism,
            "first_divergence_step": float(first if first is not None else summary.steps + 1),
            "real_return": summary.real_return,
            "predicted_return": summary.predicted_return,
        }
        if summary.disagreement_rate is not None:
            scalars["disagreement_rate"] = summary.disagreement_rate
        for key, v in scalars.items():
            self.logger.record(f"{self.prefix}/{key}", float(v))
        if self.verbose:
            print(
                f"[{self.prefix}] t={step} psnr {summary.mean_psnr_db:.2f} dB, optimism {summary.optimism:+.2f}, "
                f"first divergence {first}"
            )
        row = {"timesteps": step, **summary.to_dict()}
        self.history.append(row)
        return row

    def close(self) -> None:
        """Close the real env this callback made from a factory and the writer it opened (``log_dir``)."""
        if self._owns_env and self._env is not None:
            self._env.close()
            self._env, self._owns_env = None, False
        if self._owns_writer and self._writer is not None:
            self._writer.close()
            self._writer, self._owns_writer = None, False

    def _on_training_end(self) -> None:
        self.close()
