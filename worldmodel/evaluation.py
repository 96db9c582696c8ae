"""The evaluation report of a world-model bundle on held-out real episodes (``eval.json`` + PNG plots).

Sections of the report (all on held-out episodes of the store, never on training data unless the
store has none — then ``split`` says so):

- ``reconstruction``: tokenizer round-trip PSNR (dB) / SSIM per frame, windows as in training.
- ``open_loop``: per step 1..horizon, PSNR/SSIM of frames generated from ``context`` real frames with
  the real actions replayed, against the same with shuffled actions, the **copy-last-frame** baseline
  and the decode-real-tokens ceiling (:mod:`worldmodel.dynamics_eval`); predicted-reward MAE and
  token entropy per step.
- ``reward`` / ``termination``: the prior's heads teacher forced on whole held-out episodes (those
  ending in termination first), each transition read at the window position the dream env reads it
  at (:func:`dream_schedule_windows`: the sampler's sliding window, which keeps ``keep`` frames when
  it slides, so transitions land on positions ``keep .. frames-1``, not only on the last one): reward
  MAE (with the best-constant baseline) of the reward predicted for the real outcome (with
  ``reward_given_termination`` the head predicts a reward for each outcome; ``mae_teacher_forced`` and
  ``mae_on_terminal`` score the one matching the real termination, as the dream env reads it once it
  has drawn termination, and the ``*_expected`` variants their mix weighted by the predicted
  termination probability; both equal for one-output heads; ``open_loop.reward_mae`` and
  ``reward.mae_open_loop`` follow the same rule), termination precision/recall/F1 at probability 0.5, the
  calibration check ``expected_terminations`` (sum of the predicted probabilities, to compare with
  ``n_positive``), and (``termination.tuned``) the scores at a threshold chosen on the ``val`` split
  (max F1, :func:`choose_threshold`) when the report is on ``test``. A calibrated head cannot reach a
  high recall at 0.5 when the step of an event is itself uncertain (an HGS death is visible a step or
  two ahead but its exact step is not); the tuned threshold is the one to give the dream env
  (``termination="threshold"``), the calibrated probability is what its default Bernoulli draw needs.
- ``dream_episodes``: episode lengths of dream rollouts started from the first frame of the
  held-out episodes under a sticky random policy (the collection policy of the vizdoom stores),
  ending at the first termination drawn as Bernoulli(p) (the dream env's default), at p > 0.5, and
  at p > the tuned threshold, against the real mean length: how well the termination head ends
  dream episodes, including what teacher forcing cannot see (generated frames drifting from real
  ones).
- ``bits``: held-out nats/token, bits/token and VideoGPT bits/dim; first frames vs frames with
  history, true vs shuffled actions.
- ``fvd``: FVD (I3D, :mod:`worldmodel.metrics.fvd` protocol) of the 16-step dream clips vs the real
  clips under the same actions; ``fvd_star`` vs the tokenizer reconstructions of those clips (the
  paper's FVD*); ``fvd_recon`` reconstructions vs real. ``null`` with ``fvd_info.reason`` when it
  cannot be computed (no weights, horizon < 16, too few clips) — FVD never fails the evaluation.
  FVD is biased by the clip count: compare numbers with the same ``n_clips``.
- ``sampling``: dream frames per second of the open-loop rollout (batch of ``n_clips``, prior
  sampling + decoding).

A whole-clip action-conditioned bundle (``prior.action_cond="clip"``, the paper's protocol) cannot be stepped:
its report (``protocol: "clip"``, :func:`evaluate_clip_sampling`) has ``reconstruction``, ``fvd``/``fvd_star``/
``fvd_recon`` on clips of the prior's window sampled under their real actions, and ``sampling``; the per-step
sections are absent and ``not_evaluated`` gives the reason for each.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldmodel.atomic import atomic_file, write_json
from worldmodel.bundle import WorldModel
from worldmodel.dynamics_eval import (
    DynamicsReport,
    HeldoutClips,
    TeacherForced,
    encoded_episode,
    evaluate_dynamics_on,
    heldout_nll,
    reconstruct,
    sample_clips,
    window_starts,
)
from worldmodel.metrics.bits import bits_per_dim, bits_per_token
from worldmodel.metrics.image import psnr, ssim
from worldmodel.random_policy import StickyRandomPolicy
from worldmodel.store import EpisodeStore, heldout_episode_ids
from worldmodel.video_sampling import sample_videos

EVAL_JSON = "eval.json"
REPORT_FORMAT = "videogpt-worldmodel-eval"
REPORT_VERSION = 1
TERMINATION_THRESHOLD = 0.5  # the dream env's rule (DreamStep.terminated)


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate_world_model` measures and on how much data."""

    split: str = "test"
    """Held-out split to draw episodes from (falls back to 'val', then 'train', recorded in the report)."""
    n_episodes: int = 32
    """Open-loop start points (clips) and the number of whole episodes for the teacher-forced heads."""
    context: int = 4
    """Real context frames before the open-loop rollout."""
    horizon: int = 16
    """Open-loop steps (FVD needs 16)."""
    temperature: float = 0.0
    """Token sampling temperature of the open-loop rollouts (0 = greedy)."""
    seed: int = 0
    """Seed of the clip draw and of the sampler."""
    fvd: bool = True
    """Compute FVD (needs the I3D weights; otherwise recorded as null with the reason)."""
    i3d_weights: str | None = None
    """I3D checkpoint (default: $WORLDMODEL_HOME/weights/i3d-kinetics-400.ckpt)."""
    fvd_batch_size: int = 8
    """Clips per I3D forward."""
    dream_episodes: int = 16
    """Dream rollouts for the ``dream_episodes`` section (0 = skip it)."""
    dream_max_steps: int = 0
    """Steps after which a dream rollout that has not terminated is cut (counted as censored at that
    length); 0 = twice the longest real episode it starts from."""
    dream_temperature: float = 1.0
    """Token sampling temperature of the dream rollouts (the dream env's default, 1.0)."""

    def validate(self) -> None:
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes: got {self.n_episodes}, expected >= 1")
        if self.context < 1 or self.horizon < 1:
            raise ValueError(f"context and horizon: got {self.context}, {self.horizon}, expected both >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature: got {self.temperature}, expected >= 0")
        if self.dream_episodes < 0 or self.dream_max_steps < 0:
            raise ValueError(
                f"dream_episodes and dream_max_steps: got {self.dream_episodes}, {self.dream_max_steps}, "
                "expected both >= 0"
            )
        if self.dream_temperature < 0:
            raise ValueError(f"dream_temperature: got {self.dream_temperature}, expected >= 0")


