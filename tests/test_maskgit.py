"""MaskGIT stream of the prior: no leakage in training, cached decoding equal to the full forward,
a cache left exactly as token-by-token decoding leaves it, learning, and clear errors."""

from __future__ import annotations

import math
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from tests.conftest import make_bundle, tiny_experiment
from tests.test_prior import CFG, _random_term_head, clip, randomized, symexp_
from worldmodel.prior import Prior
from worldmodel.sampling import Rollout, generate_uncached

MG = replace(CFG, maskgit_weight=1.0, tokens_h=2, tokens_w=4)


def test_masked_stream_sees_no_token_of_its_own_frame_and_leaves_the_clean_stream_alone():
    p = randomized(MG)
    tok, act = clip(T=4, cfg=MG)
    mask = torch.ones_like(tok, dtype=torch.bool)
    mask[:, :, 0, 0] = False  # one known token per frame
    out = p(tok, act, mask=mask)
    plain = p(tok, act)
    assert torch.allclose(out.logits, plain.logits, atol=1e-5) and torch.allclose(
        out.reward, plain.reward, atol=1e-6
    )
    # changing a hidden token of frame 2 leaves frame 2's masked logits unchanged; changing its known token does not
    hidden, known = tok.clone(), tok.clone()
    hidden[:, 2, 1, 3] = (hidden[:, 2, 1, 3] + 1) % MG.vocab_size
    known[:, 2, 0, 0] = (known[:, 2, 0, 0] + 1) % MG.vocab_size
    assert torch.allclose(p(hidden, act, mask=mask).mask_logits[:, :3], out.mask_logits[:, :3], atol=1e-6)
    assert not torch.allclose(p(known, act, mask=mask).mask_logits[:, 2], out.mask_logits[:, 2], atol=1e-4)
    # frames after t and the action into frame t+1 do not reach frame t's masked logits
    later = tok.clone()
    later[:, 3] = (later[:, 3] + 1) % MG.vocab_size
    act2 = act.clone()
    act2[:, 2] = (act2[:, 2] + 1) % MG.n_actions
    assert torch.allclose(p(later, act2, mask=mask).mask_logits[:, :3], out.mask_logits[:, :3], atol=1e-6)
    # a subset of frames gives the same logits for those frames
    sub = p(tok, act, mask=mask, mask_frames=torch.tensor([1, 3])).mask_logits
    assert torch.allclose(sub, out.mask_logits[:, [1, 3]], atol=1e-5)


@pytest.mark.parametrize(
    "cond,term_from", [("cond_ln", "frame"), ("token", "frame"), ("add", "frame"), ("cond_ln", "history")]
)
def test_maskgit_decoding_matches_the_full_forward_and_leaves_an_exact_cache(cond, term_from):
    p = _random_term_head(randomized(replace(MG, action_cond=cond, termination_from=term_from)))
    with torch.no_grad():
        for prm in (p.mask_emb, p.mstream_emb):
            prm.normal_(std=0.5)
    tok, act = clip(T=4, cfg=MG)
    r = Rollout(p, 3)
    r.start(tok[:, :2], act[:, :1])
    steps = 4
    got = r.step(act[:, 1], temperature=0, decode="maskgit", maskgit_steps=steps)
    window = torch.cat([tok[:, :2], got.tokens[:, None]], 1)
    # the first refinement sees every token hidden: its committed tokens are the argmax of the full
    # forward's masked logits at its most confident positions
    hidden = torch.ones_like(window, dtype=torch.bool)
    first = p(window, act[:, :2], mask=hidden).mask_logits[:, 2]  # (B, hw, V)
    n1 = math.ceil(p.hw * (1 - math.cos(math.pi / 2 / steps)))
    top = first.log_softmax(-1).max(-1).values.topk(n1, dim=1).indices
    assert torch.equal(got.tokens.flatten(1).gather(1, top), first.argmax(-1).gather(1, top))
    # reward (and termination_from='frame') come from the clean stream of the decoded frame
    full = p(window, act[:, :2])
    assert torch.allclose(symexp_(full.reward[:, 2]), got.reward, atol=1e-4)
    assert torch.allclose(torch.sigmoid(full.term_logit[:, 2]), got.terminated_prob, atol=1e-5)
    # the cache now holds what token-by-token decoding would have written: the next frame matches
    nxt = r.step(act[:, 2], temperature=0)
    assert torch.equal(nxt.tokens, generate_uncached(p, window, act[:, :2], act[:, 2], temperature=0))


