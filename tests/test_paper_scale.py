"""``--scale paper`` against the paper's code (wilson1yan/VideoGPT-Paper): the strided sparse layout, parameter
counts equal to the pinned figures, and a paper-width forward and cached sampling step on CPU."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.config import PriorConfig, get_preset
from worldmodel.paper_reference import PAPER_PARAMS, paper_setup, param_counts
from worldmodel.prior import KVCache, Prior
from worldmodel.sampling import Rollout, generate_uncached
from worldmodel.sparse_attention import block_layout, token_mask
from worldmodel.tokenizer import VQVAE

ROOT = Path(__file__).resolve().parents[1]
PAPER_PRESETS = [
    "vizdoom_hgs",
    "vizdoom_battle2",
    "bair",
    "robonet",
    "bair_paper",
    "ucf101",
    "ucf101_uncond",
    "tgif",
]


# ------------------------------------------------------------------------------- the paper's layout, re-derived
def deepspeed_strided_layout(shape: tuple[int, ...], block: int, num_local_blocks: int) -> np.ndarray:
    """The block layout as the paper's ``StridedSparsityConfig.make_layout`` defines it (causal, one head), written
    out with its loops and index arithmetic: block shape from the trailing axes, local window, strided columns."""
    n_dim, cum, i = len(shape), 1, len(shape) - 1
    for i in range(n_dim - 1, -1, -1):
        cum *= shape[i]
        if cum > block:
            break
    assert cum % block == 0
    bshape = (*shape[:i], cum // block)
    sizes = tuple(np.flip(np.cumprod(np.flip(np.array(bshape)))[:-1])) + (1,)

    def flat(idx):
        return sum(idx[k] * sizes[k] for k in range(len(bshape)))

    def unflat(f):
        out = []
        for k in range(len(bshape)):
            out.append(f // sizes[k])
            f %= sizes[k]
        return tuple(out)

    n = int(np.prod(bshape))
    layout = np.zeros((n, n), dtype=bool)
    for row in range(n):  # set_local_layout
        for col in range(max(0, row - num_local_blocks), row + 1):
            layout[row, col] = True
    for row in range(n):  # set_global_layout
        cur = unflat(row)
        for d in range(len(bshape) - 1):
            for j in range(cur[d] + 1):
                new = list(cur)
                new[d] = j
                layout[row, flat(new)] = True
    return layout


def deepspeed_token_mask(layout: np.ndarray, block: int) -> np.ndarray:
    """Token mask of a block layout as the paper's ``make_sparse_attn_mask``: dense allowed blocks, lower-triangular
    inside the diagonal ones."""
    n = layout.shape[0] * block
    mask = np.zeros((n, n), dtype=bool)
    for r in range(layout.shape[0]):
        for c in range(layout.shape[1]):
            if layout[r, c]:
                tile = np.ones((block, block), dtype=bool)
                mask[r * block : (r + 1) * block, c * block : (c + 1) * block] = (
                    np.tril(tile) if r == c else tile
                )
    return mask


@pytest.mark.parametrize(
    "shape,block,local", [((4, 4, 8), 8, 2), ((3, 4, 4), 4, 1), ((2, 3, 4, 4), 8, 1), ((8, 32, 32), 32, 4)]
)
def test_strided_layout_equals_the_papers(shape, block, local):
    ref = deepspeed_strided_layout((*shape, 1), block, local)  # the paper's grid carries n_codebooks = 1
    assert np.array_equal(block_layout(shape, block, local).numpy(), ref)
    if math.prod(shape) <= 512:
        assert np.array_equal(token_mask(shape, block, local).numpy(), deepspeed_token_mask(ref, block))


def test_strided_layout_rejects_grids_the_block_does_not_tile():
    with pytest.raises(ValueError, match="does not divide"):
        block_layout((4, 3, 5), 4, 1)
    with pytest.raises(ValueError, match="one block"):
        block_layout((2, 2), 4, 1)


SMALL = PriorConfig(
    n_layer=2,
    n_head=2,
    n_embd=32,
    dropout=0.0,
    attn_dropout=0.0,
    vocab_size=16,
    frames=4,
    tokens_h=4,
    tokens_w=4,
    action_kind="discrete",
    n_actions=3,
    prev_frame_kernel=0,
    attn_pattern="strided",
    sparse_block=4,
    sparse_local_blocks=1,
    code_dim=8,
    paper_layers=True,
)


def test_prior_mask_on_slots_and_tokens_is_the_paper_token_mask():
    p = Prior(SMALL)
    L, hw = p.block_len, p.hw
    full = p.sparse.mask(SMALL.frames * L)
    keep = torch.tensor([i for i in range(SMALL.frames * L) if i % L < hw])  # slot + tokens, not the last
    ref = deepspeed_token_mask(deepspeed_strided_layout((SMALL.frames, 4, 4, 1), 4, 1), 4)
    assert np.array_equal(full[keep][:, keep].numpy(), ref)
    assert torch.equal(full, full.tril())  # causal in our order too


def randomized(cfg: PriorConfig, seed: int = 0) -> Prior:
    torch.manual_seed(seed)
    p = Prior(cfg).eval()
    torch.nn.init.normal_(p.head.weight, std=0.5)
    for m in p.modules():
        if getattr(m, "to_gain_bias", None) is not None:
            torch.nn.init.normal_(m.to_gain_bias.weight, std=0.3)
    return p


@pytest.mark.parametrize("kw", [{}, dict(action_kind="none", n_actions=0, n_classes=3)])
def test_strided_cached_generation_equals_full_forward_across_slides(kw):
    cfg = replace(SMALL, **kw)
    p = randomized(cfg)
    B, act = 2, cfg.action_kind != "none"
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 16, (B, 2, 4, 4), generator=g)
    acts = torch.randint(0, 3, (B, 1), generator=g) if act else None
    cls = torch.tensor([0, 2]) if cfg.n_classes else None
    r = Rollout(p, B, keep=1)
    r.start(tok, acts, class_ids=cls)
    window, window_act = tok.clone(), acts
    for step in range(4):  # crosses a slide of the window (frames=4, keep=1)
        if window.shape[1] >= cfg.frames:
            window = window[:, -1:]
            window_act = window_act[:, :0] if act else None
        a = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(step)) if act else None
        if act:
            ref = generate_uncached(p, window, window_act, a, temperature=0)
        else:  # the uncached reference, class-conditioned
            frame = torch.zeros(B, 1, 4, 4, dtype=torch.long)
            for j in range(16):
                out = p(torch.cat([window, frame], 1), None, class_ids=cls)
                frame.view(B, -1)[:, j] = out.logits[:, -1, j].argmax(-1)
            ref = frame[:, 0]
        got = r.step(a, temperature=0)
        assert torch.equal(got.tokens, ref), f"step {step}"
        window = torch.cat([window, ref[:, None]], 1)
        if act:
            window_act = torch.cat([window_act, a[:, None]], 1)


def test_strided_cached_paths_agree_one_many_and_per_row():
    p = randomized(SMALL)
    B, hs = 2, SMALL.n_embd // SMALL.n_head
    tok, acts = torch.randint(0, 16, (B, 3, 4, 4)), torch.randint(0, 3, (B, 2))
    cond = p.block_conditions(acts, B, 3)
    x, ln = p.embed_blocks(tok, cond), p.ln_condition(cond)
    S = x.shape[1]

    def cache():
        return KVCache(
            SMALL.n_layer, B, SMALL.n_head, SMALL.frames * p.block_len, hs, torch.device("cpu"), x.dtype
        )

    with torch.no_grad():
        whole = p.forward_cached(x, ln, cache(), None, 0)  # S positions from 0
        c = cache()
        half = p.forward_cached(x[:, :20], ln[:, :20], c, None, 0)
        rest = p.forward_cached(x[:, 20:], ln[:, 20:], c, None, 20)  # S > 1 from a prefix
        c1 = cache()
        ones = torch.cat(
            [p.forward_cached(x[:, i : i + 1], ln[:, i : i + 1], c1, None, i) for i in range(S)], 1
        )
        rows = p.forward_cached(x, ln, cache(), None, torch.zeros(B, dtype=torch.long))  # per-row positions
        x_all = p.drop(x)
        for blk in p.blocks:
            x_all = blk(x_all, ln, attn_mask=p.sparse.mask(S))
        full = p.ln_f(x_all, ln)
    for got in (torch.cat([half, rest], 1), ones, rows, whole):
        assert torch.allclose(got, full, atol=1e-5)
    # the sparse pattern matters: full attention gives other outputs
    dense = replace(SMALL, attn_pattern="full")
    q = randomized(dense)
    q.load_state_dict(p.state_dict())
    assert not torch.allclose(q(tok, acts).logits, p(tok, acts).logits, atol=1e-4)


# ------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_parameter_counts_equal_the_paper_code(name):
    cfg = get_preset(name, "paper")
    setup, n = paper_setup(cfg), param_counts(cfg)
    assert abs(n["tokenizer"] / PAPER_PARAMS[setup.tokenizer_same] - 1) < 0.005
    if setup.prior_same_is_trunk:  # the paper conditions differently: its unconditional trunk at our grid
        assert abs(n["prior_trunk"] / PAPER_PARAMS[setup.prior_same] - 1) < 0.005
    else:  # the paper code has this very conditioning: all but our reward/termination heads
        assert abs((n["prior"] - n["prior_heads"]) / PAPER_PARAMS[setup.prior_same] - 1) < 0.005
    assert (
        n["prior_heads"] > 0 and n["prior"] == n["prior_trunk"] + n["prior_conditioning"] + n["prior_heads"]
    )


def test_tiny_and_small_scales_keep_our_layers():
    for name in PAPER_PRESETS:
        for scale in ("tiny", "small"):
            c = get_preset(name, scale)
            assert (
                not c.tokenizer.paper_layers and not c.prior.paper_layers and c.prior.attn_pattern == "full"
            )


# ------------------------------------------------------------------------------ paper widths, CPU, batch 1
def test_paper_width_forward_and_one_cached_sampling_step_on_cpu(one_thread):
    """The vizdoom_hgs paper tokenizer and prior at full width (the prior's window shortened to 2 frames so the
    dense mask and cache stay small): tokenizer round trip, a prior forward, then one cached token step that
    must reproduce the full forward's logits. Per-step actions (--paper-actions step), the steppable variant."""
    cfg = get_preset("vizdoom_hgs", "paper", paper_actions="step")
    torch.manual_seed(0)
    tok = VQVAE(cfg.tokenizer).eval()
    frames = torch.randint(0, 256, (1, 2, 64, 64, 3), dtype=torch.uint8)
    codes = tok.encode(frames)
    assert codes.shape == (1, 2, 32, 32) and tok.decode(codes).shape == (1, 2, 64, 64, 3)
    pcfg = replace(cfg.prior, frames=2)
    prior = Prior(pcfg).eval()
    prior.tok_emb.set_codes(tok.codebook.embeddings)
    torch.nn.init.normal_(prior.head.weight, std=0.02)
    acts = torch.tensor([[3]])
    with torch.no_grad():
        out = prior(codes, acts)
        assert out.logits.shape == (1, 2, 1024, 1024) and torch.isfinite(out.logits).all()
        cond = prior.block_conditions(acts, 1, 2)
        x, ln = prior.embed_blocks(codes, cond), prior.ln_condition(cond)
        L, hs = prior.block_len, pcfg.n_embd // pcfg.n_head
        cache = KVCache(pcfg.n_layer, 1, pcfg.n_head, 2 * L, hs, torch.device("cpu"), torch.float32)
        prior.forward_cached(x[:, :L], ln[:, :L], cache, None, 0)  # frame 0's block
        h = prior.forward_cached(x[:, L : L + 1], ln[:, L : L + 1], cache, None, L)  # the next slot: one step
        step_logits = prior.head(h)[:, 0]  # predicts token 0 of frame 1
    assert torch.allclose(step_logits, out.logits[:, 1, 0], atol=1e-4)


