"""Where the dream and the real game part: the numbers of a lockstep :class:`~worldmodel.rollout_video.RolloutTrace`.

:func:`summarize` reduces a lockstep trace to a :class:`RolloutSummary`: per-step PSNR between dream and
real, cumulative predicted vs real reward (**dream optimism**: how much more reward the dream promised than
the game paid along the same actions), the first step whose frame error passes a threshold, and the steps
where the policy's choice on the dream frame differs from its choice on the real frame.
:func:`optimism_figure` draws the cumulative rewards and states the sums it plots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from worldmodel.rollout_video import RolloutTrace

DEFAULT_PSNR_THRESHOLD = 20.0
"""dB. A frame below it counts as "the dream has parted from the real game". On 64×64 ViZDoom frames the
tokenizer's own reconstructions sit near 29 dB and copying the context frame scores 20-23 dB over the first
8 steps (DESIGN §14-15), so below 20 dB a dream frame is no closer to reality than a stale one."""


@dataclass(frozen=True)
class RolloutSummary:
    """Summary of one lockstep rollout of ``steps`` steps. Steps are numbered 1..T (step t produced frame t).

    Rewards are in the env's units; ``predicted_return`` is the sum of the open-loop dream's expected reward
    (termination-probability weighted), ``optimism`` = ``predicted_return`` - ``real_return``."""

    steps: int
    psnr_threshold_db: float
    mean_psnr_db: float
    first_divergence_step: int | None  # first step whose open-loop PSNR < threshold (None: never)
    real_return: float
    predicted_return: float
    optimism: float
    real_terminated_step: int | None  # the step the real episode ended by termination (None: it did not)
    max_term_prob: float
    mean_entropy: float
    # the dream re-synced every K steps (None without that track)
    resync_every: int | None = None
    mean_psnr_resync_db: float | None = None
    first_divergence_step_resync: int | None = None
    predicted_return_resync: float | None = None
    optimism_resync: float | None = None
    # the policy read on the real and on the open-loop dream frames (None without a policy)
    policy: str | None = None
    disagreement_steps: tuple[int, ...] | None = None
    disagreement_rate: float | None = None  # fraction of the T steps
    mean_tv_distance: float | None = None  # mean total variation between its action distributions
    mean_value_real: float | None = None
    mean_value_dream: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["disagreement_steps"] is not None:
            d["disagreement_steps"] = list(d["disagreement_steps"])
        return d


def _first_below(values: np.ndarray, threshold: float) -> int | None:
    below = np.flatnonzero(values < threshold)
    return int(below[0]) + 1 if len(below) else None


def summarize(trace: RolloutTrace, psnr_threshold: float = DEFAULT_PSNR_THRESHOLD) -> RolloutSummary:
    """The :class:`RolloutSummary` of a lockstep trace (one with real frames); ``psnr_threshold`` in dB."""
    if trace.real is None or trace.reward_real is None:
        raise ValueError(
            "trace: a summary compares dream and real; this trace has no real frames (a dream-only rollout)"
        )
    p = trace.psnr()
    real_ret, pred_ret = float(trace.reward_real.sum()), float(trace.reward_pred.sum())
    term = np.flatnonzero(trace.terminated_real) if trace.terminated_real is not None else np.zeros(0, int)
    kw: dict[str, Any] = {}
    if trace.resync is not None:
        pr = trace.psnr_resync()
        kw.update(
            resync_every=trace.resync.resync_every,
            mean_psnr_resync_db=float(pr.mean()),
            first_divergence_step_resync=_first_below(pr, psnr_threshold),
            predicted_return_resync=float(trace.resync.reward_pred.sum()),
            optimism_resync=float(trace.resync.reward_pred.sum()) - real_ret,
        )
    dis = trace.disagreements()
    if dis is not None:
        real, dream = trace.policy_real, trace.policy_dream
        kw.update(
            policy=trace.policy_name,
            disagreement_steps=tuple(int(s) for s in dis),
            disagreement_rate=len(dis) / max(trace.steps, 1),
        )
        if real.probs is not None and dream.probs is not None:
            kw["mean_tv_distance"] = float(0.5 * np.abs(real.probs[1:] - dream.probs[1:]).sum(1).mean())
        if real.value is not None and dream.value is not None:
            kw.update(mean_value_real=float(real.value.mean()), mean_value_dream=float(dream.value.mean()))
    return RolloutSummary(
        steps=trace.steps,
        psnr_threshold_db=float(psnr_threshold),
        mean_psnr_db=float(p.mean()),
        first_divergence_step=_first_below(p, psnr_threshold),
        real_return=real_ret,
        predicted_return=pred_ret,
        optimism=pred_ret - real_ret,
        real_terminated_step=int(term[0]) + 1 if len(term) else None,
        max_term_prob=float(trace.term_prob.max()),
        mean_entropy=float(trace.entropy.mean()),
        **kw,
    )


def optimism_figure(trace: RolloutTrace) -> Any:
    """A matplotlib figure of dream optimism along one lockstep rollout. Top: the cumulative real reward and the
    dream's cumulative predicted reward under the same actions (open loop; re-synced too when the trace has it),
    from 0 at step 0; bottom: their difference (predicted - real). The title states the sums the curves end
    at. The caller saves or logs it (and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if trace.reward_real is None:
        raise ValueError(
            "trace: dream optimism compares predicted with real rewards; this trace has no real rewards"
        )
    t = np.arange(0, trace.steps + 1)
    real = np.concatenate([[0.0], np.cumsum(trace.reward_real, dtype=np.float64)])
    pred = np.concatenate([[0.0], np.cumsum(trace.reward_pred, dtype=np.float64)])
    fig, (top, gap) = plt.subplots(2, 1, figsize=(7, 4.4), sharex=True, height_ratios=(3, 2))
    top.plot(t, real, "k-", label=f"real: {real[-1]:.2f}")
    top.plot(t, pred, "b-", label=f"dream, open loop: {pred[-1]:.2f}")
    gap.plot(t, pred - real, "b-", label="open loop")
    if trace.resync is not None:
        rs = np.concatenate([[0.0], np.cumsum(trace.resync.reward_pred, dtype=np.float64)])
        k = trace.resync.resync_every
        top.plot(t, rs, "c:", label=f"dream, re-synced every {k}: {rs[-1]:.2f}")
        gap.plot(t, rs - real, "c:", label=f"re-synced every {k}")
    gap.axhline(0.0, color="k", lw=0.6)
    top.set_ylabel("cumulative reward")
    gap.set_ylabel("predicted - real")
    gap.set_xlabel("step")
    top.set_title(
        f"dream optimism {pred[-1] - real[-1]:+.2f} = predicted {pred[-1]:.2f} - real {real[-1]:.2f} "
        f"over {trace.steps} steps",
        fontsize=9,
    )
    top.legend(fontsize=7)
    gap.legend(fontsize=7)
    fig.tight_layout()
    return fig