def test_maskgit_rows_at_different_positions_equal_separate_rollouts():
    p = randomized(MG)
    tok, act = clip(T=4, cfg=MG)
    r = Rollout(p, 3)
    r.start(tok[:, :2], act[:, :1])
    r.start(tok[1:2, :3], act[1:2, :2], rows=[1])  # row 1 one frame further along
    got = r.step(act[:, 2], temperature=0, decode="maskgit", maskgit_steps=3)
    for b, T in ((0, 2), (1, 3)):
        solo = Rollout(p, 1)
        solo.start(tok[b : b + 1, :T], act[b : b + 1, : T - 1])
        ref = solo.step(act[b : b + 1, 2], temperature=0, decode="maskgit", maskgit_steps=3)
        assert torch.equal(got.tokens[b], ref.tokens[0])
        assert torch.allclose(got.reward[b], ref.reward[0], atol=1e-5)


def test_maskgit_sampling_is_seeded_per_row():
    p = randomized(MG)
    tok, act = clip(T=2, cfg=MG)

    def run(seeds):
        r = Rollout(p, 3)
        r.start(tok, act[:, :1])
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack(
            [
                r.step(act[:, 0], temperature=1.0, generator=gens, decode="maskgit", maskgit_steps=2).tokens
                for _ in range(3)
            ]
        )

    a, b, c = run([1, 2, 3]), run([1, 2, 3]), run([1, 9, 3])
    assert torch.equal(a, b)
    assert (
        torch.equal(a[:, 0], c[:, 0]) and torch.equal(a[:, 2], c[:, 2]) and not torch.equal(a[:, 1], c[:, 1])
    )


