"""VQ-VAE tokenizer: shapes, exact causality, learning, codebook restarts, save/load, DDP, errors."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from worldmodel.codebook import Codebook
from worldmodel.config import TokenizerConfig
from worldmodel.tokenizer import VQVAE

TINY = TokenizerConfig(
    resolution=16,
    stride=(1, 4, 4),
    channels=16,
    n_res_layers=1,
    n_heads=2,
    codebook_size=32,
    embedding_dim=8,
    max_frames=8,
)


def frames(B=2, T=4, R=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, R, R, 3), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    "stride,res,T", [((1, 8, 8), 64, 4), ((2, 2, 2), 16, 8), ((1, 4, 4), 16, 4), ((4, 2, 2), 16, 8)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_shapes(stride, res, T, causal):
    m = VQVAE(replace(TINY, stride=stride, resolution=res, causal_time=causal))
    x = frames(2, T, res)
    tok = m.encode(x)
    assert tok.shape == (2, T // stride[0], res // stride[1], res // stride[2]) and tok.dtype == torch.int64
    assert m.decode(tok).shape == x.shape and m.decode(tok).dtype == torch.uint8
    loss, metrics = m.compute_loss({"frames": x})
    loss.backward()
    assert loss.ndim == 0 and {"recon_loss", "commitment", "perplexity", "codebook_usage", "psnr"} <= set(
        metrics
    )


@pytest.mark.parametrize("stride", [(1, 4, 4), (2, 2, 2)])
def test_causal_time_is_exact(stride):
    torch.manual_seed(0)
    m = VQVAE(replace(TINY, stride=stride, causal_time=True)).eval()
    x = frames(1, 8)
    x2 = x.clone()
    x2[:, 4:] = 255 - x2[:, 4:]  # change frames 4.. (latent frames >= 4 // st)
    k = 4 // stride[0]
    z1, z2 = m.encoder(m.to_float(x)), m.encoder(m.to_float(x2))
    assert torch.equal(z1[:, :, :k], z2[:, :, :k])  # features of the past are bit-identical
    assert not torch.equal(z1[:, :, k:], z2[:, :, k:])
    assert torch.equal(m.encode(x)[:, :k], m.encode(x2)[:, :k])
    # decoding: frames before the change depend only on earlier tokens
    t1, t2 = m.encode(x), m.encode(x2)
    t2[:, :k] = t1[:, :k]
    assert torch.equal(m.decode(t1)[:, :4], m.decode(t2)[:, :4])


def test_non_causal_sees_the_future():
    torch.manual_seed(0)
    m = VQVAE(replace(TINY, causal_time=False)).eval()
    x = frames(1, 4)
    x2 = x.clone()
    x2[:, 3] = 0
    assert not torch.equal(m.encoder(m.to_float(x))[:, :, 0], m.encoder(m.to_float(x2))[:, :, 0])


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    m = VQVAE(TINY)
    # smooth images are learnable in a few steps; random noise would not be
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    imgs = torch.stack([((xx * (i + 1) + yy * 3 * i) % 256) for i in range(4)]).to(torch.uint8)
    x = imgs[:, None, :, :, None].expand(4, 2, 16, 16, 3).contiguous()
    m.set_data_variance(float((x.float() / 255 - 0.5).var()))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, metrics = m.compute_loss({"frames": x})
        first = metrics["recon_loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["recon_loss"] < first / 5, (first, metrics["recon_loss"])


def test_dead_codes_are_restarted_near_encoder_outputs():
    torch.manual_seed(0)
    cb = Codebook(16, 4, decay=0.9)
    data = torch.randn(2, 4, 1, 8, 8) * 0.1 + 5.0  # every encoder output sits near (5, 5, 5, 5)
    cb.train()
    cb(data)  # data-dependent init puts codes on data points
    assert bool(cb.initialized)
    with torch.no_grad():
        cb.embeddings[:8] = -100.0  # make half the codes unreachable
        cb.embed_sum[:8] = -100.0
        cb.cluster_size[:8] = 0.0
    before = int(cb.restarts)
    cb(data)
    assert int(cb.restarts) - before >= 8
    assert (cb.embeddings - 5.0).abs().max() < 1.0  # all codes now live near the data
    out = cb(data)
    assert out.z_q.shape == data.shape and out.codes.shape == (2, 1, 8, 8)


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = VQVAE(TINY)
    m.set_data_variance(0.05)
    m.compute_loss({"frames": frames()})  # initialises the codebook and moves its EMA state
    m.eval()
    path = tmp_path / "tok.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    m2 = VQVAE(TINY)
    m2.load_state_dict(load_file(str(path)))
    m2.eval()
    x = frames(3, 4, seed=5)
    assert torch.equal(m.encode(x), m2.encode(x))
    assert torch.equal(m.decode(m.encode(x)), m2.decode(m.encode(x)))
    assert bool(m2.codebook.initialized) and float(m2.data_variance) == pytest.approx(0.05)


def test_bad_inputs_raise_and_model_stays_usable():
    m = VQVAE(TINY).eval()
    with pytest.raises(ValueError, match="expected torch.uint8"):
        m.encode(frames().float())
    with pytest.raises(ValueError, match=r"expected a uint8 tensor \(B, T, 16, 16, 3\)"):
        m.encode(frames()[0])
    with pytest.raises(ValueError, match="expected 16x16"):
        m.encode(frames(R=32))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 32\)"):
        m.decode(torch.full((1, 2, 4, 4), 32))
    with pytest.raises(ValueError, match=r"expected an int64 tensor \(B, T', 4, 4\)"):
        m.decode(torch.zeros((1, 2, 5, 4), dtype=torch.int64))
    with pytest.raises(ValueError, match="power of two"):
        VQVAE(replace(TINY, stride=(1, 3, 3)))
    with pytest.raises(ValueError, match="divisible by the temporal stride"):
        VQVAE(replace(TINY, stride=(2, 2, 2))).encode(frames(T=3))
    with pytest.raises(ValueError, match="positive"):
        m.set_data_variance(0.0)
    assert m.encode(frames()).shape == (2, 4, 4, 4)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same init on every rank
    m = VQVAE(TINY)
    ddp = torch.nn.parallel.DistributedDataParallel(m, broadcast_buffers=False)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    for step in range(4):
        x = frames(2, 2, seed=100 * rank + step)  # different data on each rank
        out = ddp(m.to_float(x))
        loss = out.recon_loss + out.commitment
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(
        {k: v.clone() for k, v in m.codebook.state_dict().items()}, os.path.join(out_dir, f"cb{rank}.pt")
    )
    dist.destroy_process_group()


def test_ddp_keeps_codebooks_identical_across_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "cb0.pt"), torch.load(tmp_path / "cb1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert bool(a["initialized"]) and not torch.equal(a["cluster_size"], torch.ones_like(a["cluster_size"]))


def test_data_variance_normalises_the_loss():
    torch.manual_seed(0)
    m = VQVAE(TINY)
    x = frames()
    m.set_data_variance(1.0)
    torch.manual_seed(1)
    l1 = m(m.to_float(x)).recon_loss.item()
    m.set_data_variance(0.25)
    l2 = m(m.to_float(x)).recon_loss.item()
    assert l2 == pytest.approx(4 * l1, rel=1e-4)
    np.testing.assert_equal(m.grid, (4, 4))
