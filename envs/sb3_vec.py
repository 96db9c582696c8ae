"""Stable-Baselines3 ``VecEnv`` over the batched dream engine (:class:`envs.dream.DreamCore`).

SB3 conventions: same-step autoreset (a finished env is reset inside ``step_wait``; its last
observation is in ``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]`` says
whether the time limit ended it), seeds from ``VecEnv.seed`` applied at the next ``reset``.
Observations are channel-last uint8 images; SB3 transposes them for ``CnnPolicy`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from envs.dream import STEP_INFO_FLOATS, DreamCore, load_world_model
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
