"""Action-following evaluation of a world model on held-out real episodes.

For ``n`` start points in held-out episodes: encode ``context`` real frames, then generate
``horizon`` frames open loop with (a) the true actions, (b) shuffled actions (the action sequence
of another start point), and compare each to the real frames; (c) the copy-last-frame baseline
repeats the last context frame; (d) the ceiling decodes the real frames' own tokens. A world
model that follows actions has (a) clearly above (b) and (c).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from worldmodel.bundle import WorldModel
from worldmodel.store import EpisodeStore


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB over the last three axes of uint8 arrays (..., H, W, 3); identical -> 100 dB cap."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))


@dataclass
class DynamicsReport:
    steps: list[int]
    psnr_true: list[float]
    psnr_shuffled: list[float]
    psnr_copy_last: list[float]
    psnr_ceiling: list[float]
    n_starts: int
    extra: dict = field(default_factory=dict)


def sample_starts(store: EpisodeStore, split: str, n: int, length: int, seed: int = 0) -> list[tuple[str, int]]:
    ids = [i for i in store.episode_ids(split) if store.length(i) >= length]
    if not ids:
        raise ValueError(f"no '{split}' episode of {store.root} has {length} frames")
    rng = np.random.default_rng(seed)
    return [(ids[int(rng.integers(len(ids)))], 0) for _ in range(n)]


@torch.inference_mode()
def evaluate_dynamics(wm: WorldModel, store: EpisodeStore, *, split: str = "test", n: int = 32, context: int = 4,
                      horizon: int = 16, seed: int = 0, temperature: float = 0.0) -> DynamicsReport:
    """Open-loop PSNR per step for true vs shuffled actions vs copy-last vs decode-ceiling."""
    length = context + horizon
    rng = np.random.default_rng(seed)
    ids = [i for i in store.episode_ids(split) if store.length(i) >= length]
    if not ids and split != "train":
        ids = [i for i in store.episode_ids() if store.length(i) >= length]
    if not ids:
        raise ValueError(f"no episode of {store.root} has {length} frames")
    clips = []
    for _ in range(n):
        eid = ids[int(rng.integers(len(ids)))]
        start = int(rng.integers(0, store.length(eid) - length + 1))
        clips.append(store.read_clip(eid, start, length))
    frames = np.stack([c["frames"] for c in clips])  # (n, L, H, W, 3)
    actions = np.stack([c["actions"] for c in clips])  # (n, L-1[, A])
    perm = np.roll(np.arange(n), 1)  # every row gets another row's actions
    real = frames[:, context:]
    out = {}
    for name, acts in (("true", actions), ("shuffled", actions[perm])):
        ro = wm.rollout(n)
        # shuffled: only the *future* actions are swapped; the context keeps its own actions
        ro.reset(frames[:, :context], actions[:, : context - 1])
        g = torch.Generator().manual_seed(seed)
        gen = [ro.step(acts[:, context - 1 + k], temperature=temperature, generator=g).frames for k in range(horizon)]
        out[name] = psnr(np.stack(gen, 1), real).mean(0)
    copy = psnr(np.repeat(frames[:, context - 1: context], horizon, 1), real).mean(0)
    tokens = wm.tokenizer.encode(torch.from_numpy(frames).to(wm.device))
    ceiling = psnr(wm.tokenizer.decode(tokens).cpu().numpy()[:, context:], real).mean(0)
    steps = list(range(1, horizon + 1))
    return DynamicsReport(steps, [float(x) for x in out["true"]], [float(x) for x in out["shuffled"]],
                          [float(x) for x in copy], [float(x) for x in ceiling], n)


@torch.inference_mode()
def heldout_nll(wm: WorldModel, token_clips: list[dict], shuffle_seed: int = 0) -> dict[str, float]:
    """Teacher-forced nats/token on token clips: first frames, frames with history (true and shuffled actions)."""
    from worldmodel.sampling import teacher_forced_nll

    tok = torch.stack([torch.as_tensor(c["tokens"]) for c in token_clips]).to(wm.device)
    act = torch.stack([torch.as_tensor(c["actions"]) for c in token_clips]).to(wm.device)
    nll = teacher_forced_nll(wm.prior, tok, act)
    g = torch.Generator().manual_seed(shuffle_seed)
    perm = torch.randperm(len(token_clips), generator=g)
    nll_shuf = teacher_forced_nll(wm.prior, tok, act[perm.to(wm.device)])
    return {"nats_first_frame": float(nll[:, 0].mean()), "nats_with_history_true": float(nll[:, 1:].mean()),
            "nats_with_history_shuffled": float(nll_shuf[:, 1:].mean())}


@torch.inference_mode()
def render_action_strips(wm: WorldModel, store: EpisodeStore, path: str, *, actions: list[int] | None = None,
                         context: int = 4, horizon: int = 8, split: str = "test", seed: int = 0,
                         upscale_factor: int = 2) -> str:
    """PNG: one row per constant action (e.g. turn left vs turn right) rolled out from the same real
    context; the first ``context`` columns are the real context frames. Discrete actions only."""
    from worldmodel.video import annotate, grid, save_png, upscale

    spec = wm.action_spec
    if spec.kind != "discrete":
        raise ValueError("action strips need a discrete action space")
    actions = list(range(min(spec.n, 2))) if actions is None else actions
    ids = [i for i in store.episode_ids(split) if store.length(i) >= context] or \
        [i for i in store.episode_ids() if store.length(i) >= context]
    if not ids:
        raise ValueError(f"no episode of {store.root} has {context} frames")
    eid = ids[int(np.random.default_rng(seed).integers(len(ids)))]
    clip = store.read_clip(eid, 0, context)
    ro = wm.rollout(len(actions))
    ro.reset(np.repeat(clip["frames"][None], len(actions), 0), np.repeat(clip["actions"][None], len(actions), 0))
    g = torch.Generator().manual_seed(seed)
    gen = [ro.step(np.array(actions), temperature=0.0, generator=g).frames for _ in range(horizon)]
    names = spec.names or tuple(str(a) for a in range(spec.n))
    rows = []
    for r, a in enumerate(actions):
        row = np.concatenate([clip["frames"], np.stack([f[r] for f in gen])])
        row = upscale(row, upscale_factor)
        row[context] = annotate(row[context], [names[a]])
        rows.append(row)
    return str(save_png(grid(rows), path))
