"""Stable-Baselines3 ``VecEnv`` over the batched dream engine (:class:`envs.dream.DreamCore`).

SB3 conventions: same-step autoreset (a finished env is reset inside ``step_wait``; its last
observation is in ``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]`` says
whether the time limit ended it), seeds from ``VecEnv.seed`` applied at the next ``reset``.
Observations are channel-last uint8 images; SB3 transposes them for ``CnnPolicy`` itself; ``infos[i]["latent"]``
is the world model's latent state after the step's frame (:mod:`envs.latent`). :class:`VecLatentObservation`
makes that state the observation, of the dream or of a real SB3 ``VecEnv`` (a latent-reading controller scored
by SB3's ``evaluate_policy``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvWrapper

from envs.dream import STEP_INFO_FLOATS, DreamCore, load_world_model
from envs.latent import LatentTracker
from worldmodel.bundle import WorldModel


class DreamVecEnv(VecEnv):
    """``num_envs`` dream envs of one bundle as an SB3 ``VecEnv`` (one model call per step for all).

    Args:
        num_envs: number of environments.
        checkpoint: bundle directory (default: newest bundle of ``preset``).
        preset: expected preset of the bundle (checked) or None.
        max_episode_steps: truncate episodes after this many steps (None: never).
        world_model: an already loaded world model to use instead of ``checkpoint``.
        **core_kw: sampling options of :class:`envs.dream.DreamCore` (temperature, top_k, context_frames, ...).
    """

    def __init__(
        self,
        num_envs: int,
        checkpoint: str | os.PathLike | None = None,
        preset: str | None = None,
        *,
        device: str = "cpu",
        max_episode_steps: int | None = None,
        world_model: WorldModel | None = None,
        **core_kw: Any,
    ) -> None:
        wm = world_model if world_model is not None else load_world_model(checkpoint, preset, device)
        self.core = DreamCore(wm, num_envs, **core_kw)
        self.world_model = wm
        self.render_mode = "rgb_array"
        self.max_episode_steps = max_episode_steps
        super().__init__(num_envs, self.core.observation_space, self.core.action_space)
        self.metadata["render_fps"] = wm.fps
        self._actions: np.ndarray | None = None

    def _reset_rows(self, rows: list[int]) -> np.ndarray:
        for i in rows:
            if self._seeds[i] is not None or not self.core.started[i]:
                self.core.seed_row(i, seeding.np_random(self._seeds[i])[0])
        obs = self.core.reset_rows(rows, [self._options[i] or None for i in rows])
        for i in rows:
            self.reset_infos[i] = {"step": 0}
        return obs

    def reset(self) -> np.ndarray:
        self._reset_rows(list(range(self.num_envs)))
        self._reset_seeds()
        self._reset_options()
        return self.core.obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async()")
        a, self._actions = self._actions, None
        if self.core.spec.kind == "discrete" and a.size == self.num_envs:
            a = a.reshape(
                self.num_envs
            )  # SB3 may pass (N, 1); anything else is named by DreamCore.check_actions
        obs, rew, term, info = self.core.step(a)
        trunc = np.zeros(self.num_envs, bool)
        if self.max_episode_steps is not None:
            trunc = (self.core.steps >= self.max_episode_steps) & ~term
        done = term | trunc
        infos = [
            {
                "step": int(info["step"][i]),
                "latent": info["latent"][i],  # of the step's frame (the terminal one for a finished row)
                **{k: float(info[k][i]) for k in STEP_INFO_FLOATS},
                "TimeLimit.truncated": bool(trunc[i]),
            }
            for i in range(self.num_envs)
        ]
        rows = np.flatnonzero(done).tolist()
        if rows:
            for i in rows:
                infos[i]["terminal_observation"] = obs[i].copy()
            obs[rows] = self._reset_rows(rows)
        return obs, rew.astype(np.float32), done, infos

    def close(self) -> None:
        pass

    def get_images(self) -> Sequence[np.ndarray | None]:
        return list(self.core.obs.copy())

    # -- attribute access (all envs share one engine, so attributes are the engine's) ------------
    def _indices(self, indices: VecEnvIndices) -> Iterable[int]:
        return self._get_indices(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name) if attr_name == "render_mode" else getattr(self.core, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.core, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        fn = getattr(self.core, method_name)
        return [fn(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]


class VecLatentObservation(VecEnvWrapper):
    """An SB3 ``VecEnv`` whose observations are the world model's latent states, float32 (N, C): a
    :class:`DreamVecEnv`'s own (its engine's state; a finished row's is its new context's), or for a real
    ``VecEnv`` of the bundle's frames those of a :class:`~envs.latent.LatentTracker` fed with its frames and the
    actions taken. A finished row's ``infos[i]["terminal_observation"]`` becomes its terminal latent.

    Args:
        venv: the dream's or the real game's SB3 ``VecEnv``.
        wm: the world model (the dream's own for a dream).
        encode_window: the tracker's (real envs only).
    """

    def __init__(self, venv: VecEnv, wm: WorldModel, *, encode_window: int | None = None) -> None:
        C = wm.cfg.prior.n_embd
        super().__init__(venv, observation_space=spaces.Box(-np.inf, np.inf, (C,), np.float32))
        base = venv.unwrapped
        self.dream = base if isinstance(base, DreamVecEnv) else None
        if self.dream is not None and self.dream.world_model is not wm:
            raise ValueError(
                "wm: the dream env runs another world model; pass the dream's own (venv.world_model)"
            )
        shape = tuple(venv.observation_space.shape or ())
        if self.dream is None and shape != tuple(wm.obs_shape):
            raise ValueError(
                f"venv: observations of shape {shape}, the bundle's frames are {wm.obs_shape}; make the env at the "
                "bundle's resolution"
            )
        self.tracker = (
            None if self.dream is not None else LatentTracker(wm, venv.num_envs, encode_window=encode_window)
        )
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        frames = self.venv.reset()
        if self.dream is not None:
            return self.dream.core.rollout.latent
        return self.tracker.reset(np.asarray(frames))

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs, *np.shape(actions)[1:])
        self.venv.step_async(actions)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        frames, rew, done, infos = self.venv.step_wait()
        rows = np.flatnonzero(done)
        if self.dream is not None:
            for i in rows:
                infos[i]["terminal_observation"] = infos[i]["latent"]
            return self.dream.core.rollout.latent, rew, done, infos
        seen = np.array(frames, copy=True)
        for i in rows:  # same-step autoreset: the finished rows' last frames are in their infos
            seen[i] = infos[i]["terminal_observation"]
        a = self._actions
        if (
            a is not None
            and a.ndim == 2
            and a.shape[1] == 1
            and self.tracker.wm.action_spec.kind == "discrete"
        ):
            a = a[:, 0]  # SB3 may pass discrete actions as (N, 1)
        latent = self.tracker.step(seen, a)
        for i in rows:
            infos[i]["terminal_observation"] = latent[i].copy()
        if len(rows):
            latent[rows] = self.tracker.reset(np.asarray(frames)[rows], rows)
        return latent, rew, done, infos
