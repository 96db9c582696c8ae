"""World Models' controller: a linear policy on frame features, evolved with CMA-ES in the dream.

Ha & Schmidhuber (2018) solved ViZDoom Take Cover with a policy trained only inside its learned
dream: a linear controller on the world model's latent state, optimised by CMA-ES. This module is
that learner for our world models. Two ways to read a frame (``ControllerConfig.features``):

* ``"color_keys"`` (:class:`ColorKeyFeatures`): per vertical strip of the frame, the share of pixels
  whose colour passes a key: linear tests on RGB such as "R > 170 and G > 140 and B < 130" (Take
  Cover's fireballs) or "R − B > 25" (its brick walls). Computed on the frames the env returns, so
  on decoded dream frames while training and on real frames at evaluation. Measured in the REAL
  game (README, ARCHITECTURE.md): CMA-ES on these features reaches 731 ± 67 tics in 50 generations,
  while the token features below stay at random level (≈ 250) after 10.
* ``"tokens"`` (:class:`TokenFeatures`): each frame encoded to its code grid by the bundle's
  tokenizer, every code projected on the top principal components of the codebook, averaged over
  each grid column (no hand-chosen colours; kept for envs without :data:`COLOR_KEYS`).
* ``"latent"`` (:class:`LatentFeatures`): World Models' own input, the world model's latent state -- the
  prior's hidden state after the newest frame (C numbers, the prior's width; :mod:`worldmodel.sampling`,
  "Latent state") -- normalised by its mean and standard deviation over held-out store episodes. No frame is
  read: the env's observation *is* that vector (:class:`envs.latent.LatentObservation`), ``info["latent"]`` in
  the dream and :class:`envs.latent.LatentTracker` (the same world model run teacher-forced on the real frames
  and actions) in the real game, so the controller sees exactly the state the dream's dynamics and termination
  head see. Why: the open-loop dream blurs Take Cover's small fireballs away, so frame features see an empty
  room in the dream while its termination head still "sees" the danger. :func:`train_cmaes` wraps a frame env
  itself. Not measured yet (docs/ARCHITECTURE.md). All C dimensions are read (C = 128 at the tiny scale: 131
  weights for two actions, about World Models' 867); no projection.

:class:`LinearController` holds a population of linear policies (one per vector-env row) on
``[f_t, (f_t - f_{t-1}), a_{t-1}, 1]``; the previous action lets a policy keep moving one way.
:func:`train_cmaes` evolves the weights with CMA-ES (the ``cma`` package) in the batched dream:
every candidate of a generation plays the same dream contexts and sampling seeds (common random
numbers, so candidates differ by their weights, not their luck).

Policies are saved as safetensors + JSON (no pickle): :func:`save_controller` / :func:`load_controller`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from safetensors.torch import load_file, save_file

from envs.dream import DreamVectorEnv
from envs.latent import LatentObservation, LatentTracker
from worldmodel.atomic import atomic_file, write_json
from worldmodel.bundle import WorldModel
from worldmodel.store import EpisodeStore, heldout_episode_ids

CONTROLLER_JSON, CONTROLLER_WEIGHTS = "controller.json", "controller.safetensors"
FITNESSES = ("sampled", "expected")
FEATURES = ("auto", "color_keys", "tokens", "latent")
"""What a controller can read (``CMAESConfig.features``; ``ControllerConfig.features`` takes all but "auto")."""


@dataclass(frozen=True)
class ColorKey:
    """Pixels whose RGB (0..255) passes every test ``w · rgb > t``, counted in rows [row0, row1) of a
    frame (in 64-row units, scaled to the frame's height) per vertical strip, times ``scale``."""

    name: str
    tests: tuple[tuple[float, float, float, float], ...]
    """Each test (w_r, w_g, w_b, t): kept when w_r·R + w_g·G + w_b·B > t."""
    rows: tuple[int, int] = (0, 64)
    scale: float = 1.0


COLOR_KEYS: dict[str, tuple[ColorKey, ...]] = {
    # Take Cover at 64×64: fireballs are 1-9 bright yellow pixels in the wall band (they grow as they
    # come); the side walls are brown bricks whose height tells how close a wall is. Rows 60-63 hold
    # the HUD health bar. Scales put both features near 1 when present (a fireball strip of 60×4 px
    # holds a few yellow pixels; a wall strip is 0-100 % brown).
    "vizdoom_take_cover": (
        ColorKey("fireball", ((1, 0, 0, 170), (0, 1, 0, 140), (0, 0, -1, -130)), rows=(0, 60), scale=60.0),
        ColorKey("wall", ((1, 0, -1, 25),), rows=(8, 56), scale=4.0),
    ),
}
"""Colour keys per preset name, for ``features="color_keys"``."""


class Features(Protocol):
    """Observations (frames uint8 (N, H, W, 3), or latent states float32 (N, C)) -> features float32 (N, dim)."""

    dim: int

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


class ColorKeyFeatures:
    """Frames uint8 (N, H, W, 3) -> (N, len(keys) · strips): the share of each strip's pixels that pass
    each key, times the key's scale (see :class:`ColorKey`). No model in the loop; deterministic."""

    def __init__(self, keys: tuple[ColorKey, ...], strips: int = 16) -> None:
        if not keys:
            raise ValueError("keys: got none, expected at least one ColorKey")
        self.keys, self.strips = tuple(keys), strips
        self.dim = len(self.keys) * strips

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = np.asarray(frames)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames: got shape {x.shape}, expected (N, H, W, 3)")
        n, h, w, _ = x.shape
        if w % self.strips:
            raise ValueError(f"frames: width {w} is not a multiple of strips={self.strips}")
        rgb = x.astype(np.float32)
        out = []
        for key in self.keys:
            r0, r1 = (round(r * h / 64) for r in key.rows)
            band = rgb[:, r0:r1]  # (N, rows, W, 3)
            keep = np.ones(band.shape[:3], bool)
            for wr, wg, wb, t in key.tests:
                keep &= band @ np.asarray([wr, wg, wb], np.float32) > t
            share = keep.reshape(n, r1 - r0, self.strips, w // self.strips).mean((1, 3))  # (N, strips)
            out.append(share * key.scale)
        return np.concatenate(out, 1).astype(np.float32)


class TokenFeatures:
    """Frames uint8 (N, H, W, 3) -> features float32 (N, w · k) from the world model's tokenizer.

    Args:
        wm: the world model whose tokenizer (and codebook) reads the frames.
        n_components: principal components of the codebook kept per code (k).
        mean, std: per-feature normalisation (F,); :meth:`fit` estimates them from store frames.
    """

    def __init__(
        self,
        wm: WorldModel,
        n_components: int = 4,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
    ) -> None:
        tok = wm.tokenizer
        emb = tok.codebook.embeddings.detach().float().cpu()  # (K, D)
        k = min(n_components, emb.shape[1])
        centred = emb - emb.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v: (D, D), rows are components
        self.table = (centred @ v[:k].T).to(wm.device)  # (K, k): each code's coordinates
        self.wm, self.n_components = wm, k
        self.dim = tok.grid[1] * k
        self.mean = np.zeros(self.dim, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones(self.dim, np.float32) if std is None else np.asarray(std, np.float32)

    @torch.inference_mode()
    def raw(self, frames: np.ndarray) -> np.ndarray:
        """Unnormalised features (N, w · k) of frames uint8 (N, H, W, 3)."""
        x = torch.as_tensor(np.ascontiguousarray(frames), device=self.wm.device)[:, None]  # (N, 1, H, W, 3)
        codes = self.wm.tokenizer.encode(x)[:, -1]  # (N, h, w)
        z = self.table[codes]  # (N, h, w, k)
        return z.mean(1).flatten(1).cpu().numpy().astype(np.float32)  # (N, w * k): column profiles

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return (self.raw(frames) - self.mean) / self.std

    def fit(
        self, store: EpisodeStore, n_frames: int = 2048, seed: int = 0, batch: int = 256
    ) -> TokenFeatures:
        """Set the normalisation from up to ``n_frames`` frames of the store's training split."""
        rng = np.random.default_rng(seed)
        ids = store.episode_ids("train") or store.episode_ids()
        frames = []
        for eid in rng.permutation(ids):
            ep = store.read_clip(eid, 0, store.length(eid))["frames"]
            frames.append(ep[rng.permutation(len(ep))[: max(1, n_frames // 32)]])
            if sum(len(f) for f in frames) >= n_frames:
                break
        x = np.concatenate(frames)[:n_frames]
        f = np.concatenate([self.raw(x[i : i + batch]) for i in range(0, len(x), batch)])
        self.mean, self.std = f.mean(0), f.std(0) + 1e-3
        return self


class LatentFeatures:
    """Latent states float32 (N, C) (the observations of :class:`envs.latent.LatentObservation`) -> their
    normalisation ``(x - mean) / std`` (N, C); :meth:`fit` measures mean and std on held-out store episodes."""

    def __init__(self, dim: int, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        self.dim = int(dim)
        self.mean = np.zeros(self.dim, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones(self.dim, np.float32) if std is None else np.asarray(std, np.float32)
        if self.mean.shape != (self.dim,) or self.std.shape != (self.dim,):
            raise ValueError(
                f"mean, std: got shapes {self.mean.shape}, {self.std.shape}, expected ({self.dim},) each"
            )

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs)
        if x.ndim != 2 or x.shape[1] != self.dim or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"observations: got {x.dtype}{x.shape}, expected float32 (N, {self.dim}), the world model's latent "
                "state (features='latent'); wrap the env in envs.latent.LatentObservation"
            )
        return ((x - self.mean) / self.std).astype(np.float32)

    def fit(
        self, wm: WorldModel, store: EpisodeStore, n_frames: int = 2048, seed: int = 0, rows: int = 8
    ) -> LatentFeatures:
        """Set the normalisation from the latents of up to ``n_frames`` frames of held-out store episodes (the
        validation split, else test, else train: :func:`~worldmodel.store.heldout_episode_ids`), followed by
        :class:`~envs.latent.LatentTracker` as the real game is, ``rows`` episodes at a time."""
        rng = np.random.default_rng(seed)
        ids, _ = heldout_episode_ids(store, "val")
        ids = [str(i) for i in rng.permutation(ids)]
        got: list[np.ndarray] = []
        n = 0
        for g in range(0, len(ids), rows):
            eps = [store.load(i) for i in ids[g : g + rows]]
            T = min(max(len(e.frames) for e in eps), n_frames - n)
            tracker = LatentTracker(wm, len(eps))
            lat = [tracker.reset(np.stack([e.frames[0] for e in eps]))]
            for t in range(1, T):  # an episode that ended repeats its last frame (its latents are dropped)
                frames = np.stack([e.frames[min(t, len(e.frames) - 1)] for e in eps])
                acts = np.stack([e.actions[min(t, len(e.frames) - 1) - 1] for e in eps])
                lat.append(tracker.step(frames, acts))
            lat_a = np.stack(lat, 1)  # (k, T, C)
            got += [lat_a[i, : min(T, len(e.frames))] for i, e in enumerate(eps)]
            n = sum(len(x) for x in got)
            if n >= n_frames:
                break
        f = np.concatenate(got)[:n_frames]
        self.mean, self.std = f.mean(0).astype(np.float32), (f.std(0) + 1e-3).astype(np.float32)
        return self


@dataclass(frozen=True)
class ControllerConfig:
    """Shape of a :class:`LinearController` (saved in ``controller.json``)."""

    n_features: int
    """F: features per frame."""
    n_actions: int
    """Discrete actions of the env."""
    features: str = "tokens"
    """"tokens" (TokenFeatures), "color_keys" (ColorKeyFeatures) or "latent" (LatentFeatures: observations are the
    world model's latent states, n_features = the prior's width)."""
    n_components: int = 4
    """Codebook principal components per code (tokens)."""
    color_keys: tuple[ColorKey, ...] = ()
    """The keys (color_keys)."""
    strips: int = 16
    """Vertical strips per frame (color_keys)."""
    motion: bool = True
    """Also read f_t - f_{t-1} (a fireball's direction)."""
    last_action: bool = False
    """Also read the previous action (±1 for two actions, one-hot for more; 0 at an episode's start)."""

    @property
    def n_action_inputs(self) -> int:
        return 0 if not self.last_action else (1 if self.n_actions == 2 else self.n_actions)

    @property
    def n_inputs(self) -> int:
        return (2 if self.motion else 1) * self.n_features + self.n_action_inputs + 1  # ... and a bias

    @property
    def n_outputs(self) -> int:
        return 1 if self.n_actions == 2 else self.n_actions

    @property
    def n_params(self) -> int:
        return self.n_inputs * self.n_outputs

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ControllerConfig:
        keys = tuple(
            ColorKey(k["name"], tuple(tuple(t) for t in k["tests"]), tuple(k["rows"]), k["scale"])
            for k in d.get("color_keys", ())
        )
        return cls(**{**d, "color_keys": keys})


class LinearController:
    """R linear policies (one per vector-env row) over ``[f_t, (f_t - f_{t-1}), (a_{t-1}), 1]``.

    ``params``: (R, n_params) or (n_params,) (one policy for every row). :meth:`act` is deterministic.
    It also has SB3's ``predict(obs, state, episode_start, deterministic)`` so that
    ``stable_baselines3``'s ``evaluate_policy`` can score it.
    """

    def __init__(self, cfg: ControllerConfig, features: Features, params: np.ndarray) -> None:
        params = np.asarray(params, np.float32)
        if params.shape[-1] != cfg.n_params:
            raise ValueError(f"params: got shape {params.shape}, expected (..., {cfg.n_params}) for {cfg}")
        if features.dim != cfg.n_features:
            raise ValueError(
                f"features: give {features.dim} numbers per frame, the config expects {cfg.n_features}"
            )
        self.cfg, self.features = cfg, features
        self.W = params.reshape(-1, cfg.n_outputs, cfg.n_inputs)  # (R, n_out, n_in)
        self.prev: np.ndarray | None = None  # (N, F) previous features; NaN rows start an episode
        self.prev_action: np.ndarray | None = None  # (N, n_action_inputs)

    def reset(self, rows: np.ndarray | None = None) -> None:
        """Forget the previous frame and action of ``rows`` (all rows when None): their next frame starts an episode."""
        if rows is None or self.prev is None:
            self.prev = self.prev_action = None
        else:
            self.prev[rows] = np.nan
            if self.prev_action is not None:
                self.prev_action[rows] = 0.0

    def _scores(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self.features(obs)  # (N, F)
        n = len(f)
        parts = [f]
        if self.cfg.motion:
            prev = f if self.prev is None else np.where(np.isnan(self.prev), f, self.prev)
            parts.append(f - prev)
        if self.cfg.last_action:
            parts.append(
                np.zeros((n, self.cfg.n_action_inputs), np.float32)
                if self.prev_action is None
                else self.prev_action
            )
        parts.append(np.ones((n, 1), np.float32))
        x = np.concatenate(parts, 1)  # (N, n_in)
        W = self.W if len(self.W) == n else np.broadcast_to(self.W[:1], (n, *self.W.shape[1:]))
        return np.einsum("noi,ni->no", W, x), f  # (N, n_out)

    def copy(self) -> LinearController:
        """The same policies with their own copy of the per-episode memory (previous features and action), so
        the copy can read another stream of frames (e.g. the dream's beside the real game's) from here on."""
        twin = LinearController(self.cfg, self.features, self.W.reshape(len(self.W), -1))
        twin.prev = None if self.prev is None else self.prev.copy()
        twin.prev_action = None if self.prev_action is None else self.prev_action.copy()
        return twin

    def scores(self, obs: np.ndarray) -> np.ndarray:
        """The linear outputs (N, n_out) float32 for frames uint8 (N, H, W, 3); remembers the frame's features.

        Two actions: one output, action 1 when it is > 0; n > 2 actions: n outputs, the argmax is the action."""
        y, f = self._scores(obs)
        self.prev = f
        return y.astype(np.float32)

    def choose(self, scores: np.ndarray) -> np.ndarray:
        """Actions (N,) int64 for linear outputs (N, n_out) of :meth:`scores`; remembers them as the previous action."""
        a = (
            (scores[:, 0] > 0).astype(np.int64)
            if self.cfg.n_outputs == 1
            else scores.argmax(1).astype(np.int64)
        )
        if self.cfg.n_action_inputs == 1:
            self.prev_action = np.where(a == 1, 1.0, -1.0).astype(np.float32)[:, None]
        elif self.cfg.n_action_inputs:
            self.prev_action = np.eye(self.cfg.n_actions, dtype=np.float32)[a]
        return a

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions (N,) int64 for observations (frames uint8 (N, H, W, 3), or latent states (N, C) for
        ``features="latent"``); remembers this observation's features and the action."""
        return self.choose(self.scores(obs))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """:meth:`act`: a controller is a collection policy (``envs.collect.Policy``; collect calls :meth:`reset`
        with the rows whose episode starts)."""
        return self.act(obs)

    def predict(
        self,
        obs: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, None]:
        obs = np.asarray(obs)
        single = obs.ndim == (1 if self.cfg.features == "latent" else 3)  # one observation, not a batch
        obs = obs[None] if single else obs
        if episode_start is not None and self.prev is not None and len(self.prev) == len(obs):
            self.reset(np.flatnonzero(np.asarray(episode_start, bool)))
        elif self.prev is not None and len(self.prev) != len(obs):
            self.reset()
        a = self.act(obs)
        return (a[0] if single else a), None


def episode_returns(
    venv: VectorEnv,
    policy: LinearController,
    seeds: list[int],
    max_steps: int,
    expected: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Play one episode per row of ``venv`` (row i seeded ``seeds[i]``), each row with its own controller.

    Returns (returns (N,), lengths (N,)): the sum of rewards until the row terminated, truncated or
    ran ``max_steps`` steps; later steps of a finished row are ignored.

    ``expected``: the return expected under the env's predicted termination instead of one drawn
    termination: sum_t S_{t-1} * info["expected_reward"]_t with S_t = prod_{s<=t} (1 - info["terminated_prob"]_s)
    (a dream made with ``termination="never"``, whose rows run to ``max_steps``). It removes the noise of the
    termination draw from a candidate's fitness (Rao-Blackwellisation); the frames' sampling noise stays.
    """
    obs, _ = venv.reset(seed=list(seeds))
    policy.reset()
    n = venv.num_envs
    ret, length, done = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool)
    alive = np.ones(n)  # S_{t-1}: probability of being alive before this step (expected mode)
    for _ in range(max_steps):
        obs, r, term, trunc, info = venv.step(policy.act(obs))
        if expected:
            if "terminated_prob" not in info or "expected_reward" not in info:
                raise ValueError(
                    "expected=True: the env's info has no 'terminated_prob'/'expected_reward' (a dream env "
                    "gives them); use expected=False for a real env"
                )
            p = np.asarray(info["terminated_prob"], np.float64)
            ret += np.where(done, 0.0, alive * np.asarray(info["expected_reward"], np.float64))
            alive *= 1.0 - p
        else:
            ret += np.where(done, 0.0, r)
        length += ~done
        done |= np.asarray(term) | np.asarray(trunc)
        if done.all():
            break
    return ret, length


@dataclass
class CMAESConfig:
    """CMA-ES in the dream (World Models: population 64, 16 rollouts per candidate; scaled to 2 CPU cores)."""

    generations: int = 30
    """Generations of CMA-ES."""
    popsize: int = 16
    """Candidates per generation."""
    episodes: int = 2
    """Dream episodes per candidate (the same contexts and seeds for every candidate of a generation)."""
    sigma0: float = 0.5
    """Initial step size (features are of order 1, so weights of order 1 are meaningful)."""
    max_episode_steps: int = 100
    """Steps per training episode (100 steps = 400 tics at frame skip 4)."""
    features: str = "auto"
    """"color_keys", "tokens", "latent" (the world model's latent state, LatentFeatures), or "auto": color_keys
    when COLOR_KEYS has the preset, else tokens."""
    n_components: int = 4
    """Codebook principal components per code (tokens)."""
    motion: bool = False
    """Also read f_t - f_{t-1}."""
    last_action: bool = True
    """Also read the previous action."""
    fitness: str = "sampled"
    """A candidate's fitness in the dream: "sampled" (the return until a drawn termination) or "expected"
    (the return expected under the predicted termination probabilities; episodes run to max_episode_steps;
    removes the termination draw's noise; dream only)."""


def make_features(
    wm: WorldModel, cfg: ControllerConfig, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> Features:
    """The feature reader ``cfg`` names, for ``wm``'s frames (token features use its tokenizer) or latent states
    (``"latent"``: of ``wm``'s prior width)."""
    if cfg.features == "color_keys":
        return ColorKeyFeatures(cfg.color_keys, cfg.strips)
    if cfg.features == "tokens":
        return TokenFeatures(wm, cfg.n_components, mean, std)
    if cfg.features == "latent":
        return LatentFeatures(wm.cfg.prior.n_embd, mean, std)
    raise ValueError(f"features: got {cfg.features!r}, expected one of {FEATURES[1:]}")


def controller_config(wm: WorldModel, n_actions: int, cfg: CMAESConfig) -> ControllerConfig:
    """The controller shape ``cfg`` asks for on ``wm`` (resolving ``features="auto"`` by preset name)."""
    kind = cfg.features
    if kind == "auto":
        kind = "color_keys" if wm.cfg.name in COLOR_KEYS else "tokens"
    if kind == "color_keys":
        if wm.cfg.name not in COLOR_KEYS:
            raise ValueError(
                f"features='color_keys': no keys for preset {wm.cfg.name!r}; known: {sorted(COLOR_KEYS)}"
                " (or use features='tokens')"
            )
        keys = COLOR_KEYS[wm.cfg.name]
        return ControllerConfig(
            n_features=len(keys) * 16,
            n_actions=n_actions,
            features=kind,
            color_keys=keys,
            motion=cfg.motion,
            last_action=cfg.last_action,
        )
    if kind == "latent":
        return ControllerConfig(
            n_features=wm.cfg.prior.n_embd,
            n_actions=n_actions,
            features=kind,
            motion=cfg.motion,
            last_action=cfg.last_action,
        )
    if kind != "tokens":
        raise ValueError(f"features: got {cfg.features!r}, expected one of {FEATURES}")
    k = min(cfg.n_components, wm.tokenizer.codebook.embeddings.shape[1])
    return ControllerConfig(
        n_features=wm.tokenizer.grid[1] * k,
        n_actions=n_actions,
        features=kind,
        n_components=k,
        motion=cfg.motion,
        last_action=cfg.last_action,
    )


def latent_env(venv: VectorEnv, wm: WorldModel) -> VectorEnv:
    """``venv`` with the world model's latent states as observations, as a ``features="latent"`` controller reads
    them: unchanged when they already are (a :class:`~envs.latent.LatentObservation`), else wrapped in one (the
    dream's ``info["latent"]``, or the real game followed by a :class:`~envs.latent.LatentTracker`)."""
    if tuple(venv.single_observation_space.shape or ()) == (wm.cfg.prior.n_embd,):
        return venv
    return LatentObservation(venv, wm)


def train_cmaes(
    wm: WorldModel,
    venv: VectorEnv,
    cfg: CMAESConfig,
    *,
    seed: int = 0,
    log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[LinearController, list[dict[str, float]]]:
    """Evolve a :class:`LinearController` in ``venv`` (``popsize × episodes`` rows, e.g. the dream).

    ``cfg.features == "latent"``: a frame env (the dream's or the real game's) is wrapped by :func:`latent_env`
    here, so ``train_cmaes(wm, real_venv, CMAESConfig(features="latent"))`` evolves a latent controller in the
    real game (a check that the latent carries what the task needs).

    Returns the controller with CMA-ES's distribution mean as weights (it averages out evaluation
    noise better than the single luckiest candidate) and a log of each generation.
    """
    import cma  # optional at import time: only this learner needs it

    if cfg.fitness not in FITNESSES:
        raise ValueError(f"fitness: got {cfg.fitness!r}, expected one of {FITNESSES}")
    if venv.num_envs != cfg.popsize * cfg.episodes:
        raise ValueError(
            f"venv: has {venv.num_envs} rows, expected popsize × episodes = {cfg.popsize * cfg.episodes}"
        )
    ccfg = controller_config(wm, int(venv.single_action_space.n), cfg)
    feats = make_features(wm, ccfg)
    if isinstance(feats, TokenFeatures):
        feats.fit(EpisodeStore(wm.store_path), seed=seed)
    if isinstance(feats, LatentFeatures):
        venv = latent_env(venv, wm)
        feats.fit(wm, EpisodeStore(wm.store_path), seed=seed)
    es = cma.CMAEvolutionStrategy(
        np.zeros(ccfg.n_params), cfg.sigma0, {"popsize": cfg.popsize, "seed": seed + 1, "verbose": -9}
    )
    history = []
    for g in range(cfg.generations):
        t0 = time.perf_counter()
        X = np.asarray(es.ask())  # (P, n_params)
        params = np.repeat(X, cfg.episodes, axis=0)  # row = (candidate, episode)
        seeds = [
            seed * 1_000_003 + g * cfg.episodes + e for _ in range(cfg.popsize) for e in range(cfg.episodes)
        ]
        ret, length = episode_returns(
            venv,
            LinearController(ccfg, feats, params),
            seeds,
            cfg.max_episode_steps,
            expected=cfg.fitness == "expected",
        )
        fitness = ret.reshape(cfg.popsize, cfg.episodes).mean(1)
        es.tell(list(X), list(-fitness))
        row = {
            "generation": g,
            "mean_return": float(fitness.mean()),
            "best_return": float(fitness.max()),
            "mean_length": float(length.mean()),
            "sigma": float(es.sigma),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if log is not None:
            log(row)
    return LinearController(ccfg, feats, np.asarray(es.mean)), history


def train_cmaes_in_dream(
    wm: WorldModel,
    cfg: CMAESConfig,
    *,
    seed: int = 0,
    log: Callable[[dict[str, float]], None] | None = None,
    **dream_kw: Any,
) -> tuple[LinearController, list[dict[str, float]]]:
    """:func:`train_cmaes` in the batched dream of ``wm``: a :class:`~envs.dream.DreamVectorEnv` of
    ``popsize × episodes`` rows whose episodes are truncated at ``cfg.max_episode_steps`` steps.

    ``dream_kw``: the dream's sampling options (``temperature``, ``top_k``, ``context_frames``, ``termination``,
    ``termination_threshold``, ``decode``, ``maskgit_steps``; :class:`~envs.dream.DreamVectorEnv`).
    With ``cfg.fitness == "expected"`` the dream is made with ``termination="never"`` (a ``termination``
    in ``dream_kw`` is then an error). Returns the controller and the log of each generation, as
    :func:`train_cmaes`.
    """
    if cfg.fitness == "expected":
        if dream_kw.get("termination", "never") != "never":
            raise ValueError(
                f"termination: got {dream_kw['termination']!r} with fitness='expected', which runs every dream "
                "episode to its cap and weighs steps by the predicted survival; drop termination or use "
                "fitness='sampled'"
            )
        dream_kw = {**dream_kw, "termination": "never"}
    venv = DreamVectorEnv(
        cfg.popsize * cfg.episodes, world_model=wm, max_episode_steps=cfg.max_episode_steps, **dream_kw
    )
    try:
        return train_cmaes(wm, venv, cfg, seed=seed, log=log)
    finally:
        venv.close()


def cmaes_agent_steps(history: list[dict[str, float]], cfg: CMAESConfig) -> int:
    """Agent steps (env steps summed over rows, each row counted until its episode ended) that a
    :func:`train_cmaes` run with ``cfg`` took, from its per-generation log ``history``."""
    return round(sum(h["mean_length"] for h in history) * cfg.popsize * cfg.episodes)


def save_controller(policy: LinearController, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``controller.json`` + ``controller.safetensors`` into directory ``path`` (no pickle)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"weights": torch.from_numpy(np.ascontiguousarray(policy.W[0].reshape(-1)))}
    f = policy.features
    if isinstance(f, (TokenFeatures, LatentFeatures)):
        tensors |= {"feature_mean": torch.from_numpy(f.mean), "feature_std": torch.from_numpy(f.std)}
    with atomic_file(path / CONTROLLER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {"kind": "linear_controller", "config": policy.cfg.to_json(), **(extra or {})}
    write_json(path / CONTROLLER_JSON, meta, indent=1)
    return path


def is_controller(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_controller`."""
    return (Path(path) / CONTROLLER_JSON).is_file()


def load_controller(path: str | Path, wm: WorldModel) -> LinearController:
    """Read a controller saved by :func:`save_controller` (token features read frames with ``wm``'s tokenizer;
    latent features read ``wm``'s latent states, whose width must be the controller's)."""
    path = Path(path)
    try:
        meta = json.loads((path / CONTROLLER_JSON).read_text())
        cfg = ControllerConfig.from_json(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path / CONTROLLER_JSON}: not a controller written by save_controller ({e})"
        ) from None
    t = load_file(str(path / CONTROLLER_WEIGHTS))
    mean, std = (t[k].numpy() if k in t else None for k in ("feature_mean", "feature_std"))
    feats = make_features(wm, cfg, mean, std)
    if feats.dim != cfg.n_features:
        raise ValueError(f"{path}: controller reads {cfg.n_features} features, this bundle gives {feats.dim}")
    return LinearController(cfg, feats, t["weights"].numpy())
