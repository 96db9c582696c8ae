"""World Models' controller: a linear policy on the tokenizer's features, evolved with CMA-ES in the dream.

Ha & Schmidhuber (2018) solved ViZDoom Take Cover with a policy trained only inside its learned
dream: a linear controller on the world model's latent state, optimised by CMA-ES. This module is
that learner for our world models:

* :class:`TokenFeatures` turns frames into a small feature vector using the bundle's own tokenizer:
  each frame is encoded to its code grid, every code is projected on the top principal components
  of the codebook, and the projections are averaged over each grid column, so the vector says
  *what* is *where* along the horizontal axis (F = w × k numbers). The same function reads real
  frames and dream frames, so a controller evolved in the dream acts on the real game unchanged.
* :class:`LinearController` holds a population of linear policies (one per vector-env row) on
  ``[f_t, f_t - f_{t-1}, 1]``: the difference carries motion (a fireball's direction), which one
  frame lacks. Two actions: the sign of one output; n > 2: the argmax of n outputs.
* :func:`train_cmaes` evolves the weights with CMA-ES (the ``cma`` package) in the batched dream:
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
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from safetensors.torch import load_file, save_file

from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import atomic_replace
from worldmodel.store import EpisodeStore

CONTROLLER_JSON, CONTROLLER_WEIGHTS = "controller.json", "controller.safetensors"


class TokenFeatures:
    """Frames uint8 (N, H, W, 3) -> features float32 (N, w · k) from the world model's tokenizer.

    Args:
        wm: the world model whose tokenizer (and codebook) reads the frames.
        n_components: principal components of the codebook kept per code (k).
        mean, std: per-feature normalisation (F,); :meth:`fit` estimates them from store frames.
    """

    def __init__(self, wm: WorldModel, n_components: int = 4, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None) -> None:
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

    def fit(self, store: EpisodeStore, n_frames: int = 2048, seed: int = 0, batch: int = 256) -> TokenFeatures:
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
        f = np.concatenate([self.raw(x[i:i + batch]) for i in range(0, len(x), batch)])
        self.mean, self.std = f.mean(0), f.std(0) + 1e-3
        return self


@dataclass(frozen=True)
class ControllerConfig:
    """Shape of a :class:`LinearController` (saved in ``controller.json``)."""

    n_features: int
    """F: features per frame."""
    n_actions: int
    """Discrete actions of the env."""
    n_components: int = 4
    """Codebook principal components per code (TokenFeatures)."""

    @property
    def n_inputs(self) -> int:
        return 2 * self.n_features + 1  # [f_t, f_t - f_{t-1}, 1]

    @property
    def n_outputs(self) -> int:
        return 1 if self.n_actions == 2 else self.n_actions

    @property
    def n_params(self) -> int:
        return self.n_inputs * self.n_outputs


class LinearController:
    """R linear policies (one per vector-env row) over ``[f_t, f_t - f_{t-1}, 1]``.

    ``params``: (R, n_params) or (n_params,) (one policy for every row). :meth:`act` is deterministic.
    It also has SB3's ``predict(obs, state, episode_start, deterministic)`` so that
    ``stable_baselines3``'s ``evaluate_policy`` can score it.
    """

    def __init__(self, cfg: ControllerConfig, features: TokenFeatures, params: np.ndarray) -> None:
        params = np.asarray(params, np.float32)
        if params.shape[-1] != cfg.n_params:
            raise ValueError(f"params: got shape {params.shape}, expected (..., {cfg.n_params}) for {cfg}")
        self.cfg, self.features = cfg, features
        self.W = params.reshape(-1, cfg.n_outputs, cfg.n_inputs)  # (R, n_out, n_in)
        self.prev: np.ndarray | None = None

    def reset(self, rows: np.ndarray | None = None) -> None:
        """Forget the previous frame of ``rows`` (all rows when None): their next frame starts an episode."""
        if rows is None or self.prev is None:
            self.prev = None
        else:
            self.prev[rows] = np.nan

    def copy(self) -> LinearController:
        """The same policies with their own copy of the per-episode state (the previous frame's features), so
        the copy can read another stream of frames (e.g. the dream's beside the real game's) from here on."""
        twin = LinearController(self.cfg, self.features, self.W.reshape(len(self.W), -1))
        twin.prev = None if self.prev is None else self.prev.copy()
        return twin

    def scores(self, obs: np.ndarray) -> np.ndarray:
        """The linear outputs (N, n_out) float32 for frames uint8 (N, H, W, 3); advances the previous frame.

        Two actions: one output, action 1 when it is > 0; n > 2 actions: n outputs, the argmax is the action."""
        f = self.features(obs)  # (N, F)
        prev = f if self.prev is None else np.where(np.isnan(self.prev), f, self.prev)
        self.prev = f
        x = np.concatenate([f, f - prev, np.ones((len(f), 1), np.float32)], 1)  # (N, n_in)
        W = self.W if len(self.W) == len(f) else np.broadcast_to(self.W[:1], (len(f), *self.W.shape[1:]))
        return np.einsum("noi,ni->no", W, x).astype(np.float32)  # (N, n_out)

    def choose(self, scores: np.ndarray) -> np.ndarray:
        """Actions (N,) int64 for linear outputs (N, n_out) of :meth:`scores`."""
        return (scores[:, 0] > 0).astype(np.int64) if self.cfg.n_outputs == 1 else scores.argmax(1).astype(np.int64)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions (N,) int64 for frames uint8 (N, H, W, 3)."""
        return self.choose(self.scores(obs))

    def predict(self, obs: np.ndarray, state: Any = None, episode_start: np.ndarray | None = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        obs = np.asarray(obs)
        single = obs.ndim == 3
        obs = obs[None] if single else obs
        if episode_start is not None and self.prev is not None and len(self.prev) == len(obs):
            self.reset(np.flatnonzero(np.asarray(episode_start, bool)))
        elif self.prev is not None and len(self.prev) != len(obs):
            self.reset()
        a = self.act(obs)
        return (a[0] if single else a), None


def episode_returns(venv: VectorEnv, policy: LinearController, seeds: list[int], max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Play one episode per row of ``venv`` (row i seeded ``seeds[i]``), each row with its own controller.

    Returns (returns (N,), lengths (N,)): the sum of rewards until the row terminated, truncated or
    ran ``max_steps`` steps; later steps of a finished row are ignored.
    """
    obs, _ = venv.reset(seed=list(seeds))
    policy.reset()
    n = venv.num_envs
    ret, length, done = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool)
    for _ in range(max_steps):
        obs, r, term, trunc, _ = venv.step(policy.act(obs))
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
    """Initial step size (features are standardised, so weights of order 1 are meaningful)."""
    max_episode_steps: int = 250
    """Dream steps per episode (250 steps = 1000 tics at frame skip 4, above Take Cover's 750 bar)."""
    n_components: int = 4
    """Codebook principal components per code."""


def train_cmaes(wm: WorldModel, venv: VectorEnv, cfg: CMAESConfig, *, seed: int = 0,
                log: Callable[[dict[str, float]], None] | None = None) -> tuple[LinearController, list[dict[str, float]]]:
    """Evolve a :class:`LinearController` in ``venv`` (``popsize × episodes`` rows, e.g. the dream).

    Returns the controller with the best mean weights (CMA-ES's distribution mean, which averages
    out evaluation noise better than the single luckiest candidate) and a log of each generation.
    """
    import cma  # optional at import time: only this learner needs it

    if venv.num_envs != cfg.popsize * cfg.episodes:
        raise ValueError(f"venv: has {venv.num_envs} rows, expected popsize × episodes = {cfg.popsize * cfg.episodes}")
    store = EpisodeStore(wm.store_path)
    feats = TokenFeatures(wm, cfg.n_components).fit(store, seed=seed)
    ccfg = ControllerConfig(n_features=feats.dim, n_actions=int(venv.single_action_space.n), n_components=feats.n_components)
    es = cma.CMAEvolutionStrategy(np.zeros(ccfg.n_params), cfg.sigma0,
                                  {"popsize": cfg.popsize, "seed": seed + 1, "verbose": -9})
    history = []
    for g in range(cfg.generations):
        t0 = time.perf_counter()
        X = np.asarray(es.ask())  # (P, n_params)
        params = np.repeat(X, cfg.episodes, axis=0)  # row = (candidate, episode)
        seeds = [seed * 1_000_003 + g * cfg.episodes + e for _ in range(cfg.popsize) for e in range(cfg.episodes)]
        ret, length = episode_returns(venv, LinearController(ccfg, feats, params), seeds, cfg.max_episode_steps)
        fitness = ret.reshape(cfg.popsize, cfg.episodes).mean(1)
        es.tell(list(X), list(-fitness))
        row = {"generation": g, "mean_return": float(fitness.mean()), "best_return": float(fitness.max()),
               "mean_length": float(length.mean()), "sigma": float(es.sigma), "seconds": time.perf_counter() - t0}
        history.append(row)
        if log is not None:
            log(row)
    return LinearController(ccfg, feats, np.asarray(es.mean)), history


def save_controller(policy: LinearController, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``controller.json`` + ``controller.safetensors`` into directory ``path`` (no pickle)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    f = policy.features
    tensors = {"weights": torch.from_numpy(np.ascontiguousarray(policy.W[0].reshape(-1))),
               "feature_mean": torch.from_numpy(f.mean), "feature_std": torch.from_numpy(f.std)}
    tmp = path / f".{CONTROLLER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    atomic_replace(tmp, path / CONTROLLER_WEIGHTS)
    meta = {"kind": "linear_controller", "config": asdict(policy.cfg), **(extra or {})}
    tmp = path / f".{CONTROLLER_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    atomic_replace(tmp, path / CONTROLLER_JSON)
    return path


def is_controller(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_controller`."""
    return (Path(path) / CONTROLLER_JSON).is_file()


def load_controller(path: str | Path, wm: WorldModel) -> LinearController:
    """Read a controller saved by :func:`save_controller`; it reads frames with ``wm``'s tokenizer."""
    path = Path(path)
    try:
        meta = json.loads((path / CONTROLLER_JSON).read_text())
        cfg = ControllerConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / CONTROLLER_JSON}: not a controller written by save_controller ({e})") from None
    t = load_file(str(path / CONTROLLER_WEIGHTS))
    feats = TokenFeatures(wm, cfg.n_components, t["feature_mean"].numpy(), t["feature_std"].numpy())
    if feats.dim != cfg.n_features:
        raise ValueError(f"{path}: controller reads {cfg.n_features} features, this bundle's tokenizer gives {feats.dim}")
    return LinearController(cfg, feats, t["weights"].numpy())
