"""Tokenizer objective options: L1 / L1+MSE pixel loss, random-feature perceptual term, PatchGAN hinge adversary
(warm-up, adaptive weight, no cross-talk between the players), exact resume and bundle loading with them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import fit_clip, make_bundle, scenes, tiny_experiment
from worldmodel.config import TokenizerConfig
from worldmodel.discriminator import Adversary, PatchDiscriminator, adaptive_weight, hinge_d_loss
from worldmodel.perceptual import RandomFeatures
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
    disc_channels=8,
    disc_layers=2,
)


def blur(video: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of float video (B, 3, T, H, W), per frame."""
    B, C, T, H, W = video.shape
    f = video.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    f = F.avg_pool2d(F.pad(f, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return f.reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)


def test_defaults_are_the_paper_objective_and_build_no_extra_modules():
    torch.manual_seed(0)
    m = VQVAE(TINY)
    assert m.perceptual is None and m.adversary is None
    assert not any(k.startswith(("adversary.", "perceptual.")) for k in m.state_dict())
    x = m.to_float(scenes())
    recon = torch.rand_like(x) - 0.5
    assert torch.equal(m.pixel_loss(recon, x), F.mse_loss(recon, x) / m.data_variance)
    assert list(m.optimizer_param_sets()) == ["tokenizer"]
    # the extra modules do not change the autoencoder's initial weights
    torch.manual_seed(0)
    m2 = VQVAE(replace(TINY, perceptual_weight=1.0, adv_weight=0.5))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_l1_and_l1_plus_mse_losses_and_gradients_differ_from_mse():
    torch.manual_seed(0)
    models = {k: VQVAE(replace(TINY, recon_loss=k)) for k in ("mse", "l1", "l1+mse")}
    for m in models.values():
        m.load_state_dict(models["mse"].state_dict())
        m.set_data_variance(0.04)
    x = VQVAE.to_float(scenes())
    recon = x + 0.1 * torch.randn_like(x)
    recon[..., :4, :4] += 0.5  # one large error: L1 weighs it linearly, MSE quadratically
    mse, l1 = F.mse_loss(recon, x) / 0.04, F.l1_loss(recon, x) / 0.2
    assert models["mse"].pixel_loss(recon, x) == pytest.approx(float(mse), rel=1e-5)
    assert models["l1"].pixel_loss(recon, x) == pytest.approx(float(l1), rel=1e-5)
    assert models["l1+mse"].pixel_loss(recon, x) == pytest.approx(float(mse + l1), rel=1e-5)
    grads = {}
    for k, m in models.items():
        m.compute_loss({"frames": scenes()})[0].backward()
        grads[k] = m.decoder.last_layer.grad.flatten()
    cos = F.cosine_similarity(grads["mse"], grads["l1"], dim=0)
    assert cos < 0.99  # a different direction, not a rescaled MSE


def test_hard_pixel_term_is_the_mean_of_the_worst_pixels_and_pulls_on_them():
    torch.manual_seed(0)
    m = VQVAE(replace(TINY, hard_pixel_weight=2.0, hard_pixel_fraction=16 / (4 * 16 * 16)))
    m.set_data_variance(0.04)
    x = VQVAE.to_float(scenes(B=1))
    recon = x + 0.01 * torch.randn_like(x)
    recon[0, :, 1, 3:7, 5:9] += 0.5  # a 4x4 object (16 pixels) drawn wrong, the rest nearly right
    mse = F.mse_loss(recon, x) / 0.04
    worst = ((recon - x)[0, :, 1, 3:7, 5:9].pow(2).mean()) / 0.04  # exactly the 16 worst pixels
    assert m.hard_pixel_loss(recon, x) == pytest.approx(float(worst), rel=1e-4)
    assert m.pixel_loss(recon, x) == pytest.approx(float(mse + 2.0 * worst), rel=1e-4)
    # its gradient lands on the object's pixels: the mean-squared term spreads over all 1024
    r = recon.clone().requires_grad_(True)
    m.hard_pixel_loss(r, x).backward()
    g = r.grad[0].abs().sum(0)  # (T, H, W)
    assert g[1, 3:7, 5:9].sum() > 0.99 * g.sum()
    with pytest.raises(ValueError, match="hard_pixel_fraction"):
        TokenizerConfig(hard_pixel_fraction=0.0)
    with pytest.raises(ValueError, match="hard_pixel_weight"):
        TokenizerConfig(hard_pixel_weight=-1.0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"recon_loss": "l1"},
        {"recon_loss": "l1+mse"},
        {"perceptual_weight": 0.2},
        {"adv_weight": 0.1, "adv_start_step": 10},
        {"hard_pixel_weight": 0.1},
    ],
)
def test_each_objective_trains(kw):
    torch.manual_seed(0)
    first, metrics = fit_clip(VQVAE(replace(TINY, **kw)), scenes(B=2, T=4))
    assert metrics["psnr"] > first["psnr"] + 3.0, (kw, first, metrics)
    # the worst pixels are by definition the slowest to fall: the hard-pixel term is held to less
    assert metrics["recon_loss"] < (0.6 if "hard_pixel_weight" in kw else 0.5) * first["recon_loss"]
    if "perceptual_weight" in kw:
        assert metrics["perceptual"] < 0.9 * first["perceptual"]
    if "adv_weight" in kw:
        assert metrics["adv_active"] == 1.0 and {"d_loss", "g_loss", "adv_lambda"} <= set(metrics)


