"""The evaluation report of a world-model bundle on held-out real episodes (``eval.json`` + PNG plots).

Sections of the report (all on held-out episodes of the store, never on training data unless the
store has none — then ``split`` says so):

- ``reconstruction``: tokenizer round-trip PSNR (dB) / SSIM per frame, windows as in training.
- ``open_loop``: per step 1..horizon, PSNR/SSIM of frames generated from ``context`` real frames with
  the real actions replayed, against the same with shuffled actions, the **copy-last-frame** baseline
  and the decode-real-tokens ceiling (:mod:`worldmodel.dynamics_eval`); predicted-reward MAE and
  token entropy per step.
- ``reward`` / ``termination``: the prior's heads teacher forced on whole held-out episodes (those
  ending in termination first): reward MAE (with the best-constant baseline), termination
  precision/recall/F1 at probability 0.5, and (``termination.tuned``) at a threshold chosen on the
  ``val`` split (max F1, :func:`choose_threshold`) when the report is on ``test``: terminations are
  rare (about 1 transition in 100 in HGS), so a BCE-trained head ranks them well but stays below 0.5.
- ``bits``: held-out nats/token, bits/token and VideoGPT bits/dim; first frames vs frames with
  history, true vs shuffled actions.
- ``fvd``: FVD (I3D, :mod:`worldmodel.metrics.fvd` protocol) of the 16-step dream clips vs the real
  clips under the same actions; ``fvd_star`` vs the tokenizer reconstructions of those clips (the
  paper's FVD*); ``fvd_recon`` reconstructions vs real. ``null`` with ``fvd_info.reason`` when it
  cannot be computed (no weights, horizon < 16, too few clips) — FVD never fails the evaluation.
  FVD is biased by the clip count: compare numbers with the same ``n_clips``.
- ``sampling``: dream frames per second of the open-loop rollout (batch of ``n_clips``, prior
  sampling + decoding).
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

from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import write_json
from worldmodel.dynamics_eval import (
    DynamicsReport,
    HeldoutClips,
    evaluate_dynamics_on,
    heldout_episode_ids,
    heldout_nll,
    reconstruct,
    sample_clips,
    teacher_forced_episodes,
)
from worldmodel.metrics.bits import bits_per_dim, bits_per_token
from worldmodel.metrics.image import psnr, ssim
from worldmodel.store import EpisodeStore

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

    def validate(self) -> None:
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes: got {self.n_episodes}, expected >= 1")
        if self.context < 1 or self.horizon < 1:
            raise ValueError(f"context and horizon: got {self.context}, {self.horizon}, expected both >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature: got {self.temperature}, expected >= 0")


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
    return {"precision": precision, "recall": recall, "f1": f1, "true_positives": tp, "n_predicted": n_pred,
            "n_positive": n_true, "n_transitions": int(pred.size)}


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
    return {"psnr": _mean(psnr(recon, clips.frames)), "ssim": _mean(ssim(recon, clips.frames)),
            "n_frames": int(np.prod(clips.frames.shape[:2]))}


def open_loop_section(rep: DynamicsReport, clips: HeldoutClips, context: int) -> dict[str, Any]:
    H = len(rep.steps)
    real_r = clips.rewards[:, context - 1: context - 1 + H]  # rewards of the generated transitions
    ro = rep.rollouts["true"]
    return {
        "steps": rep.steps,
        "psnr": {"model": rep.psnr_true, "shuffled_actions": rep.psnr_shuffled, "copy_last": rep.psnr_copy_last,
                 "ceiling": rep.psnr_ceiling},
        "ssim": {"model": rep.ssim_true, "shuffled_actions": rep.ssim_shuffled, "copy_last": rep.ssim_copy_last,
                 "ceiling": rep.ssim_ceiling},
        "psnr_gain_over_copy_last": [m - c for m, c in zip(rep.psnr_true, rep.psnr_copy_last)],
        "reward_mae": [float(x) for x in np.abs(ro.rewards - real_r).mean(0)],
        "token_entropy": [float(x) for x in ro.entropy.mean(0)],
        "at_horizon": {"step": H, "psnr_model": rep.psnr_true[-1], "psnr_copy_last": rep.psnr_copy_last[-1],
                       "gain_db": rep.psnr_true[-1] - rep.psnr_copy_last[-1],
                       "ssim_model": rep.ssim_true[-1], "ssim_copy_last": rep.ssim_copy_last[-1]},
    }


def choose_episodes(store: EpisodeStore, split: str, n: int) -> tuple[list[str], str, int]:
    """Up to ``n`` held-out episodes, those ending in termination first: (ids, split used, n terminating)."""
    ids, used = heldout_episode_ids(store, split, 2)
    ends = {e: bool(store.read_clip(e, store.length(e) - 2, 2)["terminated"][-1]) for e in ids}
    ordered = sorted(ids, key=lambda e: (not ends[e], e))[:n]
    return ordered, used, sum(ends[e] for e in ordered)


def tuned_termination(wm: WorldModel, store: EpisodeStore, split: str, n: int, p_term: np.ndarray,
                      d_true: np.ndarray) -> dict[str, Any]:
    """Scores on (p_term, d_true) at a threshold chosen on up to ``n`` ``val`` episodes (never the
    evaluated ones): only when the evaluated split is ``test``."""
    if split != "test":
        return {"threshold": None, "reason": f"the report is on the {split!r} split: no separate split to tune on"}
    ids, used, n_term = choose_episodes(store, "val", n)
    if used != "val" or n_term == 0:
        return {"threshold": None, "reason": "no 'val' episode ends in termination"}
    tf = teacher_forced_episodes(wm, store, ids)
    thr = choose_threshold(np.concatenate(tf.term_prob), np.concatenate(tf.terminated))
    return {**binary_scores(p_term > thr, d_true), "threshold": thr, "chosen_on": "val", "n_val_episodes": len(ids),
            "n_val_terminating": n_term}


def heads_sections(wm: WorldModel, store: EpisodeStore, split: str, n: int) -> tuple[dict, dict, dict]:
    """(reward, termination, bits) sections from the prior teacher forced on whole held-out episodes."""
    ids, used, n_term = choose_episodes(store, split, n)
    tf = teacher_forced_episodes(wm, store, ids)
    r_pred, r_true = np.concatenate(tf.reward_pred), np.concatenate(tf.rewards)
    p_term, d_true = np.concatenate(tf.term_prob), np.concatenate(tf.terminated)
    where = {"split": used, "n_episodes": len(tf.episode_ids), "episode_ids": tf.episode_ids}
    reward = {"mae_teacher_forced": _mean(np.abs(r_pred - r_true)),
              "mae_constant_baseline": _mean(np.abs(np.median(r_true) - r_true)),
              "mean_abs_reward": _mean(np.abs(r_true)), **where}
    termination = {**binary_scores(p_term > TERMINATION_THRESHOLD, d_true), "threshold": TERMINATION_THRESHOLD,
                   "n_terminating_episodes": n_term, **where}
    if n_term == 0:
        termination["note"] = "no held-out episode ends in termination: recall is undefined"
    termination["tuned"] = tuned_termination(wm, store, used, n, p_term, d_true)
    bits: dict[str, Any] = {"n_windows": len(tf.token_windows), "window_frames": wm.cfg.prior.frames}
    if tf.token_windows:
        nll = heldout_nll(wm, tf.token_windows)
        h, w = wm.cfg.prior.tokens_h, wm.cfg.prior.tokens_w
        H, W, C = wm.obs_shape
        F = wm.cfg.prior.frames
        bits.update(nll, bits_per_token=bits_per_token(nll["nats_per_token"]),
                    bits_per_dim=bits_per_dim(nll["nats_per_token"], (F, h, w), (F, H, W, C)))
    else:
        bits["note"] = f"no held-out episode has the {wm.cfg.prior.frames} frames of a prior window"
    return reward, termination, bits


def fvd_section(real: np.ndarray, recon: np.ndarray, dream: np.ndarray, *, weights: str | None,
                batch_size: int = 8, device: str | torch.device = "cpu") -> dict[str, Any]:
    """FVD(real, dream), FVD*(recon, dream) and FVD(real, recon) on 16-frame clips; never raises.

    All three sets are uint8 (n, T, H, W, 3) over the same clips; the first 16 frames are used.
    """
    from worldmodel.metrics.fvd import FVD_FRAMES, frechet_distance, get_i3d, i3d_embed, resolve_i3d_weights

    out: dict[str, Any] = {"fvd": None, "fvd_star": None, "fvd_recon": None}
    info: dict[str, Any] = {"n_clips": int(len(dream)), "frames": FVD_FRAMES, "weights": None, "reason": None}
    out["fvd_info"] = info
    if dream.shape[1] < FVD_FRAMES:
        info["reason"] = f"horizon {dream.shape[1]} < {FVD_FRAMES}: FVD needs {FVD_FRAMES}-frame clips (use --horizon 16)"
        return out
    if len(dream) < 2:
        info["reason"] = "FVD needs at least 2 clips per set"
        return out
    try:
        path = resolve_i3d_weights(weights)
        info["weights"] = str(path)
        t0 = time.perf_counter()
        model = get_i3d(path, device)
        emb = {k: i3d_embed(np.ascontiguousarray(v[:, :FVD_FRAMES]), model, batch_size)
               for k, v in (("real", real), ("recon", recon), ("dream", dream))}
        out["fvd"] = frechet_distance(emb["real"], emb["dream"])
        out["fvd_star"] = frechet_distance(emb["recon"], emb["dream"])
        out["fvd_recon"] = frechet_distance(emb["real"], emb["recon"])
        info["seconds"] = time.perf_counter() - t0
    except Exception as e:  # FVD is optional: missing/corrupt weights or a degenerate covariance is recorded, not fatal
        info["reason"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"FVD skipped: {info['reason']}", stacklevel=2)
    return out


# -- plots -------------------------------------------------------------------------------------------
def _save_figure(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
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


def plot_rollouts(clips: HeldoutClips, dream: np.ndarray, context: int, path: Path, max_rows: int = 4) -> Path:
    """Image grid: for up to ``max_rows`` clips, the real frames above the dream (context frames repeated)."""
    from worldmodel.video import grid, save_png, upscale

    factor = max(1, 64 // clips.frames.shape[2])
    rows = []
    for i in range(min(max_rows, len(dream))):
        real = clips.frames[i, : context + dream.shape[1]]
        rows += [upscale(real, factor), upscale(np.concatenate([real[:context], dream[i]]), factor)]
    return save_png(grid(rows), path)


# -- the report ---------------------------------------------------------------------------------------
def evaluate_world_model(wm: WorldModel, store: EpisodeStore, settings: EvalSettings = EvalSettings(), *,
                         plot_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Compute the evaluation report (a JSON-ready dict; see the module docstring) of ``wm`` on ``store``.

    ``plot_dir``: if given, ``eval_open_loop.png`` and ``eval_rollouts.png`` are written there and
    listed under ``plots``.
    """
    settings.validate()
    if wm.action_spec.kind == "none":
        raise ValueError("the bundle models action-free video; evaluate.py needs an action-conditioned bundle")
    t_all = time.perf_counter()
    s = settings
    clips = sample_clips(store, split=s.split, n=s.n_episodes, length=s.context + s.horizon, seed=s.seed)
    t0 = time.perf_counter()
    recon = reconstruct(wm, clips.frames)
    t_recon = time.perf_counter() - t0
    rep = evaluate_dynamics_on(wm, clips, context=s.context, horizon=s.horizon, temperature=s.temperature,
                               seed=s.seed, reconstruction=recon)
    open_loop = open_loop_section(rep, clips, s.context)
    reward, termination, bits = heads_sections(wm, store, s.split, s.n_episodes)
    dream = rep.rollouts["true"]
    reward["mae_open_loop"] = _mean(np.abs(dream.rewards - clips.rewards[:, s.context - 1: s.context - 1 + s.horizon]))
    real_future = clips.frames[:, s.context: s.context + s.horizon]
    if s.fvd:
        fvd = fvd_section(real_future, recon[:, s.context: s.context + s.horizon], dream.frames,
                          weights=s.i3d_weights, batch_size=s.fvd_batch_size, device=wm.device)
    else:
        fvd = {"fvd": None, "fvd_star": None, "fvd_recon": None, "fvd_info": {"reason": "disabled (fvd=False / --no-fvd)"}}
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "store": str(store.root),
        "settings": asdict(s), "split": clips.split, "n_clips": len(clips.episode_ids),
        "clips": [[e, st] for e, st in zip(clips.episode_ids, clips.starts)],
        "reconstruction": {**reconstruction_section(clips, recon), "seconds": t_recon},
        "open_loop": open_loop,
        "reward": reward, "termination": termination, "bits": bits, **fvd,
        "sampling": {"frames_per_s": dream.frames.shape[0] * dream.frames.shape[1] / dream.seconds,
                     "batch_size": int(dream.frames.shape[0]), "seconds": dream.seconds,
                     "temperature": s.temperature, "includes": "context encoding, prior sampling, frame decoding"},
    }
    if plot_dir is not None:
        d = Path(plot_dir)
        d.mkdir(parents=True, exist_ok=True)
        report["plots"] = [plot_open_loop(open_loop, d / "eval_open_loop.png").name,
                           plot_rollouts(clips, dream.frames, s.context, d / "eval_rollouts.png").name]
    report["seconds"] = time.perf_counter() - t_all
    return report


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, store: str | os.PathLike | None = None,
                        out: str | os.PathLike | None = None, settings: EvalSettings = EvalSettings(),
                        device: str = "cpu") -> tuple[dict[str, Any], Path]:
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
