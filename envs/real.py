"""Real envs by name: the named ViZDoom scenarios (:mod:`envs.vizdoom`) and any Gymnasium id with pixels,
``"gym:<ID>"`` (:mod:`envs.gym_source`). Collection, real-env scoring, the MBRL loop and the benchmarks make
their real envs here, so each works with both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from envs.gym_source import is_gym_env, make_gym_env, make_gym_env_fn, parse_make_kwargs
from envs.vizdoom import ENV_NAMES
from worldmodel.store import ActionSpec


def is_real_env(name: str) -> bool:
    """Whether ``name`` is a real env: one of :data:`envs.vizdoom.ENV_NAMES` or ``"gym:<ID>"``."""
    return name in ENV_NAMES or is_gym_env(name)


def check_real_env(name: str, what: str = "env") -> None:
    """``ValueError`` naming ``what`` unless ``name`` is a real env."""
    if not is_real_env(name):
        raise ValueError(
            f"{what}: got {name!r}, expected one of {list(ENV_NAMES)} or 'gym:<Gymnasium id>' (a real env, "
            f"e.g. gym:ALE/Pong-v5, gym:CarRacing-v3, gym:VizdoomDefendCenter-v1)"
        )


def make_real_env_fn(name: str, *, engines_in_workers: bool = False, **kwargs: Any) -> Callable[[], gym.Env]:
    """A picklable zero-argument factory of the real env ``name`` (for ``AsyncVectorEnv`` subprocesses).

    ``engines_in_workers`` (ViZDoom only; see :func:`envs.vizdoom.make_real_env_fn`): called in this process, the
    factory returns the env's spaces without starting an engine."""
    check_real_env(name)
    if is_gym_env(name):
        return make_gym_env_fn(name, **kwargs)
    from envs.vizdoom import make_real_env_fn as vizdoom_fn

    return vizdoom_fn(name, engines_in_workers=engines_in_workers, **kwargs)


def make_real_env(name: str, **kwargs: Any) -> gym.Env:
    """The real env ``name`` (keyword arguments: :func:`envs.vizdoom.make_real_env` or
    :func:`envs.gym_source.make_gym_env`)."""
    check_real_env(name)
    if is_gym_env(name):
        return make_gym_env(name, **kwargs)
    from envs.vizdoom import make_real_env as vizdoom_env

    return vizdoom_env(name, **kwargs)


def recorded_settings(
    env: gym.Env, name: str, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(env_kwargs, extra)`` that a store records for a probe ``env`` of ``name`` made with ``kwargs``: the
    effective settings that rebuild the same env (ViZDoom: as strings, the store's historical form; gym:
    JSON values of :meth:`envs.gym_source.GymPixelEnv.settings`) and, for gym envs, ``{"gym": description}``."""
    if is_gym_env(name):
        return env.settings(), {"gym": env.description()}  # type: ignore[attr-defined]
    u = env.unwrapped
    merged = {**kwargs, "resolution": u.resolution, "frame_skip": u.frame_skip, "health_bar": u.health_bar}  # type: ignore[attr-defined]
    return {k: str(v) for k, v in merged.items()}, {}


def store_action_spec(env: gym.Env, name: str) -> ActionSpec:
    """The store's action spec of a probe ``env`` of ``name`` (ViZDoom: named discrete actions)."""
    if is_gym_env(name):
        return env.store_action_spec()  # type: ignore[attr-defined]
    from envs.vizdoom import action_names

    return ActionSpec.discrete(int(env.action_space.n), names=action_names(name))  # type: ignore[attr-defined]


@dataclass
class EnvOptions:
    """How to make the real env: CLI flags of train.py, collect.py and mbrl.py (``--env-module``, ``--env-kwargs``,
    ``--pixels``, ``--frame-skip``, ``--sticky-actions``). Only ``frame_skip`` applies to the ViZDoom presets."""

    env_module: str | None = None
    """Module to import before gym.make so that it registers its ids (like Gymnasium's 'module:id'), e.g.
    ale_py (gym: envs; ALE/* ids import ale_py and Vizdoom* ids vizdoom.gymnasium_wrapper by themselves)."""
    env_kwargs: str = "{}"
    """Keyword arguments of gym.make as a JSON object, e.g. '{"continuous": false}' (gym: envs)."""
    pixels: str = "auto"
    """Where the frames come from (gym: envs): 'auto', 'obs' (an image observation), 'render'
    (render_mode='rgb_array') or 'key:NAME' (the image entry NAME of a Dict observation, e.g. key:screen)."""
    frame_skip: int | None = None
    """Env steps per step, action held, rewards summed. gym: envs: default 1 if the env skips frames itself
    (ALE v5), else 4. ViZDoom: game tics per step, default 4 (35 tics/s)."""
    sticky_actions: float = 0.0
    """Probability that an env step repeats the previous action instead of the new one (gym: envs)."""

    def env_kwargs_for(self, name: str) -> dict[str, Any]:
        """Keyword arguments of :func:`make_real_env` these options give for env ``name`` (resolution excluded);
        ``ValueError`` naming the flags when gym-only options are set for a ViZDoom env."""
        check_real_env(name, "--env")
        if not is_gym_env(name):
            default = EnvOptions()
            gym_only = [
                f"--{k.replace('_', '-')}"
                for k in ("env_module", "env_kwargs", "pixels", "sticky_actions")
                if getattr(self, k) != getattr(default, k)
            ]
            if gym_only:
                raise ValueError(f"{', '.join(gym_only)}: only for gym:<ID> envs; got with --env {name!r}")
            return {} if self.frame_skip is None else {"frame_skip": self.frame_skip}
        out: dict[str, Any] = {
            "make_kwargs": parse_make_kwargs(self.env_kwargs),
            "pixels": self.pixels,
            "sticky_actions": self.sticky_actions,
        }
        if self.env_module:
            out["module"] = self.env_module
        if self.frame_skip is not None:
            out["frame_skip"] = self.frame_skip
        return out
