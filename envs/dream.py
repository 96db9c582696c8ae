"""Dream environments: a trained world model stepped like a Gymnasium env.

Three front ends share one batched engine, :class:`DreamCore` (N dream envs over one
:class:`~worldmodel.bundle.WorldModel`; a step of all N is one model call per token):

- :class:`DreamEnv` — ``gymnasium.Env`` (N = 1), the ``entry_point`` of ``VideoGPTDream-<Name>-v0``;
- :class:`DreamVectorEnv` — ``gymnasium.vector.VectorEnv`` (next-step autoreset), the
  ``vector_entry_point``, so ``gym.make_vec(id, num_envs=N)`` steps N envs per model call;
- :class:`envs.sb3_vec.DreamVecEnv` — Stable-Baselines3 ``VecEnv`` (same-step autoreset).

Semantics. Observations are the bundle's frames, ``Box(0, 255, (H, W, 3), uint8)``. ``reset``
takes context frames (and the actions between them) from ``options`` or draws a held-out episode
of the bundle's store (its first ``context_frames`` frames, or a random window with
``start="random"``) and returns the last context frame. ``step`` generates the next frame and
returns the predicted reward and termination — by default drawn as a Bernoulli of the predicted
termination probability (``termination="sample"``; ``"threshold"`` ends only when it exceeds
``termination_threshold``, default 0.5 -- evaluate.py reports one tuned on validation episodes,
which for rare, barely predictable events such as an HGS death never happens; ``"never"`` runs every
episode to its time limit and leaves the termination to the caller, e.g. a learner that weighs each step
by the predicted probability of surviving to it). ``hazard_scale`` k turns every predicted termination
probability p into 1 - (1 - p)^k (the hazard rate times k: k > 1 is a pessimistic dream, calibrated so
that the data's behaviour policy lives as long in the dream as in the data). ``termination_source="unroll"``
takes the termination probability from the bundle's hazard unroll (:mod:`worldmodel.hazard`: from the real
context frames and the actions since, re-rooted every K steps at the newest frames) instead of the prior's termination
head on each generated frame. The reward is the
one the bundle predicts for the outcome drawn: ``reward_if_terminated`` on a terminating step,
``reward_if_not_terminated`` otherwise (the same value for bundles with a one-output reward head,
``PriorConfig.reward_given_termination`` False), so an ending dream episode carries the terminal
reward (HGS: the death penalty). ``info`` holds ``step`` (steps since reset), ``entropy`` (mean token
entropy of the new frame in nats: high where the model is unsure, a dream-uncertainty signal),
``terminated_prob``, both rewards and ``expected_reward`` (their mix weighted by
``terminated_prob``, the reward to expect before termination is drawn) and ``latent``, the world model's
latent state after the returned frame (float32 (C,) per env, C the prior's width; also in ``reset``'s info: the
state after the context frames), World Models' [z_t, h_t] for a controller that reads the model's state rather
than its frames (:mod:`worldmodel.sampling`, "Latent state"; :mod:`envs.latent`). Each env draws its
samples from its own generator seeded from ``reset(seed=...)``, so the same seed gives the same
episode, alone or inside a vector env. Continuous actions are exposed normalised to [-1, 1] and
mapped linearly to the dataset's per-dimension [low, high] (recorded in the bundle); values outside
[-1, 1] raise ``ValueError`` unless the env was made with ``clip_actions=True``. Every bad action, option
or setting raises ``TypeError``/``ValueError`` naming the argument, the value and what is accepted, before
any state changes, so the env stays usable.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import CONFIG_JSON, BundleError
from worldmodel.hazard import UnrollState
from worldmodel.paths import BundleSkippedWarning, bundle_preset, find_bundles, runs_dir
from worldmodel.sampling import DECODES
from worldmodel.store import ActionSpec, EpisodeStore, heldout_episode_ids

STARTS = ("episode_start", "random")
TERMINATIONS = ("sample", "threshold", "never")
TERMINATION_SOURCES = ("head", "unroll")
OPTION_KEYS = ("frames", "actions", "episode_id", "start")
# per-step float entries of ``info`` besides "step" (see the module docstring)
STEP_INFO_FLOATS = (
    "entropy",
    "terminated_prob",
    "reward_if_terminated",
    "reward_if_not_terminated",
    "expected_reward",
)


def _no_bundle(preset: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no trained {preset!r} bundle under {runs_dir().resolve()} (or ./runs); train one "
        f"with: python experiments/train.py --env {preset}   or pass checkpoint=<bundle dir>"
    )


def resolve_bundle(checkpoint: str | os.PathLike | None, preset: str | None) -> Path:
    """The bundle directory to load: ``checkpoint`` if given (checked against ``preset``), else the
    newest complete bundle of ``preset`` under the runs directory (see :mod:`worldmodel.paths`)."""
    train_cmd = f"python experiments/train.py --env {preset or '<preset>'}"
    if checkpoint is None:
        if preset is None:
            raise ValueError("checkpoint: required when the env has no preset (pass checkpoint=<bundle dir>)")
        found = find_bundles(preset)
        if not found:
            raise _no_bundle(preset)
        return found[0]
    path = Path(checkpoint)
    if not (path / CONFIG_JSON).exists():
        raise FileNotFoundError(
            f"checkpoint: {path} is not a bundle (no {CONFIG_JSON}); train one with: {train_cmd}"
        )
    found_preset = bundle_preset(path)
    if found_preset is None:
        raise ValueError(
            f"checkpoint: {path} has no trained prior yet; finish it with: {train_cmd} --run-dir {path}"
        )
    if preset is not None and found_preset != preset:
        raise ValueError(
            f"checkpoint: {path} is a {found_preset!r} bundle but this env is {preset!r}; use "
            f"VideoGPTDream id of that preset, or train a {preset!r} bundle with: {train_cmd}"
        )
    return path


def action_space_of(spec: ActionSpec) -> spaces.Space:
    """The Gymnasium action space a dream env exposes for ``spec`` (continuous: normalised to [-1, 1])."""
    if spec.kind == "discrete":
        return spaces.Discrete(spec.n)
    if spec.kind == "continuous":
        return spaces.Box(-1.0, 1.0, (spec.dim,), np.float32)
    raise ValueError(
        "the bundle models action-free video; a dream env needs an action-conditioned bundle "
        "(presets vizdoom_hgs, vizdoom_battle2, vizdoom_take_cover, bair, robonet)"
    )


def _show(value: Any) -> str:
    """A short repr of a user-supplied value for error messages."""
    if isinstance(value, np.ndarray):
        text = np.array2string(value, threshold=8, edgeitems=2)
        return f"{value.dtype}{value.shape} {text}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def int_actions(values: Any, n: int, where: str, shape: tuple[int, ...], expected: str) -> np.ndarray:
    """``values`` as int64 actions of ``shape`` in ``[0, n)``: ``TypeError`` for non-integers (floats, bools,
    ``Decimal``, ``None``, strings: nothing is truncated), ``ValueError`` for a wrong shape or range; both name
    ``where``, the value and ``expected``."""
    a = np.asarray(values)
    if a.dtype == object:  # Python ints too large for int64, Decimals, None, mixed lists ...
        for v in a.reshape(-1):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(
                    f"{where}: got {_show(values)} (an element of type {type(v).__name__}), expected {expected}"
                )
        if a.size and any(not 0 <= int(v) < n for v in a.reshape(-1)):
            raise ValueError(f"{where}: got {_show(values)}, out of range; expected {expected}")
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{where}: got {_show(values)} of dtype {a.dtype}, expected {expected}")
    if a.shape != shape:
        raise ValueError(f"{where}: got {_show(values)} of shape {a.shape}, expected {expected}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"{where}: got {_show(values)}, out of range; expected {expected}")
    return a.astype(np.int64)


def float_actions(values: Any, where: str, shape: tuple[int, ...], expected: str) -> np.ndarray:
    """``values`` as finite float32 actions of ``shape``: ``TypeError`` for non-real values (complex, bool,
    objects, strings), ``ValueError`` for a wrong shape or NaN/inf; both name ``where``, the value and ``expected``."""
    a = np.asarray(values)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{where}: got {_show(values)} of dtype {a.dtype}, expected {expected}")
    if a.shape != shape:
        raise ValueError(f"{where}: got {_show(values)} of shape {a.shape}, expected {expected}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: got {_show(values)}, which contains NaN or inf; expected {expected}")
    return a


def _check_number(
    name: str,
    value: Any,
    *,
    integer: bool,
    low: float | None = None,
    high: float | None = None,
    what: str = "",
) -> None:
    """``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a real number (an int if ``integer``) in
    ``[low, high]``."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    expected = what or f"{'an integer' if integer else 'a number'} in [{low}, {high}]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
        raise TypeError(f"{name}: got {_show(value)}, expected {expected}")
    if (low is not None and value < low) or (high is not None and value > high) or value != value:
        raise ValueError(f"{name}: got {_show(value)}, expected {expected}")


