"""Any Gymnasium env with pixels as a real-env source: ``gym:<ID>`` (e.g. ``gym:ALE/Pong-v5``,
``gym:CarRacing-v3``, ``gym:VizdoomDefendCenter-v1``).

:class:`GymPixelEnv` wraps ``gym.make(ID, **make_kwargs)`` into the form every stage downstream
expects of a real env (the form of :class:`envs.vizdoom.VizdoomEnv`):

- **Pixels.** Observations are ``Box(0, 255, (R, R, 3), uint8)``, taken from (``pixels``)
  ``"obs"`` -- the observation itself when it is an image Box (uint8 ``(H, W, 3)``, ``(H, W, 4)``
  (alpha dropped), grey ``(H, W)`` / ``(H, W, 1)``, or channel-first ``(3, H, W)`` / ``(1, H, W)``);
  ``"key:NAME"`` -- the image entry ``NAME`` of a Dict observation (ViZDoom's ids: ``screen``); or
  ``"render"`` -- ``env.render()`` of an env made with ``render_mode="rgb_array"``. ``"auto"``
  (default) picks the first that exists, in that order (a Dict with one image entry, or one named
  ``screen``, ``pixels``, ``image``, ``rgb``, ``frame``). An env with none of them gets
  :class:`NoPixelsError` naming the observation space and render modes it has.
  Frames are resized to ``R × R`` with an area (box) filter, stretched: the aspect ratio is not
  kept (210×160 Atari frames become square), which the tokenizer's square grid needs.
- **Actions.** ``Discrete(n, start)`` stays ``Discrete(n)``; a ``Box`` with finite bounds is exposed
  as ``Box(-1, 1, (dim,), float32)`` -- exactly the dream env's continuous space -- and mapped
  linearly to the env's ``[low, high]``; ``MultiBinary(k)`` and ``MultiDiscrete(nvec)`` become one
  ``Discrete`` over every combination (at most :data:`MAX_COMBINATIONS`); anything else (unbounded
  Box, Tuple, Dict, Text, larger products) raises :class:`UnsupportedActionSpace` naming the space.
  The store records actions in the env's own units (:meth:`GymPixelEnv.store_actions`).
- **Wrapper settings.** ``frame_skip`` steps of the inner env per step (action held, rewards
  summed, stopping at the end of the episode); by default 1 when the env skips frames itself (an
  integer ``frameskip`` / ``frame_skip`` > 1 in its spec's kwargs, e.g. ALE v5's 4) and 4 otherwise.
  ``sticky_actions`` is the probability that each inner step repeats the previous action instead
  (Machado et al. 2018; ALE v5 has its own, 0.25, recorded among the spec's kwargs).
  ``max_episode_steps`` truncates after that many (wrapper) steps.
- ``terminated`` and ``truncated`` are kept apart, as the inner env reports them (its TimeLimit
  truncates).

:meth:`GymPixelEnv.settings` are the keyword arguments that rebuild the very same env
(``envs.collect`` stores them as ``extra.env_kwargs``; ``envs.policy.real_env_kwargs`` reads them back
to score dream-trained policies); :meth:`GymPixelEnv.description` adds what was found (spaces, the
spec's kwargs, the action mapping, the resize).

Ids of third-party packages are registered by importing them: ``module`` (CLI ``--env-module``, like
Gymnasium's ``module:id``) is imported before ``gym.make``; ``ALE/*`` ids import ``ale_py`` and
``Vizdoom*`` ids ``vizdoom.gymnasium_wrapper`` by themselves. A missing optional package is an
:class:`ImportError` naming the extra to install (``atari``: ale-py; ``box2d``: CarRacing, LunarLander,
BipedalWalker).
"""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from worldmodel.config import GYM_PREFIX
from worldmodel.store import ActionSpec