def test_maskgit_learns_action_dependent_dynamics():
    """Next frame = previous frame rolled by the action; 4-step MaskGIT decoding recovers it."""
    torch.manual_seed(0)
    cfg = replace(CFG, vocab_size=8, tokens_h=1, tokens_w=6, frames=3, maskgit_weight=1.0)
    p = Prior(cfg)

    def make(B, g):
        first = torch.randint(0, 8, (B, 1, 1, 6), generator=g)
        act = torch.randint(0, 3, (B, 2), generator=g)
        frames = [first]
        for t in range(2):
            frames.append(
                torch.stack([torch.roll(frames[-1][b], int(act[b, t]) - 1, dims=-1) for b in range(len(act))])
            )
        return torch.cat(frames, 1), act

    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first_nats = None
    for _ in range(250):
        tok, act = make(32, g)
        loss, m = p.compute_loss({"tokens": tok, "actions": act})
        first_nats = first_nats or m["maskgit_nats"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["maskgit_nats"] < 0.5 * first_nats
    tok, act = make(64, torch.Generator().manual_seed(99))
    r = Rollout(p, 64)
    r.start(tok[:, :1], act[:, :0])
    got = r.step(act[:, 0], temperature=0, decode="maskgit", maskgit_steps=3)
    assert (got.tokens == tok[:, 1]).float().mean() > 0.9


def test_maskgit_errors():
    plain = randomized(CFG)
    tok, act = clip(T=2)
    r = Rollout(plain, 3)
    r.start(tok, act[:, :1])
    with pytest.raises(ValueError, match="maskgit_weight"):
        r.step(act[:, 0], decode="maskgit")
    with pytest.raises(ValueError, match="decode"):
        r.step(act[:, 0], decode="beam")
    with pytest.raises(ValueError, match="mask"):
        plain(tok, act, mask=torch.ones_like(tok, dtype=torch.bool))
    p = randomized(MG)
    tok, act = clip(T=2, cfg=MG)
    r = Rollout(p, 3)
    r.start(tok, act[:, :1])
    with pytest.raises(ValueError, match="maskgit_steps"):
        r.step(act[:, 0], decode="maskgit", maskgit_steps=0)
    with pytest.raises(ValueError, match="mask"):
        p(tok, act, mask=torch.ones(3, 2, 1, 1, dtype=torch.bool))
    assert r.step(act[:, 0], decode="maskgit").tokens.shape == (3, 2, 4)  # still usable


def test_dream_env_with_maskgit_decoding(tmp_path, hgs_store, tiny_bundle):
    cfg = tiny_experiment(hgs_store)
    bundle = make_bundle(replace(cfg, prior=replace(cfg.prior, maskgit_weight=1.0)), tmp_path / "mg")
    env = gym.make(envs.dream_id("VizdoomHGS"), checkpoint=bundle, decode="maskgit", maskgit_steps=2)
    check_env(env.unwrapped, skip_render_check=True)

    def episode(seed):
        obs, _ = env.reset(seed=seed)
        return np.stack([obs] + [env.step(a)[0] for a in (0, 1, 2, 3)])

    a, b = episode(3), episode(3)
    assert np.array_equal(a, b) and a.std() > 0
    with pytest.raises(ValueError, match="maskgit"):
        gym.make(envs.dream_id("VizdoomHGS"), checkpoint=tiny_bundle, decode="maskgit")
    with pytest.raises(ValueError, match="maskgit_steps"):
        gym.make(envs.dream_id("VizdoomHGS"), checkpoint=bundle, decode="maskgit", maskgit_steps=0)


def test_masked_pass_on_a_row_major_cache_attends_in_place_exactly_as_on_a_copy():
    """bf16 (row-major keys): the masked queries' keys/values go to the block's own slots instead of a copy of
    the cache prefix; the output is bit-identical and the prefix is untouched."""
    from types import SimpleNamespace

    p = randomized(replace(CFG, maskgit_weight=1.0))
    B = 3
    tok, act = clip(B=B, T=3)
    r = Rollout(p, B, bf16=True)
    assert not r.cache.keys_transposed
    r.start(tok[:, :2], act[:, :1])
    t_idx = r._advance(act[:, 1])
    base = int(t_idx[0]) * p.block_len
    with torch.inference_mode(), r._autocast():
        emb = r._embed_step(t_idx)
        p.forward_cached(emb.slot_input()[:, None], emb.ln, r.cache, None, base)
        known = torch.rand(B, 1, p.hw, generator=torch.Generator().manual_seed(0)) < 0.5
        xm = p.embed_masked(tok[:, 2:3].flatten(2), known, emb.cond, t_idx[:, None], emb.prev[:, None])[:, 0]
        prefix = (r.cache.k[:, :, :, : base + 1].clone(), r.cache.v[:, :, :, : base + 1].clone())
        copied = SimpleNamespace(k=r.cache.k, v=r.cache.v, capacity=r.cache.capacity, keys_transposed=True)
        want = p.forward_cached(xm, emb.ln, copied, None, base + 1, write=False)  # the concatenating path
        got = p.forward_cached(xm, emb.ln, r.cache, None, base + 1, write=False)
    assert torch.equal(got, want)
    assert torch.equal(r.cache.k[:, :, :, : base + 1], prefix[0]) and torch.equal(
        r.cache.v[:, :, :, : base + 1], prefix[1]
    )


def test_fused_bf16_frame_pass_is_close_to_autocast_and_causal_only_when_writing():
    """bf16 MaskGIT runs its whole-frame passes through ``TokenDecoder.block`` (weights cast once): close to the
    autocast ``forward_cached`` on the masked and the writing pass, the same keys/values cached, and the writing
    pass causal while the masked one is not."""
    import copy

    p = randomized(replace(CFG, maskgit_weight=1.0))
    B = 3
    tok, act = clip(B=B, T=3)
    r = Rollout(p, B, bf16=True)
    r.start(tok[:, :2], act[:, :1])
    t_idx = r._advance(act[:, 1])
    base = int(t_idx[0]) * p.block_len
    with torch.inference_mode(), r._autocast():
        emb = r._embed_step(t_idx)
        p.forward_cached(emb.slot_input()[:, None], emb.ln, r.cache, None, base)
        norms = r.decoder.frame_norms(emb.ln, B)
        known = torch.rand(B, 1, p.hw, generator=torch.Generator().manual_seed(0)) < 0.5
        xm = p.embed_masked(tok[:, 2:3].flatten(2), known, emb.cond, t_idx[:, None], emb.prev[:, None])[:, 0]
        ref = p.forward_cached(xm, emb.ln, copy.deepcopy(r.cache), None, base + 1, write=False).float()
        got = r.decoder.block(xm, norms, copy.deepcopy(r.cache), base + 1, causal=False)
        assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=0.1), (got - ref).abs().max()
        xc = emb.frame_inputs(tok[:, 2].flatten(1))  # (B, hw, C)
        ref_cache, got_cache = copy.deepcopy(r.cache), copy.deepcopy(r.cache)
        ref = p.forward_cached(xc, emb.ln, ref_cache, None, base + 1).float()
        got = r.decoder.block(xc, norms, got_cache, base + 1, causal=True)
        assert torch.allclose(got, ref, atol=0.1), (got - ref).abs().max()
        end = base + 1 + p.hw
        for a, b in ((ref_cache.k, got_cache.k), (ref_cache.v, got_cache.v)):
            assert torch.allclose(a[:, :, :, :end].float(), b[:, :, :, :end].float(), atol=0.05)
        # the last position's input reaches only itself in the writing pass, every position in the masked one
        xc2 = xc.clone()
        xc2[:, -1] += torch.randn(
            xc.shape[-1], generator=torch.Generator().manual_seed(1)
        )  # not a constant: LN
        causal2 = r.decoder.block(xc2, norms, copy.deepcopy(r.cache), base + 1, causal=True)
        assert torch.equal(causal2[:, :-1], got[:, :-1]) and not torch.equal(causal2[:, -1], got[:, -1])
        masked = r.decoder.block(xc, norms, copy.deepcopy(r.cache), base + 1, causal=False)
        masked2 = r.decoder.block(xc2, norms, copy.deepcopy(r.cache), base + 1, causal=False)
        assert not torch.equal(masked2[:, 0], masked[:, 0])
    with pytest.raises(ValueError, match="bf16"):
        Rollout(p, B).decoder.block(xc, norms, r.cache, base + 1, causal=True)


