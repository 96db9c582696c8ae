"""Finite scalar quantisation (``TokenizerConfig.quantizer = "fsq"``): the grid, its codes, its gradient, the
config's checks, and a tokenizer with it that trains, round-trips and dreams as a bundle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.conftest import fit_clip, make_bundle, scenes, tiny_experiment
from tests.test_tokenizer_objectives import TINY
from worldmodel.config import TokenizerConfig
from worldmodel.fsq import FSQ
from worldmodel.tokenizer import VQVAE

LEVELS = (8, 5, 3)
FSQ_TINY = replace(TINY, quantizer="fsq", fsq_levels=LEVELS, codebook_size=120, embedding_dim=3)


def test_grid_codes_vectors_and_lookup_agree():
    torch.manual_seed(0)
    q = FSQ(LEVELS)
    assert q.n_codes == 120 and q.embeddings.shape == (120, 3)
    # every code is reachable, each channel takes exactly its number of values, and codes are unique per vector
    z = torch.randn(4, 3, 2, 40, 40) * 3
    out = q(z)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 120
    assert out.codes.unique().numel() == 120 and float(out.usage) == 1.0
    for i, n in enumerate(LEVELS):
        assert out.z_q[:, i].unique().numel() == n
    assert float(out.z_q.abs().max()) <= 1.0 and float(out.commitment) == 0.0
    # forward, codes_for (encode) and lookup (decode) describe the same grid point
    flat = z.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    assert torch.equal(q.codes_for(flat).view(out.codes.shape), out.codes)
    assert torch.allclose(q.lookup(out.codes), out.z_q)
    assert torch.allclose(q.embeddings[out.codes.flatten()], out.z_q.permute(0, 2, 3, 4, 1).reshape(-1, 3))
    assert q.embeddings.unique(dim=0).shape[0] == 120
    # encoding under bf16 autocast (a bf16 encoder output) gives the forward's codes too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = z.bfloat16()
        assert torch.equal(
            q.codes_for(zb.permute(0, 2, 3, 4, 1).reshape(-1, 3)).view(out.codes.shape), q(zb).codes
        )


def test_rounding_passes_the_gradient_straight_through_and_saturates_smoothly():
    torch.manual_seed(0)
    q = FSQ(LEVELS)
    z = torch.randn(2, 3, 1, 4, 4, requires_grad=True)
    q(z).z_q.sum().backward()
    assert z.grad is not None and bool((z.grad > 0).all())  # tanh' > 0 everywhere: no dead inputs
    assert len(q.state_dict()) == 0  # nothing learned, nothing saved


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="levels"):
        FSQ((8, 1))
    with pytest.raises(ValueError, match="fsq_levels"):
        TokenizerConfig(quantizer="fsq")
    with pytest.raises(ValueError, match="codebook-size 120 --config.tokenizer.embedding-dim 3"):
        replace(TINY, quantizer="fsq", fsq_levels=LEVELS)
    with pytest.raises(ValueError, match="quantizer"):
        TokenizerConfig(quantizer="lfq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        FSQ(LEVELS)(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"flat: got shape \(5, 1\), expected \(N, 3\)"):
        FSQ(LEVELS).codes_for(torch.zeros(5, 1))
    with pytest.raises(ValueError, match="fsq_levels.*quantizer='ema'"):
        replace(TINY, fsq_levels=LEVELS)
    with pytest.raises(ValueError, match="at most 32767"):
        replace(TINY, quantizer="fsq", fsq_levels=(8, 8, 8, 8, 8, 8), codebook_size=8**6, embedding_dim=6)


def test_fsq_tokenizer_trains_and_encode_decode_match_the_forward():
    torch.manual_seed(0)
    m, x = VQVAE(FSQ_TINY), scenes(B=2, T=4)
    first, metrics = fit_clip(m, x)
    assert metrics["psnr"] > first["psnr"] + 3.0, (first, metrics)
    m.eval()
    tokens = m.encode(x)
    with torch.no_grad():
        out = m(m.to_float(x))
    assert torch.equal(tokens, out.codes)
    assert torch.equal(m.decode(tokens), m.to_uint8(out.recon))


def test_fsq_bundle_loads_encodes_and_dreams(tmp_path, hgs_store):
    from worldmodel.bundle import WorldModel

    cfg = tiny_experiment(hgs_store, steps=3)
    cfg = replace(
        cfg,
        tokenizer=replace(
            cfg.tokenizer, quantizer="fsq", fsq_levels=(4, 4, 4), codebook_size=64, embedding_dim=3
        ),
    )
    wm = WorldModel.from_pretrained(make_bundle(cfg, tmp_path / "bundle"))
    assert wm.prior.cfg.vocab_size == 64
    frames = torch.zeros(1, 4, 32, 32, 3, dtype=torch.uint8)
    tokens = wm.tokenizer.encode(frames)
    assert int(tokens.max()) < 64 and wm.tokenizer.decode(tokens).shape == frames.shape
    ro = wm.rollout(2)
    ro.reset(np.zeros((2, 3, 32, 32, 3), np.uint8), np.zeros((2, 2), np.int64))
    out = ro.step(np.array([0, 1]))
    assert out.frames.shape == (2, 32, 32, 3) and out.frames.dtype == np.uint8
    assert out.tokens.shape == (2, *tokens.shape[-2:]) and int(out.tokens.max()) < 64