MAX_COMBINATIONS = 256
"""Largest ``Discrete`` a ``MultiBinary`` / ``MultiDiscrete`` action space is mapped to (2**8 button combinations)."""
DEFAULT_FRAME_SKIP = 4
"""Frame skip of envs that do not skip frames themselves (World Models, DreamerV3's Atari action repeat)."""
IMAGE_KEYS = ("screen", "pixels", "image", "rgb", "frame")
"""Dict observation entries ``pixels="auto"`` prefers when several are images."""
RESIZE = "area filter (PIL BOX), stretched to R×R (aspect ratio not kept)"
PIXEL_SOURCES = ("auto", "obs", "render", "key:NAME")

# id prefix -> (module that registers it, pip extra of this package that installs it)
_ID_MODULES: tuple[tuple[str, str, str | None], ...] = (
    ("ALE/", "ale_py", "atari"),
    ("Vizdoom", "vizdoom.gymnasium_wrapper", None),
)
# ids of Gymnasium's own box2d envs -> extra "box2d"
_BOX2D_NAMES = ("CarRacing", "LunarLander", "BipedalWalker")
_EXTRA_PACKAGES = {"atari": "ale-py", "box2d": "box2d"}


class NoPixelsError(ValueError):
    """The env has no image observation, no image entry in its Dict observation, and no ``rgb_array`` render."""


class UnsupportedActionSpace(ValueError):
    """The env's action space cannot be mapped to a Discrete or a bounded Box."""


def is_gym_env(name: str) -> bool:
    """Whether ``name`` names a Gymnasium id (``"gym:<ID>"``)."""
    return isinstance(name, str) and name.startswith(GYM_PREFIX)


def gym_id(name: str) -> str:
    """The Gymnasium id of ``"gym:<ID>"``; ``ValueError`` naming ``env`` for anything else."""
    if not is_gym_env(name) or not name[len(GYM_PREFIX) :].strip():
        raise ValueError(
            f"env: got {name!r}, expected 'gym:<Gymnasium id>', e.g. 'gym:ALE/Pong-v5' or 'gym:CarRacing-v3'"
        )
    return name[len(GYM_PREFIX) :]


def extra_for(env_id: str) -> str | None:
    """The optional extra of this package (``pip install -e ".[EXTRA]"``) that installs ``env_id``'s simulator."""
    for prefix, _, extra in _ID_MODULES:
        if env_id.startswith(prefix):
            return extra
    name = env_id.split("/")[-1]
    return "box2d" if name.startswith(_BOX2D_NAMES) else None


def _missing_extra(env_id: str, what: str) -> ImportError:
    extra = extra_for(env_id)
    if extra is None:
        return ImportError(f"env 'gym:{env_id}': {what}; install the package that provides it")
    return ImportError(
        f"env 'gym:{env_id}': {what}; install the {extra!r} extra: pip install -c constraints.txt -e "
        f'".[{extra}]" (or pip install {_EXTRA_PACKAGES[extra]})'
    )


def import_env_module(env_id: str, module: str | None = None) -> str | None:
    """Import ``module`` (or the module known to register ``env_id``) so that its ids are registered; returns
    the module imported (None: none needed). A failed import is an ``ImportError`` naming the extra."""
    auto = next((m for prefix, m, _ in _ID_MODULES if env_id.startswith(prefix)), None)
    name = module or auto
    if name is None:
        return None
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        if module is not None and module != auto:
            raise ImportError(
                f"env_module: cannot import {module!r} ({e}); expected an importable module that "
                f"registers {env_id!r} with Gymnasium"
            ) from None
        raise _missing_extra(env_id, f"cannot import {name!r} ({e})") from None
    if hasattr(gym, "register_envs"):
        gym.register_envs(mod)  # a no-op that documents the import (ale_py registers on import)
    return name


