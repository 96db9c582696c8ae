"""Generation from an empty window (video sampling from scratch) matches full teacher-forced forwards."""

from __future__ import annotations

import pytest
import torch

from worldmodel.config import PriorConfig
from worldmodel.prior import Prior
from worldmodel.sampling import Rollout


def _prior(**kw) -> Prior:
    cfg = PriorConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        attn_dropout=0.0,
        vocab_size=16,
        frames=3,
        tokens_h=3,
        tokens_w=3,
        **kw,
    )
    torch.manual_seed(0)
    prior = Prior(cfg).eval()
    with (
        torch.no_grad()
    ):  # away from the zero-initialised head / conditional LayerNorms, so every input matters
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return prior


@torch.inference_mode()
def _greedy_reference(prior: Prior, tokens: torch.Tensor, actions, cls, cond) -> torch.Tensor:
    """The next frame after ``tokens`` (B, Tc >= 0, h, w) by greedy decoding with one full forward per token."""
    B, Tc, h, w = tokens.shape
    frame = torch.zeros(B, 1, h, w, dtype=torch.long)
    for j in range(h * w):
        logits = prior(torch.cat([tokens, frame], 1), actions, cls, cond).logits[:, Tc, j]
        frame.view(B, -1)[:, j] = logits.argmax(-1)
    return frame


CASES = {
    "class_prev_frame": dict(action_kind="none", n_classes=5, prev_frame_kernel=3),
    "frame_conditioned": dict(action_kind="none", n_cond_frames=1, prev_frame_kernel=0),
    "unconditional_token": dict(action_kind="none", action_cond="token", prev_frame_kernel=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frames_from_an_empty_window_match_uncached_forwards(case, one_thread):
    prior = _prior(**CASES[case])
    B, cfg = 2, prior.cfg
    cls = torch.tensor([1, 4]) if cfg.n_classes else None
    cond = (
        torch.randint(0, cfg.vocab_size, (B, 1, 3, 3), generator=torch.Generator().manual_seed(1))
        if cfg.n_cond_frames
        else None
    )
    ro = Rollout(prior, B)
    ro.start(torch.zeros(B, 0, 3, 3, dtype=torch.long), class_ids=cls, cond_tokens=cond)
    tokens = window = torch.zeros(B, 0, 3, 3, dtype=torch.long)
    for _ in range(cfg.frames + 1):  # the last step slides the window (re-encoded from its start condition)
        got = ro.step(None, temperature=0.0).tokens[:, None]
        if window.shape[1] == cfg.frames:
            window = window[:, -ro.keep :]
        assert torch.equal(got, _greedy_reference(prior, window, None, cls, cond)), window.shape
        tokens, window = torch.cat([tokens, got], 1), torch.cat([window, got], 1)
    if cls is not None:  # the label changes the first frame
        ro2 = Rollout(prior, B)
        ro2.start(torch.zeros(B, 0, 3, 3, dtype=torch.long), class_ids=torch.tensor([0, 2]))
        assert not torch.equal(ro2.step(None, temperature=0.0).tokens, tokens[:, 0])


def test_rows_started_empty_and_with_context_share_a_batch_with_actions(one_thread):
    prior = _prior(action_kind="continuous", action_dim=2, prev_frame_kernel=3)
    ctx = torch.randint(0, 16, (1, 2, 3, 3), generator=torch.Generator().manual_seed(2))
    acts = torch.randn(1, 1, 2, generator=torch.Generator().manual_seed(3))
    nxt = torch.randn(2, 2, generator=torch.Generator().manual_seed(4))
    ro = Rollout(prior, 2)
    ro.start(torch.zeros(1, 0, 3, 3, dtype=torch.long), rows=[0])
    ro.start(ctx, acts, rows=[1])
    got = ro.step(nxt, temperature=0.0).tokens
    # row 0: block 0 from the start vector (its action is unused); row 1: after its context, under its action
    assert torch.equal(
        got[0], _greedy_reference(prior, ctx[:0].new_zeros(1, 0, 3, 3), None, None, None)[0, 0]
    )
    assert torch.equal(
        got[1], _greedy_reference(prior, ctx, torch.cat([acts, nxt[1:, None]], 1), None, None)[0, 0]
    )
    with pytest.raises(ValueError, match="class_ids"):
        Rollout(_prior(n_classes=3, action_kind="none"), 1).start(torch.zeros(1, 0, 3, 3, dtype=torch.long))