def test_bf16_maskgit_step_through_the_fused_passes_draws_what_the_autocast_path_draws(monkeypatch):
    """bf16 MaskGIT steps (fused whole-frame passes), a token-by-token step that reads the cache those passes wrote,
    and steps after the window slid (a fused re-encoded prefill) give the tokens the autocast ``forward_cached`` path
    gives (temperature 0; bf16 roundings of the two paths differ, so near-ties may flip: at least 90 % agree)."""
    from worldmodel.fast_decode import TokenDecoder

    cfg = replace(CFG, maskgit_weight=1.0, tokens_h=4, tokens_w=4)
    agree = []
    for seed in range(3):
        p = randomized(cfg, seed=seed)
        tok, act = clip(B=4, T=4, cfg=cfg, seed=seed)
        paths = []
        for fused in (True, False):
            if not fused:
                monkeypatch.setattr(TokenDecoder, "supported", staticmethod(lambda *a: False))
            r = Rollout(p, 4, bf16=True)
            r.start(tok[:, :2], act[:, :1])
            mg = {"decode": "maskgit", "maskgit_steps": 3}
            steps, lengths = [], []
            for k, kw in enumerate([mg, {}, mg, {}]):  # MaskGIT, then a token step reading the cache it wrote
                steps.append(r.step(act[:, 1 + k % 2], temperature=0, **kw))
                lengths.append(int(r.n_frames[0]))
            assert lengths == [3, 4, 3, 4]  # the 4-frame window slid at the third step: a re-encoded prefill
            paths.append(steps)
            monkeypatch.undo()
        for a, b in zip(*paths):
            agree.append((a.tokens == b.tokens).float().mean().item())
            assert torch.allclose(a.reward, b.reward, atol=0.05, rtol=0.05)
    assert sum(agree) / len(agree) >= 0.9, agree