def binary_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float | int | None]:
    """Precision, recall and F1 of boolean predictions (None where the ratio is 0/0), with the counts.

    Hand-written: three ratios of counts do not justify a scikit-learn dependency.
    """
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    tp = int((pred & true).sum())
    n_pred, n_true = int(pred.sum()), int(true.sum())
    precision = tp / n_pred if n_pred else None
    recall = tp / n_true if n_true else None
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else None
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": tp,
        "n_predicted": n_pred,
        "n_positive": n_true,
        "n_transitions": int(pred.size),
    }


def choose_threshold(prob: np.ndarray, true: np.ndarray) -> float | None:
    """The probability threshold (``prob > threshold`` predicts True) that maximises F1 on (prob, true),
    placed midway between the lowest accepted score and the next lower one (ties: the higher threshold).
    None when ``true`` has no positive."""
    prob, true = np.asarray(prob, np.float64), np.asarray(true, bool)
    if not true.any():
        return None
    best = max(np.unique(prob[true]), key=lambda t: (binary_scores(prob >= t, true)["f1"] or 0.0, t))
    below = prob[prob < best]
    return float((best + (below.max() if below.size else 0.0)) / 2)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


# -- sections ---------------------------------------------------------------------------------------
def reconstruction_section(clips: HeldoutClips, recon: np.ndarray) -> dict[str, Any]:
    return {
        "psnr": _mean(psnr(recon, clips.frames)),
        "ssim": _mean(ssim(recon, clips.frames)),
        "n_frames": int(np.prod(clips.frames.shape[:2])),
    }