def _check_sampling_args(
    num_envs: Any,
    context_frames: Any,
    maskgit_steps: Any,
    temperature: Any,
    termination_threshold: Any,
    top_k: Any,
    top_p: Any,
    hazard_scale: Any = 1.0,
) -> None:
    """Type checks of :class:`DreamCore`'s numeric arguments (``ValueError``/``TypeError`` naming the argument)."""
    _check_number("num_envs", num_envs, integer=True, low=1, what="an integer >= 1")
    _check_number("context_frames", context_frames, integer=True, what="an integer >= 1")
    _check_number("maskgit_steps", maskgit_steps, integer=True, what="an integer >= 1")
    _check_number("temperature", temperature, integer=False, low=0, what="a number >= 0")
    _check_number("hazard_scale", hazard_scale, integer=False, low=0, what="a number >= 0")
    _check_number(
        "termination_threshold", termination_threshold, integer=False, what="a probability in (0, 1)"
    )
    if top_k is not None:
        _check_number("top_k", top_k, integer=True, low=1, what="None or an integer >= 1")
    if top_p is not None:
        _check_number("top_p", top_p, integer=False, what="None or a probability in (0, 1]")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: got {top_p!r}, expected None or a probability in (0, 1]")


def refuse_whole_clip_conditioning(wm: WorldModel) -> None:
    """``ValueError`` for a bundle whose prior conditions on the whole clip's actions (``prior.action_cond='clip'``,
    the paper's ViZDoom/RoboNet protocol): it needs every action of a clip before the first frame, while a
    Gymnasium env receives them one at a time."""
    if wm.cfg.prior.action_cond == "clip":
        raise ValueError(
            "this bundle's prior uses prior.action_cond='clip' (the paper's whole-clip action conditioning): it "
            "needs all of a clip's actions before the first frame, so it cannot be stepped as a Gymnasium env "
            "(actions arrive one at a time). Sample or evaluate its clips instead (experiments/sample.py, "
            "worldmodel.video_sampling.sample_videos), or train a steppable bundle with per-step actions "
            "(python experiments/train.py --scale paper --paper-actions step, or prior.action_cond='cond_ln')"
        )