def test_print_config_shows_ours_and_the_papers_side_by_side():
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "train.py"),
            "--env",
            "tgif",
            "--scale",
            "paper",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "prior.attn_pattern (attn_type)" in out and "DIFFERS" not in out
    assert f"{PAPER_PARAMS['gpt_large@4x32x32']:,}" in out and f"{PAPER_PARAMS['vae_res64_ds422']:,}" in out


# ------------------------------------------------ the paper's BAIR pixel conditioning and whole-clip actions
def test_resnet34_conditioner_has_the_paper_codes_parameter_count():
    n = param_counts(get_preset("bair_paper", "paper"))
    assert abs(n["prior_resnet"] / PAPER_PARAMS["resnet34@bair"] - 1) < 0.005


@pytest.mark.parametrize("name", ["vizdoom_hgs", "vizdoom_battle2", "robonet"])
def test_per_step_variant_of_the_paper_presets_keeps_its_counts(name):
    cfg = get_preset(name, "paper", paper_actions="step")
    assert cfg.prior.action_cond == "cond_ln" and cfg.tokenizer.stride == (1, 2, 2)
    setup, n = paper_setup(cfg), param_counts(cfg)
    assert abs(n["tokenizer"] / PAPER_PARAMS[setup.tokenizer_same] - 1) < 0.005
    assert abs(n["prior_trunk"] / PAPER_PARAMS[setup.prior_same] - 1) < 0.005