def open_loop_section(rep: DynamicsReport, clips: HeldoutClips, context: int) -> dict[str, Any]:
    H = len(rep.steps)
    real_r = clips.rewards[:, context - 1 : context - 1 + H]  # rewards of the generated transitions
    real_d = clips.terminated[:, context - 1 : context - 1 + H]
    ro = rep.rollouts["true"]
    return {
        "steps": rep.steps,
        "psnr": {
            "model": rep.psnr_true,
            "shuffled_actions": rep.psnr_shuffled,
            "copy_last": rep.psnr_copy_last,
            "ceiling": rep.psnr_ceiling,
        },
        "ssim": {
            "model": rep.ssim_true,
            "shuffled_actions": rep.ssim_shuffled,
            "copy_last": rep.ssim_copy_last,
            "ceiling": rep.ssim_ceiling,
        },
        "psnr_gain_over_copy_last": [m - c for m, c in zip(rep.psnr_true, rep.psnr_copy_last)],
        "reward_mae": [float(x) for x in np.abs(ro.rewards_given(real_d) - real_r).mean(0)],
        "token_entropy": [float(x) for x in ro.entropy.mean(0)],
        "at_horizon": {
            "step": H,
            "psnr_model": rep.psnr_true[-1],
            "psnr_copy_last": rep.psnr_copy_last[-1],
            "gain_db": rep.psnr_true[-1] - rep.psnr_copy_last[-1],
            "ssim_model": rep.ssim_true[-1],
            "ssim_copy_last": rep.ssim_copy_last[-1],
        },
    }


def choose_episodes(store: EpisodeStore, split: str, n: int) -> tuple[list[str], str, int]:
    """Up to ``n`` held-out episodes, those ending in termination first: (ids, split used, n terminating)."""
    ids, used = heldout_episode_ids(store, split, 2)
    ends = {e: bool(store.read_clip(e, store.length(e) - 2, 2)["terminated"][-1]) for e in ids}
    ordered = sorted(ids, key=lambda e: (not ends[e], e))[:n]
    return ordered, used, sum(ends[e] for e in ordered)


def dream_schedule_windows(T: int, frames: int, keep: int) -> list[tuple[int, int, int]]:
    """The prior windows a dream rollout started from frame 0 of a ``T``-frame episode reads its
    transitions in: ``(start, n, first)`` = a window of frames ``start .. start+n-1`` whose frames
    ``start+first .. start+n-1`` are predicted in it (each frame ``m >= 1`` exactly once).

    This mirrors :class:`~worldmodel.sampling.Rollout`: the window fills to ``frames`` frames, then
    slides, keeping its last ``keep`` frames at positions ``0 .. keep-1``, so new frames land on
    positions ``keep .. frames-1`` (a teacher-forced evaluation that only read the last position, or
    a training set whose terminal transitions only sit on the last position, would miss that).
    """
    if not 1 <= keep < frames:
        raise ValueError(f"keep: got {keep}, expected 1 <= keep < frames={frames}")
    out = [(0, min(frames, T), 1)] if T >= 2 else []
    s = frames - keep
    while s + keep < T:
        out.append((s, min(frames, T - s), keep))
        s += frames - keep
    return out


@torch.inference_mode()
def heads_on_dream_schedule(
    wm: WorldModel, store: EpisodeStore, episode_ids: list[str], batch_size: int = 16
) -> TeacherForced:
    """Reward and termination heads on every transition of ``episode_ids``, teacher forced (real frames
    and actions) in the windows of :func:`dream_schedule_windows` (the sampler's ``keep``), i.e. with the
    history and at the window position the dream env would read each transition with. ``token_windows``
    holds each episode's full prior windows (:func:`~worldmodel.dynamics_eval.window_starts`), for
    :func:`~worldmodel.dynamics_eval.heldout_nll`, from the same encoding."""
    from worldmodel.prior_heads import symexp
    from worldmodel.sampling import Rollout

    F = wm.cfg.prior.frames
    keep = Rollout(wm.prior, 1).keep  # the sampler's own setting, so both stay in step
    out = TeacherForced([], [], [], [], [])
    for eid in episode_ids:
        loaded = encoded_episode(wm, store, eid)
        if loaded is None:
            continue
        ep, tokens, acts = loaded  # tokens (T, h, w)
        T = len(ep)
        r_pred, r_pred_t, p_term = (np.full(T - 1, np.nan, np.float32) for _ in range(3))
        wins = dream_schedule_windows(T, F, keep)
        for n in sorted({n for _, n, _ in wins}):  # windows of equal length go through the prior together
            group = [(s, first) for s, m, first in wins if m == n]
            for i in range(0, len(group), batch_size):
                part = group[i : i + batch_size]
                res = wm.prior(
                    torch.stack([tokens[s : s + n] for s, _ in part]),
                    torch.stack([acts[s : s + n - 1] for s, _ in part]),
                )
                reward = symexp(res.reward.float()).cpu().numpy()  # (b, n): [j] = transition into frame s+j
                reward_t = symexp(res.reward_if_terminated.float()).cpu().numpy()
                term = torch.sigmoid(res.term_logit.float()).cpu().numpy()
                for k, (s, first) in enumerate(part):
                    r_pred[s + first - 1 : s + n - 1] = reward[k, first:]
                    r_pred_t[s + first - 1 : s + n - 1] = reward_t[k, first:]
                    p_term[s + first - 1 : s + n - 1] = term[k, first:]
        out.episode_ids.append(eid)
        out.reward_pred.append(r_pred)
        out.reward_pred_if_terminated.append(r_pred_t)
        out.term_prob.append(p_term)
        out.rewards.append(ep.rewards.astype(np.float32))
        out.terminated.append(ep.terminated.astype(bool))
        if T >= F:
            out.token_windows += [
                {"tokens": tokens[s : s + F].cpu(), "actions": acts[s : s + F - 1].cpu()}
                for s in window_starts(T, F)
            ]
    return out