def test_perceptual_features_are_fixed_and_weigh_small_objects():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    pf = RandomFeatures()
    assert torch.equal(torch.rand(3), before)  # building it does not move the global RNG
    assert all(
        torch.equal(a, b) for a, b in zip(pf.state_dict().values(), RandomFeatures().state_dict().values())
    )
    assert not list(pf.parameters())  # buffers: never trained, never in the optimizer
    x = VQVAE.to_float(scenes())
    assert float(pf(x, x)) == 0.0
    # same pixel MSE, two kinds of error: the objects erased vs a uniform brightness shift
    erased = torch.full_like(x, float(x.min()))
    shift = (F.mse_loss(erased, x)).sqrt()
    shifted = x + shift
    assert F.mse_loss(shifted, x) == pytest.approx(float(F.mse_loss(erased, x)), rel=1e-4)
    assert pf(erased, x) > 3 * pf(shifted, x)
    assert pf(blur(x), x) > 0.1


def test_discriminator_hinge_learns_blur_and_cannot_separate_identical_inputs():
    torch.manual_seed(0)
    adv = Adversary(1.0, adaptive=False, channels=8, n_layers=2)
    real = VQVAE.to_float(scenes(B=4, T=2))
    opt = torch.optim.Adam(adv.parameters(), lr=2e-3)

    def d_loss(fake: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(adv.logits(real), adv.logits(fake))

    start = float(d_loss(blur(real)))
    for _ in range(60):
        loss = d_loss(blur(real))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 1.5 and float(d_loss(blur(real))) < 0.5  # the blur is detected
    assert float(d_loss(real)) >= 2.0 - 1e-5  # identical inputs: the hinge cannot go below 2


def test_generator_term_reaches_the_decoder_only_and_the_discriminator_loss_the_discriminator_only():
    torch.manual_seed(0)
    adv = Adversary(0.5, adaptive=False, channels=8, n_layers=2)
    real = VQVAE.to_float(scenes(B=2, T=2))
    fake = blur(real).clone().requires_grad_(True)
    loss, metrics = adv(real, fake, fake.sum() * 0, torch.zeros(1, requires_grad=True))
    loss.backward()
    got = [p.grad.clone() for p in adv.parameters()]
    fake_grad = fake.grad.clone()
    adv.zero_grad()
    fake.grad = None
    hinge_d_loss(adv.logits(real), adv.logits(fake.detach())).backward()
    for a, b in zip(got, (p.grad for p in adv.parameters())):
        assert torch.allclose(a, b, atol=1e-6)  # the generator's term adds nothing to D's gradient
    (-0.5 * adv.logits(fake).mean()).backward()
    assert fake.grad.abs().sum() > 0 and torch.allclose(fake_grad, fake.grad, atol=1e-7)
    assert metrics["adv_active"] == 1.0


def test_adversary_warm_up_and_adaptive_weight():
    torch.manual_seed(0)
    adv = Adversary(1.0, start_step=2, adaptive=True, channels=8, n_layers=2)
    real = VQVAE.to_float(scenes(B=1, T=2))
    w = torch.randn(4, requires_grad=True)
    fake = blur(real) + (w.sum() * 0.01)
    for _ in range(2):
        loss, metrics = adv(real, fake, (w**2).sum(), w)
        loss.backward(retain_graph=True)
        assert metrics == {"adv_active": 0.0} and float(loss) == 0.0
        assert all(p.grad is not None and not p.grad.any() for p in adv.parameters())  # touched, zero
    assert int(adv.steps) == 2 and "steps" in dict(adv.named_buffers())
    loss, metrics = adv(real, fake, (w**2).sum(), w)
    assert metrics["adv_active"] == 1.0 and int(adv.steps) == 3
    # lambda = |grad rec| / |grad adv| at the last layer: doubling the reconstruction loss doubles it
    g = -adv.logits(fake, detach_weights=True).mean()
    lam1, lam2 = adaptive_weight((w**2).sum(), g, w), adaptive_weight(2 * (w**2).sum(), g, w)
    assert float(lam2) == pytest.approx(2 * float(lam1), rel=1e-4) and float(lam1) > 0
    adv.eval()  # validation: scores only, no step, nothing added
    with torch.no_grad():
        zero, m = adv(real, fake.detach(), torch.zeros(()), w)
    assert float(zero) == 0.0 and {"d_loss", "g_loss"} == set(m) and int(adv.steps) == 3


def test_discriminator_shape_and_resolution_check():
    d = PatchDiscriminator(8, 3)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="disc_layers"):
        VQVAE(replace(TINY, adv_weight=1.0, disc_layers=3))  # 16 px < 24
    with pytest.raises(ValueError, match="recon_loss"):
        TokenizerConfig(recon_loss="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adv_weight"):
        TokenizerConfig(adv_weight=-1.0)


