"""Action-following evaluation of a world model on held-out real episodes.

Open loop: for ``n`` start points in held-out episodes, encode ``context`` real frames, then
generate ``horizon`` frames with (a) the true actions replayed, (b) shuffled actions (the action
sequence of another start point), and compare each to the real frames; (c) the copy-last-frame
baseline repeats the last context frame; (d) the ceiling decodes the real frames' own tokens. A
world model that follows actions has (a) clearly above (b) and (c).

Teacher forced: whole held-out episodes are tokenized like the training data and read by the prior
in windows of its context, giving the reward and termination heads' prediction for every transition
and the held-out token NLL (bits/dim).

PSNR and SSIM are :mod:`worldmodel.metrics.image`'s (``psnr`` is re-exported here for old callers).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worldmodel.bundle import WorldModel
from worldmodel.metrics.image import psnr, ssim
from worldmodel.prior_heads import symexp
from worldmodel.store import EpisodeStore, heldout_episode_ids

__all__ = [
    "DynamicsReport",
    "HeldoutClips",
    "OpenLoopRollout",
    "TeacherForced",
    "encode_windows",
    "evaluate_dynamics",
    "evaluate_dynamics_on",
    "heldout_nll",
    "open_loop",
    "psnr",
    "reconstruct",
    "render_action_strips",
    "sample_clips",
    "teacher_forced_episodes",
    "window_starts",
]


# -- held-out data --------------------------------------------------------------------------------
@dataclass
class HeldoutClips:
    """``n`` clips of ``L`` consecutive frames from held-out episodes (alignment as in the store)."""

    frames: np.ndarray  # (n, L, H, W, 3) uint8
    actions: np.ndarray  # (n, L-1) int64 | (n, L-1, A) float32
    rewards: np.ndarray  # (n, L-1) float32
    terminated: np.ndarray  # (n, L-1) bool
    episode_ids: list[str]
    starts: list[int]  # first frame of each clip in its episode
    split: str  # the split the clips were drawn from


def sample_clips(
    store: EpisodeStore, *, split: str = "test", n: int = 32, length: int = 20, seed: int = 0
) -> HeldoutClips:
    """``n`` random clips of ``length`` frames (episode, then start, drawn uniformly with ``seed``)."""
    if n < 1 or length < 2:
        raise ValueError(f"n and length: got n={n}, length={length}, expected n >= 1 and length >= 2")
    if store.meta.action_spec.kind == "none":
        raise ValueError(
            f"store {store.root} has no actions; open-loop evaluation needs an action-conditioned store"
        )
    try:
        ids, used = heldout_episode_ids(store, split, length)
    except ValueError as e:
        raise ValueError(
            f"length: {e} (a clip of context + horizon frames); use a shorter context or horizon"
        ) from None
    rng = np.random.default_rng(seed)
    clips, eids, starts = [], [], []
    for _ in range(n):
        eid = ids[int(rng.integers(len(ids)))]
        start = int(rng.integers(0, store.length(eid) - length + 1))
        clips.append(store.read_clip(eid, start, length))
        eids.append(eid)
        starts.append(start)
    return HeldoutClips(
        np.stack([c["frames"] for c in clips]),
        np.stack([c["actions"] for c in clips]),
        np.stack([c["rewards"] for c in clips]),
        np.stack([c["terminated"] for c in clips]),
        eids,
        starts,
        used,
    )


# -- tokenizer windows ----------------------------------------------------------------------------
def _check_stride(wm: WorldModel) -> None:
    st = int(wm.cfg.tokenizer.stride[0])
    if st != 1:
        raise ValueError(
            f"the bundle's tokenizer has temporal stride {st}; this evaluation needs one token frame "
            "per video frame (temporal stride 1, as every dream preset uses)"
        )


@torch.inference_mode()
def encode_windows(wm: WorldModel, frames: np.ndarray) -> torch.Tensor:
    """Tokens of frames (B, T, H, W, 3) uint8 encoded in windows of ``cfg.data.clip_len`` frames, as the
    token cache the prior was trained on is built (``token_cache.encode_store``). -> (B, T, h, w) int64."""
    _check_stride(wm)
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(wm.device)
    return torch.cat([wm.tokenizer.encode(w) for w in torch.split(x, wm.cfg.data.clip_len, dim=1)], 1)


@torch.inference_mode()
def reconstruct(wm: WorldModel, frames: np.ndarray) -> np.ndarray:
    """Tokenizer round trip of frames (B, T, H, W, 3) uint8, window by window of ``cfg.data.clip_len`` frames (the
    windows of :func:`encode_windows`). Any temporal stride: each window is encoded and decoded on its own, so a
    strided tokenizer (the paper's whole-clip presets) needs windows of a multiple of its stride."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(wm.device)
    windows = torch.split(x, wm.cfg.data.clip_len, dim=1)
    return np.concatenate([wm.tokenizer.decode(wm.tokenizer.encode(w)).cpu().numpy() for w in windows], 1)


# -- open loop -------------------------------------------------------------------------------------
@dataclass
class OpenLoopRollout:
    """``horizon`` generated steps of ``n`` dream rows."""

    frames: np.ndarray  # (n, horizon, H, W, 3) uint8
    rewards: np.ndarray  # (n, horizon) predicted reward of each transition if it did not end the episode
    terminated_prob: np.ndarray  # (n, horizon)
    entropy: np.ndarray  # (n, horizon) mean token entropy of each generated frame, nats
    seconds: float  # wall time of the reset (context encoding) and all steps, including decoding
    rewards_if_terminated: np.ndarray  # (n, horizon) predicted reward if it ended the episode (see DreamStep)

    def rewards_given(self, terminated: np.ndarray) -> np.ndarray:
        """(n, horizon) the predicted reward of the outcome ``terminated`` (bool (n, horizon), e.g. the real one)."""
        return np.where(terminated, self.rewards_if_terminated, self.rewards)

    @property
    def expected_rewards(self) -> np.ndarray:
        """(n, horizon) rewards of both outcomes weighted by the predicted termination probability."""
        p = self.terminated_prob
        return p * self.rewards_if_terminated + (1 - p) * self.rewards


@torch.inference_mode()
def open_loop(
    wm: WorldModel,
    frames: np.ndarray,
    actions: np.ndarray,
    *,
    context: int,
    horizon: int,
    temperature: float = 0.0,
    seed: int = 0,
    **decode_kw: Any,
) -> OpenLoopRollout:
    """Start from ``frames[:, :context]`` (with ``actions[:, :context-1]``) and generate ``horizon`` frames
    replaying ``actions[:, context-1 : context-1+horizon]``.

    Args:
        frames: uint8 (n, >= context, H, W, 3) real frames.
        actions: (n, >= context-1+horizon[, A]) actions in the dataset's units.
        temperature: token sampling temperature (0 = greedy, deterministic).
        seed: seed of the sampler when ``temperature > 0``.
        decode_kw: passed to :meth:`Rollout.step` (``decode="maskgit"``, ``maskgit_steps``).
    """
    n = len(frames)
    if context < 1 or horizon < 1:
        raise ValueError(f"context and horizon: got {context}, {horizon}, expected both >= 1")
    if frames.shape[1] < context or len(actions) != n or actions.shape[1] < context - 1 + horizon:
        raise ValueError(
            f"frames/actions: got {frames.shape} and {actions.shape}, expected (n, >= {context}, H, W, 3) "
            f"and (n, >= {context - 1 + horizon}[, A]) for context={context}, horizon={horizon}"
        )
    t0 = time.perf_counter()
    ro = wm.rollout(n)
    ro.reset(frames[:, :context], actions[:, : context - 1])
    g = torch.Generator(device=wm.device).manual_seed(seed)
    steps = [
        ro.step(actions[:, context - 1 + k], temperature=temperature, generator=g, **decode_kw)
        for k in range(horizon)
    ]
    seconds = time.perf_counter() - t0
    return OpenLoopRollout(
        np.stack([s.frames for s in steps], 1),
        np.stack([s.rewards for s in steps], 1),
        np.stack([s.terminated_prob for s in steps], 1),
        np.stack([s.entropy for s in steps], 1),
        seconds,
        np.stack([s.rewards_if_terminated for s in steps], 1),
    )


@dataclass
class DynamicsReport:
    """Per-step (1..horizon) means over the start points. ``rollouts`` keeps the generated data."""

    steps: list[int]
    psnr_true: list[float]
    psnr_shuffled: list[float]
    psnr_copy_last: list[float]
    psnr_ceiling: list[float]
    ssim_true: list[float]
    ssim_shuffled: list[float]
    ssim_copy_last: list[float]
    ssim_ceiling: list[float]
    n_starts: int
    rollouts: dict[str, OpenLoopRollout] = field(default_factory=dict, repr=False)  # "true", "shuffled"
    extra: dict = field(default_factory=dict)


def _per_step(fn, a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(x) for x in fn(a, b).mean(0)]


def evaluate_dynamics_on(
    wm: WorldModel,
    clips: HeldoutClips,
    *,
    context: int = 4,
    horizon: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    reconstruction: np.ndarray | None = None,
    **decode_kw: Any,
) -> DynamicsReport:
    """Open-loop PSNR/SSIM per step for true vs shuffled actions vs copy-last vs decode-ceiling on ``clips``.

    ``clips`` must hold at least ``context + horizon`` frames; ``reconstruction`` (optional) is
    :func:`reconstruct` of ``clips.frames``, reused for the ceiling when the caller has it already;
    ``decode_kw`` choose the decoding (see :func:`open_loop`).
    """
    n, L = clips.frames.shape[:2]
    if L < context + horizon:
        raise ValueError(f"clips: {L} frames, expected >= context + horizon = {context + horizon}")
    real = clips.frames[:, context : context + horizon]
    perm = np.roll(np.arange(n), 1)  # every row gets another row's actions
    rollouts = {}
    for name, acts in (("true", clips.actions), ("shuffled", clips.actions[perm])):
        if name == "shuffled":  # only the *future* actions are swapped; the context keeps its own actions
            acts = np.concatenate([clips.actions[:, : context - 1], acts[:, context - 1 :]], 1)
        rollouts[name] = open_loop(
            wm,
            clips.frames,
            acts,
            context=context,
            horizon=horizon,
            temperature=temperature,
            seed=seed,
            **decode_kw,
        )
    copy = np.repeat(clips.frames[:, context - 1 : context], horizon, 1)
    recon = reconstruct(wm, clips.frames) if reconstruction is None else reconstruction
    ceiling = recon[:, context : context + horizon]
    return DynamicsReport(
        list(range(1, horizon + 1)),
        _per_step(psnr, rollouts["true"].frames, real),
        _per_step(psnr, rollouts["shuffled"].frames, real),
        _per_step(psnr, copy, real),
        _per_step(psnr, ceiling, real),
        _per_step(ssim, rollouts["true"].frames, real),
        _per_step(ssim, rollouts["shuffled"].frames, real),
        _per_step(ssim, copy, real),
        _per_step(ssim, ceiling, real),
        n,
        rollouts,
    )


def evaluate_dynamics(
    wm: WorldModel,
    store: EpisodeStore,
    *,
    split: str = "test",
    n: int = 32,
    context: int = 4,
    horizon: int = 16,
    seed: int = 0,
    temperature: float = 0.0,
    **decode_kw: Any,
) -> DynamicsReport:
    """:func:`evaluate_dynamics_on` ``n`` clips drawn from ``store``'s held-out episodes with ``seed``."""
    clips = sample_clips(store, split=split, n=n, length=context + horizon, seed=seed)
    rep = evaluate_dynamics_on(
        wm, clips, context=context, horizon=horizon, temperature=temperature, seed=seed, **decode_kw
    )
    rep.extra.update(split=clips.split, clips=[[e, s] for e, s in zip(clips.episode_ids, clips.starts)])
    return rep


# -- teacher forced --------------------------------------------------------------------------------
def window_starts(T: int, frames: int) -> list[int]:
    """Starts of windows of ``frames`` frames covering every transition of a ``T``-frame episode.

    Consecutive windows overlap by one frame (a transition t -> t+1 needs both frames in one
    window); the last window is moved back to end at frame T. Episodes with ``T <= frames`` get one
    window of all T frames.
    """
    if T <= frames:
        return [0]
    starts = list(range(0, T - frames + 1, frames - 1))
    if starts[-1] + frames < T:
        starts.append(T - frames)
    return starts


@dataclass
class TeacherForced:
    """The prior's heads, teacher forced, on whole episodes; per-episode arrays over transitions (T-1,)."""

    episode_ids: list[str]
    reward_pred: list[np.ndarray]  # predicted reward of each transition if it did not end the episode
    term_prob: list[np.ndarray]  # predicted termination probability of each transition
    rewards: list[np.ndarray]  # the real rewards
    terminated: list[np.ndarray]  # the real terminations
    token_windows: list[dict] = field(default_factory=list, repr=False)  # full prior windows, for heldout_nll
    reward_pred_if_terminated: list[np.ndarray] = field(default_factory=list)  # ... if it ended the episode

    def reward_pred_given_truth(self) -> list[np.ndarray]:
        """Per episode, the predicted reward of the outcome that really happened (the output matching
        the real termination; the one output of a one-output head)."""
        return [
            np.where(d, rt, rc)
            for rc, rt, d in zip(self.reward_pred, self.reward_pred_if_terminated, self.terminated)
        ]

    def expected_reward_pred(self) -> list[np.ndarray]:
        """Per episode, both predicted rewards weighted by the predicted termination probability."""
        return [
            p * rt + (1 - p) * rc
            for rc, rt, p in zip(self.reward_pred, self.reward_pred_if_terminated, self.term_prob)
        ]


def encoded_episode(
    wm: WorldModel, store: EpisodeStore, eid: str
) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
    """(episode, tokens (T, h, w), actions (T-1[, A]) on the model's device) of a stored episode, or
    None when it has fewer than 2 frames (no transition); raises when it has no actions."""
    ep = store.load(eid)
    if len(ep) < 2:
        return None
    if ep.actions is None:
        raise ValueError(f"episode {eid!r} of {store.root} has no actions")
    return ep, encode_windows(wm, ep.frames[None])[0], torch.as_tensor(ep.actions).to(wm.device)


@torch.inference_mode()
def teacher_forced_episodes(
    wm: WorldModel, store: EpisodeStore, episode_ids: list[str], batch_size: int = 16
) -> TeacherForced:
    """Reward and termination predictions of the prior's heads for every transition of ``episode_ids``
    (``batch_size`` prior windows per forward).

    Each episode is tokenized in the tokenizer's training windows (:func:`encode_windows`) and read by
    the prior in windows of its context (:func:`window_starts`); transition t -> t+1 is predicted with
    the history its window holds (at least frame t), real actions throughout.
    """
    F = wm.cfg.prior.frames
    out = TeacherForced([], [], [], [], [])
    for eid in episode_ids:
        loaded = encoded_episode(wm, store, eid)
        if loaded is None:
            continue
        ep, tokens, acts = loaded
        T = len(ep)
        starts = window_starts(T, F)
        L = min(F, T)
        tok = torch.stack([tokens[s : s + L] for s in starts])  # (nw, L, h, w)
        act = torch.stack([acts[s : s + L - 1] for s in starts])  # (nw, L-1[, A])
        reward, reward_t, term = [], [], []
        for i in range(0, len(starts), batch_size):
            res = wm.prior(tok[i : i + batch_size], act[i : i + batch_size])
            reward.append(symexp(res.reward[:, 1:].float()).cpu().numpy())  # (b, L-1): transitions s .. s+L-2
            reward_t.append(symexp(res.reward_if_terminated[:, 1:].float()).cpu().numpy())
            term.append(torch.sigmoid(res.term_logit[:, 1:].float()).cpu().numpy())
        reward, reward_t, term = np.concatenate(reward), np.concatenate(reward_t), np.concatenate(term)
        r_pred, r_pred_t, p_term = (np.full(T - 1, np.nan, np.float32) for _ in range(3))
        for i, s in enumerate(starts):
            new = np.isnan(r_pred[s : s + L - 1])  # the first window that covers a transition predicts it
            r_pred[s : s + L - 1][new] = reward[i][new]
            r_pred_t[s : s + L - 1][new] = reward_t[i][new]
            p_term[s : s + L - 1][new] = term[i][new]
        out.episode_ids.append(eid)
        out.reward_pred.append(r_pred)
        out.reward_pred_if_terminated.append(r_pred_t)
        out.term_prob.append(p_term)
        out.rewards.append(ep.rewards.astype(np.float32))
        out.terminated.append(ep.terminated.astype(bool))
        if L == F:
            out.token_windows += [
                {"tokens": tok[i].cpu(), "actions": act[i].cpu()} for i in range(len(starts))
            ]
    return out


@torch.inference_mode()
def heldout_nll(
    wm: WorldModel, token_clips: list[dict], shuffle_seed: int = 0, batch_size: int = 16
) -> dict[str, float]:
    """Teacher-forced nats/token on token clips (each {"tokens": (F, h, w), "actions": (F-1[, A])}): all
    frames, first frames, frames with history (true and shuffled actions). ``batch_size`` clips per forward."""
    from worldmodel.sampling import teacher_forced_nll

    if not token_clips:
        raise ValueError("token_clips: got none, expected at least one clip")
    tok = torch.stack([torch.as_tensor(c["tokens"]) for c in token_clips]).to(wm.device)
    act = torch.stack([torch.as_tensor(c["actions"]) for c in token_clips]).to(wm.device)
    g = torch.Generator().manual_seed(shuffle_seed)
    act_shuf = act[torch.randperm(len(token_clips), generator=g).to(wm.device)]
    chunks = [slice(i, i + batch_size) for i in range(0, len(tok), batch_size)]
    nll = torch.cat([teacher_forced_nll(wm.prior, tok[c], act[c]) for c in chunks])  # (N, F)
    nll_shuf = torch.cat([teacher_forced_nll(wm.prior, tok[c], act_shuf[c]) for c in chunks])
    return {
        "nats_per_token": float(nll.mean()),
        "nats_first_frame": float(nll[:, 0].mean()),
        "nats_with_history_true": float(nll[:, 1:].mean()),
        "nats_with_history_shuffled": float(nll_shuf[:, 1:].mean()),
    }


# -- pictures --------------------------------------------------------------------------------------
@torch.inference_mode()
def render_action_strips(
    wm: WorldModel,
    store: EpisodeStore,
    path: str,
    *,
    actions: list[int] | None = None,
    context: int = 4,
    horizon: int = 8,
    split: str = "test",
    seed: int = 0,
    upscale_factor: int = 2,
) -> str:
    """PNG: one row per constant action (e.g. turn left vs turn right) rolled out from the same real
    context; the first ``context`` columns are the real context frames. Discrete actions only."""
    from worldmodel.video import annotate, grid, save_png, upscale

    spec = wm.action_spec
    if spec.kind != "discrete":
        raise ValueError("action strips need a discrete action space")
    actions = list(range(min(spec.n, 2))) if actions is None else actions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a training-time picture may come from training episodes
        ids, _ = heldout_episode_ids(store, split, context)
    eid = ids[int(np.random.default_rng(seed).integers(len(ids)))]
    clip = store.read_clip(eid, 0, context)
    ro = wm.rollout(len(actions))
    ro.reset(
        np.repeat(clip["frames"][None], len(actions), 0), np.repeat(clip["actions"][None], len(actions), 0)
    )
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
