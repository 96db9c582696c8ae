"""Sample videos from a bundle: unconditional, class-conditional, or continuing real context frames.

The paper's video setups (UCF-101, TGIF, BAIR without actions) generate whole clips of
``prior.frames`` latent frames that the tokenizer decodes at once (temporal stride may be > 1).
Every frame is drawn with the KV-cached :class:`~worldmodel.sampling.Rollout`; a clip without real
context starts from an empty window, whose first frame is conditioned on the prior's start vector
(+ class label, + conditioning frames) exactly like block 0 of a training clip.
"""

from __future__ import annotations

import numpy as np
import torch

from worldmodel.bundle import WorldModel
from worldmodel.config import PriorConfig
from worldmodel.sampling import Rollout


@torch.inference_mode()
def sample_videos(
    wm: WorldModel,
    n: int,
    *,
    class_ids: list[int] | np.ndarray | None = None,
    context: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    frames: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sample ``n`` videos; returns uint8 (n, T, H, W, 3).

    Args:
        class_ids: (n,) labels for a class-conditional prior.
        context: uint8 (n, Tc, H, W, 3) real frames to continue (encoded by the tokenizer); None to
            start from nothing (action-free or whole-clip action-conditioned priors only).
        actions: for action-conditioned priors, (n, Tc - 1 + steps[, A]) actions in the data's units:
            those between the context frames, then one per generated latent frame; for a whole-clip
            conditioned prior (``action_cond="clip"``) the clip's (n, clip_actions[, A]) pixel-rate actions.
        frames: latent frames generated after any conditioning frames (default: the prior's window).
            A token frame-conditioned prior (``n_cond_frames``) takes its conditioning frames from the
            first latent frames of ``context``; they are prepended to the output. A pixel frame-conditioned
            one (``cond_pixels``) takes the first ``n_cond_frames`` pixel frames of ``context`` and generates
            every latent frame of the clip from them (the paper's BAIR protocol).
    """
    prior, cfg = wm.prior, wm.cfg.prior
    dev = wm.device
    g = torch.Generator(device=dev).manual_seed(seed)
    total = frames or cfg.frames
    tok_cfg = wm.cfg.tokenizer
    k_tok = 0 if cfg.cond_pixels else cfg.n_cond_frames  # conditioning latent frames prepended to the output
    n_out = (k_tok + total) * tok_cfg.stride[0]
    if (
        not tok_cfg.causal_time and n_out > tok_cfg.max_frames
    ):  # decoded as one clip with learned time positions
        raise ValueError(
            f"frames: {k_tok} + {total} latent frames decode to {n_out} frames, more than "
            f"the tokenizer's max_frames={tok_cfg.max_frames}; ask for at most "
            f"{tok_cfg.max_frames // tok_cfg.stride[0] - k_tok}"
        )
    cls = None
    if cfg.n_classes:
        if class_ids is None or len(class_ids) != n:
            raise ValueError(f"class_ids: a class-conditional prior needs {n} labels in [0, {cfg.n_classes})")
        cls = torch.as_tensor(np.asarray(class_ids), dtype=torch.long, device=dev)
    elif class_ids is not None:
        raise ValueError("class_ids: this prior is not class-conditional")
    clip = cfg.action_cond == "clip" and cfg.action_kind != "none"
    if cfg.action_kind != "none" and (actions is None or (context is None and not clip)):
        raise ValueError("an action-conditioned prior needs context frames and actions")
    cond_tokens = cond_frames = None
    tokens = torch.zeros(
        n, 0, cfg.tokens_h, cfg.tokens_w, dtype=torch.long, device=dev
    )  # no context frames yet
    if context is not None:
        ctx = torch.as_tensor(np.asarray(context), device=dev)
        if ctx.ndim != 5 or ctx.shape[0] != n or ctx.dtype != torch.uint8:
            raise ValueError(f"context: got {ctx.dtype}{tuple(ctx.shape)}, expected uint8 ({n}, Tc, H, W, 3)")
        if (
            cfg.cond_pixels
        ):  # the first pixel frames condition (ResNet + cross-attention); every latent frame is drawn
            if ctx.shape[1] < cfg.n_cond_frames:
                raise ValueError(
                    f"context: a pixel frame-conditioned prior needs {cfg.n_cond_frames} pixel frames of context"
                )
            cond_frames, ctx = ctx[:, : cfg.n_cond_frames], ctx[:, :0]
        tokens = wm.tokenizer.encode(ctx) if ctx.shape[1] else tokens  # (n, Tc', h, w)
        if k_tok:  # the first latent frames condition (cross-attention); the sequence starts after them
            if tokens.shape[1] < cfg.n_cond_frames:
                raise ValueError(
                    f"context: a frame-conditioned prior needs {cfg.n_cond_frames} latent frames of context"
                )
            cond_tokens, tokens = tokens[:, : cfg.n_cond_frames], tokens[:, cfg.n_cond_frames :]
    elif cfg.n_cond_frames:
        raise ValueError(
            f"context: a frame-conditioned prior needs {cfg.n_cond_frames} latent frames of context"
        )
    acts = None if actions is None else torch.as_tensor(np.asarray(actions), device=dev)
    Tc = tokens.shape[1]
    if Tc >= total:
        raise ValueError(f"frames: {total} latent frames requested but the context already has {Tc}")
    acts = _checked_actions(acts, cfg, n, total, clip)
    ro = Rollout(prior, n)
    ctx_acts = acts if clip or acts is None else acts[:, : max(Tc - 1, 0)]
    ro.start(tokens, ctx_acts, class_ids=cls, cond_tokens=cond_tokens, cond_frames=cond_frames)
    out = [tokens]
    for t in range(
        Tc, total
    ):  # t = 0 only without context: an action-free (or whole-clip conditioned) first frame
        step_act = None if acts is None or clip else acts[:, t - 1]
        step = ro.step(step_act, temperature=temperature, top_k=top_k, generator=g)
        out.append(step.tokens[:, None])
    all_tokens = torch.cat(([] if cond_tokens is None else [cond_tokens]) + out, 1)  # (n, [k +] total, h, w)
    return wm.tokenizer.decode(all_tokens).cpu().numpy()  # (n, total * stride_t, H, W, 3)


def _checked_actions(
    acts: torch.Tensor | None, cfg: PriorConfig, n: int, total: int, clip: bool
) -> torch.Tensor | None:
    """``acts`` as the prior's action dtype after checking their shape: the whole clip's (n, clip_actions[, A]) for a
    whole-clip conditioned prior, else at least one per generated latent frame."""
    if acts is not None and clip:
        if acts.shape[0] != n or acts.shape[1] != cfg.clip_actions:
            raise ValueError(
                f"actions: got {tuple(acts.shape)}, expected ({n}, {cfg.clip_actions}[, A]): the whole clip's "
                "pixel-rate actions (action_cond='clip')"
            )
        acts = acts.long() if cfg.action_kind == "discrete" else acts.float()
    elif acts is not None:
        if acts.shape[0] != n or acts.shape[1] < total - 1:
            raise ValueError(
                f"actions: got {tuple(acts.shape)}, expected ({n}, {total - 1}[, A]) for {total} latent frames"
            )
        acts = acts.long() if cfg.action_kind == "discrete" else acts.float()
    return acts