def _cached_step_matches_forward(prior: Prior, codes, acts, memory) -> None:
    """Prefill frame 0's block, run frame 1's slot as one cached step: its logits equal the full forward's."""
    pcfg = prior.cfg
    with torch.no_grad():
        out = prior(codes, acts, cond_frames=memory)
        assert torch.isfinite(out.logits).all()
        mem = prior.cond_memory(None, 1, memory)
        kv = None if mem is None else prior.memory_kv(mem)
        cond = prior.block_conditions(acts, 1, 2)
        x, ln = prior.embed_blocks(codes, cond), prior.ln_condition(cond)
        L, hs = prior.block_len, pcfg.n_embd // pcfg.n_head
        cache = KVCache(pcfg.n_layer, 1, pcfg.n_head, 2 * L, hs, torch.device("cpu"), torch.float32)
        prior.forward_cached(x[:, :L], None if ln is None else ln[:, :L], cache, None, 0, kv)
        h = prior.forward_cached(
            x[:, L : L + 1], None if ln is None else ln[:, L : L + 1], cache, None, L, kv
        )
        step_logits = prior.head(h)[:, 0]
    assert torch.allclose(step_logits, out.logits[:, 1, 0], atol=1e-4)


def test_bair_paper_pixel_frame_conditioning_forward_and_cached_step(one_thread):
    """bair_paper at paper width: one 64x64 pixel frame through the ResNet-34 conditions 8x32x32 latents (the window
    shortened to 2 latent frames); a prior forward and one cached step reproduce each other."""
    cfg = get_preset("bair_paper", "paper")
    assert cfg.prior.cond_pixels and cfg.prior.frames == 8 and cfg.prior.n_cond_frames == 1
    torch.manual_seed(0)
    prior = Prior(replace(cfg.prior, frames=2)).eval()
    torch.nn.init.normal_(prior.head.weight, std=0.02)
    codes = torch.randint(0, 1024, (1, 2, 32, 32))
    frame = torch.randint(0, 256, (1, 1, 64, 64, 3), dtype=torch.uint8)
    _cached_step_matches_forward(prior, codes, None, frame)
    with pytest.raises(ValueError, match="cond_frames"):
        prior(codes, cond_frames=frame[:, :, :32])
    r = Rollout(prior, 1)  # the cached sampler takes the frame too
    r.start(codes[:, :0], cond_frames=frame)
    assert r.mem_k.shape[3] == 16 * 16