def parse_make_kwargs(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """``--env-kwargs`` as a dict: a JSON object (``'{"continuous": false}'``) or a dict; ``ValueError`` otherwise."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        value: Any = text
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"env_kwargs: got {text!r}, expected a JSON object such as '{{\"continuous\": false}}' ({e})"
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"env_kwargs: got {text!r}, expected a JSON object of gym.make keyword arguments")
    return dict(value)


# ---------------------------------------------------------------------------------------------- pixels


def image_layout(space: spaces.Space) -> str | None:
    """How ``space`` holds an image: ``"hwc"`` (``(H, W, 3|4)``), ``"hw1"`` / ``"hw"`` (grey), ``"chw"`` /
    ``"1hw"`` (channel first), or None if it is not a uint8 image Box (both sides >= 8 pixels)."""
    if not isinstance(space, spaces.Box) or space.dtype != np.uint8:
        return None
    s = space.shape
    if len(s) == 2 and min(s) >= 8:
        return "hw"
    if len(s) == 3 and min(s[:2]) >= 8 and s[2] in (3, 4):
        return "hwc"
    if len(s) == 3 and min(s[:2]) >= 8 and s[2] == 1:
        return "hw1"
    if len(s) == 3 and min(s[1:]) >= 8 and s[0] == 3:
        return "chw"
    if len(s) == 3 and min(s[1:]) >= 8 and s[0] == 1:
        return "1hw"
    return None


def to_rgb(frame: np.ndarray, layout: str) -> np.ndarray:
    """An image of ``layout`` (see :func:`image_layout`) as uint8 ``(H, W, 3)``."""
    a = np.asarray(frame)
    if layout == "chw" or layout == "1hw":
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3], dtype=np.uint8)


def render_layout(frame: Any) -> str | None:
    """The layout of a rendered frame (an array), as :func:`image_layout`; None if it is not an image."""
    a = np.asarray(frame) if frame is not None else None
    if a is None or a.dtype != np.uint8:
        return None
    return image_layout(spaces.Box(0, 255, a.shape, np.uint8))


def _describe_obs(space: spaces.Space) -> str:
    if isinstance(space, spaces.Dict):
        return "Dict(" + ", ".join(f"{k!r}: {v}" for k, v in space.spaces.items()) + ")"
    return str(space)


def _pixel_source(env_id: str, space: spaces.Space, pixels: str, render_modes: list[str]) -> str:
    """Resolve ``pixels`` against the observation space: ``"obs"``, ``"key:NAME"`` or ``"render"``."""
    renders = "rgb_array" in render_modes
    found = f"observation space {_describe_obs(space)} and render_modes {render_modes}"
    if pixels == "obs":
        if image_layout(space) is None:
            raise NoPixelsError(
                f"pixels='obs': env 'gym:{env_id}' has {found}; the observation is not a uint8 image "
                f"Box (H, W, 3), (H, W, 1), (H, W) or (3, H, W). Use pixels='auto', 'render' or 'key:NAME'"
            )
        return "obs"
    if pixels == "render":
        if not renders:
            raise NoPixelsError(
                f"pixels='render': env 'gym:{env_id}' has {found}; it cannot render 'rgb_array'"
            )
        return "render"
    if pixels.startswith("key:") or pixels not in ("auto",):
        key = pixels[4:] if pixels.startswith("key:") else pixels
        if not isinstance(space, spaces.Dict) or key not in space.spaces:
            keys = list(space.spaces) if isinstance(space, spaces.Dict) else []
            raise NoPixelsError(
                f"pixels={pixels!r}: env 'gym:{env_id}' has {found}; expected a Dict observation with "
                f"an entry {key!r} (its entries: {keys}); pixels accepts {list(PIXEL_SOURCES)}"
            )
        if image_layout(space.spaces[key]) is None:
            raise NoPixelsError(
                f"pixels={pixels!r}: entry {key!r} of env 'gym:{env_id}' is {space.spaces[key]}, not a "
                f"uint8 image Box (H, W, 3), (H, W, 1), (H, W) or (3, H, W)"
            )
        return f"key:{key}"
    # auto
    if image_layout(space) is not None:
        return "obs"
    if isinstance(space, spaces.Dict):
        images = [k for k, v in space.spaces.items() if image_layout(v) is not None]
        if len(images) == 1:
            return f"key:{images[0]}"
        preferred = [k for k in IMAGE_KEYS if k in images]
        if preferred:
            return f"key:{preferred[0]}"
        if images:
            raise NoPixelsError(
                f"env 'gym:{env_id}' has {found}: several image entries {images}; choose one with "
                f"pixels='key:NAME' (CLI --pixels key:NAME)"
            )
    if renders:
        return "render"
    raise NoPixelsError(
        f"env 'gym:{env_id}' has no pixels: found {found}. Expected an image observation (uint8 Box "
        f"(H, W, 3), (H, W, 1), (H, W) or (3, H, W)), a Dict observation with such an entry, or "
        f"'rgb_array' among the render modes (CLI --pixels {'|'.join(PIXEL_SOURCES)})"
    )


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class ActionMap:
    """How the exposed action space maps to the env's: ``kind`` ``discrete`` | ``box`` | ``multibinary`` |
    ``multidiscrete``."""

    kind: str
    exposed: spaces.Space
    env_space: spaces.Space
    names: tuple[str, ...] | None = None

    def to_env(self, action: Any) -> Any:
        """The env's action for an exposed one (already checked to lie in :attr:`exposed`)."""
        s = self.env_space
        if self.kind == "discrete":
            return int(action) + int(s.start)  # type: ignore[attr-defined]
        if self.kind == "box":
            a = np.clip(np.asarray(action, np.float64).reshape(-1), -1.0, 1.0)
            low, high = s.low.reshape(-1).astype(np.float64), s.high.reshape(-1).astype(np.float64)  # type: ignore[attr-defined]
            return (low + (a + 1.0) / 2.0 * (high - low)).reshape(s.shape).astype(s.dtype)
        if self.kind == "multibinary":
            n = int(np.prod(s.shape))
            bits = [(int(action) >> (n - 1 - i)) & 1 for i in range(n)]
            return np.asarray(bits, s.dtype).reshape(s.shape)
        nvec = np.asarray(s.nvec).reshape(-1)  # type: ignore[attr-defined]
        digits = np.unravel_index(int(action), tuple(int(x) for x in nvec))
        start = np.asarray(getattr(s, "start", np.zeros_like(nvec))).reshape(-1)
        return (np.asarray(digits) + start).astype(s.dtype).reshape(np.asarray(s.nvec).shape)  # type: ignore[attr-defined]

    def store_spec(self) -> ActionSpec:
        """The store's action spec: Discrete actions as indices; Box actions in the env's units with its bounds."""
        if self.kind == "box":
            s = self.env_space
            return ActionSpec.continuous(
                int(np.prod(s.shape)),
                low=s.low.reshape(-1).tolist(),  # type: ignore[attr-defined]
                high=s.high.reshape(-1).tolist(),
            )  # type: ignore[attr-defined]
        return ActionSpec.discrete(int(self.exposed.n), names=self.names)  # type: ignore[attr-defined]


def action_map(env_id: str, space: spaces.Space, names: list[str] | None = None) -> ActionMap:
    """Map the env's action space to a Discrete or a ``[-1, 1]`` Box (see the module docstring), or raise
    :class:`UnsupportedActionSpace` naming it and what is accepted."""
    accepted = (
        f"accepted: Discrete, Box with finite bounds, MultiBinary / MultiDiscrete with at most "
        f"{MAX_COMBINATIONS} combinations"
    )
    where = f"env 'gym:{env_id}': action space {space}"
    if isinstance(space, spaces.Discrete):
        n = int(space.n)
        ok = names is not None and len(names) == n
        return ActionMap("discrete", spaces.Discrete(n), space, tuple(str(x) for x in names) if ok else None)  # type: ignore[arg-type]
    if isinstance(space, spaces.Box):
        if not np.issubdtype(space.dtype, np.floating):
            raise UnsupportedActionSpace(f"{where} is an integer Box; {accepted}")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise UnsupportedActionSpace(
                f"{where} has unbounded dimensions (the dream maps [-1, 1] to the bounds); "
                f"wrap the env with gymnasium.wrappers.ClipAction/RescaleAction first; {accepted}"
            )
        dim = int(np.prod(space.shape))
        return ActionMap("box", spaces.Box(-1.0, 1.0, (dim,), np.float32), space)
    if isinstance(space, spaces.MultiBinary):
        n = int(np.prod(space.shape))
        if 2**n > MAX_COMBINATIONS:
            raise UnsupportedActionSpace(
                f"{where} has 2**{n} button combinations, more than {MAX_COMBINATIONS}; "
                f"wrap the env to expose fewer buttons (e.g. a Discrete of chosen combinations); "
                f"{accepted}"
            )
        combos = tuple("".join(str((i >> (n - 1 - b)) & 1) for b in range(n)) for i in range(2**n))
        return ActionMap("multibinary", spaces.Discrete(2**n), space, combos)
    if isinstance(space, spaces.MultiDiscrete):
        nvec = [int(x) for x in np.asarray(space.nvec).reshape(-1)]
        total = math.prod(nvec)
        if total > MAX_COMBINATIONS:
            raise UnsupportedActionSpace(
                f"{where} has {' x '.join(map(str, nvec))} = {total} combinations, more than "
                f"{MAX_COMBINATIONS}; wrap the env to expose fewer; {accepted}"
            )
        combos = tuple(",".join(map(str, np.unravel_index(i, tuple(nvec)))) for i in range(total))
        return ActionMap("multidiscrete", spaces.Discrete(total), space, combos)
    raise UnsupportedActionSpace(f"{where} ({type(space).__name__}) is not supported; {accepted}")


# ---------------------------------------------------------------------------------------------- the env


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of ``d`` (others as their repr)."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = repr(v)
    return out


def _own_frame_skip(spec_kwargs: dict[str, Any]) -> int:
    for k in ("frameskip", "frame_skip"):
        v = spec_kwargs.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:
            return v
    return 1


class GymPixelEnv(gym.Env):
    """A Gymnasium env as a real-env source with square RGB pixels; see the module docstring.

    Args:
        env_id: the Gymnasium id (without ``gym:``), e.g. ``"ALE/Pong-v5"``.
        module: module imported first to register ``env_id`` (CLI ``--env-module``); ALE/Vizdoom ids need none.
        make_kwargs: keyword arguments of ``gym.make`` (JSON-serialisable; recorded in the store).
        pixels: ``"auto"``, ``"obs"``, ``"render"`` or ``"key:NAME"`` (a bare ``NAME`` means ``"key:NAME"``).
        resolution: side ``R`` of the square observation.
        frame_skip: inner steps per step (None: 1 if the env skips frames itself, else 4).
        sticky_actions: probability that an inner step repeats the previous action.
        max_episode_steps: truncate after this many steps (None: the env's own limits only).
        render_mode: ``None`` or ``"rgb_array"`` (the last frame at the env's own size).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15.0}

    def __init__(
        self,
        env_id: str,
        *,
        module: str | None = None,
        make_kwargs: dict[str, Any] | None = None,
        pixels: str = "auto",
        resolution: int = 64,
        frame_skip: int | None = None,
        sticky_actions: float = 0.0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8:
            raise ValueError(f"resolution: got {resolution!r}, expected an integer >= 8 (pixels per side)")
        if frame_skip is not None and (
            not isinstance(frame_skip, int) or isinstance(frame_skip, bool) or frame_skip < 1
        ):
            raise ValueError(f"frame_skip: got {frame_skip!r}, expected None (auto) or an integer >= 1")
        if not (isinstance(sticky_actions, (int, float)) and 0.0 <= float(sticky_actions) < 1.0):
            raise ValueError(f"sticky_actions: got {sticky_actions!r}, expected a probability in [0, 1)")
        if max_episode_steps is not None and (
            not isinstance(max_episode_steps, int) or max_episode_steps < 1
        ):
            raise ValueError(
                f"max_episode_steps: got {max_episode_steps!r}, expected None or an integer >= 1"
            )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: got {render_mode!r}, expected None or 'rgb_array'")
        if not isinstance(pixels, str) or not pixels:
            raise ValueError(f"pixels: got {pixels!r}, expected one of {list(PIXEL_SOURCES)}")
        make_kwargs = parse_make_kwargs(make_kwargs)
        if "render_mode" in make_kwargs:
            raise ValueError(
                "make_kwargs: 'render_mode' is chosen by pixels ('render' makes the env with "
                "render_mode='rgb_array'); remove it from make_kwargs"
            )
        self.env_id = env_id
        self.module = import_env_module(env_id, module)
        self.make_kwargs = make_kwargs
        inner = self._make(render=pixels == "render")
        try:
            modes = list(inner.metadata.get("render_modes", []))
            source = _pixel_source(env_id, inner.observation_space, pixels, modes)
            if source == "render" and pixels != "render":  # auto chose rendering: make it again, rendering
                inner.close()
                inner = self._make(render=True)
            spec_kwargs = dict(inner.spec.kwargs) if inner.spec is not None else {}
            names = None
            meanings = getattr(inner.unwrapped, "get_action_meanings", None)
            if callable(meanings):
                try:
                    names = list(meanings())
                except Exception:  # noqa: BLE001 - names are decoration
                    names = None
            self._map = action_map(env_id, inner.action_space, names)
        except BaseException:
            inner.close()
            raise
        self.env = inner
        self.pixels = source
        self._layout: str | None = (
            image_layout(self._pixel_space(inner.observation_space)) if source != "render" else None
        )
        self.own_frame_skip = _own_frame_skip(spec_kwargs)
        self.frame_skip = (
            frame_skip if frame_skip is not None else (1 if self.own_frame_skip > 1 else DEFAULT_FRAME_SKIP)
        )
        self.sticky_actions = float(sticky_actions)
        self.max_episode_steps = max_episode_steps
        self.resolution = resolution
        self.render_mode = render_mode
        self.spec_kwargs = _json_safe(spec_kwargs)
        self.spec_max_episode_steps = inner.spec.max_episode_steps if inner.spec is not None else None
        fps = float(inner.metadata.get("render_fps") or 0.0) or 30.0
        self.metadata = {**self.metadata, "render_fps": fps / self.frame_skip / self.own_frame_skip}
        self.observation_space = spaces.Box(0, 255, (resolution, resolution, 3), np.uint8)
        self.action_space = self._map.exposed
        self._frame: np.ndarray | None = None
        self._prev_env_action: Any = None
        self._steps = 0

    # -- helpers --------------------------------------------------------------------------------
    def _make(self, render: bool) -> gym.Env:
        kw = dict(self.make_kwargs)
        if render:
            kw["render_mode"] = "rgb_array"
        try:
            return gym.make(self.env_id, **kw)
        except gym.error.DependencyNotInstalled as e:
            raise _missing_extra(self.env_id, f"a dependency is missing ({e})") from None
        except (
            gym.error.NameNotFound,
            gym.error.NamespaceNotFound,
            gym.error.VersionNotFound,
            gym.error.UnregisteredEnv,
        ) as e:
            hint = (
                f" (its ids come from the {extra_for(self.env_id)!r} extra)" if extra_for(self.env_id) else ""
            )
            raise ValueError(
                f"env: 'gym:{self.env_id}' is not a registered Gymnasium id ({e}){hint}; import the "
                f"package that registers it with --env-module MODULE (Python: module=...)"
            ) from None

    def _pixel_space(self, space: spaces.Space) -> spaces.Space:
        if self.pixels.startswith("key:"):
            return space.spaces[self.pixels[4:]]  # type: ignore[attr-defined]
        return space

    def _read(self, obs: Any) -> np.ndarray:
        if self.pixels == "render":
            frame = self.env.render()
            layout = render_layout(frame)
            if layout is None:
                a = np.asarray(frame) if frame is not None else None
                raise NoPixelsError(
                    f"env 'gym:{self.env_id}': render() returned "
                    f"{None if a is None else f'{a.dtype}{a.shape}'}, expected a uint8 image (H, W, 3)"
                )
            frame = to_rgb(frame, layout)
        else:
            raw = obs[self.pixels[4:]] if self.pixels.startswith("key:") else obs
            frame = to_rgb(raw, self._layout)  # type: ignore[arg-type]
        self._frame = frame
        R = self.resolution
        if frame.shape[:2] == (R, R):
            return frame.copy()
        # Box (area) filter: every source pixel contributes, which avoids aliasing on downscale.
        return np.asarray(Image.fromarray(frame).resize((R, R), Image.Resampling.BOX), dtype=np.uint8)

    # -- what to record -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The keyword arguments (JSON values) that rebuild this very env with :func:`make_gym_env`."""
        return {
            "module": self.module,
            "make_kwargs": self.make_kwargs,
            "pixels": self.pixels,
            "resolution": self.resolution,
            "frame_skip": self.frame_skip,
            "sticky_actions": self.sticky_actions,
            "max_episode_steps": self.max_episode_steps,
        }

    def description(self) -> dict[str, Any]:
        """What was found and how it is mapped (recorded in the store beside :meth:`settings`)."""
        frame_space = self._pixel_space(self.env.observation_space) if self.pixels != "render" else None
        return {
            "id": self.env_id,
            "observation_space": _describe_obs(self.env.observation_space),
            "pixel_space": None if frame_space is None else str(frame_space),
            "action_space": str(self.env.action_space),
            "action_mapping": self._map.kind,
            "spec_kwargs": self.spec_kwargs,
            "spec_max_episode_steps": self.spec_max_episode_steps,
            "own_frame_skip": self.own_frame_skip,
            "resize": RESIZE,
            "episode_limit": self.episode_limit(),
        }

    def episode_limit(self) -> int | None:
        """Steps (of this wrapper) after which the real env truncates, when known."""
        limits = [self.max_episode_steps] if self.max_episode_steps is not None else []
        if self.spec_max_episode_steps:
            limits.append(math.ceil(self.spec_max_episode_steps / self.frame_skip))
        return min(limits) if limits else None

    def store_action_spec(self) -> ActionSpec:
        """The store's action spec (Box actions in the env's units, with its bounds)."""
        return self._map.store_spec()

    def store_actions(self, actions: np.ndarray) -> np.ndarray:
        """Exposed actions ``(N,)`` / ``(N, dim)`` as the store keeps them: indices, or Box actions in the env's units
        (flattened)."""
        a = np.asarray(actions)
        if self._map.kind != "box":
            return a.astype(np.int64).reshape(len(a))
        s = self._map.env_space
        low, high = s.low.reshape(-1), s.high.reshape(-1)  # type: ignore[attr-defined]
        a = np.clip(a.astype(np.float64).reshape(len(a), -1), -1.0, 1.0)
        return (low + (a + 1.0) / 2.0 * (high - low)).astype(np.float32)

    # -- Gymnasium API --------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._steps = 0
        self._prev_env_action = None
        return self._read(obs), {"step": 0, **_json_safe(info)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.asarray(action)
        if self._map.kind == "box":
            if a.shape != self.action_space.shape or not np.all(np.isfinite(a)):
                raise ValueError(
                    f"action: got {action!r}, expected finite floats of shape {self.action_space.shape} "
                    "in [-1, 1] (values outside are clipped)"
                )
        elif (
            a.shape != () or not np.issubdtype(a.dtype, np.integer) or not self.action_space.contains(int(a))
        ):
            raise ValueError(f"action: got {action!r}, expected an int in [0, {self.action_space.n})")  # type: ignore[attr-defined]
        env_action = self._map.to_env(a)
        reward, terminated, truncated = 0.0, False, False
        obs: Any = None
        info: dict[str, Any] = {}
        for _ in range(self.frame_skip):
            act = env_action
            if (
                self.sticky_actions
                and self._prev_env_action is not None
                and self.np_random.random() < self.sticky_actions
            ):
                act = self._prev_env_action
            self._prev_env_action = act
            obs, r, terminated, truncated, info = self.env.step(act)
            reward += float(r)
            if terminated or truncated:
                break
        self._steps += 1
        if self.max_episode_steps is not None and self._steps >= self.max_episode_steps and not terminated:
            truncated = True
        return (
            self._read(obs),
            reward,
            bool(terminated),
            bool(truncated),
            {"step": self._steps, **_json_safe(info)},
        )

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array" and self._frame is not None:
            return self._frame.copy()
        return None

    def close(self) -> None:
        """Close the inner env (idempotent)."""
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- factories

GYM_KWARGS = (
    "module",
    "make_kwargs",
    "pixels",
    "resolution",
    "frame_skip",
    "sticky_actions",
    "max_episode_steps",
    "render_mode",
)


def make_gym_env(name: str, *, seed: int | None = None, **kwargs: Any) -> GymPixelEnv:
    """The env ``"gym:<ID>"`` as a :class:`GymPixelEnv` (keyword arguments as its constructor's); ``seed`` seeds
    its first reset."""
    unknown = sorted(set(kwargs) - set(GYM_KWARGS))
    if unknown:
        raise ValueError(f"env {name!r}: unknown settings {unknown}; a gym: env accepts {list(GYM_KWARGS)}")
    env = GymPixelEnv(gym_id(name), **kwargs)
    if seed is not None:
        env.reset(seed=seed)
    return env


def make_gym_env_fn(name: str, **kwargs: Any) -> Callable[[], GymPixelEnv]:
    """A picklable zero-argument factory of :func:`make_gym_env`, for ``AsyncVectorEnv`` subprocesses. The id
    and settings are checked here, in the caller's process (``gym_id``, unknown settings)."""
    gym_id(name)
    unknown = sorted(set(kwargs) - set(GYM_KWARGS))
    if unknown:
        raise ValueError(f"env {name!r}: unknown settings {unknown}; a gym: env accepts {list(GYM_KWARGS)}")
    return _GymFactory(name, kwargs)


class _GymFactory:
    def __init__(self, name: str, kwargs: dict[str, Any]) -> None:
        self.name, self.kwargs = name, kwargs

    def __call__(self) -> GymPixelEnv:
        if multiprocessing.parent_process() is not None:
            from envs.vizdoom import sigterm_exits

            sigterm_exits()  # an env worker: SIGTERM runs close() (ViZDoom ids hold an engine process)
        if gym_id(self.name).startswith("Vizdoom"):
            from envs.vizdoom import prepare_engine_dir

            prepare_engine_dir()  # workers starting together race to create the engine's directory
        return make_gym_env(self.name, **self.kwargs)


@dataclass(frozen=True)
class GymSpaces:
    """What a probe of a ``gym:`` env found: the frame's size before resizing, the store's action spec, the
    wrapper's episode limit."""

    frame_hw: tuple[int, int]
    action_spec: ActionSpec
    episode_limit: int | None


def probe_gym_env(name: str, **kwargs: Any) -> GymSpaces:
    """Make the env once (resolution ignored), reset it and report its spaces; the env is closed again."""
    kwargs = {k: v for k, v in kwargs.items() if k != "resolution"}
    env = make_gym_env(name, seed=0, **kwargs)
    try:
        assert env._frame is not None
        return GymSpaces(
            frame_hw=(int(env._frame.shape[0]), int(env._frame.shape[1])),
            action_spec=env.store_action_spec(),
            episode_limit=env.episode_limit(),
        )
    finally:
        env.close()


def register_gym_preset(name: str, **kwargs: Any) -> None:
    """Register ``"gym:<ID>"`` as a preset (every scale) built from the spaces of the env, found by one probe with
    ``kwargs`` (see :func:`make_gym_env`): the frame size bounds the resolution and the action space sets the
    prior's (:func:`worldmodel.config.generic_preset`). Without it :func:`~worldmodel.config.get_preset` gives the
    generic preset without a probe (default resolution; the action space follows from the store)."""
    from worldmodel.config import generic_preset, register_preset

    found = probe_gym_env(name, **kwargs)
    spec = found.action_spec
    register_preset(
        name,
        lambda scale: generic_preset(
            name,
            scale,
            frame_size=min(found.frame_hw),
            action_kind=spec.kind,
            n_actions=spec.n,
            action_dim=spec.dim,
        ),
    )
