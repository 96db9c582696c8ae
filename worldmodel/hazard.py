"""A termination model unrolled from a root: real frames + the actions since -> per-step hazards.

The dream's own termination head reads the prior's state after each *generated* frame. On Take Cover those
frames let an approaching fireball fade, so the head cannot tell a policy that steps aside from one that stays
(``benchmarks/bench_dodge.py``; README, Take Cover). A model that reads the *real* frames at a branch point and
the actions that follow does not need the dream to draw the fireball. :class:`HazardUnroll` is such a model,
shaped as MuZero's reward prediction (Schrittwieser et al. 2020: rewards predicted ``k`` steps ahead from a
root and the actions since, with no observation generated)::

    e   = CNN(root's C newest frames)                      (B, hidden)
    P_k = sigmoid(MLP([e, f(a_1..a_k), 0 ... 0, onehot(k)]))   the probability that the episode has ended by
                                                            step k; k = 1..K
    p_k = 1 - (1 - P_k) / (1 - P_{k-1})                      the probability that step k ends it, if alive

Trained on "ended by step k", each output pools every ending up to k: a per-step target (the step that ended
it) left the outputs near blind to the actions on the same data (session 15).

:func:`train_hazard` fits it on the bundle's store (the tokenizer and prior are not touched): roots are windows
of ``context`` real frames of the training episodes, every root within ``horizon`` steps of an episode's end and
a uniform sample of the others, importance-weighted so that the loss is the one over every root. The dream env
uses it with ``termination_source="unroll"`` (:mod:`envs.dream`): rooted at the episode's real context, re-rooted
every K steps at the newest (generated) frames, through :class:`UnrollState`. It is saved in the bundle as the
``hazard.*`` tensors of ``model.safetensors`` and ``hazard.json`` (its config and held-out metrics).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from tqdm.auto import tqdm

from worldmodel.atomic import write_json
from worldmodel.checkpoint import has_weights, load_weights, save_weights

if TYPE_CHECKING:
    from worldmodel.bundle import WorldModel
    from worldmodel.store import EpisodeStore

HAZARD_JSON = "hazard.json"


@dataclass
class HazardConfig:
    """How :func:`train_hazard` builds and fits the unroll."""

    horizon: int = 6
    """K: steps unrolled from a root (the dream re-roots every K steps)."""
    context: int = 4
    """Real frames a root reads (the dream env's ``context_frames``; < the prior's window)."""
    hidden: int = 256
    """MLP width."""
    roots_per_episode: int = 24
    """Uniform roots drawn per training episode, besides every root within ``horizon`` steps of its end."""
    steps: int = 3000
    """Optimiser steps."""
    batch: int = 256
    """Roots per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    bf16: bool = True
    """bf16 autocast for the training steps on CPU (held-out metrics are computed in fp32). Measured on 2 cores
    with glibc told to keep freed memory (worldmodel/memory.py, which the training CLIs call; README, Take Cover):
    7.7 steps/s, against 2.2 in fp32 without that."""
    seed: int = 0
    """Seed of the root sample and of the initialisation."""

    def check(self) -> None:
        check_fields(self, "hazard")