def _check_settings(
    wm: WorldModel,
    num_envs: int,
    decode: str,
    maskgit_steps: int,
    context_frames: int,
    start: str,
    termination: str,
    termination_threshold: float,
    temperature: float,
) -> None:
    """Range checks of :class:`DreamCore`'s settings against each other and the bundle."""
    if termination not in TERMINATIONS:
        raise ValueError(f"termination: got {termination!r}, expected one of {TERMINATIONS}")
    if not 0 < termination_threshold < 1:
        raise ValueError(
            f"termination_threshold: got {termination_threshold}, expected a probability in (0, 1)"
        )
    if num_envs < 1:
        raise ValueError(f"num_envs: got {num_envs}, expected >= 1")
    if decode not in DECODES:
        raise ValueError(f"decode: got {decode!r}, expected one of {DECODES}")
    if decode == "maskgit" and not wm.prior.maskgit:
        raise ValueError(
            "decode='maskgit': this bundle's prior was trained without the MaskGIT objective "
            "(train with --config.prior.maskgit-weight 1.0), use decode='autoregressive'"
        )
    if decode == "maskgit" and not 1 <= maskgit_steps <= wm.prior.hw:
        raise ValueError(f"maskgit_steps: got {maskgit_steps}, expected 1..{wm.prior.hw} (tokens per frame)")
    if start not in STARTS:
        raise ValueError(f"start: got {start!r}, expected one of {STARTS}")
    if not 1 <= context_frames < wm.cfg.prior.frames:
        raise ValueError(
            f"context_frames: got {context_frames}, expected 1..{wm.cfg.prior.frames - 1} "
            f"(the prior's window is {wm.cfg.prior.frames} frames)"
        )
    if temperature < 0:
        raise ValueError(f"temperature: got {temperature}, expected >= 0")


def scale_hazard(p: np.ndarray, k: float) -> np.ndarray:
    """Termination probabilities ``p`` (any shape) with the hazard rate times ``k``: ``1 - (1 - p)^k``, float32
    (the dream env's ``hazard_scale``)."""
    return (1.0 - (1.0 - np.asarray(p, np.float64)) ** k).astype(np.float32)