def test_whole_clip_action_conditioning_forward_and_cached_step(one_thread):
    """vizdoom_hgs at paper scale follows the paper's protocol: 8x32x32 latents and the clip's 15 actions as one
    condition vector; forward and one cached step at batch 1 (window shortened to 2 frames)."""
    cfg = get_preset("vizdoom_hgs", "paper")
    assert cfg.prior.action_cond == "clip" and cfg.tokenizer.stride == (2, 2, 2) and cfg.prior.frames == 8
    torch.manual_seed(0)
    prior = Prior(replace(cfg.prior, frames=2)).eval()
    torch.nn.init.normal_(prior.head.weight, std=0.02)
    for m in prior.modules():
        if getattr(m, "to_gain_bias", None) is not None:
            torch.nn.init.normal_(m.to_gain_bias.weight, std=0.1)
    codes = torch.randint(0, 1024, (1, 2, 32, 32))
    acts = torch.randint(0, 5, (1, 15))
    _cached_step_matches_forward(prior, codes, acts, None)
    other = (acts + 1) % 5  # every block, frame 0's too, is conditioned on the whole clip
    assert not torch.allclose(
        prior.block_conditions(acts, 1, 2)[:, 0], prior.block_conditions(other, 1, 2)[:, 0]
    )
    with pytest.raises(ValueError, match="15"):
        prior(codes, acts[:, :1])
    r = Rollout(prior, 1)
    r.start(codes[:, :1], acts)
    with pytest.raises(ValueError, match="start"):
        r.step(acts[:, 0])


def test_dream_env_refuses_a_whole_clip_conditioned_bundle():
    from types import SimpleNamespace

    from envs.dream import DreamEnv

    wm = SimpleNamespace(cfg=get_preset("vizdoom_hgs", "paper"))
    with pytest.raises(ValueError, match="action_cond='clip'.*--paper-actions step"):
        DreamEnv(world_model=wm)