def tuned_termination(
    wm: WorldModel, store: EpisodeStore, split: str, n: int, p_term: np.ndarray, d_true: np.ndarray
) -> dict[str, Any]:
    """Scores on (p_term, d_true) at a threshold chosen on up to ``n`` ``val`` episodes (never the
    evaluated ones): only when the evaluated split is ``test``."""
    if split != "test":
        return {
            "threshold": None,
            "reason": f"the report is on the {split!r} split: no separate split to tune on",
        }
    ids, used, n_term = choose_episodes(store, "val", n)
    if used != "val" or n_term == 0:
        return {"threshold": None, "reason": "no 'val' episode ends in termination"}
    tf = heads_on_dream_schedule(wm, store, ids)
    thr = choose_threshold(np.concatenate(tf.term_prob), np.concatenate(tf.terminated))
    return {
        **binary_scores(p_term > thr, d_true),
        "threshold": thr,
        "chosen_on": "val",
        "n_val_episodes": len(ids),
        "n_val_terminating": n_term,
    }


def heads_sections(wm: WorldModel, store: EpisodeStore, split: str, n: int) -> tuple[dict, dict, dict]:
    """(reward, termination, bits) sections from the prior teacher forced on whole held-out episodes
    (:func:`heads_on_dream_schedule`: heads at the dream's window positions, bits on full windows)."""
    ids, used, n_term = choose_episodes(store, split, n)
    hs = heads_on_dream_schedule(wm, store, ids)
    r_true = np.concatenate(hs.rewards)
    r_pred = np.concatenate(
        hs.reward_pred_given_truth()
    )  # the output for the real outcome (as the dream env reads it)
    r_exp = np.concatenate(
        hs.expected_reward_pred()
    )  # before termination is known: weighted by p(terminated)
    p_term, d_true = np.concatenate(hs.term_prob), np.concatenate(hs.terminated)
    where = {"split": used, "n_episodes": len(hs.episode_ids), "episode_ids": hs.episode_ids}
    reward = {
        "reward_given_termination": wm.cfg.prior.reward_given_termination,
        "mae_teacher_forced": _mean(np.abs(r_pred - r_true)),
        "mae_teacher_forced_expected": _mean(np.abs(r_exp - r_true)),
        "mae_constant_baseline": _mean(np.abs(np.median(r_true) - r_true)),
        "mean_abs_reward": _mean(np.abs(r_true)),
        **where,
    }
    if d_true.any():  # the rare rewards that come with termination (HGS: the death penalty)
        reward["mae_on_terminal"] = _mean(np.abs(r_pred[d_true] - r_true[d_true]))
        reward["mae_on_terminal_expected"] = _mean(np.abs(r_exp[d_true] - r_true[d_true]))
    termination = {
        **binary_scores(p_term > TERMINATION_THRESHOLD, d_true),
        "threshold": TERMINATION_THRESHOLD,
        "expected_terminations": float(p_term.sum()),
        "n_terminating_episodes": n_term,
        **where,
    }
    if n_term == 0:
        termination["note"] = "no held-out episode ends in termination: recall is undefined"
    termination["tuned"] = tuned_termination(wm, store, used, n, p_term, d_true)
    bits: dict[str, Any] = {"n_windows": len(hs.token_windows), "window_frames": wm.cfg.prior.frames}
    if hs.token_windows:
        nll = heldout_nll(wm, hs.token_windows)
        h, w = wm.cfg.prior.tokens_h, wm.cfg.prior.tokens_w
        H, W, C = wm.obs_shape
        F = wm.cfg.prior.frames
        bits.update(
            nll,
            bits_per_token=bits_per_token(nll["nats_per_token"]),
            bits_per_dim=bits_per_dim(nll["nats_per_token"], (F, h, w), (F, H, W, C)),
        )
    else:
        bits["note"] = f"no held-out episode has the {wm.cfg.prior.frames} frames of a prior window"
    return reward, termination, bits


