"""The prior's heads and its training objective: what is read from the network's hidden states, and how
it is scored.

Heads (an MLP each on one position's hidden state, see :mod:`worldmodel.prior` for which position):
the token head is the prior's ``head`` (a Linear to the vocabulary); the reward head regresses
symlog(reward) with one output, or two with ``reward_given_termination`` (the reward if the
transition did not end the episode, and if it did); the termination head gives one logit (BCE). The
heads are built here and owned by :class:`~worldmodel.prior.Prior` (their ``state_dict`` keys,
``reward_head.*`` / ``term_head.*``, are a bundle contract).

:func:`prior_loss` is ``Prior.compute_loss``: token cross-entropy, the MaskGIT stream's cross-entropy,
the reward and termination losses, with their metrics.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
    from worldmodel.prior import Prior, PriorOutput


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``keep`` (bool, broadcast to ``x``) is True; 0 when none is."""
    w = keep.expand_as(x).to(x.dtype)
    return (x * w).sum() / w.sum().clamp(min=1)


def reward_head(n_embd: int, two_outputs: bool) -> nn.Sequential:
    """Symlog reward(s) of a transition from a hidden state (..., C) -> (..., 1 or 2): [if not terminated,
    if terminated] with ``two_outputs`` (``PriorConfig.reward_given_termination``), else one for both."""
    return nn.Sequential(nn.Linear(n_embd, n_embd), nn.GELU(), nn.Linear(n_embd, 2 if two_outputs else 1))


def termination_head(n_embd: int) -> nn.Sequential:
    """Termination logit of a transition from a hidden state (..., C) -> (..., 1)."""
    return nn.Sequential(nn.Linear(n_embd, n_embd), nn.GELU(), nn.Linear(n_embd, 1))


