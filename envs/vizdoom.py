"""Real ViZDoom environments: Health Gathering Supreme, Battle2 and Take Cover, as Gymnasium envs.

Both run headless through :class:`vizdoom.DoomGame` and return RGB uint8 observations resized to
``resolution × resolution``, with ``frame_skip`` game tics per step and a discrete action set of
button combinations.

**vizdoom_hgs** — ``health_gathering_supreme.cfg`` shipped with ViZDoom: an acid floor drains
health, medikits restore it. Reward is the scenario's: +1 per tic alive and −100 on death, summed
over the skipped tics (so +4 per step alive with frame skip 4). Episodes end by death
(``terminated``) or the 2100-tic timeout (``truncated``).

**vizdoom_battle2** — ``D4_battle2.{wad,cfg}``, the "D4" scenario of Dosovitskiy & Koltun,
*Learning to Act by Predicting the Future* (ICLR 2017): a maze with monsters, medikits and ammo.
It is not shipped with the vizdoom package; ours ships it as package data (``envs/assets/vizdoom_battle2``,
MIT, from the DirectFuturePrediction repository). Its cfg sets no reward. Our reward follows the
objective of that paper for D4 (measurements ammo, health, frags normalised by 7.5, 30 and 1 with
weights 0.5, 0.5, 1), applied to the change of the cfg's game variables over a step::

    r_t = ΔUSER2 + 0.5 · ΔHEALTH / 30 + 0.5 · ΔAMMO2 / 7.5

where USER2 is the frag (kill) counter that the map's script maintains. Dying ends the episode
(``terminated``); the timeout truncates it.

**vizdoom_take_cover** — ``take_cover.cfg`` shipped with ViZDoom, the World Models (Ha & Schmidhuber,
2018) benchmark: monsters across the room throw fireballs; the agent can only move left or right.
Reward +1 per tic alive (+4 per step at frame skip 4), so the return is the number of tics survived.
The scenario has no timeout; we end episodes after 2100 tics (``truncated``), as World Models did
(their dream-trained agent: 1092 ± 556 tics; "solved" is a mean of 750 over 100 episodes).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
import weakref
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import vizdoom as vzd
from PIL import Image

ENV_NAMES = ("vizdoom_hgs", "vizdoom_battle2", "vizdoom_take_cover")
TICRATE = 35  # ViZDoom's game tics per second

# Button order is the cfg's ``available_buttons``; each action is one combination of them.
HGS_BUTTONS = ("TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD")
HGS_ACTIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("turn_left", (1, 0, 0)),
    ("turn_right", (0, 1, 0)),
    ("forward", (0, 0, 1)),
    ("forward_left", (1, 0, 1)),
    ("forward_right", (0, 1, 1)),
)
BATTLE2_BUTTONS = (
    "MOVE_FORWARD",
    "MOVE_BACKWARD",
    "MOVE_RIGHT",
    "MOVE_LEFT",
    "TURN_LEFT",
    "TURN_RIGHT",
    "ATTACK",
    "SPEED",
)
# Turning, running forward (SPEED held), and shooting while standing or aiming: the moves a
# Battle2 agent needs; backward and strafing moves are left out to keep the action set small.
BATTLE2_ACTIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("turn_left", (0, 0, 0, 0, 1, 0, 0, 0)),
    ("turn_right", (0, 0, 0, 0, 0, 1, 0, 0)),
    ("run_forward", (1, 0, 0, 0, 0, 0, 0, 1)),
    ("run_forward_left", (1, 0, 0, 0, 1, 0, 0, 1)),
    ("run_forward_right", (1, 0, 0, 0, 0, 1, 0, 1)),
    ("attack", (0, 0, 0, 0, 0, 0, 1, 0)),
    ("attack_turn_left", (0, 0, 0, 0, 1, 0, 1, 0)),
    ("attack_turn_right", (0, 0, 0, 0, 0, 1, 1, 0)),
)
TAKE_COVER_BUTTONS = ("MOVE_LEFT", "MOVE_RIGHT")
TAKE_COVER_ACTIONS: tuple[tuple[str, tuple[int, ...]], ...] = (("move_left", (1, 0)), ("move_right", (0, 1)))
TAKE_COVER_TIMEOUT = 2100  # tics (60 s), World Models' episode cap
BATTLE2_FILES = ("D4_battle2.wad", "D4_battle2.cfg")
BATTLE2_REWARD_WEIGHTS = {"USER2": 1.0, "HEALTH": 0.5 / 30.0, "AMMO2": 0.5 / 7.5}


_ACTIONS = {
    "vizdoom_hgs": HGS_ACTIONS,
    "vizdoom_battle2": BATTLE2_ACTIONS,
    "vizdoom_take_cover": TAKE_COVER_ACTIONS,
}


def action_names(name: str) -> list[str]:
    """Human-readable names of the discrete actions of env ``name``."""
    if name not in _ACTIONS:
        raise ValueError(f"name: got {name!r}, expected one of {ENV_NAMES}")
    return [a for a, _ in _ACTIONS[name]]


def packaged_battle2_path() -> Path:
    """The Battle2 map shipped inside this package (``envs/assets/vizdoom_battle2``: wad, cfg, MIT LICENSE)."""
    return Path(str(resources.files("envs") / "assets" / "vizdoom_battle2"))


def resolve_battle2_path(path: str | os.PathLike | None) -> Path:
    """Directory holding ``D4_battle2.wad`` and ``D4_battle2.cfg``.

    The argument wins, then ``$VIZDOOM_BATTLE2_PATH``, then the copy shipped with the package (the D4
    scenario of Dosovitskiy & Koltun's DirectFuturePrediction repository, MIT-licensed).
    """
    if path is None:
        path = os.environ.get("VIZDOOM_BATTLE2_PATH") or packaged_battle2_path()
    p = Path(path)
    missing = [f for f in BATTLE2_FILES if not (p / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"battle2_path {p}: missing {', '.join(missing)}; expected a directory holding "
            f"{' and '.join(BATTLE2_FILES)} (CLI: --battle2-path DIR; leave it unset to use "
            f"the map shipped with the package)"
        )
    return p


def _check_env_args(name: str, resolution: int, frame_skip: int, render_mode: str | None) -> None:
    if name not in ENV_NAMES:
        raise ValueError(f"name: got {name!r}, expected one of {ENV_NAMES}")
    if resolution < 8 or frame_skip < 1:
        raise ValueError(f"resolution must be >= 8 and frame_skip >= 1, got {resolution}, {frame_skip}")
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode: got {render_mode!r}, expected None or 'rgb_array'")


class VizdoomEnv(gym.Env):
    """A ViZDoom scenario as a Gymnasium env with RGB observations and a discrete action set.

    Args:
        name: ``"vizdoom_hgs"``, ``"vizdoom_battle2"`` or ``"vizdoom_take_cover"``.
        resolution: observation height and width in pixels (frames are area-resampled from 160×120).
        frame_skip: game tics per step (the action is held for all of them).
        battle2_path: directory of the Battle2 map (Battle2 only; default: the copy shipped with the package).
        max_episode_steps: truncate episodes after this many steps (None: the scenario's timeout).
        render_mode: ``None`` or ``"rgb_array"`` (the last game screen at 160×120).
        health_bar: draw the player's health (0-100) as a red bar over the bottom ``resolution // 16``
            rows of the observation: a HUD that stays legible at 64×64 (Doom's own status bar does
            not), so that a world model can see what death depends on. On by default: without it a
            dream cannot predict HGS deaths (termination recall 0.0 vs 1.0 with it, README Results);
            ``False`` gives the raw scenario frames.
        labels: ViZDoom's labels buffer on; ``info["objects"]`` lists the visible objects' boxes in
            observation pixels (:class:`envs.objects.ObjectBox`).
        object_mask: ``info["object_mask"]``, uint8 ``(resolution, resolution)``: 1 inside the boxes of the
            small objects a policy reacts to (:data:`envs.objects.OBJECTS`: medkits, fireballs), else 0. Turns
            the labels buffer on. Collection stores it per frame (``extras/object_mask``), where the
            tokenizer's and the prior's object-weighted losses read it.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": TICRATE / 4}

    def __init__(
        self,
        name: str = "vizdoom_hgs",
        *,
        resolution: int = 64,
        frame_skip: int = 4,
        battle2_path: str | os.PathLike | None = None,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        health_bar: bool = True,
        labels: bool = False,
        object_mask: bool = False,
    ) -> None:
        _check_env_args(name, resolution, frame_skip, render_mode)
        self.name, self.resolution, self.frame_skip = name, resolution, frame_skip
        self.health_bar, self.object_mask = health_bar, bool(object_mask)
        self.labels = bool(labels or object_mask)
        self._objects: list = []
        self.max_episode_steps, self.render_mode = max_episode_steps, render_mode
        self.metadata = {**self.metadata, "render_fps": TICRATE / frame_skip}
        game = vzd.DoomGame()
        if name == "vizdoom_hgs":
            game.load_config(os.path.join(vzd.scenarios_path, "health_gathering_supreme.cfg"))
            buttons, self._actions = HGS_BUTTONS, HGS_ACTIONS
        elif name == "vizdoom_take_cover":
            game.load_config(os.path.join(vzd.scenarios_path, "take_cover.cfg"))
            game.set_episode_timeout(TAKE_COVER_TIMEOUT)
            buttons, self._actions = TAKE_COVER_BUTTONS, TAKE_COVER_ACTIONS
        else:
            root = resolve_battle2_path(battle2_path)
            game.load_config(str(root / "D4_battle2.cfg"))
            game.set_doom_scenario_path(str(root / "D4_battle2.wad"))
            buttons, self._actions = BATTLE2_BUTTONS, BATTLE2_ACTIONS
        got = tuple(b.name for b in game.get_available_buttons())
        if got != buttons:
            raise RuntimeError(f"{name}: cfg buttons are {got}, expected {buttons}")
        game.set_screen_format(vzd.ScreenFormat.RGB24)
        game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
        game.set_window_visible(False)
        game.set_mode(vzd.Mode.PLAYER)
        game.set_labels_buffer_enabled(self.labels)
        # ViZDoom writes its engine ini into the working directory unless told otherwise.
        game.set_doom_config_path(
            os.path.join(tempfile.gettempdir(), f"worldmodel_vizdoom_{os.getuid()}.ini")
        )
        try:
            prepare_engine_dir()
            game.init()  # starts the engine process
        except BaseException:
            _close_game(game)
            raise
        self.game = game
        # the engine is closed by close(), and otherwise when this env is garbage-collected or the
        # interpreter exits (a sys.exit, an uncaught exception, SIGTERM turned into SystemExit)
        self._finalizer = weakref.finalize(self, _close_game, game)
        self._buttons = [list(map(float, b)) for _, b in self._actions]
        self._vars = [v.name for v in game.get_available_game_variables()]
        self.action_space = gym.spaces.Discrete(len(self._actions))
        self.observation_space = gym.spaces.Box(0, 255, (resolution, resolution, 3), np.uint8)
        self._screen = np.zeros((120, 160, 3), np.uint8)
        self._obs = np.zeros(self.observation_space.shape, np.uint8)
        self._steps = 0
        self._last_vars: dict[str, float] = {}

    # -- helpers --------------------------------------------------------------------------------
    def _read_state(self) -> None:
        state = self.game.get_state()
        if state is not None:  # None once the episode has finished: keep the last frame
            self._screen = np.ascontiguousarray(state.screen_buffer)
            if self.labels:
                from envs.objects import screen_boxes

                self._objects = screen_boxes(state.labels, self.resolution)
            # Box (area) filter: every source pixel contributes, which avoids aliasing on downscale.
            img = Image.fromarray(self._screen).resize(
                (self.resolution, self.resolution), Image.Resampling.BOX
            )
            self._obs = np.asarray(img, dtype=np.uint8)
            if self.health_bar:
                self._obs = self._obs.copy()
                rows = max(1, self.resolution // 16)
                health = float(self.game.get_game_variable(vzd.GameVariable.HEALTH))
                width = int(round(self.resolution * min(max(health, 0.0), 100.0) / 100.0))
                self._obs[-rows:] = 0
                self._obs[-rows:, :width] = (255, 0, 0)

    def _game_vars(self) -> dict[str, float]:
        return {v: float(self.game.get_game_variable(getattr(vzd.GameVariable, v))) for v in self._vars}

    def _info(self) -> dict[str, Any]:
        info = {"step": self._steps, "episode_tic": int(self.game.get_episode_time()), **self._last_vars}
        if self.labels:
            info["objects"] = list(self._objects)  # envs.objects.ObjectBox, observation pixels
        if self.object_mask:
            from envs.objects import OBJECTS, box_mask

            wanted = [b for b in self._objects if b.name in OBJECTS[self.name]]
            info["object_mask"] = box_mask(wanted, self.resolution).astype(np.uint8)
        return info

    # -- Gymnasium API --------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.game.set_seed(int(self.np_random.integers(0, 2**31 - 1)))
        self.game.new_episode()
        self._steps = 0
        self._read_state()
        self._last_vars = self._game_vars()
        return self._obs.copy(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise ValueError(
                f"action: got {action!r}, expected an int in [0, {self.action_space.n}) "
                f"({', '.join(action_names(self.name))})"
            )
        if self.game.is_episode_finished():
            raise RuntimeError("step() called after the episode ended; call reset() first")
        reward = float(self.game.make_action(self._buttons[int(action)], self.frame_skip))
        self._steps += 1
        dead = self.game.is_player_dead()
        finished = self.game.is_episode_finished()
        if not finished:
            self._read_state()
        new_vars = self._game_vars() if not finished else self._last_vars
        if self.name == "vizdoom_battle2" and not finished:
            reward = sum(w * (new_vars[k] - self._last_vars[k]) for k, w in BATTLE2_REWARD_WEIGHTS.items())
        self._last_vars = new_vars
        terminated = bool(dead)
        truncated = bool(finished and not dead)
        if self.max_episode_steps is not None and self._steps >= self.max_episode_steps and not terminated:
            truncated = True
        return self._obs.copy(), reward, terminated, truncated, self._info()

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._screen.copy()
        return None

    def close(self) -> None:
        """Stop the engine process (idempotent)."""
        if getattr(self, "game", None) is not None:
            self._finalizer()
            self.game = None  # type: ignore[assignment]


def prepare_engine_dir() -> None:
    """Create ``./_vizdoom/``, the engine's scratch directory in the working directory, before an engine starts.

    ViZDoom's engine makes that directory itself at ``init()`` with a check-then-create that is not safe across
    processes: two env workers starting together (``AsyncVectorEnv``) can both see it missing, and the loser dies
    with "Failed to create ./_vizdoom/ directory: File exists", which the parent sees as a reset pipe. Made here
    first (``exist_ok``), the engine finds it. A working directory we cannot write to is an error that says so
    (the engine would crash there)."""
    try:
        os.makedirs("_vizdoom", exist_ok=True)
    except OSError as e:
        raise RuntimeError(
            f"ViZDoom needs a writable working directory for its '_vizdoom/' scratch directory; "
            f"cannot create it in {os.getcwd()!r} ({e}). Run from a writable directory."
        ) from e


def _close_game(game: vzd.DoomGame) -> None:
    try:
        game.close()
    except Exception:  # noqa: BLE001 - closing is best effort: the engine may already be gone
        pass


_terminated: list[int] = []  # the SIGTERM received, if any (see exit_if_terminated)


def _sigterm_to_system_exit(signum: int, frame: Any) -> None:
    _terminated.append(signum)
    raise SystemExit(128 + signum)


def exit_if_terminated() -> None:
    """Raise ``SystemExit(128 + SIGTERM)`` if a SIGTERM arrived. The handler raises it at once, but when the
    signal lands while Python runs a finalizer or ``__del__`` the exception is printed and dropped, and the
    run would go on to finish with exit code 0; long loops call this once per step so that a SIGTERM is never lost."""
    if _terminated:
        raise SystemExit(128 + _terminated[0])


def sigterm_exits() -> None:
    """Make SIGTERM raise ``SystemExit`` in this process (main thread only, only if SIGTERM still has its
    default action), so ``finally`` blocks and finalizers run and every ViZDoom engine is closed -- by
    default SIGTERM kills the interpreter outright and leaves engines running. The CLIs call it; env
    worker processes call it themselves (:func:`make_real_env_fn`)."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _sigterm_to_system_exit)


def make_real_env(
    name: str,
    *,
    resolution: int = 64,
    frame_skip: int = 4,
    battle2_path: str | os.PathLike | None = None,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
    seed: int | None = None,
    health_bar: bool = True,
    object_mask: bool = False,
) -> VizdoomEnv:
    """Create the real env ``name`` (see :class:`VizdoomEnv`); ``seed`` seeds its first reset."""
    env = VizdoomEnv(
        name,
        resolution=resolution,
        frame_skip=frame_skip,
        battle2_path=battle2_path,
        max_episode_steps=max_episode_steps,
        render_mode=render_mode,
        health_bar=health_bar,
        object_mask=object_mask,
    )
    if seed is not None:
        env.reset(seed=seed)
    return env


class RealEnvSpaces(gym.Env):
    """The observation and action spaces and the metadata of a real env (:class:`VizdoomEnv`), without its
    engine; arguments as :func:`make_real_env`, checked the same way. It cannot be reset or stepped."""

    def __init__(
        self,
        name: str = "vizdoom_hgs",
        *,
        resolution: int = 64,
        frame_skip: int = 4,
        battle2_path: str | os.PathLike | None = None,
        render_mode: str | None = None,
        **_: Any,
    ) -> None:
        _check_env_args(name, resolution, frame_skip, render_mode)
        if name == "vizdoom_battle2":
            resolve_battle2_path(battle2_path)
        self.metadata = {**VizdoomEnv.metadata, "render_fps": TICRATE / frame_skip}
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(len(_ACTIONS[name]))
        self.observation_space = gym.spaces.Box(0, 255, (resolution, resolution, 3), np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        raise RuntimeError("RealEnvSpaces holds a real env's spaces only; make the env with make_real_env")

    def step(self, action: Any) -> Any:
        raise RuntimeError("RealEnvSpaces holds a real env's spaces only; make the env with make_real_env")


def make_real_env_fn(name: str, *, engines_in_workers: bool = False, **kwargs: Any) -> Callable[[], gym.Env]:
    """A picklable zero-argument factory, for ``AsyncVectorEnv`` subprocesses.

    ``engines_in_workers``: called in the process that made the factory, it returns a :class:`RealEnvSpaces`
    instead of starting an engine there. For ``AsyncVectorEnv``, which builds one env in the calling process only
    to read its spaces: a SIGKILL of that process (which can run no cleanup) would orphan that env's engine, while
    a worker closes its engine when its pipe to the killed process breaks. Never for ``SyncVectorEnv``."""
    if name not in ENV_NAMES:
        raise ValueError(f"name: got {name!r}, expected one of {ENV_NAMES}")
    if name == "vizdoom_battle2":  # fail here, in the caller's process, with the clear message
        resolve_battle2_path(kwargs.get("battle2_path"))
    return _Factory(name, kwargs, os.getpid() if engines_in_workers else None)


class _Factory:
    def __init__(self, name: str, kwargs: dict[str, Any], spaces_only_in: int | None = None) -> None:
        self.name, self.kwargs, self.spaces_only_in = name, kwargs, spaces_only_in

    def __call__(self) -> gym.Env:
        if self.spaces_only_in == os.getpid():
            return RealEnvSpaces(self.name, **self.kwargs)
        if multiprocessing.parent_process() is not None:
            # an env worker (AsyncVectorEnv): multiprocessing SIGTERMs daemon workers when the parent exits;
            # as SystemExit, the worker's ``finally: env.close()`` stops the engine instead of orphaning it
            sigterm_exits()
        return make_real_env(self.name, **self.kwargs)