@torch.inference_mode()
def dream_episode_section(
    wm: WorldModel,
    store: EpisodeStore,
    episode_ids: list[str],
    *,
    rows: int,
    max_steps: int = 0,
    thresholds: dict[str, float | None] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Lengths (steps) of ``rows`` dream episodes started from the first frame of ``episode_ids``
    (cycled) under a :class:`~worldmodel.random_policy.StickyRandomPolicy`, for several ways of ending them on one rollout:
    ``sample`` (the first step whose Bernoulli(p) draw says terminated, the dream env's default) and
    ``p > threshold`` for each of ``thresholds`` (name -> threshold; None entries are skipped).
    Rollouts that have not ended by ``max_steps`` count as that long (``n_censored``; the mean is then
    a lower bound). ``real_mean_length`` is over the starting episodes (steps = frames - 1)."""
    spec = wm.action_spec
    ids = [e for e in episode_ids if store.length(e) >= 2]
    if spec.kind != "discrete":
        return {"reason": f"needs a discrete action space (the sticky random policy); got {spec.kind!r}"}
    if not ids or rows < 1:
        return {"reason": "no held-out episode to start from" if not ids else "disabled (dream_episodes=0)"}
    starts = [ids[i % len(ids)] for i in range(rows)]
    real = np.array([store.length(e) - 1 for e in ids], np.float64)
    max_steps = max_steps or int(2 * real.max())
    rules = {"sample": None, **{k: v for k, v in (thresholds or {}).items() if v is not None}}
    ended = {k: np.full(rows, -1) for k in rules}
    rng = np.random.default_rng(seed)
    policy = StickyRandomPolicy(spec.n, rows, seed=seed)
    gens = [torch.Generator(device=wm.device).manual_seed(seed * 1_000_003 + i) for i in range(rows)]
    ro = wm.rollout(rows)
    ro.reset(np.stack([store.read_clip(e, 0, 1)["frames"] for e in starts]))
    t0, steps = time.perf_counter(), 0
    for t in range(max_steps):
        p = ro.step(policy(), temperature=temperature, generator=gens).terminated_prob
        u = rng.random(rows)
        steps = t + 1
        for k, thr in rules.items():
            hit = (u < p) if thr is None else (p > thr)
            ended[k][(ended[k] < 0) & hit] = steps
        if all((v >= 0).all() for v in ended.values()):
            break
    out: dict[str, Any] = {
        "policy": "sticky random (mean repeat 4)",
        "n_episodes": rows,
        "max_steps": max_steps,
        "temperature": temperature,
        "real_mean_length": float(real.mean()),
        "real_n_episodes": len(ids),
        "steps_run": steps,
        "seconds": time.perf_counter() - t0,
    }
    for k, thr in rules.items():
        lengths = np.where(ended[k] < 0, max_steps, ended[k])
        out[k] = {
            "mean_length": float(lengths.mean()),
            "median_length": float(np.median(lengths)),
            "n_censored": int((ended[k] < 0).sum()),
            **({} if thr is None else {"threshold": thr}),
        }
    return out


def _fvd_disabled() -> dict[str, Any]:
    """The FVD keys of a report whose settings turned FVD off (``fvd=False`` / ``--no-fvd``): null, with the reason."""
    return {
        "fvd": None,
        "fvd_star": None,
        "fvd_recon": None,
        "fvd_info": {"reason": "disabled (fvd=False / --no-fvd)"},
    }


def fvd_section(
    real: np.ndarray,
    recon: np.ndarray,
    dream: np.ndarray,
    *,
    weights: str | None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FVD(real, dream), FVD*(recon, dream) and FVD(real, recon) on 16-frame clips; never raises.

    All three sets are uint8 (n, T, H, W, 3) over the same clips; the first 16 frames are used.
    """
    from worldmodel.metrics.fvd import FVD_FRAMES, frechet_distance, get_i3d, i3d_embed, resolve_i3d_weights

    out: dict[str, Any] = {"fvd": None, "fvd_star": None, "fvd_recon": None}
    info: dict[str, Any] = {"n_clips": int(len(dream)), "frames": FVD_FRAMES, "weights": None, "reason": None}
    out["fvd_info"] = info
    if dream.shape[1] < FVD_FRAMES:
        info["reason"] = (
            f"horizon {dream.shape[1]} < {FVD_FRAMES}: FVD needs {FVD_FRAMES}-frame clips (use --horizon 16)"
        )
        return out
    if len(dream) < 2:
        info["reason"] = "FVD needs at least 2 clips per set"
        return out
    try:
        path = resolve_i3d_weights(weights)
        info["weights"] = str(path)
        t0 = time.perf_counter()
        model = get_i3d(path, device)
        emb = {
            k: i3d_embed(np.ascontiguousarray(v[:, :FVD_FRAMES]), model, batch_size)
            for k, v in (("real", real), ("recon", recon), ("dream", dream))
        }
        out["fvd"] = frechet_distance(emb["real"], emb["dream"])
        out["fvd_star"] = frechet_distance(emb["recon"], emb["dream"])
        out["fvd_recon"] = frechet_distance(emb["real"], emb["recon"])
        info["seconds"] = time.perf_counter() - t0
    except (
        Exception
    ) as e:  # FVD is optional: missing/corrupt weights or a degenerate covariance is recorded, not fatal
        info["reason"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"FVD skipped: {info['reason']}", stacklevel=2)
    return out


# -- plots -------------------------------------------------------------------------------------------
def _save_figure(fig: Any, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def plot_open_loop(section: dict[str, Any], path: Path) -> Path:
    """Three panels over the open-loop steps: PSNR, SSIM (model vs baselines) and predicted-reward MAE."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    steps = section["steps"]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    styles = {"model": "-o", "shuffled_actions": "--", "copy_last": ":", "ceiling": "-."}
    for ax, key, unit in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for name, style in styles.items():
            ax.plot(steps, section[key][name], style, label=name.replace("_", " "), markersize=3)
        ax.set_xlabel("open-loop step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].plot(steps, section["reward_mae"], "-o", markersize=3)
    axes[2].set_xlabel("open-loop step")
    axes[2].set_ylabel("reward MAE")
    axes[2].grid(alpha=0.3)
    fig.suptitle("open-loop prediction on held-out episodes (real actions replayed)")
    return _save_figure(fig, path)


def plot_rollouts(
    clips: HeldoutClips, dream: np.ndarray, context: int, path: Path, max_rows: int = 4
) -> Path:
    """Image grid: for up to ``max_rows`` clips, the real frames above the dream (context frames repeated)."""
    from worldmodel.video import grid, save_png, upscale

    factor = max(1, 64 // clips.frames.shape[2])
    rows = []
    for i in range(min(max_rows, len(dream))):
        real = clips.frames[i, : context + dream.shape[1]]
        rows += [upscale(real, factor), upscale(np.concatenate([real[:context], dream[i]]), factor)]
    return save_png(grid(rows), path)


# -- the report ---------------------------------------------------------------------------------------
CLIP_PROTOCOL_ABSENT = {
    key: "not evaluated: a whole-clip action-conditioned prior (prior.action_cond='clip') needs every action of a "
    "clip before its first frame, so it cannot be stepped " + what
    for key, what in (
        ("open_loop", "from real context frames one action at a time"),
        ("reward", "to read its reward head per transition as the dream env does"),
        ("termination", "to read its termination head per transition as the dream env does"),
        ("dream_episodes", "as a dream env (envs.dream refuses it; --paper-actions step can be stepped)"),
        ("bits", "on the per-step windows the teacher-forced sections read"),
    )
}
"""The sections of the per-step report a ``protocol: "clip"`` report leaves out, with the reason (``not_evaluated``)."""


def evaluate_clip_sampling(
    wm: WorldModel,
    store: EpisodeStore,
    settings: EvalSettings,
    *,
    plot_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The report of a whole-clip action-conditioned bundle (``prior.action_cond='clip'``, the paper's
    ViZDoom/RoboNet protocol). Such a prior needs every action of a clip up front, so there is no open loop, no
    dream episode and no head evaluation (``not_evaluated`` gives each reason): ``n_episodes`` held-out clips of
    the prior's window (``prior.frames`` latent frames, 16 pixel frames at paper scale) are reconstructed by the
    tokenizer and sampled from scratch under their real actions (temperature ``settings.temperature``), and FVD /
    FVD* / FVD(real, recon) are computed on them as the paper does (``protocol: "clip"`` in the report).
    ``context`` and ``horizon`` do not apply (the clip is the prior's window). A frame-conditioned prior
    (``n_cond_frames``) gets its conditioning frames from the start of each real clip."""
    s, t_all = settings, time.perf_counter()
    p = wm.cfg.prior
    st = int(wm.cfg.tokenizer.stride[0])
    # latent frames of token conditioning come first in the window (pixel conditioning adds none)
    k_tok = 0 if p.cond_pixels else p.n_cond_frames
    length = (k_tok + p.frames) * st
    if p.clip_actions > length - 1:
        raise ValueError(
            f"prior.clip_actions={p.clip_actions} is more than the {length - 1} transitions of a clip of the "
            f"prior's window ({length} frames)"
        )
    clips = sample_clips(store, split=s.split, n=s.n_episodes, length=length, seed=s.seed)
    t0 = time.perf_counter()
    recon = reconstruct(wm, clips.frames)
    t_recon = time.perf_counter() - t0
    actions = clips.actions[:, : p.clip_actions]
    t0 = time.perf_counter()
    dream = sample_videos(
        wm,
        len(clips.frames),
        context=clips.frames if p.n_cond_frames else None,
        actions=actions,
        temperature=s.temperature,
        seed=s.seed,
    )
    t_sample = time.perf_counter() - t0
    if dream.shape != clips.frames.shape or recon.shape != clips.frames.shape:
        raise RuntimeError(
            f"clip evaluation: real clips {clips.frames.shape}, reconstructions {recon.shape} and sampled clips "
            f"{dream.shape} should have the same shape"
        )
    if s.fvd:
        fvd = fvd_section(
            clips.frames, recon, dream, weights=s.i3d_weights, batch_size=s.fvd_batch_size, device=wm.device
        )
        from worldmodel.metrics.fvd import FVD_FRAMES

        if length < FVD_FRAMES:  # the clip is the prior's window, not --horizon
            fvd["fvd_info"]["reason"] = (
                f"clips of {length} frames (the prior's window) < {FVD_FRAMES}: FVD needs {FVD_FRAMES}-frame clips"
            )
    else:
        fvd = _fvd_disabled()
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "protocol": "clip",
        "store": str(store.root),
        "settings": asdict(s),
        "split": clips.split,
        "n_clips": len(clips.episode_ids),
        "clip_frames": length,
        "clips": [[e, st_] for e, st_ in zip(clips.episode_ids, clips.starts)],
        "reconstruction": {**reconstruction_section(clips, recon), "seconds": t_recon},
        **fvd,
        "sampling": {
            "frames_per_s": dream.shape[0] * dream.shape[1] / max(t_sample, 1e-9),
            "batch_size": int(dream.shape[0]),
            "seconds": t_sample,
            "temperature": s.temperature,
            "clip_shape": list(dream.shape),
            "actions_shape": list(actions.shape),
            "includes": "prior sampling of every latent frame under the clip's actions, frame decoding",
        },
        "not_evaluated": dict(CLIP_PROTOCOL_ABSENT),
    }
    if plot_dir is not None:
        d = Path(plot_dir)
        d.mkdir(parents=True, exist_ok=True)
        report["plots"] = [plot_rollouts(clips, dream, 0, d / "eval_clips.png").name]
    report["seconds"] = time.perf_counter() - t_all
    return report


def evaluate_world_model(
    wm: WorldModel,
    store: EpisodeStore,
    settings: EvalSettings = EvalSettings(),
    *,
    plot_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compute the evaluation report (a JSON-ready dict; see the module docstring) of ``wm`` on ``store``.

    ``plot_dir``: if given, ``eval_open_loop.png`` and ``eval_rollouts.png`` are written there and
    listed under ``plots``.
    """
    settings.validate()
    if wm.action_spec.kind == "none":
        raise ValueError(
            "the bundle models action-free video; evaluate.py needs an action-conditioned bundle"
        )
    if wm.cfg.prior.action_cond == "clip":
        return evaluate_clip_sampling(wm, store, settings, plot_dir=plot_dir)
    t_all = time.perf_counter()
    s = settings
    clips = sample_clips(store, split=s.split, n=s.n_episodes, length=s.context + s.horizon, seed=s.seed)
    t0 = time.perf_counter()
    recon = reconstruct(wm, clips.frames)
    t_recon = time.perf_counter() - t0
    rep = evaluate_dynamics_on(
        wm,
        clips,
        context=s.context,
        horizon=s.horizon,
        temperature=s.temperature,
        seed=s.seed,
        reconstruction=recon,
    )
    open_loop = open_loop_section(rep, clips, s.context)
    reward, termination, bits = heads_sections(wm, store, s.split, s.n_episodes)
    dream_eps = dream_episode_section(
        wm,
        store,
        termination["episode_ids"],
        rows=s.dream_episodes,
        max_steps=s.dream_max_steps,
        thresholds={"threshold_0.5": TERMINATION_THRESHOLD, "tuned": termination["tuned"]["threshold"]},
        temperature=s.dream_temperature,
        seed=s.seed,
    )
    dream = rep.rollouts["true"]
    real_r = clips.rewards[:, s.context - 1 : s.context - 1 + s.horizon]
    reward["mae_open_loop"] = _mean(
        np.abs(dream.rewards_given(clips.terminated[:, s.context - 1 : s.context - 1 + s.horizon]) - real_r)
    )
    reward["mae_open_loop_expected"] = _mean(np.abs(dream.expected_rewards - real_r))
    real_future = clips.frames[:, s.context : s.context + s.horizon]
    if s.fvd:
        fvd = fvd_section(
            real_future,
            recon[:, s.context : s.context + s.horizon],
            dream.frames,
            weights=s.i3d_weights,
            batch_size=s.fvd_batch_size,
            device=wm.device,
        )
    else:
        fvd = _fvd_disabled()
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "store": str(store.root),
        "settings": asdict(s),
        "split": clips.split,
        "n_clips": len(clips.episode_ids),
        "clips": [[e, st] for e, st in zip(clips.episode_ids, clips.starts)],
        "reconstruction": {**reconstruction_section(clips, recon), "seconds": t_recon},
        "open_loop": open_loop,
        "reward": reward,
        "termination": termination,
        "dream_episodes": dream_eps,
        "bits": bits,
        **fvd,
        "sampling": {
            "frames_per_s": dream.frames.shape[0] * dream.frames.shape[1] / dream.seconds,
            "batch_size": int(dream.frames.shape[0]),
            "seconds": dream.seconds,
            "temperature": s.temperature,
            "includes": "context encoding, prior sampling, frame decoding",
        },
    }
    if plot_dir is not None:
        d = Path(plot_dir)
        d.mkdir(parents=True, exist_ok=True)
        report["plots"] = [
            plot_open_loop(open_loop, d / "eval_open_loop.png").name,
            plot_rollouts(clips, dream.frames, s.context, d / "eval_rollouts.png").name,
        ]
    report["seconds"] = time.perf_counter() - t_all
    return report


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    store: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    settings: EvalSettings = EvalSettings(),
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """Load the bundle ``checkpoint``, evaluate it on ``store`` (default: the store it was trained on) and
    write ``eval.json`` + the plots to ``out`` (default: the bundle directory). Returns (report, json path)."""
    wm = WorldModel.from_pretrained(checkpoint, device=device)
    store_path = store or wm.store_path
    if not store_path:
        raise ValueError(f"store: the bundle {checkpoint} records no store; pass --store DIR")
    out_dir = Path(out) if out is not None else Path(checkpoint)
    report = evaluate_world_model(wm, EpisodeStore(store_path), settings, plot_dir=out_dir)
    report = {"checkpoint": str(checkpoint), "preset": wm.cfg.name, "scale": wm.cfg.scale, **report}
    path = out_dir / EVAL_JSON
    write_json(path, report)
    return report, path