def sample_maskgit_mask(
    B: int,
    T: int,
    tokens_h: int,
    tokens_w: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MaskGIT training masks (B, T, h, w) bool: per frame a ratio r = cos(pi/2 * u), u ~ U(0, 1), of
    its tokens (at least one) is hidden, at random positions (MaskGIT's cosine schedule)."""
    hw = tokens_h * tokens_w
    u = torch.rand(B, T, 1, generator=generator, device=device)
    n = (torch.cos(math.pi / 2 * u) * hw).ceil().clamp(min=1)  # (B, T, 1) tokens to hide
    rank = torch.rand(B, T, hw, generator=generator, device=device).argsort(-1).argsort(-1)  # random order
    return rearrange(rank < n, "b t (h w) -> b t h w", h=tokens_h)


def prior_loss(prior: Prior, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Token cross-entropy + weighted reward (symlog MSE) and termination (BCE) losses.

    ``batch``: tokens (B, T, h, w), actions (B, T-1[, A]), rewards (B, T-1), terminated (B, T-1),
    optional class_ids (B,), valid (B, T) bool: False on padding frames after an episode's end
    (no loss there; the model is causal, so padding never changes the predictions before it), and
    termination_only (B,) bool: windows that train only the termination head (no token or reward
    loss; on HGS, scoring the death penalty of every padded window again cost 0.2 nats per token).
    Training windows that run past the end put an episode's last transition on every window
    position, not only the last (``worldmodel.stages.EndPaddedClips``); without them the heads learn
    that nothing ever ends before the last position, where the dream's sliding window rarely reads.

    Reward head: regression on symlog(reward). HGS rewards are +4 per step and −100 on death;
    symlog compresses that range so the rare large penalty neither dominates the loss nor is
    ignored, and is simpler than two-hot bins for one scalar per frame. With
    ``reward_given_termination`` the head's two outputs are scored on disjoint transitions: the
    "not terminated" output's symlog MSE averaged over the scored non-terminal transitions plus the
    "terminated" output's averaged over the scored terminal ones (0 in a batch without any), so the
    rare terminal reward is learned at the rate of the common one instead of ~1/120 of it (HGS).
    Metrics: ``reward_loss`` is the reward term of the loss (before ``reward_weight``),
    ``reward_mae`` the MAE of the output matching the true termination over all scored transitions,
    ``reward_loss_terminal`` / ``reward_mae_terminal`` the terminal output's on terminal transitions
    (the MAE only in batches that hold one).
    """
    cfg = prior.cfg
    tokens = batch["tokens"]
    # a store's actions / labels are ignored by a prior configured without them (DataConfig.use_actions)
    actions = batch.get("actions") if cfg.action_kind != "none" else None
    if cfg.action_cond == "clip":  # the whole clip's pixel-rate actions (the token cache's ``clip_actions``)
        if "clip_actions" not in batch:
            raise ValueError(
                "batch: prior.action_cond='clip' needs 'clip_actions' (the clip's pixel-rate actions); re-encode "
                "the token cache with this config (python experiments/train.py --stage encode)"
            )
        actions = batch["clip_actions"]
    # frame conditioning on tokens: the clip's first k latent frames condition, the rest are modelled; on pixels
    # (cond_pixels) the cache's ``cond_frames`` condition and every latent frame is modelled
    k = 0 if cfg.cond_pixels else cfg.n_cond_frames
    cond_tokens = tokens[:, :k] if k else None
    cond_frames = batch.get("cond_frames") if cfg.cond_pixels else None
    if cfg.cond_pixels and cond_frames is None:
        raise ValueError(
            "batch: prior.cond_pixels needs 'cond_frames' (the conditioning pixel frames); re-encode the token "
            "cache with this config (python experiments/train.py --stage encode)"
        )
    if k:
        tokens = tokens[:, k:]
        actions = None if actions is None else actions[:, k:]
        batch = {
            **batch,
            **{n: batch[n][:, k:] for n in ("rewards", "terminated", "valid", "object_tokens") if n in batch},
        }
    B, T = tokens.shape[:2]
    mask = frames = None
    if prior.maskgit:  # the masked stream runs on a random quarter of the frames (it costs ~2.6x when on all)
        mask = sample_maskgit_mask(B, T, cfg.tokens_h, cfg.tokens_w, prior.pos_t.device)
        frames = torch.randperm(T, device=tokens.device)[: max(1, T // 4)].sort().values
    inputs = tokens
    if prior.training and cfg.context_noise > 0:  # corrupt inputs only; the targets below stay clean
        noisy = torch.rand(tokens.shape, device=tokens.device) < cfg.context_noise
        inputs = torch.where(noisy, torch.randint_like(tokens, cfg.vocab_size), tokens)
    out = prior(
        inputs,
        actions,
        batch.get("class_ids") if prior.class_emb is not None else None,
        cond_tokens,
        mask,
        frames,
        cond_frames=cond_frames,
    )
    valid = batch.get("valid")
    valid = (
        torch.ones(B, T, dtype=torch.bool, device=tokens.device) if valid is None else valid.bool()
    )  # (B, T)
    tok_valid = valid  # (B, T) frames whose tokens (and rewards) are scored
    if "termination_only" in batch:  # windows that train the termination head only (end-padded windows)
        tok_valid = valid & ~batch["termination_only"].bool().view(B, 1)
    loss, metrics = _token_loss(prior, out, tokens, tok_valid, mask, frames, batch.get("object_tokens"))
    if T > 1:
        tv, rv = (
            valid[:, 1:],
            tok_valid[:, 1:],
        )  # (B, T-1) transitions into a real frame; those scored for reward
        if "rewards" in batch:
            loss = loss + cfg.reward_weight * _reward_loss(prior, out, batch, rv, metrics)
        if "terminated" in batch:
            loss = loss + cfg.termination_weight * _termination_loss(prior, out, batch, tv, metrics)
    return loss, metrics


def _token_loss(
    prior: Prior,
    out: PriorOutput,
    tokens: torch.Tensor,
    tok_valid: torch.Tensor,
    mask: torch.Tensor | None,
    frames: torch.Tensor | None,
    object_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token cross-entropy over the scored frames ``tok_valid`` (B, T) (+ MaskGIT's over the hidden tokens of
    ``frames``; + ``object_weight`` x the mean over the tokens ``object_tokens`` (B, T, h, w) marks as objects):
    the loss and the first metrics."""
    B, T = tokens.shape[:2]
    target = rearrange(tokens.long(), "b t h w -> b t (h w)")
    ce = F.cross_entropy(
        rearrange(out.logits, "b t n v -> (b t n) v").float(), target.flatten(), reduction="none"
    ).view(B, T, -1)
    token_loss = masked_mean(ce, tok_valid[..., None])
    loss = token_loss
    metrics = {
        "nats_per_token": token_loss.item(),
        "bits_per_token": token_loss.item() / math.log(2),
        "nats_first_frame": masked_mean(ce[:, 0], tok_valid[:, :1]).item(),
    }
    cfg = prior.cfg
    if cfg.object_weight > 0 or cfg.object_aux_weight > 0:
        if object_tokens is None:
            raise ValueError(
                "prior.object_weight / object_aux_weight > 0 need batch['object_tokens'] (B, T, h, w): a token "
                "cache encoded from a store collected with object masks (train.py --config.collect-object-masks)"
            )
        obj = rearrange(object_tokens.bool(), "b t h w -> b t (h w)")
        obj_loss = masked_mean(ce, obj & tok_valid[..., None])  # 0 when no token holds an object
        metrics["object_nats"] = obj_loss.item()
        if cfg.object_weight > 0:
            loss = loss + cfg.object_weight * obj_loss
        if cfg.object_aux_weight > 0:
            bce = F.binary_cross_entropy_with_logits(out.object_logits.float(), obj.float(), reduction="none")
            aux = masked_mean(bce, tok_valid[..., None])
            loss = loss + cfg.object_aux_weight * aux
            metrics["object_aux_bce"] = aux.item()
    if mask is not None:  # MaskGIT objective: cross-entropy of the hidden tokens only
        m = rearrange(mask[:, frames], "b t h w -> b t (h w)") & tok_valid[:, frames, None]
        ce_m = F.cross_entropy(
            rearrange(out.mask_logits, "b t n v -> b v t n").float(), target[:, frames], reduction="none"
        )
        mg_loss = masked_mean(ce_m, m)
        loss = loss + prior.cfg.maskgit_weight * mg_loss
        metrics["maskgit_nats"] = mg_loss.item()
    if T > 1:
        metrics["nats_with_history"] = masked_mean(ce[:, 1:], tok_valid[:, 1:, None]).item()
    return loss, metrics


def _reward_loss(
    prior: Prior,
    out: PriorOutput,
    batch: dict[str, torch.Tensor],
    rv: torch.Tensor,
    metrics: dict[str, float],
) -> torch.Tensor:
    """Symlog MSE of the reward head on the scored transitions ``rv`` (B, T-1) (see :func:`prior_loss`);
    adds its metrics to ``metrics``."""
    T = out.reward.shape[1]
    r = batch["rewards"][:, : T - 1].float()
    pred = out.reward[:, 1:].float()  # (B, T-1) symlog reward if not terminated
    if prior.cfg.reward_given_termination:
        if "terminated" not in batch:
            raise ValueError(
                "batch: prior.reward_given_termination needs 'terminated' (B, T-1) with 'rewards'"
            )
        d = batch["terminated"][:, : T - 1].bool()
        pred_t = out.reward_if_terminated[:, 1:].float()
        # each output on the transitions of its kind, each a mean over its own (0 when there are none)
        r_loss_t = masked_mean((pred_t - symlog(r)) ** 2, rv & d)
        r_loss = masked_mean((pred - symlog(r)) ** 2, rv & ~d) + r_loss_t
        pred = torch.where(d, pred_t, pred)  # the output matching the true termination
        metrics["reward_loss_terminal"] = r_loss_t.item()
        if bool((rv & d).any()):  # absent, not 0, from batches without a scored terminal transition
            metrics["reward_mae_terminal"] = masked_mean((symexp(pred.detach()) - r).abs(), rv & d).item()
    else:
        r_loss = masked_mean((pred - symlog(r)) ** 2, rv)
    metrics["reward_loss"] = r_loss.item()
    metrics["reward_mae"] = masked_mean((symexp(pred.detach()) - r).abs(), rv).item()
    return r_loss


def _termination_loss(
    prior: Prior,
    out: PriorOutput,
    batch: dict[str, torch.Tensor],
    tv: torch.Tensor,
    metrics: dict[str, float],
) -> torch.Tensor:
    """BCE of the termination head on the transitions into real frames ``tv`` (B, T-1); adds its metrics."""
    T = out.term_logit.shape[1]
    d = batch["terminated"][:, : T - 1].float()
    logit = out.term_logit[:, 1:].float()
    pw = torch.tensor(prior.cfg.termination_pos_weight, device=logit.device)  # 1 = calibrated BCE
    t_loss = masked_mean(F.binary_cross_entropy_with_logits(logit, d, pos_weight=pw, reduction="none"), tv)
    metrics["termination_loss"] = t_loss.item()
    metrics["termination_accuracy"] = masked_mean(((logit.detach() > 0).float() == d).float(), tv).item()
    return t_loss
