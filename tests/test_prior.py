"""GPT prior and cached generation: exactness, causality, learning, action sensitivity, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worldmodel.config import PriorConfig
from worldmodel.fast_decode import TokenDecoder
from worldmodel.prior import KVCache, Prior
from worldmodel.sampling import Rollout, generate_uncached, teacher_forced_nll

CFG = PriorConfig(
    n_layer=2,
    n_head=2,
    n_embd=32,
    dropout=0.0,
    attn_dropout=0.0,
    vocab_size=16,
    frames=4,
    tokens_h=2,
    tokens_w=3,
    action_kind="discrete",
    n_actions=3,
)


def randomized(cfg: PriorConfig, seed: int = 0) -> Prior:
    """A prior with non-trivial output layers (the zero-initialised head would make every logit equal)."""
    torch.manual_seed(seed)
    p = Prior(cfg).eval()
    torch.nn.init.normal_(p.head.weight, std=0.5)
    for m in p.modules():
        if getattr(m, "to_gain_bias", None) is not None:
            torch.nn.init.normal_(m.to_gain_bias.weight, std=0.3)
    return p


def clip(B=3, T=4, cfg=CFG, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, cfg.vocab_size, (B, T, cfg.tokens_h, cfg.tokens_w), generator=g),
        torch.randint(0, cfg.n_actions, (B, T - 1), generator=g),
    )


@pytest.mark.parametrize("cond,prev_frames", [("cond_ln", 1), ("token", 1), ("add", 1), ("cond_ln", 2)])
def test_cached_generation_equals_full_forward(cond, prev_frames):
    p = randomized(replace(CFG, action_cond=cond, prev_frames=prev_frames))
    if prev_frames == 2:  # the second previous-frame path must matter for the comparison to test it
        torch.nn.init.normal_(p.prev2_conv.weight, std=0.3)
        torch.nn.init.normal_(p.no_prev2, std=0.5)
    tok, act = clip(T=2)
    r = Rollout(p, 3, keep=1)
    r.start(tok, act[:, :1])
    window_tok, window_act = tok.clone(), act[:, :1].clone()
    for step in range(5):  # crosses several slides of the window (frames=4, keep=1)
        if window_tok.shape[1] >= CFG.frames:
            window_tok, window_act = window_tok[:, -1:], window_act[:, :0]
        a = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(step))
        ref = generate_uncached(p, window_tok, window_act, a, temperature=0)
        got = r.step(a, temperature=0)
        assert torch.equal(got.tokens, ref), f"step {step}"
        # logits of the generated frame under a full forward equal what the cache saw
        full = p(torch.cat([window_tok, ref[:, None]], 1), torch.cat([window_act, a[:, None]], 1))
        assert torch.allclose(symexp_(full.reward[:, -1]), got.reward, atol=1e-4)
        window_tok = torch.cat([window_tok, ref[:, None]], 1)
        window_act = torch.cat([window_act, a[:, None]], 1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(action_cond="cond_ln"),
        dict(action_cond="token"),
        dict(action_cond="add", prev_frame_kernel=3),
        dict(n_classes=3),
    ],
)
def test_fused_token_decoder_equals_forward_cached_and_follows_weight_updates(kw):
    p = randomized(replace(CFG, **kw))
    B, hs = 3, CFG.n_embd // CFG.n_head
    tok, act = clip(B=B, T=2)
    cls = torch.tensor([0, 2, 1]) if p.class_emb is not None else None
    dec = TokenDecoder(p)
    for round_ in range(2):  # the second round after an optimizer step changed every weight in place
        caches = [
            KVCache(
                CFG.n_layer, B, CFG.n_head, CFG.frames * p.block_len, hs, torch.device("cpu"), torch.float32
            )
            for _ in range(2)
        ]
        with torch.no_grad():
            cond = p.block_conditions(act[:, :1], B, 2, cls)
            for c in caches:  # the same context in both caches
                p.forward_cached(p.embed_blocks(tok, cond), p.ln_condition(cond), c, None, 0)
            a = torch.tensor([[2, 2], [0, 0], [1, 1]])  # the next block's action
            new = p.block_conditions(a, B, 2, cls)[:, 1:]  # (B, 1, C)
            ln = p.ln_params(new)
            assert TokenDecoder.supported(p, caches[1], None)
            norms = dec.frame_norms(ln, B)
            x = torch.randn(B, CFG.n_embd, generator=torch.Generator().manual_seed(round_))
            for pos in range(2 * p.block_len, 2 * p.block_len + 4):
                ref = p.forward_cached(x[:, None], ln if ln is not None else new, caches[0], None, pos)[:, 0]
                got = dec(x, norms, caches[1], pos)
                assert torch.allclose(got, ref, atol=1e-5), (round_, pos, (got - ref).abs().max())
                assert torch.allclose(caches[1].kt, caches[0].kt, atol=1e-6) and torch.allclose(
                    caches[1].v, caches[0].v, atol=1e-6
                )
                x = ref + 0.1
        p.train()
        opt = torch.optim.SGD(p.parameters(), lr=0.5)
        loss, _ = p.compute_loss(
            {"tokens": tok, "actions": act[:, :1], **({"class_ids": cls} if cls is not None else {})}
        )
        loss.backward()
        opt.step()
        p.eval()
    assert not TokenDecoder.supported(p.train(), caches[1], None), (
        "dropout in training mode: the fused path must not apply"
    )
    cache16 = KVCache(CFG.n_layer, B, CFG.n_head, 8, hs, torch.device("cpu"), torch.bfloat16)
    assert not TokenDecoder.supported(p.eval(), cache16, None), "bf16 needs row-major keys"


def test_bf16_token_decoder_is_close_to_autocast_forward_cached():
    """The fused bf16 loop (bf16 GEMMs, row-major bf16 cache, SDPA) against the autocast general path."""
    p = randomized(CFG)
    B, hs = 3, CFG.n_embd // CFG.n_head
    tok, act = clip(B=B, T=2)
    dec = TokenDecoder(p, torch.bfloat16)
    caches = [
        KVCache(
            CFG.n_layer,
            B,
            CFG.n_head,
            CFG.frames * p.block_len,
            hs,
            torch.device("cpu"),
            torch.bfloat16,
            False,
        )
        for _ in range(2)
    ]
    assert TokenDecoder.supported(p, caches[0], None)
    # the fp32 general path on the same inputs: bf16 must stay close to it on any CPU (bf16 kernels, and
    # so single roundings, differ between CPUs with and without native bf16 units)
    cache32 = KVCache(
        CFG.n_layer, B, CFG.n_head, CFG.frames * p.block_len, hs, torch.device("cpu"), torch.float32
    )
    with torch.inference_mode():
        cond = p.block_conditions(act[:, :1], B, 2)
        p.forward_cached(p.embed_blocks(tok, cond), p.ln_condition(cond), cache32, None, 0)
        ln32 = p.ln_params(p.block_conditions(torch.tensor([[2, 2], [0, 0], [1, 1]]), B, 2)[:, 1:])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        cond = p.block_conditions(act[:, :1], B, 2)
        for c in caches:
            p.forward_cached(p.embed_blocks(tok, cond), p.ln_condition(cond), c, None, 0)
        ln = p.ln_params(p.block_conditions(torch.tensor([[2, 2], [0, 0], [1, 1]]), B, 2)[:, 1:])
        norms = dec.frame_norms(ln, B)
        x = torch.randn(B, CFG.n_embd, generator=torch.Generator().manual_seed(0))
        for pos in range(2 * p.block_len, 2 * p.block_len + 4):
            ref = p.forward_cached(x[:, None], ln, caches[0], None, pos)[:, 0].float()
            got = dec(x, norms, caches[1], pos)
            assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=0.1), (got - ref).abs().max()
            with torch.autocast("cpu", enabled=False):
                ref32 = p.forward_cached(x[:, None], ln32, cache32, None, pos)[:, 0]
            assert torch.allclose(got, ref32, atol=0.05), (got - ref32).abs().max()
            assert torch.allclose(caches[1].k.float(), caches[0].k.float(), atol=0.05)
            x = ref + 0.1
    with pytest.raises(ValueError, match="dtype"):
        TokenDecoder(p, torch.float16)


def symexp_(x):
    return torch.sign(x) * torch.expm1(x.abs())


@pytest.mark.parametrize("cond", ["cond_ln", "token", "add"])
def test_actions_are_causal(cond):
    p = randomized(replace(CFG, action_cond=cond))
    tok, act = clip()
    base = p(tok, act)
    for t in range(3):
        act2 = act.clone()
        act2[:, t] = (act2[:, t] + 1) % 3
        out = p(tok, act2)
        # frames <= t and transitions into frames <= t are untouched by a_t ...
        assert torch.equal(out.logits[:, : t + 1], base.logits[:, : t + 1])
        assert torch.equal(out.reward[:, : t + 1], base.reward[:, : t + 1])
        assert torch.equal(out.term_logit[:, : t + 1], base.term_logit[:, : t + 1])
        # ... and frame t+1 does depend on it
        assert not torch.allclose(out.logits[:, t + 1], base.logits[:, t + 1])


def test_sliding_window_runs_far_beyond_context_with_bounded_cache():
    p = randomized(CFG)
    tok, act = clip(T=3)
    r = Rollout(p, 3)
    r.start(tok, act[:, :2])
    shape = r.cache.k.shape
    for i in range(40):  # 10x the trained context
        out = r.step(torch.full((3,), i % 3))
        assert out.tokens.shape == (3, 2, 3)
        assert int(r.n_frames.max()) <= CFG.frames
    assert r.cache.k.shape == shape


def test_same_seed_same_rollout_and_per_row_reset():
    p = randomized(CFG)
    tok, act = clip(T=2)

    def run(seed):
        r = Rollout(p, 3)
        r.start(tok, act[:, :1])
        g = torch.Generator().manual_seed(seed)
        outs = [
            r.step(torch.tensor([0, 1, 2]), temperature=1.0, top_k=8, top_p=0.9, generator=g).tokens
            for _ in range(6)
        ]
        return torch.stack(outs), r

    a, r = run(5)
    b, _ = run(5)
    c, _ = run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # resetting one row gives it the same future as a fresh rollout from that context, and leaves others be
    r.start(tok[1:2], act[1:2, :1], rows=[1])
    assert int(r.n_frames[1]) == 2 and int(r.n_frames[0]) != 2
    got = r.step(torch.tensor([0, 1, 2]), temperature=0)
    fresh = Rollout(p, 1)
    fresh.start(tok[1:2], act[1:2, :1])
    assert torch.equal(got.tokens[1], fresh.step(torch.tensor([1]), temperature=0).tokens[0])


def test_overfits_a_handful_of_clips():
    torch.manual_seed(0)
    p = Prior(CFG)
    tok, act = clip(B=4)
    batch = {
        "tokens": tok,
        "actions": act,
        "rewards": torch.randn(4, 3),
        "terminated": torch.zeros(4, 3, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, m = p.compute_loss(batch)
        first = m["nats_per_token"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=1e-3)  # zero-init head: uniform
    assert m["nats_per_token"] < first / 10


def test_reward_and_termination_heads_learn_a_rule():
    torch.manual_seed(0)
    p = Prior(CFG)
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    for _ in range(250):
        tok, act = clip(B=16, seed=int(torch.randint(0, 10**6, ())))
        rewards = act.float() * 2 - 1  # reward = f(action): -1, 1, 3
        term = tok[:, 1:, 0, 0] == 0  # terminated when the new frame's first token is 0
        loss, m = p.compute_loss({"tokens": tok, "actions": act, "rewards": rewards, "terminated": term})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["reward_mae"] < 0.3 and m["termination_accuracy"] > 0.9


def test_learns_to_use_actions_on_action_dependent_dynamics():
    """Next frame = current frame rolled by the action: only a model that reads actions can predict it."""
    torch.manual_seed(0)
    cfg = replace(CFG, vocab_size=8, tokens_h=1, tokens_w=6)
    p = Prior(cfg)

    def make(B, g):
        first = torch.randint(0, 8, (B, 1, 1, 6), generator=g)
        act = torch.randint(0, 3, (B, 3), generator=g)
        frames = [first]
        for t in range(3):
            shift = act[:, t] - 1  # -1, 0, +1
            frames.append(torch.stack([torch.roll(frames[-1][b], int(shift[b]), dims=-1) for b in range(B)]))
        return torch.cat(frames, 1), act

    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        tok, act = make(32, g)
        loss, _ = p.compute_loss({"tokens": tok, "actions": act})
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.eval()
    tok, act = make(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        true = teacher_forced_nll(p, tok, act)[:, 1:].mean()
        shuffled = teacher_forced_nll(p, tok, act[torch.randperm(64)])[:, 1:].mean()
    assert true < 0.5 * shuffled, (true, shuffled)


def test_state_dict_round_trip(tmp_path):
    p = randomized(CFG)
    torch.save(p.state_dict(), tmp_path / "p.pt")
    q = Prior(CFG).eval()
    q.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    tok, act = clip()
    assert torch.equal(p(tok, act).logits, q(tok, act).logits)


def test_bad_inputs_raise_and_model_stays_usable():
    p = randomized(CFG)
    tok, act = clip()
    with pytest.raises(ValueError, match=r"actions: got torch.float32\(3, 3\), expected int64 \(3, 3\)"):
        p(tok, act.float())
    with pytest.raises(ValueError, match=r"values must lie in \[0, 3\)"):
        p(tok, act + 3)
    with pytest.raises(ValueError, match="actions: got"):
        p(tok, act[:2])  # batch-size mismatch
    with pytest.raises(ValueError, match=r"tokens: .*expected int64 \(B, T, 2, 3\)"):
        p(tok[:, :, :1], act)
    with pytest.raises(ValueError, match=r"expected 1..4"):
        p(torch.zeros(3, 5, 2, 3, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))
    cont = Prior(replace(CFG, action_kind="continuous", action_dim=2, n_actions=0))
    with pytest.raises(ValueError, match="NaN"):
        cont(tok, torch.full((3, 3, 2), float("nan")))
    r = Rollout(p, 3)
    with pytest.raises(RuntimeError, match="start"):
        r.step(torch.zeros(3, dtype=torch.long))
    r.start(tok[:, :1])
    with pytest.raises(ValueError, match="actions"):
        r.step(torch.zeros(2, dtype=torch.long))
    assert p(tok, act).logits.shape == (3, 4, 6, 16)
    assert r.step(torch.zeros(3, dtype=torch.long)).tokens.shape == (3, 2, 3)


def test_unconditional_and_class_conditional():
    p = randomized(replace(CFG, action_kind="none", n_actions=0, n_classes=5))
    tok, _ = clip()
    cls = torch.tensor([0, 1, 4])
    out = p(tok, None, cls)
    other = p(tok, None, torch.tensor([1, 1, 4]))
    assert not torch.allclose(out.logits[0], other.logits[0]) and torch.equal(
        out.logits[1:], other.logits[1:]
    )
    with pytest.raises(ValueError, match="class_ids"):
        p(tok, None, None)
    r = Rollout(p, 3)
    r.start(tok[:, :2], class_ids=cls)
    assert r.step(None).tokens.shape == (3, 2, 3)


def test_frame_conditioning_cached_equals_full_and_is_learned():
    cfg = replace(CFG, action_kind="none", n_actions=0, n_cond_frames=1, prev_frame_kernel=0)
    p = randomized(cfg)
    tok = torch.randint(
        0, cfg.vocab_size, (3, 3, cfg.tokens_h, cfg.tokens_w), generator=torch.Generator().manual_seed(1)
    )
    cond = torch.randint(
        0, cfg.vocab_size, (3, 1, cfg.tokens_h, cfg.tokens_w), generator=torch.Generator().manual_seed(5)
    )
    out = p(tok, None, None, cond)
    other = p(tok, None, None, cond.roll(1, dims=0))
    assert not torch.allclose(out.logits, other.logits)  # the conditioning frame reaches every position
    with pytest.raises(ValueError, match="cond_tokens"):
        p(tok, None, None, None)
    # cached generation (cross-attention keys/values computed once per row) equals full forwards
    r = Rollout(p, 3)
    r.start(tok[:, :1], cond_tokens=cond)
    got = r.step(None, temperature=0)
    full = p(torch.cat([tok[:, :1], torch.zeros_like(tok[:, :1])], 1), None, None, cond)
    first = full.logits[:, 1, 0].argmax(-1)
    assert torch.equal(got.tokens.flatten(1)[:, 0], first)
    check = p(torch.cat([tok[:, :1], got.tokens[:, None]], 1), None, None, cond).logits[:, 1].argmax(-1)
    assert torch.equal(check, got.tokens.flatten(1))  # greedy: every token is the argmax given its prefix
    # learning: the first modelled frame copies the conditioning frame -> loss falls far below chance
    torch.manual_seed(0)
    model = Prior(replace(cfg, frames=1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):  # the query of z[j] must learn to find memory position j: ~400 steps to click
        c = torch.randint(0, cfg.vocab_size, (16, 1, cfg.tokens_h, cfg.tokens_w), generator=g)
        loss, m = model.compute_loss({"tokens": torch.cat([c, c], 1)})  # clip = [cond frame, copy of it]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["nats_per_token"] < 0.3 * torch.log(torch.tensor(float(cfg.vocab_size))).item()


def test_context_noise_corrupts_inputs_in_training_only():
    noisy_cfg = replace(CFG, context_noise=0.5)
    p, ref = randomized(noisy_cfg), randomized(CFG)  # same seed: same weights
    tok, act = clip(T=4)
    batch = {"tokens": tok, "actions": act}
    with torch.no_grad():
        p.eval()
        assert p.compute_loss(batch)[0] == ref.eval().compute_loss(batch)[0]  # evaluation sees clean inputs
        p.train()
        torch.manual_seed(0)
        a = p.compute_loss(batch)[0]
        torch.manual_seed(1)
        b = p.compute_loss(batch)[0]
    assert (
        a != b and a != ref.train().compute_loss(batch)[0]
    )  # fresh random corruption in every training step
    with pytest.raises(ValueError, match="context_noise"):
        Prior(replace(CFG, context_noise=1.0))


def _random_term_head(p: Prior) -> Prior:
    with torch.no_grad():
        for m in p.term_head:
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.5)
    return p


def test_termination_from_history_is_a_hazard_the_new_frame_cannot_change():
    """termination_from="history": the termination of the transition into frame t reads frames < t and a_{t-1}
    (ViZDoom's terminal frame is a copy of the previous one and carries nothing); "frame" reads frame t too."""
    tok, act = clip()
    hist = _random_term_head(randomized(replace(CFG, termination_from="history")))
    frame = _random_term_head(randomized(replace(CFG, termination_from="frame")))
    other = tok.clone()
    other[:, 2] = (other[:, 2] + 1) % CFG.vocab_size  # a different frame 2
    assert torch.equal(hist(other, act).term_logit[:, 2], hist(tok, act).term_logit[:, 2])
    assert not torch.allclose(
        hist(other, act).term_logit[:, 3], hist(tok, act).term_logit[:, 3]
    )  # frame 2 is history of 3
    assert not torch.allclose(frame(other, act).term_logit[:, 2], frame(tok, act).term_logit[:, 2])
    act2 = act.clone()
    act2[:, 1] = (act2[:, 1] + 1) % CFG.n_actions  # the action into frame 2
    assert not torch.allclose(hist(tok, act2).term_logit[:, 2], hist(tok, act).term_logit[:, 2])
    with pytest.raises(ValueError, match="termination_from"):
        replace(CFG, termination_from="slot")


@pytest.mark.parametrize("fused", [True, False])
def test_rollout_reads_the_history_termination_as_the_full_forward_does(fused):
    p = _random_term_head(randomized(replace(CFG, termination_from="history")))
    tok, act = clip(T=3)
    r = Rollout(p, 3)
    if not fused:
        p.train()  # dropout is 0: same numbers, but the fused single-position path does not apply
        assert not TokenDecoder.supported(p, r.cache, None)
    r.start(tok[:, :2], act[:, :1])
    got = r.step(act[:, 1], temperature=0)
    full = p.eval()(torch.cat([tok[:, :2], got.tokens[:, None]], 1), act[:, :2])
    assert torch.allclose(torch.sigmoid(full.term_logit[:, 2]), got.terminated_prob, atol=1e-5)
    assert torch.allclose(
        symexp_(full.reward[:, 2]), got.reward, atol=1e-4
    )  # the reward still reads the new frame


@pytest.mark.parametrize("path", ["fused", "general", "per_row", "maskgit", "observe"])
@pytest.mark.parametrize("kw", [dict(action_cond="cond_ln"), dict(action_cond="add", prev_frame_kernel=3)])
def test_rollout_latent_is_the_full_forwards_hidden_state(path, kw):
    """``Rollout.hidden`` (the latent the dream env reports) after start, each step and a slide equals the full
    forward's hidden state at the last position of the window's newest frame, on every sampling path and under
    teacher forcing (``observe``)."""
    cfg = replace(CFG, maskgit_weight=1.0 if path == "maskgit" else 0.0, **kw)
    p = randomized(cfg)
    tok, act = clip(T=2, cfg=cfg)
    r = Rollout(p, 3, keep=1)
    if path == "general":
        p.train()  # dropout is 0: same numbers, but the fused single-position path does not apply
        assert not TokenDecoder.supported(p, r.cache, None)
    r.start(tok, act[:, :1])
    win = [[tok[b], act[b, :1]] for b in range(3)]  # each row's window: tokens (n, h, w), actions (n - 1,)
    if path == "per_row":  # row 1 restarts from one frame: rows step at different cache positions
        r.start(tok[1:2, :1], None, rows=[1])
        win[1] = [tok[1, :1], act[1, :0]]

    def check(where: str) -> None:
        was = p.training
        p.eval()
        for b in range(3):
            ref = p(win[b][0][None], win[b][1][None]).hidden[0, -1]
            assert torch.allclose(r.hidden[b], ref, atol=1e-4), f"{where}, row {b}"
        p.train(was)

    check("start")
    g = torch.Generator().manual_seed(0)
    for step in range(5):  # frames=4, keep=1: crosses slides
        for b in range(3):
            if len(win[b][0]) >= cfg.frames:
                win[b] = [win[b][0][-1:], win[b][1][:0]]
        a = torch.randint(0, cfg.n_actions, (3,), generator=g)
        if path == "observe":
            new = torch.randint(0, cfg.vocab_size, (3, cfg.tokens_h, cfg.tokens_w), generator=g)
            got = r.observe(new, a)
            assert torch.equal(got.tokens, new)
        elif path == "maskgit":
            got = r.step(a, temperature=1.0, generator=g, decode="maskgit", maskgit_steps=2)
        else:
            got = r.step(a, temperature=1.0, generator=g)
        for b in range(3):
            win[b] = [torch.cat([win[b][0], got.tokens[b : b + 1]]), torch.cat([win[b][1], a[b : b + 1]])]
        assert torch.equal(got.hidden, r.hidden) and got.hidden.dtype == torch.float32
        check(f"step {step}")
        if path == "observe":  # teacher forcing reads the heads as the full forward does
            p.eval()
            for b in range(3):
                full = p(win[b][0][None], win[b][1][None])
                assert torch.allclose(symexp_(full.reward[0, -1]), got.reward[b], atol=1e-4)
                assert torch.allclose(
                    torch.sigmoid(full.term_logit[0, -1]), got.terminated_prob[b], atol=1e-5
                )


def test_observe_checks_its_tokens_and_keeps_the_rollout_usable():
    p = randomized(CFG)
    tok, act = clip(T=3)
    r = Rollout(p, 3)
    r.start(tok[:, :2], act[:, :1])
    with pytest.raises(ValueError, match="tokens: got"):
        r.observe(tok[:, 0, :1], act[:, 1])
    with pytest.raises(ValueError, match="tokens: values"):
        r.observe(tok[:, 0] + CFG.vocab_size, act[:, 1])
    assert r.observe(tok[:, 2], act[:, 1]).hidden.shape == (3, CFG.n_embd)


def test_second_previous_frame_path_reads_z_t_minus_2_locally_and_names_bad_settings():
    """prev_frames=2: block t's token inputs get z_{t-2}'s local features (block 1 a learned vector, block 0 none);
    prev_frames=1 has no such weights, so bundles trained before it load unchanged."""
    p = randomized(replace(CFG, prev_frames=2))
    torch.nn.init.normal_(p.no_prev2, std=0.5)
    tok, _ = clip(T=4)
    base = p.prev_stream(tok)
    one = Prior(replace(CFG, prev_frames=1))
    assert not any("prev2" in k for k in one.state_dict()) and {"prev2_conv.weight", "no_prev2"} <= set(
        p.state_dict()
    )
    with torch.no_grad():
        first = p.prev_features(tok[:, :-1])  # z_{t-1} features of blocks 1..3
        assert torch.allclose(base[:, 1], first[:, 0] + p.no_prev2, atol=1e-6)
        assert torch.allclose(base[:, 0], p.no_prev.expand_as(base[:, 0]))
        # changing z_1 at one corner changes z_3's block only near that corner (k = 3: within one token)
        moved = tok.clone()
        moved[:, 1, 0, 0] = (moved[:, 1, 0, 0] + 1) % CFG.vocab_size
        diff = (p.prev_stream(moved) - base).abs().sum(-1)  # (B, T, hw)
    near = torch.tensor([0, 1, 3, 4])  # raster positions of the 2x3 grid within one token of (0, 0)
    assert diff[:, 3, near].min() > 0 and diff[:, 3, 2].max() == 0 and diff[:, 3, 5].max() == 0
    assert diff[:, 2, near].min() > 0  # and block 2 through the z_{t-1} path, as before
    for bad, match in (
        (dict(prev_frames=3), "prev_frames"),
        (dict(prev_frames=2, prev_frame_kernel=0), "prev_frame_kernel"),
    ):
        with pytest.raises(ValueError, match=match):
            Prior(replace(CFG, **bad))


def test_conditional_layernorm_modulates_in_bf16_under_autocast_only():
    """Training under CPU bf16 autocast, the conditional LayerNorm hands the next Linear a bf16 tensor (its gain/bias
    come from a bf16 Linear; no round trip through fp32) within bf16 rounding of the fp32 result. In eval (generation,
    as the fused decoder) and outside autocast it stays fp32, even when given bf16 (scale, bias) made under autocast."""
    from worldmodel.prior import CondLayerNorm

    torch.manual_seed(0)
    ln = CondLayerNorm(32, 8)
    torch.nn.init.normal_(ln.to_gain_bias.weight, std=0.5)
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 5, 8)
    ref = ln(x, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x, cond)
        pair = ln.gain_bias(cond)
    assert ref.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02) and not torch.equal(y.float(), ref)
    assert ln(x, pair).dtype == torch.float32  # bf16 pair, no autocast: promoted, as before
    ln.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x, cond).dtype == torch.float32
