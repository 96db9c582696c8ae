"""Sample videos from a bundle: unconditional, class-conditional, or continuing real context frames.

The paper's video setups (UCF-101, TGIF, BAIR without actions) generate whole clips of
``prior.frames`` latent frames that the tokenizer decodes at once (temporal stride may be > 1).
The first latent frame of an unconditional clip has no context, so it is drawn token by token with
full forwards of a one-frame sequence (:func:`sample_first_frame`); the rest use the KV-cached
:class:`~worldmodel.sampling.Rollout`.
"""

from __future__ import annotations

import numpy as np
import torch

from worldmodel.bundle import WorldModel
from worldmodel.prior import Prior
from worldmodel.sampling import Rollout, sample_logits


@torch.inference_mode()
def sample_first_frame(prior: Prior, B: int, *, class_ids: torch.Tensor | None = None,
                       cond_tokens: torch.Tensor | None = None, temperature: float = 1.0,
                       top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the tokens of a first frame with no context: (B, 1, h, w) int64.

    Each of the h*w tokens costs one forward of the one-frame sequence; later positions of the
    frame are placeholders that causal attention never lets the current position see.
    """
    cfg = prior.cfg
    frame = torch.zeros(B, 1, cfg.tokens_h, cfg.tokens_w, dtype=torch.long, device=next(prior.parameters()).device)
    flat = frame.view(B, -1)
    for j in range(cfg.tokens_h * cfg.tokens_w):
        logits = prior(frame, None, class_ids, cond_tokens).logits[:, 0, j]  # (B, V)
        flat[:, j] = sample_logits(logits, temperature, top_k, generator=generator)[0]
    return frame


@torch.inference_mode()
def sample_videos(wm: WorldModel, n: int, *, class_ids: list[int] | np.ndarray | None = None,
                  context: np.ndarray | None = None, actions: np.ndarray | None = None, frames: int | None = None,
                  temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Sample ``n`` videos; returns uint8 (n, T, H, W, 3).

    Args:
        class_ids: (n,) labels for a class-conditional prior.
        context: uint8 (n, Tc, H, W, 3) real frames to continue (encoded by the tokenizer); None to
            start from nothing (action-free priors only).
        actions: for action-conditioned priors, (n, Tc - 1 + steps[, A]) actions in the data's units:
            those between the context frames, then one per generated latent frame.
        frames: latent frames generated after any conditioning frames (default: the prior's window).
            A frame-conditioned prior (``n_cond_frames``) takes its conditioning frames from the
            first latent frames of ``context``; they are prepended to the output.
    """
    prior, cfg = wm.prior, wm.cfg.prior
    dev = wm.device
    g = torch.Generator(device=dev).manual_seed(seed)
    total = frames or cfg.frames
    cls = None
    if cfg.n_classes:
        if class_ids is None or len(class_ids) != n:
            raise ValueError(f"class_ids: a class-conditional prior needs {n} labels in [0, {cfg.n_classes})")
        cls = torch.as_tensor(np.asarray(class_ids), dtype=torch.long, device=dev)
    elif class_ids is not None:
        raise ValueError("class_ids: this prior is not class-conditional")
    if cfg.action_kind != "none" and (context is None or actions is None):
        raise ValueError("an action-conditioned prior needs context frames and actions")
    cond_tokens = None
    tokens = torch.zeros(n, 0, cfg.tokens_h, cfg.tokens_w, dtype=torch.long, device=dev)  # no context frames yet
    if context is not None:
        ctx = torch.as_tensor(np.asarray(context), device=dev)
        if ctx.ndim != 5 or ctx.shape[0] != n or ctx.dtype != torch.uint8:
            raise ValueError(f"context: got {ctx.dtype}{tuple(ctx.shape)}, expected uint8 ({n}, Tc, H, W, 3)")
        tokens = wm.tokenizer.encode(ctx)  # (n, Tc', h, w)
        if cfg.n_cond_frames:  # the first latent frames condition (cross-attention); the sequence starts after them
            if tokens.shape[1] < cfg.n_cond_frames:
                raise ValueError(f"context: a frame-conditioned prior needs {cfg.n_cond_frames} latent frames of context")
            cond_tokens, tokens = tokens[:, : cfg.n_cond_frames], tokens[:, cfg.n_cond_frames:]
    elif cfg.n_cond_frames:
        raise ValueError(f"context: a frame-conditioned prior needs {cfg.n_cond_frames} latent frames of context")
    if tokens.shape[1] == 0:
        tokens = sample_first_frame(prior, n, class_ids=cls, cond_tokens=cond_tokens, temperature=temperature,
                                    top_k=top_k, generator=g)
    acts = None if actions is None else torch.as_tensor(np.asarray(actions), device=dev)
    Tc = tokens.shape[1]
    if Tc >= total:
        raise ValueError(f"frames: {total} latent frames requested but the context already has {Tc}")
    if acts is not None:
        if acts.shape[0] != n or acts.shape[1] < total - 1:
            raise ValueError(f"actions: got {tuple(acts.shape)}, expected ({n}, {total - 1}[, A]) for {total} latent frames")
        acts = acts.long() if cfg.action_kind == "discrete" else acts.float()
    ro = Rollout(prior, n)
    ro.start(tokens, None if acts is None else acts[:, : Tc - 1], class_ids=cls, cond_tokens=cond_tokens)
    out = [tokens]
    for t in range(Tc, total):
        step = ro.step(None if acts is None else acts[:, t - 1], temperature=temperature, top_k=top_k, generator=g)
        out.append(step.tokens[:, None])
    all_tokens = torch.cat(([] if cond_tokens is None else [cond_tokens]) + out, 1)  # (n, [k +] total, h, w)
    return wm.tokenizer.decode(all_tokens).cpu().numpy()  # (n, total * stride_t, H, W, 3)
