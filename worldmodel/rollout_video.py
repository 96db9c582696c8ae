"""Rollout videos for policy debugging.

A :class:`RolloutTrace` records one dream rollout step by step: frames, actions, predicted reward,
termination probability and token entropy, and — in **lockstep** mode, where a recorded real
episode's actions are replayed from the same context — the real frames and rewards too.
:func:`render_trace` turns it into an mp4 and a gif (panels ``real · dream · |difference|`` with text
overlays, upscaled with nearest-neighbour for viewing) and a PNG plot of per-step PSNR and rewards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodel.bundle import WorldModel
from worldmodel.metrics.image import psnr
from worldmodel.store import EpisodeStore
from worldmodel.video import annotate, grid, upscale, write_video


@dataclass
class RolloutTrace:
    """One rollout; T steps after a context whose last frame is index 0 of the frame arrays."""

    dream: np.ndarray  # (T+1, H, W, 3) uint8: last context frame, then the generated frames
    actions: np.ndarray  # (T,) or (T, A)
    reward_pred: np.ndarray  # (T,) float32: a dream env's reward (that of the outcome it drew); lockstep (no
    #                          termination is drawn, the real episode sets the length): the expected reward
    term_prob: np.ndarray  # (T,) float32
    entropy: np.ndarray  # (T,) float32, mean token entropy in nats
    real: np.ndarray | None = None  # (T+1, H, W, 3) uint8 in lockstep mode
    reward_real: np.ndarray | None = None  # (T,)
    terminated_real: np.ndarray | None = None  # (T,) bool
    action_names: tuple[str, ...] | None = None

    @property
    def steps(self) -> int:
        return len(self.actions)

    def psnr(self) -> np.ndarray | None:
        """Per-step PSNR (dB) of dream vs real frames (T,), lockstep mode only."""
        return None if self.real is None else psnr(self.dream[1:], self.real[1:])

    def action_label(self, t: int) -> str:
        a = self.actions[t]
        if np.ndim(a) == 0 and self.action_names is not None and 0 <= int(a) < len(self.action_names):
            return self.action_names[int(a)]
        return np.array2string(np.asarray(a), precision=2, separator=",") if np.ndim(a) else str(int(a))


@torch.inference_mode()
def lockstep_trace(wm: WorldModel, store: EpisodeStore, episode_id: str, *, start: int = 0, context: int = 1,
                   steps: int | None = None, temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> RolloutTrace:
    """Replay a real episode's actions in the dream from the same ``context`` real frames.

    Frames ``[start, start+context)`` are the context; the dream then takes the episode's actions
    for ``steps`` steps (default: to the end of the episode).
    """
    n = store.length(episode_id)
    if not 1 <= context < wm.cfg.prior.frames:
        raise ValueError(f"context: got {context}, expected 1..{wm.cfg.prior.frames - 1}")
    avail = n - start - context
    if start < 0 or avail < 1:
        raise ValueError(f"episode {episode_id!r} has {n} frames: no step left after start={start} + context={context}")
    steps = avail if steps is None else min(steps, avail)
    clip = store.read_clip(episode_id, start, context + steps)
    acts = clip.get("actions")
    if acts is None:
        raise ValueError("lockstep rollouts need an action-conditioned store")
    ro = wm.rollout(1)
    ro.reset(clip["frames"][None, :context], acts[None, : context - 1] if context > 1 else None)
    g = torch.Generator(device=wm.device).manual_seed(seed)
    dream = [clip["frames"][context - 1]]
    rew, term, ent = [], [], []
    for t in range(steps):
        out = ro.step(acts[None, context - 1 + t], temperature=temperature, top_k=top_k, generator=g)
        dream.append(out.frames[0])
        rew.append(out.expected_rewards[0])  # p(term)-weighted: this replay never draws a termination
        term.append(out.terminated_prob[0])
        ent.append(out.entropy[0])
    names = wm.action_spec.names
    return RolloutTrace(dream=np.stack(dream), actions=acts[context - 1:], reward_pred=np.array(rew, np.float32),
                        term_prob=np.array(term, np.float32), entropy=np.array(ent, np.float32),
                        real=clip["frames"][context - 1:], reward_real=clip["rewards"][context - 1:].astype(np.float32),
                        terminated_real=clip["terminated"][context - 1:].astype(bool),
                        action_names=tuple(names) if names else None)


def trace_frames(trace: RolloutTrace, scale: int = 4) -> list[np.ndarray]:
    """Video frames of a trace: ``real · dream · |difference|`` (or the dream alone) with overlays."""
    frames = []
    for t in range(trace.steps + 1):
        d = upscale(trace.dream[t], scale)
        if t == 0:
            head = ["context"]
        else:
            head = [f"t={t} a={trace.action_label(t - 1)}", f"r^={trace.reward_pred[t - 1]:.2f}",
                    f"p(term)={trace.term_prob[t - 1]:.2f} H={trace.entropy[t - 1]:.2f}"]
        if trace.real is None:
            frames.append(annotate(d, ["dream", *head]))
            continue
        r = upscale(trace.real[t], scale)
        diff = np.abs(trace.real[t].astype(np.int16) - trace.dream[t].astype(np.int16)).astype(np.uint8)
        real_lines = ["real"] if t == 0 else ["real", f"r={trace.reward_real[t - 1]:.2f}"
                                              + (" TERM" if trace.terminated_real[t - 1] else "")]
        diff_lines = ["|diff|"] if t == 0 else ["|diff|", f"psnr={float(psnr(trace.dream[t], trace.real[t])):.1f}"]
        frames.append(grid([np.stack([annotate(r, real_lines), annotate(d, ["dream", *head]),
                                      annotate(upscale(diff, scale), diff_lines)])]))
    return frames


def plot_trace(trace: RolloutTrace, path: str | os.PathLike) -> Path:
    """PNG of per-step PSNR (lockstep) and predicted vs real reward and termination probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    t = np.arange(1, trace.steps + 1)
    n_ax = 3 if trace.real is not None else 2
    fig, axes = plt.subplots(n_ax, 1, figsize=(7, 2.2 * n_ax), sharex=True)
    ax = iter(axes)
    if trace.real is not None:
        a = next(ax)
        a.plot(t, trace.psnr(), label="dream vs real")
        copy_last = psnr(np.repeat(trace.real[:1], trace.steps, 0), trace.real[1:])
        a.plot(t, copy_last, "--", label="copy context frame")
        a.set_ylabel("PSNR (dB)")
        a.legend(fontsize=7)
    a = next(ax)
    a.plot(t, trace.reward_pred, label="predicted")
    if trace.reward_real is not None:
        a.plot(t, trace.reward_real, "--", label="real")
    a.set_ylabel("reward")
    a.legend(fontsize=7)
    a = next(ax)
    a.plot(t, trace.term_prob, label="p(terminated)")
    a.plot(t, trace.entropy / max(float(trace.entropy.max()), 1e-9), ":", label="token entropy (scaled)")
    if trace.terminated_real is not None and trace.terminated_real.any():
        a.axvline(int(np.flatnonzero(trace.terminated_real)[0]) + 1, color="k", lw=0.8, label="real termination")
    a.set_ylim(0, 1.05)
    a.set_xlabel("step")
    a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def render_trace(trace: RolloutTrace, out_stem: str | os.PathLike, *, scale: int = 4, fps: float = 8.75,
                 gif: bool = True) -> dict[str, Path]:
    """Write ``<out_stem>.mp4`` (+ ``.gif``) and ``<out_stem>.png`` (traces); returns their paths."""
    if scale < 1:
        raise ValueError(f"scale: got {scale}, expected an integer >= 1")
    stem = Path(out_stem)
    frames = trace_frames(trace, scale)
    out = {"mp4": write_video(frames, stem.with_suffix(".mp4"), fps=fps)}
    if gif:
        out["gif"] = write_video(frames, stem.with_suffix(".gif"), fps=fps)
    out["png"] = plot_trace(trace, stem.with_suffix(".png"))
    return out