class DreamCore:
    """``num_envs`` dream environments over one world model. See the module docstring.

    Args:
        wm: the world model (shared; not copied).
        num_envs: number of environments (rows).
        temperature, top_k, top_p: sampling of the frame tokens (temperature 0 = greedy).
        decode: ``"autoregressive"`` (token by token) or ``"maskgit"`` (``maskgit_steps`` parallel steps).
        context_frames: real frames a reset starts from (1 ≤ context_frames < the prior's window).
        start: where a drawn context starts in its episode: ``"episode_start"`` or ``"random"``.
        termination: ``"sample"`` (Bernoulli of the predicted probability, from the row's generator)
            or ``"threshold"`` (probability > ``termination_threshold``; ``eval.json``'s
            ``termination.tuned.threshold`` is one chosen on validation episodes), or ``"never"`` (episodes
            end only at the time limit; ``info["terminated_prob"]`` tells the caller the hazard).
        bf16: the prior and the tokenizer's decoder in bf16 (:class:`worldmodel.bundle.DreamRollout`).
        clip_actions: continuous actions outside [-1, 1] (and reset context actions outside the data's
            range) are clipped; by default they raise ``ValueError``.
        hazard_scale: k >= 0; every predicted termination probability p becomes 1 - (1 - p)^k (the
            hazard rate times k) before it is drawn, thresholded or reported.
        termination_source: where the termination probability comes from: ``"head"`` (the prior's termination
            head on each generated frame) or ``"unroll"`` (the bundle's hazard unroll, :mod:`worldmodel.hazard`:
            from the episode's real context frames and the actions since; every K steps, K its
            horizon, it restarts from the newest generated frames).
    """

    def __init__(
        self,
        wm: WorldModel,
        num_envs: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        decode: str = "autoregressive",
        maskgit_steps: int = 8,
        context_frames: int = 1,
        start: str = "episode_start",
        termination: str = "sample",
        termination_threshold: float = 0.5,
        bf16: bool = False,
        clip_actions: bool = False,
        hazard_scale: float = 1.0,
        termination_source: str = "head",
    ) -> None:
        refuse_whole_clip_conditioning(wm)
        if termination_source not in TERMINATION_SOURCES:
            raise ValueError(
                f"termination_source: got {termination_source!r}, expected one of {list(TERMINATION_SOURCES)}"
            )
        if termination_source == "unroll" and wm.hazard is None:
            raise ValueError(
                "termination_source='unroll': the bundle has no hazard unroll; train one with "
                "python experiments/train_hazard.py --checkpoint <bundle>"
            )
        _check_sampling_args(
            num_envs,
            context_frames,
            maskgit_steps,
            temperature,
            termination_threshold,
            top_k,
            top_p,
            hazard_scale,
        )
        if not isinstance(clip_actions, (bool, np.bool_)):
            raise TypeError(f"clip_actions: got {_show(clip_actions)}, expected True or False")
        _check_settings(
            wm,
            num_envs,
            decode,
            maskgit_steps,
            context_frames,
            start,
            termination,
            termination_threshold,
            temperature,
        )
        self.clip_actions = bool(clip_actions)
        self.termination, self.termination_threshold = termination, termination_threshold
        self.hazard_scale = float(hazard_scale)
        self.wm, self.N = wm, num_envs
        self.spec = wm.action_spec
        self.observation_space = spaces.Box(0, 255, wm.obs_shape, np.uint8)
        self.action_space = action_space_of(self.spec)
        if self.spec.kind == "continuous":
            if self.spec.low is None or self.spec.high is None:
                raise ValueError(
                    "the bundle's continuous action space has no bounds (retrain with a current "
                    "version: prepare_run records the dataset's action range)"
                )
            self.a_low = np.asarray(self.spec.low, np.float32)
            self.a_high = np.asarray(self.spec.high, np.float32)
        self.sample_kw: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        if decode != "autoregressive":
            self.sample_kw.update(decode=decode, maskgit_steps=maskgit_steps)
        self.context_frames, self.start = context_frames, start
        self.rollout = wm.rollout(num_envs, bf16=bf16)
        self._unroll = UnrollState(wm.hazard, num_envs, wm.device) if termination_source == "unroll" else None
        self.obs = np.zeros((num_envs, *wm.obs_shape), np.uint8)
        self.steps = np.zeros(num_envs, np.int64)
        self.started = np.zeros(num_envs, bool)
        dev = wm.device
        self.rngs = [np.random.default_rng() for _ in range(num_envs)]
        self.gens = [torch.Generator(device=dev) for _ in range(num_envs)]
        self._scratch = torch.Generator(device=dev)
        for i in range(num_envs):
            self.seed_row(i, self.rngs[i])
        self._store: EpisodeStore | None = None
        self._heldout: list[str] | None = None

    # -- seeding and contexts -------------------------------------------------------------------
    def seed_row(self, row: int, rng: np.random.Generator) -> None:
        """Make ``rng`` row ``row``'s generator of contexts and seed its token sampler from it."""
        self.rngs[row] = rng
        self.gens[row].manual_seed(int(rng.integers(2**62)))

    def _heldout_ids(self) -> list[str]:
        if self._heldout is None:
            path = self.wm.store_path
            if not path or not Path(path, "store.json").exists():
                raise FileNotFoundError(
                    f"the bundle's store {path!r} is not available to draw reset contexts from; "
                    f"pass reset(options={{'frames': ..., 'actions': ...}}) instead"
                )
            self._store = EpisodeStore(path)
            try:
                self._heldout, _ = heldout_episode_ids(self._store, "test", self.context_frames)
            except ValueError as e:
                raise ValueError(f"{e}, the frames a reset context needs") from None
        return self._heldout

    def _context(self, row: int, options: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Context frames (Tc, H, W, 3) uint8 and actions (Tc-1, ...) in the dataset's units."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_KEYS) - {"reset_mask"})
        if unknown:
            raise ValueError(f"options: unknown keys {unknown}; expected some of {list(OPTION_KEYS)}")
        H, W, _ = self.wm.obs_shape
        if "frames" in options:
            frames = np.asarray(options["frames"])
            if frames.ndim == 3:
                frames = frames[None]
            if (
                frames.dtype != np.uint8
                or frames.ndim != 4
                or frames.shape[1:] != (H, W, 3)
                or len(frames) < 1
            ):
                raise ValueError(
                    f"options['frames']: got {frames.dtype}{frames.shape}, expected uint8 (Tc, {H}, {W}, 3)"
                )
            if len(frames) >= self.wm.cfg.prior.frames:
                frames = frames[-(self.wm.cfg.prior.frames - 1) :]
            if len(frames) == 1:
                return frames, None
            if options.get("actions") is None:
                raise ValueError(
                    f"options['actions']: {len(frames)} context frames need {len(frames) - 1} actions "
                    f"({self.spec.describe(len(frames) - 1)}, in the dataset's units)"
                )
            return frames, self._context_actions(options["actions"], len(frames) - 1)
        ids = self._heldout_ids()
        rng = self.rngs[row]
        if "episode_id" in options:
            eid = str(options["episode_id"])
            if eid not in self._store.episode_ids():
                raise ValueError(
                    f"options['episode_id']: {eid!r} is not in the bundle's store {self.wm.store_path}"
                )
        else:
            eid = ids[int(rng.integers(len(ids)))]
        n = self._store.length(eid)
        c = self.context_frames
        if "start" in options:
            t = options["start"]
            _check_number(
                "options['start']",
                t,
                integer=True,
                low=0,
                high=n - c,
                what=f"an integer frame index in 0..{n - c} for episode {eid!r} of {n} frames",
            )
            t = int(t)
        else:
            t = 0 if self.start == "episode_start" else int(rng.integers(n - c + 1))
        clip = self._store.read_clip(eid, t, c)
        acts = clip.get("actions")
        return clip["frames"], (None if acts is None or c == 1 else acts[: c - 1])

    def _context_actions(self, values: Any, k: int) -> np.ndarray:
        """The ``k`` actions between context frames, in the dataset's units (the last ``k`` if more are given)."""
        where, spec = "options['actions']", self.spec
        a = np.asarray(values)
        if a.ndim == 0:
            raise ValueError(
                f"{where}: got the scalar {_show(values)}; expected a sequence of {spec.describe(k)}"
            )
        a = a[-k:]
        if spec.kind == "discrete":
            return int_actions(a, spec.n, where, (k,), f"{spec.describe(k)}")
        lo, hi = self.a_low, self.a_high
        out = float_actions(
            a,
            where,
            (k, spec.dim),
            f"{spec.describe(k)} within the data's range [{lo.tolist()}, {hi.tolist()}]",
        )
        tol = 1e-6 * np.maximum(1.0, np.abs(hi - lo))
        if self.clip_actions:
            return np.clip(out, lo, hi)
        if np.any(out < lo - tol) or np.any(out > hi + tol):
            raise ValueError(
                f"{where}: got {_show(values)}, outside the data's range low={lo.tolist()}, "
                f"high={hi.tolist()} (the actions the world model was trained on); make the env with "
                f"clip_actions=True to clip them"
            )
        return out

    def reset_rows(self, rows: list[int], options: list[dict[str, Any] | None] | None = None) -> np.ndarray:
        """Start ``rows`` from new contexts; returns their observations (k, H, W, 3)."""
        options = options or [None] * len(rows)
        ctx = [self._context(r, o) for r, o in zip(rows, options)]
        by_len: dict[int, list[int]] = {}
        for i, (f, _) in enumerate(ctx):
            by_len.setdefault(len(f), []).append(i)
        for idx in by_len.values():  # rows with equal context length are encoded in one call
            frames = np.stack([ctx[i][0] for i in idx])
            acts = None if ctx[idx[0]][1] is None else np.stack([ctx[i][1] for i in idx])
            self.rollout.reset(frames, acts, rows=[rows[i] for i in idx])
        if self._unroll is not None:  # root the hazard unroll at the real context
            for idx in by_len.values():
                self._unroll.root([rows[i] for i in idx], np.stack([ctx[i][0] for i in idx]))
        for r, (f, _) in zip(rows, ctx):
            self.obs[r] = f[-1]
            self.steps[r] = 0
            self.started[r] = True
        return self.obs[rows].copy()

    # -- stepping -------------------------------------------------------------------------------
    def check_actions(self, actions: Any, where: str = "actions") -> np.ndarray:
        """Validate a batch of N actions (from the exposed action space); returns them in the dataset's units.

        Discrete: N integers in ``[0, n)`` (no float, bool or ``Decimal`` is truncated). Continuous: real
        ``(N, dim)`` in ``[-1, 1]``; values outside raise unless the env was made with ``clip_actions=True``.
        ``TypeError``/``ValueError`` name ``where``, the value and what is accepted.
        """
        if self.spec.kind == "discrete":
            return int_actions(
                actions, self.spec.n, where, (self.N,), f"{self.N} integer action(s) in [0, {self.spec.n})"
            )
        expected = f"real actions of shape ({self.N}, {self.spec.dim}) in [-1, 1]"
        a = float_actions(actions, where, (self.N, self.spec.dim), expected)
        if self.clip_actions:
            a = np.clip(a, -1.0, 1.0)
        elif np.any(np.abs(a) > 1.0):
            raise ValueError(
                f"{where}: got {_show(np.asarray(actions))}, outside [-1, 1]; expected {expected} "
                f"(make the env with clip_actions=True to clip them)"
            )
        return self.a_low + (a + 1.0) * 0.5 * (self.a_high - self.a_low)

    def step(
        self, actions: Any, skip: np.ndarray | None = None, where: str = "actions"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Step every row; rows in ``skip`` (bool (N,)) are stepped with throw-away randomness because
        the caller resets them right after (keeps each row's sample stream equal to a single env's).

        Returns obs (N, H, W, 3) uint8, rewards (N,) float32, terminated (N,) bool, info arrays (``latent``
        (N, C) float32, the others (N,)).
        """
        if not self.started.all():
            raise RuntimeError("reset() must be called before step()")
        a = self.check_actions(actions, where)
        gens = self.gens if skip is None else [self._scratch if s else g for g, s in zip(self.gens, skip)]
        out = self.rollout.step(a, generator=gens, **self.sample_kw)
        self.obs[:] = out.frames
        self.steps += 1
        p, expected = out.terminated_prob, out.expected_rewards
        if self._unroll is not None:
            p = self._unroll.step(a, out.frames)
        if (
            self.hazard_scale != 1.0 or self._unroll is not None
        ):  # hazard rate x k: p -> 1 - (1 - p)^k, and the expected reward's mix with it
            p = scale_hazard(p, self.hazard_scale)
            expected = ((1.0 - p) * out.rewards + p * out.rewards_if_terminated).astype(np.float32)
        info = {
            "step": self.steps.copy(),
            "latent": out.latent,
            "entropy": out.entropy,
            "terminated_prob": p,
            "reward_if_terminated": out.rewards_if_terminated,
            "reward_if_not_terminated": out.rewards,
            "expected_reward": expected,
        }
        if self.termination == "sample":  # skipped rows draw nothing: their streams stay those of single envs
            u = np.array(
                [1.0 if skip is not None and skip[i] else self.rngs[i].random() for i in range(self.N)]
            )
            terminated = u < p
        elif self.termination == "threshold":
            terminated = p > self.termination_threshold
        else:  # "never": the caller weighs steps by info["terminated_prob"]
            terminated = np.zeros(self.N, bool)
        # the reward of the outcome drawn: a dream episode that ends carries the terminal reward (HGS: the death penalty)
        rewards = np.where(terminated, out.rewards_if_terminated, out.rewards).astype(np.float32)
        return self.obs.copy(), rewards, terminated, info


def load_world_model(checkpoint: str | os.PathLike | None, preset: str | None, device: str) -> WorldModel:
    """Load the bundle a dream env runs on (see :func:`resolve_bundle`). Without ``checkpoint``, discovered
    bundles are tried newest first: one that fails to load is skipped with a warning naming its path."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if checkpoint is not None or preset is None:
        return WorldModel.from_pretrained(resolve_bundle(checkpoint, preset), device=device)
    found = find_bundles(preset)
    if not found:
        raise _no_bundle(preset)
    for path in found:
        try:
            return WorldModel.from_pretrained(path, device=device)
        except (BundleError, OSError) as e:
            warnings.warn(f"skipping bundle {path}: {e}", BundleSkippedWarning, stacklevel=2)
    raise FileNotFoundError(
        f"no loadable {preset!r} bundle under {runs_dir().resolve()} (or ./runs) -- every one "
        f"found failed to load (see the warnings); train one with: python experiments/train.py "
        f"--env {preset}   or pass checkpoint=<bundle dir>"
    )


class _Viewer:
    """A pygame window showing frames upscaled (nearest), for ``render_mode="human"``."""

    def __init__(self, scale: int = 6, title: str = "VideoGPT dream") -> None:
        import pygame  # the vizdoom dependency ships it; imported only for human rendering

        self.pg, self.scale, self.title = pygame, scale, title
        self.screen = None

    def show(self, frame: np.ndarray, fps: float) -> None:
        pg = self.pg
        h, w, _ = frame.shape
        if self.screen is None:
            pg.display.init()  # display only: pg.init() would also open the audio device
            pg.display.set_caption(self.title)
            self.screen = pg.display.set_mode((w * self.scale, h * self.scale))
            self.clock = pg.time.Clock()
        surf = pg.surfarray.make_surface(
            np.repeat(np.repeat(frame, self.scale, 0), self.scale, 1).swapaxes(0, 1)
        )
        self.screen.blit(surf, (0, 0))
        pg.event.pump()
        pg.display.flip()
        self.clock.tick(fps)

    def close(self) -> None:
        if self.screen is not None:
            self.pg.display.quit()
            self.screen = None


class DreamEnv(gym.Env):
    """One dream environment (the entry point of ``VideoGPTDream-<Name>-v0``). See the module docstring.

    Args:
        checkpoint: bundle directory; default: the newest bundle of ``preset`` under the runs directory.
        preset: the preset this id stands for (set by the registration; checked against the bundle).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        temperature, top_k, top_p, decode, maskgit_steps, context_frames, start, termination,
            termination_threshold, bf16, clip_actions, hazard_scale, termination_source: see :class:`DreamCore`.
        max_episode_steps: truncate after this many steps (``gym.make`` applies its TimeLimit instead).
        render_mode: ``None``, ``"rgb_array"`` (the current frame) or ``"human"`` (a pygame window).
        world_model: an already loaded :class:`WorldModel` to share (then ``checkpoint`` is ignored).
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 8.75}

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        preset: str | None = None,
        device: str = "cpu",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        decode: str = "autoregressive",
        maskgit_steps: int = 8,
        context_frames: int = 1,
        start: str = "episode_start",
        termination: str = "sample",
        termination_threshold: float = 0.5,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        bf16: bool = False,
        world_model: WorldModel | None = None,
        clip_actions: bool = False,
        hazard_scale: float = 1.0,
        termination_source: str = "head",
    ) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode: got {render_mode!r}, expected None or one of {self.metadata['render_modes']}"
            )
        wm = world_model if world_model is not None else load_world_model(checkpoint, preset, device)
        self.core = DreamCore(
            wm,
            1,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            decode=decode,
            maskgit_steps=maskgit_steps,
            context_frames=context_frames,
            start=start,
            termination=termination,
            termination_threshold=termination_threshold,
            bf16=bf16,
            clip_actions=clip_actions,
            hazard_scale=hazard_scale,
            termination_source=termination_source,
        )
        self.world_model = wm
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": wm.fps}
        self._viewer: _Viewer | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None or not self.core.started[0]:
            self.core.seed_row(0, self.np_random)
        obs = self.core.reset_rows([0], [options])[0]
        if self.render_mode == "human":
            self.render()
        return obs, {"step": 0, "latent": self.core.rollout.latent[0]}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        spec = self.core.spec
        if spec.kind == "discrete":
            a = int_actions(action, spec.n, "action", (), f"a scalar integer in [0, {spec.n})")[None]
            obs, rew, term, info = self.core.step(a)
        else:
            a = float_actions(
                action, "action", (spec.dim,), f"real actions of shape ({spec.dim},) in [-1, 1]"
            )
            obs, rew, term, info = self.core.step(a[None], where="action")
        step = int(info["step"][0])
        truncated = (
            self.max_episode_steps is not None and step >= self.max_episode_steps and not bool(term[0])
        )
        if self.render_mode == "human":
            self.render()
        return (
            obs[0],
            float(rew[0]),
            bool(term[0]),
            truncated,
            {"step": step, "latent": info["latent"][0], **{k: float(info[k][0]) for k in STEP_INFO_FLOATS}},
        )

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self.core.obs[0].copy()
        if self.render_mode == "human":
            if self._viewer is None:
                self._viewer = _Viewer()
            self._viewer.show(self.core.obs[0], self.metadata["render_fps"])
        return None

    def close(self) -> None:
        if self._viewer is not None:
            self._viewer.close()
            self._viewer = None


class DreamVectorEnv(VectorEnv):
    """``num_envs`` dream environments stepped in one model call (``gym.make_vec``'s vector entry point).

    Autoreset is Gymnasium's default next-step mode: the step after an env terminates or truncates
    resets it (its action is ignored) and returns the new first observation with reward 0.
    ``reset(seed=s)`` seeds env i with ``s + i``, so env i reproduces ``DreamEnv.reset(seed=s + i)``.
    Arguments as :class:`DreamEnv`.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8.75, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        checkpoint: str | os.PathLike | None = None,
        preset: str | None = None,
        device: str = "cpu",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        decode: str = "autoregressive",
        maskgit_steps: int = 8,
        context_frames: int = 1,
        start: str = "episode_start",
        termination: str = "sample",
        termination_threshold: float = 0.5,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        bf16: bool = False,
        world_model: WorldModel | None = None,
        clip_actions: bool = False,
        hazard_scale: float = 1.0,
        termination_source: str = "head",
    ) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode: got {render_mode!r}, expected None or 'rgb_array'")
        wm = world_model if world_model is not None else load_world_model(checkpoint, preset, device)
        self.core = DreamCore(
            wm,
            num_envs,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            decode=decode,
            maskgit_steps=maskgit_steps,
            context_frames=context_frames,
            start=start,
            termination=termination,
            termination_threshold=termination_threshold,
            bf16=bf16,
            clip_actions=clip_actions,
            hazard_scale=hazard_scale,
            termination_source=termination_source,
        )
        self.world_model = wm
        self.num_envs = num_envs
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = spaces.Box(0, 255, (num_envs, *wm.obs_shape), np.uint8)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": wm.fps}
        self._autoreset = np.zeros(num_envs, bool)

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        N = self.num_envs
        if seed is not None and not isinstance(seed, list):
            _check_number(
                "seed", seed, integer=True, low=0, what="None, an integer >= 0 or a list of num_envs of them"
            )
        seeds = [None if seed is None else seed + i for i in range(N)] if not isinstance(seed, list) else seed
        if len(seeds) != N:
            raise ValueError(f"seed: got {len(seeds)} seeds, expected {N}")
        for i, s_i in enumerate(seeds):
            if s_i is not None:
                _check_number(f"seed[{i}]", s_i, integer=True, low=0, what="None or an integer >= 0")
        mask = np.ones(N, bool)
        if options is not None and "reset_mask" in options:
            m = np.asarray(options["reset_mask"])
            if m.dtype != np.bool_ or m.shape != (N,):
                raise ValueError(
                    f"options['reset_mask']: got {_show(options['reset_mask'])}, expected {N} booleans "
                    f"(one per env)"
                )
            mask = m.copy()
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seeds[0])
        rows = [i for i in range(N) if mask[i]]
        for i in rows:
            if seeds[i] is not None or not self.core.started[i]:
                self.core.seed_row(i, gym.utils.seeding.np_random(seeds[i])[0])
        self.core.reset_rows(rows, [options] * len(rows))
        self._autoreset[rows] = False
        info = {
            "step": self.core.steps.copy(),
            "latent": self.core.rollout.latent,
        }  # every row's current state
        return self.core.obs.copy(), {**info, "_step": mask.copy(), "_latent": np.ones(N, bool)}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        done_before = self._autoreset.copy()
        obs, rew, term, info = self.core.step(actions, skip=done_before if done_before.any() else None)
        rew = rew.astype(np.float64)
        trunc = np.zeros(self.num_envs, bool)
        if self.max_episode_steps is not None:
            trunc = (self.core.steps >= self.max_episode_steps) & ~term
        if done_before.any():  # next-step autoreset: these rows start over; their step above is discarded
            rows = np.flatnonzero(done_before).tolist()
            obs[rows] = self.core.reset_rows(rows)
            rew[rows], term[rows], trunc[rows] = 0.0, False, False
            for k in STEP_INFO_FLOATS:
                info[k][rows] = 0.0
            info["step"][rows] = 0
            info["latent"][rows] = self.core.rollout.latent[rows]  # the new episode's context state
        self._autoreset = term | trunc
        mask = np.ones(self.num_envs, bool)
        info.update({f"_{k}": mask for k in list(info)})
        return obs, rew, term, trunc, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode == "rgb_array":
            return tuple(self.core.obs.copy())
        return None