def check_fields(cfg: Any, prefix: str) -> None:
    """Validate a small training config dataclass: ``lr`` a finite number > 0, ``bf16`` a bool, ``seed`` an integer
    >= 0, every other field an integer >= 1; ValueError naming ``<prefix>.<field>`` and what is accepted."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        low = 0 if f.name == "seed" else 1
        if f.name == "lr":
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{prefix}.lr: got {v!r}, expected a number > 0")
        elif f.name == "bf16":
            if not isinstance(v, bool):
                raise ValueError(f"{prefix}.bf16: got {v!r}, expected True or False")
        elif not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{prefix}.{f.name}: got {v!r}, expected an integer >= {low}")


def frame_encoder(n_frames: int, resolution: int, hidden: int) -> nn.Sequential:
    """The small conv net that embeds a window of ``n_frames`` RGB frames stacked on channels, (B, 3C, R, R)
    floats in [0, 1] -> (B, hidden): three stride-2 4×4 convs (32, 64, 64 channels) and a linear layer, ReLUs.
    ``resolution`` R must be a multiple of 8."""
    return nn.Sequential(
        nn.Conv2d(3 * n_frames, 32, 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 4, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * (resolution // 8) ** 2, hidden),
        nn.ReLU(),
    )


def frames_input(frames: torch.Tensor) -> torch.Tensor:
    """Frame windows uint8 (B, C, R, R, 3) -> the input of :func:`frame_encoder`, float (B, 3C, R, R) in [0, 1]."""
    return rearrange(frames.float() / 255.0, "b c h w rgb -> b (c rgb) h w")


class HazardUnroll(nn.Module):
    """Logits of P(ended by step k), k = 1..K, for K actions from a root's real frames (module docstring).

    The root's ``n_frames`` frames go through a small conv net (nanoGPT-plain: three stride-2 convs); step k's
    logit is an MLP of that embedding, the actions of steps 1..k (the later ones masked to zero) and a one-hot
    of k: causal by construction.

    Args:
        n_frames: C, real frames a root reads.
        resolution: R, the frames' side (a multiple of 8).
        action_kind: ``"discrete"`` (actions are integers in [0, n)) or ``"continuous"`` (vectors of n).
        n: number of discrete actions, or the action dimension.
        horizon: K, the steps unrolled from a root.
        hidden: embedding and MLP width.
    """

    def __init__(
        self, n_frames: int, resolution: int, action_kind: str, n: int, horizon: int = 6, hidden: int = 256
    ) -> None:
        super().__init__()
        if action_kind not in ("discrete", "continuous"):
            raise ValueError(f"action_kind: got {action_kind!r}, expected 'discrete' or 'continuous'")
        if resolution % 8:
            raise ValueError(f"resolution: got {resolution}, expected a multiple of 8")
        self.n_frames, self.resolution, self.hidden = int(n_frames), int(resolution), int(hidden)
        self.action_kind, self.n, self.horizon = action_kind, int(n), int(horizon)
        self.encoder = frame_encoder(n_frames, resolution, hidden)  # (B, 3C, R, R) -> (B, hidden)
        # per action: a one-hot (discrete; all zeros = not taken yet), or the vector and a taken flag
        self.feat = self.n if action_kind == "discrete" else self.n + 1
        self.mlp = nn.Sequential(
            nn.Linear(hidden + self.horizon * (self.feat + 1), hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Root frames uint8 (B, C, R, R, 3) -> (B, hidden)."""
        return self.encoder(frames_input(frames))

    def action_features(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (B, K) long or (B, K, n) float -> (B, K, feat) float."""
        if self.action_kind == "discrete":
            return F.one_hot(actions.long(), self.n).float()
        a = actions.float()
        return torch.cat([a, torch.ones_like(a[..., :1])], -1)

    def logits_at(self, e: torch.Tensor, feats: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Step ``k`` (B,) long in 0..K-1 of each row: root embeddings (B, hidden), action features
        (B, K, feat) -> logits (B,); only the features of steps 0..k are read."""
        K = self.horizon
        keep = (torch.arange(K, device=e.device)[None] <= k[:, None]).float()  # (B, K)
        x = rearrange(feats * keep[..., None], "b k f -> b (k f)")
        return self.mlp(torch.cat([e, x, F.one_hot(k.long(), K).float()], -1))[:, 0]

    def forward(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Root frames uint8 (B, C, R, R, 3), actions (B, K) or (B, K, n) -> logits of P(ended by step k)
        (B, K); logit k reads actions[:, :k+1]."""
        B, K = actions.shape[0], actions.shape[1]
        if K != self.horizon:
            raise ValueError(f"actions: got {K} steps, expected the unroll's horizon {self.horizon}")
        e, feats = self.embed(frames), self.action_features(actions)
        out = self.logits_at(
            repeat(e, "b c -> (k b) c", k=K),
            repeat(feats, "b t f -> (k b) t f", k=K),
            repeat(torch.arange(K, device=e.device), "k -> (k b)", b=B),
        )
        return rearrange(out, "(k b) -> b k", k=K)


def root_window(frames: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` frames of each row (N, Tc, H, W, 3), the first repeated in front when Tc < n."""
    if frames.shape[1] >= n:
        return frames[:, frames.shape[1] - n :]
    pad = np.repeat(frames[:, :1], n - frames.shape[1], 1)
    return np.concatenate([pad, frames], 1)


class UnrollState:
    """The hazard unroll of ``num_rows`` dream rows, stepped with them: each row's root frames, the actions
    since its root and their count; rows re-root at their newest ``n_frames`` frames every K steps. The one
    place the dream env (:class:`envs.dream.DreamCore`) and ``bench_dodge.py`` turn an unroll into
    per-step termination probabilities."""

    def __init__(self, unroll: HazardUnroll, num_rows: int, device: torch.device | str = "cpu") -> None:
        self.u, self.device = unroll, torch.device(device)
        R, C, K = unroll.resolution, unroll.n_frames, unroll.horizon
        self.frames = np.zeros((num_rows, C, R, R, 3), np.uint8)  # each row's newest C frames
        self.k = np.zeros(num_rows, np.int64)  # steps since the root
        self.e = torch.zeros(num_rows, unroll.hidden, device=self.device)  # each row's root embedding
        self.feats = torch.zeros(num_rows, K, unroll.feat, device=self.device)

    @torch.inference_mode()
    def root(self, rows: np.ndarray | list[int], frames: np.ndarray | None = None) -> None:
        """Root ``rows`` at ``frames`` (k, Tc, R, R, 3) uint8 (default: their newest frames)."""
        rows = np.asarray(rows, np.int64)
        if frames is not None:
            self.frames[rows] = root_window(np.asarray(frames), self.u.n_frames)
        r = torch.as_tensor(rows, device=self.device)
        self.e[r] = self.u.embed(torch.as_tensor(self.frames[rows], device=self.device))
        self.feats[r] = 0.0
        self.k[rows] = 0

    @torch.inference_mode()
    def step(self, actions: np.ndarray, new_frames: np.ndarray) -> np.ndarray:
        """Every row takes ``actions`` (N,) or (N, n) and reaches ``new_frames`` (N, R, R, 3): the probability
        (N,) float32 that this step ends its episode; rows at K steps re-root at their newest frames."""
        N = len(self.k)
        k = torch.as_tensor(self.k, device=self.device)
        a = torch.as_tensor(np.asarray(actions), device=self.device)
        self.feats[torch.arange(N, device=self.device), k] = self.u.action_features(a[:, None])[:, 0]
        now = torch.sigmoid(self.u.logits_at(self.e, self.feats, k))  # P(ended by this step)
        before = torch.where(
            k > 0, torch.sigmoid(self.u.logits_at(self.e, self.feats, (k - 1).clamp(min=0))), 0.0
        )
        p = step_hazards(torch.stack([before, now], -1))[:, 1].float().cpu().numpy()
        self.frames = np.concatenate([self.frames[:, 1:], np.asarray(new_frames)[:, None]], 1)
        self.k += 1
        due = np.flatnonzero(self.k >= self.u.horizon)
        if len(due):
            self.root(due)
        return p


def build_hazard(wm: WorldModel, cfg: HazardConfig) -> HazardUnroll:
    """An untrained :class:`HazardUnroll` for ``wm``'s frame size and action space."""
    spec = wm.action_spec
    if spec.kind not in ("discrete", "continuous"):
        raise ValueError(f"wm: the bundle has no actions ({spec.kind}); a hazard unroll reads actions")
    n = spec.n if spec.kind == "discrete" else spec.dim
    return HazardUnroll(cfg.context, wm.obs_shape[0], spec.kind, n, cfg.horizon, cfg.hidden)


def sample_roots(
    store: EpisodeStore, ids: list[str], cfg: HazardConfig, rng: np.random.Generator, n_act_fill: Any
) -> dict[str, np.ndarray]:
    """Roots of episodes ``ids``: context frames (N, C, H, W, 3), the next K
    actions (N, K[, A]) (past an episode's end: ``n_act_fill``, masked), per-step targets (N, K) (1 at the
    step that terminated the episode), per-step masks (N, K) (steps the episode reached alive) and importance
    weights (N,)."""
    K, C = cfg.horizon, cfg.context
    cf, u, y, m, w = [], [], [], [], []
    for eid in ids:
        ep = store.load(eid)
        T = 0 if ep.actions is None else len(ep.actions)
        if T < C:  # a root needs C frames and one action after them
            continue
        acts = np.concatenate([ep.actions, np.repeat(np.asarray(n_act_fill, ep.actions.dtype)[None], K, 0)])
        near = list(range(max(C - 1, T - K), T))  # within K steps of the end: every one
        far = np.arange(C - 1, max(C - 1, T - K))
        pick = rng.choice(far, min(len(far), cfg.roots_per_episode), replace=False) if len(far) else far
        for b, wt in [(b, 1.0) for b in near] + [(int(b), len(far) / len(pick)) for b in pick]:
            cf.append(ep.frames[b - C + 1 : b + 1])
            u.append(acts[b : b + K])
            steps = np.arange(1, K + 1)
            y.append(((b + steps == T) & bool(ep.terminated[-1])).astype(np.float32))
            m.append((b + steps <= T).astype(np.float32))
            w.append(wt)
    if not cf:
        raise ValueError(
            f"the store's episodes {ids[:3]}... have fewer than {C + 1} frames: a root needs "
            f"hazard.context = {C} frames and an action after them"
        )
    return {
        "frames": np.stack(cf),
        "actions": np.stack(u),
        "targets": np.stack(y),
        "mask": np.stack(m),
        "weights": np.asarray(w, np.float32),
    }


def hazard_loss(
    unroll: HazardUnroll,
    frames: torch.Tensor,
    actions: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted mean over roots of the summed BCE of "ended by step k", k = 1..K: targets (B, K) mark the step
    that ended the episode, mask (B, K) the steps it reached alive; the steps after an ending count as ended
    (target 1), the steps past a time limit are dropped."""
    ended = torch.cumsum(targets, 1).clamp(max=1.0)
    keep = torch.maximum(mask, ended)
    bce = F.binary_cross_entropy_with_logits(unroll(frames, actions), ended, reduction="none") * keep
    return (bce.sum(1) * weights).sum() / weights.sum().clamp(min=1e-8)


def step_hazards(ended_by: torch.Tensor) -> torch.Tensor:
    """Per-step termination probabilities from P(ended by step k) (..., K): p_k = 1 - (1 - P_k) / (1 - P_{k-1}),
    P_0 = 0, clipped to [0, 1] (an unroll's cumulative outputs need not be monotone)."""
    prev = torch.cat([torch.zeros_like(ended_by[..., :1]), ended_by[..., :-1]], -1)
    return (1 - (1 - ended_by) / (1 - prev).clamp(min=1e-6)).clamp(0.0, 1.0)


def _auc(score: np.ndarray, label: np.ndarray, weight: np.ndarray) -> float | None:
    """Weighted ROC AUC (ties count half); None without both classes. Hand-written: a dozen lines against
    pulling scikit-learn into the runtime dependencies."""
    pos, neg = label > 0.5, label <= 0.5
    if not pos.any() or not neg.any():
        return None
    order = np.argsort(score, kind="mergesort")
    s, lab, wt = score[order], label[order] > 0.5, weight[order]
    auc, neg_below = 0.0, 0.0
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        wp, wn = wt[i:j][lab[i:j]].sum(), wt[i:j][~lab[i:j]].sum()
        auc += wp * (neg_below + 0.5 * wn)
        neg_below += wn
        i = j
    return float(auc / (weight[pos].sum() * weight[neg].sum()))


def train_hazard(
    wm: WorldModel, store: EpisodeStore, cfg: HazardConfig | None = None, *, progress: bool = True
) -> tuple[HazardUnroll, dict[str, Any]]:
    """Fit a :class:`HazardUnroll` on ``store``'s training episodes (the tokenizer and prior are not touched);
    metrics on its held-out (``val``, else ``test``) episodes: the weighted loss and the AUC of P(termination
    within K) over roots. Returns (the unroll in eval mode, metrics)."""
    from worldmodel.store import heldout_episode_ids

    cfg = cfg or HazardConfig()
    cfg.check()
    if wm.obs_shape[0] % 8:
        raise ValueError(f"wm: frames of side {wm.obs_shape[0]}; the hazard unroll needs a multiple of 8")
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    spec = wm.action_spec
    fill = 0 if spec.kind == "discrete" else np.zeros(spec.dim, np.float32)
    val_ids, val_split = heldout_episode_ids(store, "val", cfg.context + 1)
    tr = sample_roots(store, store.episode_ids("train"), cfg, rng, fill)
    va = sample_roots(store, val_ids, cfg, rng, fill)
    dev = wm.device

    def batch(d: dict[str, np.ndarray], ix: np.ndarray) -> list[torch.Tensor]:
        return [
            torch.as_tensor(d[k][ix], device=dev) for k in ("frames", "actions", "targets", "mask", "weights")
        ]

    unroll = build_hazard(wm, cfg).to(dev)
    opt = torch.optim.AdamW(unroll.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n = len(tr["frames"])
    bar = tqdm(range(cfg.steps), desc="hazard", unit="step", disable=not progress)
    for _ in bar:
        with torch.autocast(dev.type, torch.bfloat16, enabled=cfg.bf16 and dev.type == "cpu"):
            loss = hazard_loss(unroll, *batch(tr, rng.integers(0, n, cfg.batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unroll.eval()
    losses, within = [], []
    with torch.no_grad():
        for i in range(0, len(va["frames"]), 512):
            ix = np.arange(i, min(len(va["frames"]), i + 512))
            f, u, y, m, w = batch(va, ix)
            losses.append(hazard_loss(unroll, f, u, y, m, w).item() * w.sum().item())
            within.append(torch.sigmoid(unroll(f, u))[:, -1].cpu().numpy())  # ended by step K
    metrics = {
        "val_split": val_split,
        "train_roots": n,
        "val_roots": int(len(va["frames"])),
        "val_loss": round(sum(losses) / float(va["weights"].sum()), 5),
        "val_auc_within_horizon": _auc(np.concatenate(within), va["targets"].sum(1), va["weights"]),
        "minutes": round((time.time() - t0) / 60, 2),
    }
    return unroll, metrics


def fit_hazard(
    wm: WorldModel, store: EpisodeStore, cfg: HazardConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """:func:`train_hazard` on ``store``, then :func:`save_hazard` into ``wm``'s bundle directory (a
    :class:`~worldmodel.bundle.WorldModel` loaded afterwards has the unroll); returns the held-out metrics."""
    cfg = cfg or HazardConfig()
    unroll, metrics = train_hazard(wm, store, cfg, progress=progress)
    save_hazard(wm.path, unroll, cfg, metrics)
    return metrics


def save_hazard(
    run_dir: str | os.PathLike, unroll: HazardUnroll, cfg: HazardConfig, metrics: dict[str, Any]
) -> None:
    """Write the unroll into a bundle: ``hazard.*`` tensors of ``model.safetensors`` and ``hazard.json``."""
    save_weights(run_dir, "hazard", unroll.state_dict())
    doc = {"config": asdict(cfg), "action_kind": unroll.action_kind, "n": unroll.n, "metrics": metrics}
    write_json(Path(run_dir) / HAZARD_JSON, doc)


def load_hazard(run_dir: str | os.PathLike, resolution: int) -> tuple[HazardUnroll, HazardConfig] | None:
    """The bundle's unroll and its config, or None when it has none (``hazard.json`` absent)."""
    path = Path(run_dir) / HAZARD_JSON
    if not path.exists() or not has_weights(run_dir, "hazard"):
        return None
    try:
        doc = json.loads(path.read_text())
        cfg = HazardConfig(**doc["config"])
        unroll = HazardUnroll(
            cfg.context, resolution, doc["action_kind"], int(doc["n"]), cfg.horizon, cfg.hidden
        )
        unroll.load_state_dict(load_weights(run_dir, "hazard"))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        from worldmodel.checkpoint import BundleError

        raise BundleError(f"{path}: the hazard unroll does not load ({str(e)[:300]})") from None
    return unroll.eval(), cfg
