"""Rollout videos for policy debugging.

A :class:`RolloutTrace` records one dream rollout step by step: frames, actions, predicted reward,
termination probability and token entropy, and — in the lockstep modes — the real frames and rewards
too: a recorded real episode's actions replayed from the same context (:func:`lockstep_trace`), or a
policy driving the real game with the dream following its actions (``envs/follow.py``), which adds a
second dream re-synced to the real frames every K steps (:class:`DreamTrack`) and the policy read on
the real and on the dream frames (:class:`PolicyTrack`).
:func:`render_trace` turns it into an mp4 and a gif (panels ``real · dream · |difference|`` with text
overlays and, with a policy, a small bar per action of its probabilities; upscaled with
nearest-neighbour for viewing) and a PNG plot of the per-step traces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from worldmodel.bundle import WorldModel
from worldmodel.metrics.image import psnr
from worldmodel.store import EpisodeStore
from worldmodel.video import annotate, grid, save_figure, upscale, write_video


@dataclass
class DreamTrack:
    """A second dream of the same rollout under the same actions: here, one re-synced to the real frames every
    ``resync_every`` steps (it restarts from the real history, so its error is that of 1..K steps ahead)."""

    frames: (
        np.ndarray
    )  # (T+1, H, W, 3) uint8: frame t is the prediction of real frame t (index 0: the context)
    reward_pred: np.ndarray  # (T,) float32 expected reward (p(term)-weighted)
    term_prob: np.ndarray  # (T,) float32
    entropy: np.ndarray  # (T,) float32, mean token entropy in nats
    resync_every: int  # K >= 1


@dataclass
class PolicyTrack:
    """A policy read on each frame of one stream (real or dream); index t = the frame after t steps, so
    ``choice[t]`` is what the policy would do next on that frame."""

    choice: np.ndarray  # (T+1,) int64 most likely action (the deterministic choice)
    probs: np.ndarray | None = None  # (T+1, n_actions) float32 action probabilities
    value: np.ndarray | None = None  # (T+1,) float32 value estimate (None: the policy has no critic)
    scores: np.ndarray | None = None  # (T+1, n_outputs) float32 linear outputs (a linear controller)


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
    resync: DreamTrack | None = None  # policy lockstep: the dream re-synced every K steps
    policy_real: PolicyTrack | None = (
        None  # policy lockstep: the policy on the real frames (its actions are these)
    )
    policy_dream: PolicyTrack | None = None  # policy lockstep: the policy on the open-loop dream frames
    policy_name: str | None = None

    @property
    def steps(self) -> int:
        return len(self.actions)

    def psnr(self) -> np.ndarray | None:
        """Per-step PSNR (dB) of dream vs real frames (T,), lockstep mode only."""
        return None if self.real is None else psnr(self.dream[1:], self.real[1:])

    def psnr_resync(self) -> np.ndarray | None:
        """Per-step PSNR (dB) of the re-synced dream vs the real frames (T,); None without that track."""
        return (
            None if self.real is None or self.resync is None else psnr(self.resync.frames[1:], self.real[1:])
        )

    def disagreements(self) -> np.ndarray | None:
        """Steps t in 1..T (int64) where the policy's choice on the dream frame differs from its choice on the
        real frame; None without a policy read on both."""
        if self.policy_real is None or self.policy_dream is None:
            return None
        differ = self.policy_real.choice[1:] != self.policy_dream.choice[1:]
        return np.flatnonzero(differ).astype(np.int64) + 1

    def action_label(self, t: int) -> str:
        a = self.actions[t]
        if np.ndim(a) == 0 and self.action_names is not None and 0 <= int(a) < len(self.action_names):
            return self.action_names[int(a)]
        return np.array2string(np.asarray(a), precision=2, separator=",") if np.ndim(a) else str(int(a))


@torch.inference_mode()
def lockstep_trace(
    wm: WorldModel,
    store: EpisodeStore,
    episode_id: str,
    *,
    start: int = 0,
    context: int = 1,
    steps: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> RolloutTrace:
    """Replay a real episode's actions in the dream from the same ``context`` real frames.

    Frames ``[start, start+context)`` are the context; the dream then takes the episode's actions
    for ``steps`` steps (default: to the end of the episode).
    """
    n = store.length(episode_id)
    if not 1 <= context < wm.cfg.prior.frames:
        raise ValueError(f"context: got {context}, expected 1..{wm.cfg.prior.frames - 1}")
    avail = n - start - context
    if start < 0 or avail < 1:
        raise ValueError(
            f"episode {episode_id!r} has {n} frames: no step left after start={start} + context={context}"
        )
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
    return RolloutTrace(
        dream=np.stack(dream),
        actions=acts[context - 1 :],
        reward_pred=np.array(rew, np.float32),
        term_prob=np.array(term, np.float32),
        entropy=np.array(ent, np.float32),
        real=clip["frames"][context - 1 :],
        reward_real=clip["rewards"][context - 1 :].astype(np.float32),
        terminated_real=clip["terminated"][context - 1 :].astype(bool),
        action_names=tuple(names) if names else None,
    )


BAR_BACK, BAR_FILL, BAR_PICK = (
    (48, 48, 48),
    (0, 190, 255),
    (255, 140, 0),
)  # bar colours: back, probability, choice


def prob_bar_boxes(size: int, n: int) -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` (pixels, exclusive ends) of the ``n`` probability bars on a ``size`` × ``size``
    panel: one row per action, right-aligned, stacked upward from just above the bottom sixteenth (where the
    ViZDoom frames draw the health bar). A bar of probability p fills the first ``round(p * (x1 - x0))`` pixels."""
    h = max(2, size // 24)  # bar height: 10 px on a 256-pixel panel
    w = max(8, size // 3)
    x1 = size - 2
    bottom = size - max(1, size // 16) - 2
    return [(x1 - w, bottom - (n - i) * (h + 1), x1, bottom - (n - i) * (h + 1) + h) for i in range(n)]


def draw_prob_bars(panel: np.ndarray, probs: np.ndarray, pick: int | None = None) -> np.ndarray:
    """A copy of ``panel`` uint8 (S, S, 3) with a bar per action of ``probs`` (n,) (see :func:`prob_bar_boxes`);
    action ``pick`` is drawn in the highlight colour; on panels of 192 pixels or more each bar is labelled with
    its action index and probability."""
    out = panel.copy()
    boxes = prob_bar_boxes(out.shape[0], len(probs))
    for i, ((x0, y0, x1, y1), p) in enumerate(zip(boxes, probs)):
        out[y0:y1, x0:x1] = BAR_BACK
        fill = int(round(float(np.clip(p, 0.0, 1.0)) * (x1 - x0)))
        out[y0:y1, x0 : x0 + fill] = BAR_PICK if i == pick else BAR_FILL
    if out.shape[0] >= 192:
        img = Image.fromarray(out)
        draw, font = ImageDraw.Draw(img), ImageFont.load_default()
        for i, ((x0, y0, _, y1), p) in enumerate(zip(boxes, probs)):
            label = f"{i} {float(p):.2f}"
            w = draw.textlength(label, font=font)
            draw.rectangle((x0 - w - 4, y0, x0 - 1, y1 - 1), fill=(0, 0, 0))
            draw.text((x0 - w - 2, y0 - 1), label, fill=(255, 255, 255), font=font)
        out = np.asarray(img)
    return out


def _value_line(track: PolicyTrack, t: int) -> list[str]:
    lines = [f"V={float(track.value[t]):.2f}" if track.value is not None else "V n/a"]
    if track.scores is not None:
        lines.append("s=" + ",".join(f"{float(x):+.2f}" for x in track.scores[t]))
    return lines


def panel_lines(trace: RolloutTrace, t: int) -> dict[str, list[str]]:
    """Text overlays of video frame ``t`` (0 = the context) of a policy-lockstep trace, per panel: ``real``,
    ``dream``, ``diff`` and, with a re-synced track, ``info``, ``resync``, ``resync_diff``."""
    T = trace.steps
    pr, pd = trace.policy_real, trace.policy_dream
    real = [f"real t={t}"]
    if t < T:
        real.append(f"a={trace.action_label(t)}")
    if t >= 1:
        real.append(f"r={trace.reward_real[t - 1]:+.2f}" + (" TERM" if trace.terminated_real[t - 1] else ""))
    if pr is not None:
        real += _value_line(pr, t)
    dream = ["dream open loop"]
    if t >= 1:
        dream += [
            f"r^={trace.reward_pred[t - 1]:+.2f} p(end)={trace.term_prob[t - 1]:.2f}",
            f"H={trace.entropy[t - 1]:.2f}",
        ]
    if pd is not None:
        dream += _value_line(pd, t)
        if pr is not None and pd.choice[t] != pr.choice[t]:
            dream.append(f"choice {pd.choice[t]} != real {pr.choice[t]}")
    out = {
        "real": real,
        "dream": dream,
        "diff": ["|diff|"] + ([f"psnr={float(psnr(trace.dream[t], trace.real[t])):.1f}"] if t >= 1 else []),
    }
    rs = trace.resync
    if rs is not None:
        cum_real = float(trace.reward_real[:t].sum())
        cum_open, cum_rs = float(trace.reward_pred[:t].sum()), float(rs.reward_pred[:t].sum())
        info = [
            f"step {t}/{T}",
            f"sum r real   {cum_real:+.1f}",
            f"sum r^ open  {cum_open:+.1f}",
            f"  optimism   {cum_open - cum_real:+.1f}",
            f"sum r^ resync {cum_rs:+.1f}",
        ]
        if trace.policy_name:
            info.insert(1, f"policy {trace.policy_name}")
        if trace.action_names:
            info += [f"{i} {n}" for i, n in enumerate(trace.action_names)]
        resync = [f"dream resync/{rs.resync_every}"]
        if t >= 1:
            resync += [
                f"r^={rs.reward_pred[t - 1]:+.2f} p(end)={rs.term_prob[t - 1]:.2f}",
                f"H={rs.entropy[t - 1]:.2f}",
            ]
        out.update(
            info=info,
            resync=resync,
            resync_diff=["|diff| resync"]
            + ([f"psnr={float(psnr(rs.frames[t], trace.real[t])):.1f}"] if t >= 1 else []),
        )
    return out


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)


def _follow_frame(trace: RolloutTrace, t: int, scale: int) -> np.ndarray:
    """Video frame ``t`` of a policy-lockstep trace: rows ``real · dream · |diff|`` and (with a re-synced
    track) ``info · dream resync · |diff|``, probability bars on the real and the open-loop dream panel."""
    lines = panel_lines(trace, t)
    T = trace.steps
    r, d = upscale(trace.real[t], scale), upscale(trace.dream[t], scale)
    pr, pd = trace.policy_real, trace.policy_dream
    if pr is not None and pr.probs is not None:  # the bar of the action taken next is highlighted
        r = draw_prob_bars(r, pr.probs[t], int(trace.actions[t]) if t < T else None)
    if pd is not None and pd.probs is not None:  # ... on the dream: the policy's choice there
        d = draw_prob_bars(d, pd.probs[t], int(pd.choice[t]))
    row = [
        annotate(r, lines["real"]),
        annotate(d, lines["dream"]),
        annotate(upscale(_diff(trace.real[t], trace.dream[t]), scale), lines["diff"]),
    ]
    rows = [np.stack(row)]
    rs = trace.resync
    if rs is not None:
        info = annotate(np.zeros_like(r), lines["info"], color=(255, 255, 255))
        rows.append(
            np.stack(
                [
                    info,
                    annotate(upscale(rs.frames[t], scale), lines["resync"]),
                    annotate(upscale(_diff(trace.real[t], rs.frames[t]), scale), lines["resync_diff"]),
                ]
            )
        )
    return grid(rows)


def trace_frames(trace: RolloutTrace, scale: int = 4) -> list[np.ndarray]:
    """Video frames of a trace: ``real · dream · |difference|`` (or the dream alone) with overlays; a
    policy-lockstep trace adds the policy's bars and the re-synced dream's row (:func:`panel_lines`)."""
    if trace.real is not None and (trace.policy_real is not None or trace.resync is not None):
        return [_follow_frame(trace, t, scale) for t in range(trace.steps + 1)]
    frames = []
    for t in range(trace.steps + 1):
        d = upscale(trace.dream[t], scale)
        if t == 0:
            head = ["context"]
        else:
            head = [
                f"t={t} a={trace.action_label(t - 1)}",
                f"r^={trace.reward_pred[t - 1]:.2f}",
                f"p(term)={trace.term_prob[t - 1]:.2f} H={trace.entropy[t - 1]:.2f}",
            ]
        if trace.real is None:
            frames.append(annotate(d, ["dream", *head]))
            continue
        r = upscale(trace.real[t], scale)
        real_lines = (
            ["real"]
            if t == 0
            else [
                "real",
                f"r={trace.reward_real[t - 1]:.2f}" + (" TERM" if trace.terminated_real[t - 1] else ""),
            ]
        )
        diff_lines = (
            ["|diff|"] if t == 0 else ["|diff|", f"psnr={float(psnr(trace.dream[t], trace.real[t])):.1f}"]
        )
        frames.append(
            grid(
                [
                    np.stack(
                        [
                            annotate(r, real_lines),
                            annotate(d, ["dream", *head]),
                            annotate(upscale(_diff(trace.real[t], trace.dream[t]), scale), diff_lines),
                        ]
                    )
                ]
            )
        )
    return frames


def plot_trace(trace: RolloutTrace, path: str | os.PathLike, *, psnr_threshold: float | None = None) -> Path:
    """PNG of the per-step traces: PSNR dream vs real (lockstep; the re-synced dream too, and the
    ``psnr_threshold`` line), predicted vs real reward, termination probability and token entropy and,
    with a policy read on both streams, how far its action distributions on the real and the dream frame
    lie apart (total variation), its value estimates and the steps where its choice differs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(1, trace.steps + 1)
    lockstep = trace.real is not None
    with_policy = trace.disagreements() is not None
    n_ax = 2 + lockstep + with_policy
    fig, axes = plt.subplots(n_ax, 1, figsize=(7, 2.2 * n_ax), sharex=True)
    ax = iter(axes)
    if lockstep:
        a = next(ax)
        a.plot(t, trace.psnr(), label="dream (open loop) vs real")
        if trace.resync is not None:
            a.plot(t, trace.psnr_resync(), label=f"dream re-synced every {trace.resync.resync_every} vs real")
        copy_last = psnr(np.repeat(trace.real[:1], trace.steps, 0), trace.real[1:])
        a.plot(t, copy_last, "--", label="copy context frame")
        if psnr_threshold is not None:
            a.axhline(psnr_threshold, color="r", lw=0.8, ls=":", label=f"threshold {psnr_threshold:g} dB")
        # identical frames score 100 dB (a still first step): keep the axis on the dreams' range
        shown = [trace.psnr()] + ([trace.psnr_resync()] if trace.resync is not None else [])
        a.set_ylim(top=max(float(np.max(shown)), psnr_threshold or 0.0) + 5.0)
        a.set_ylabel("PSNR (dB)")
        a.legend(fontsize=7)
    a = next(ax)
    a.plot(t, trace.reward_pred, label="predicted" + (" (open loop)" if trace.resync is not None else ""))
    if trace.resync is not None:
        a.plot(t, trace.resync.reward_pred, ":", label="predicted (re-synced)")
    if trace.reward_real is not None:
        a.plot(t, trace.reward_real, "--", label="real")
    a.set_ylabel("reward")
    a.legend(fontsize=7)
    a = next(ax)
    a.plot(t, trace.term_prob, label="p(terminated)")
    a.plot(t, trace.entropy / max(float(trace.entropy.max()), 1e-9), ":", label="token entropy (scaled)")
    if trace.terminated_real is not None and trace.terminated_real.any():
        a.axvline(
            int(np.flatnonzero(trace.terminated_real)[0]) + 1, color="k", lw=0.8, label="real termination"
        )
    a.set_ylim(0, 1.05)
    a.legend(fontsize=7)
    if with_policy:
        a = next(ax)
        pr, pd = trace.policy_real, trace.policy_dream
        if pr.probs is not None and pd.probs is not None:
            tv = 0.5 * np.abs(pr.probs[1:] - pd.probs[1:]).sum(1)
            a.plot(t, tv, label="TV(policy on real, on dream)")
        for s in trace.disagreements():
            a.axvline(int(s), color="r", lw=0.6, alpha=0.5)
        a.plot([], [], color="r", lw=0.6, label="choice differs")
        a.set_ylim(0, 1.05)
        a.set_ylabel("policy")
        handles, labels = a.get_legend_handles_labels()
        if pr.value is not None and pd.value is not None:
            v = a.twinx()
            v.plot(t, pr.value[1:], "k--", lw=0.8, label="value on real")
            v.plot(t, pd.value[1:], "g--", lw=0.8, label="value on dream")
            v.set_ylabel("value")
            h2, l2 = v.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        a.legend(handles, labels, fontsize=7)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, path)


def render_trace(
    trace: RolloutTrace,
    out_stem: str | os.PathLike,
    *,
    scale: int = 4,
    fps: float = 8.75,
    gif: bool = True,
    psnr_threshold: float | None = None,
) -> dict[str, Path]:
    """Write ``<out_stem>.mp4`` (+ ``.gif``) and ``<out_stem>.png`` (traces); returns their paths."""
    if scale < 1:
        raise ValueError(f"scale: got {scale}, expected an integer >= 1")
    stem = Path(out_stem)
    frames = trace_frames(trace, scale)
    out = {"mp4": write_video(frames, stem.with_suffix(".mp4"), fps=fps)}
    if gif:
        out["gif"] = write_video(frames, stem.with_suffix(".gif"), fps=fps)
    out["png"] = plot_trace(trace, stem.with_suffix(".png"), psnr_threshold=psnr_threshold)
    return out