def test_tokenizer_stage_with_discriminator_resumes_exactly_and_loads_as_a_bundle(tmp_path, hgs_store):
    from worldmodel.bundle import WorldModel
    from worldmodel.checkpoint import load_trainer_state
    from worldmodel.stages import load_tokenizer, train_tokenizer

    cfg = tiny_experiment(hgs_store, steps=6)
    cfg = replace(
        cfg,
        tokenizer=replace(
            cfg.tokenizer,
            recon_loss="l1+mse",
            perceptual_weight=0.5,
            adv_weight=0.2,
            adv_start_step=3,
            disc_channels=8,
            disc_layers=2,
        ),
    )
    full = train_tokenizer(cfg, tmp_path / "a", progress=False)
    part = train_tokenizer(
        replace(cfg, tokenizer_train=replace(cfg.tokenizer_train, max_minutes=1e-9)),
        tmp_path / "b",
        progress=False,
    )
    assert part.step == 1
    assert len(load_trainer_state(tmp_path / "b", "tokenizer")["optimizer"]["param_groups"]) == 4
    resumed = train_tokenizer(cfg, tmp_path / "b", progress=False)
    assert resumed.step == 6 and full.last_metrics["adv_active"] == 1.0
    for k in ("recon_loss", "d_loss", "g_loss", "perceptual"):
        assert resumed.last_metrics[k] == pytest.approx(full.last_metrics[k], rel=1e-5), k
    a, b = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "b")
    assert int(a.adversary.steps) == 6
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    # a bundle of this config loads (the discriminator rides along, unused) and dreams
    bundle = make_bundle(cfg, tmp_path / "bundle")
    wm = WorldModel.from_pretrained(bundle)
    frames = torch.zeros(1, 4, 32, 32, 3, dtype=torch.uint8)
    assert wm.tokenizer.decode(wm.tokenizer.encode(frames)).shape == frames.shape
