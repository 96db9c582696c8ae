"""PSNR / SSIM / bits-per-dim and the numpy-only restricted unpickler (worldmodel.metrics)."""

from __future__ import annotations

import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from worldmodel.metrics import (
    PSNR_MAX_DB,
    bits_per_dim,
    bits_per_token,
    psnr,
    restricted_load,
    ssim,
    video_dims,
)
from worldmodel.metrics.weights import flatten_arrays, load_numpy_checkpoint

# ---------------------------------------------------------------- PSNR


def test_psnr_matches_mse_formula_per_frame():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 10  # every value off by 10 -> MSE 100
    b[1, 2, 3, 1] = 255  # one of 48 values off by 255 -> MSE 255^2 / 48
    out = psnr(a, b)
    assert out.shape == (2,) and out.dtype == np.float64
    np.testing.assert_allclose(out, [10 * math.log10(255**2 / 100), 10 * math.log10(48)], rtol=1e-12)
    np.testing.assert_allclose(psnr(b, a), out)  # symmetric


def test_psnr_identical_frames_are_capped_without_warnings():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 5, 8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[1, 2, 0, 0, 0] ^= 1  # one frame off by one LSB in a single value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = psnr(a, b)
    assert out.shape == (3, 5)
    expected = np.full((3, 5), PSNR_MAX_DB)
    expected[1, 2] = 10 * math.log10(255**2 * 8 * 8 * 3)
    np.testing.assert_allclose(out, expected)


def test_psnr_accepts_torch_and_single_images():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ref = psnr(a, b)
    assert ref.shape == ()
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(float(ref))


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_bad_frames_are_rejected_with_clear_errors(fn):
    a = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        fn(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="same shape"):
        fn(a, a[:1])
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\)"):
        fn(a[..., :1], a[..., :1])
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        fn(a.tolist(), a)


# ---------------------------------------------------------------- SSIM


def test_ssim_identical_is_one_and_symmetric():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 3, 24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(ssim(a, a), np.ones((2, 3)))
    s = ssim(a, b)
    assert s.shape == (2, 3) and np.all(s < 0.99) and np.all(s > 0)
    np.testing.assert_allclose(ssim(b, a), s, rtol=1e-12)


def test_ssim_of_constant_frames_is_the_luminance_term():
    # Constant frames have zero variance/covariance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), C1 = (0.01 * 255)^2.
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert float(ssim(a, b)) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rel=1e-9)


def _ssim_wang(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 by hand: 11-tap Gaussian (sigma 1.5) moments, population statistics, 5-px border dropped."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(3):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731 - radius 5 -> 11x11 window
        ma, mb = f(a), f(b)
        va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        m = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
        vals.append(m[5:-5, 5:-5].mean())
    return float(np.mean(vals))


def test_ssim_matches_hand_computation_with_wang_settings():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 60, a.shape), 0, 255).astype(np.uint8)
    out = ssim(a, b)
    np.testing.assert_allclose(out, [_ssim_wang(a[i], b[i]) for i in range(2)], rtol=1e-7)


def test_ssim_rejects_frames_smaller_than_window():
    a = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a, a)


# ---------------------------------------------------------------- bits / dim


def test_bits_per_token_and_dim():
    assert bits_per_token(math.log(2)) == pytest.approx(1.0)
    assert bits_per_token(math.log(512)) == pytest.approx(9.0)
    # Uniform over 1024 codes = 10 bits/token; 8x32x32 tokens for a 16x64x64x3 clip -> 10 * 8192 / 196608 = 5/12.
    assert video_dims((16, 64, 64, 3)) == 196608
    assert bits_per_dim(math.log(1024), (8, 32, 32), (16, 64, 64, 3)) == pytest.approx(5 / 12)
    # One token per pixel value: bits/dim equals bits/token.
    assert bits_per_dim(math.log(256), (4, 8, 8, 3), (4, 8, 8, 3)) == pytest.approx(8.0)


def test_bits_bad_shapes():
    with pytest.raises(ValueError, match="video_shape"):
        video_dims((16, 64, 64))
    with pytest.raises(ValueError, match="video_shape"):
        bits_per_dim(1.0, (8, 8, 8), (16, 0, 64, 3))
    with pytest.raises(ValueError, match="token_shape"):
        bits_per_dim(1.0, (), (16, 64, 64, 3))


# ---------------------------------------------------------------- restricted unpickler


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_restricted_unpickler_loads_dicts_of_arrays(protocol):
    tree = {
        "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float64)},
        "step": np.int64(7),
        "meta": [1, "x", None, (2.5, True)],
    }
    out = restricted_load(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(out["params"]["w"], tree["params"]["w"])
    assert out["params"]["w"].dtype == np.float32 and out["params"]["b"].dtype == np.float64
    assert out["step"] == 7 and out["meta"] == [1, "x", None, (2.5, True)]


@pytest.mark.parametrize(
    "fn, arg, forbidden",
    [
        (os.system, "touch {marker}", "system"),
        (eval, "open({marker!r}, 'w').close()", "builtins.eval"),
        (exec, "open({marker!r}, 'w').close()", "builtins.exec"),
    ],
)
def test_restricted_unpickler_rejects_callables_without_running_them(tmp_path, fn, arg, forbidden):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps({"w": np.zeros(2), "x": _Evil(fn, arg.format(marker=marker))}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=forbidden):
        restricted_load(payload)
    assert not os.path.exists(marker)
    path = tmp_path / "evil.ckpt"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        load_numpy_checkpoint(path)
    assert not os.path.exists(marker)


def test_restricted_unpickler_rejects_object_arrays_and_old_protocols():
    with pytest.raises(pickle.UnpicklingError, match="object-dtype"):
        restricted_load(pickle.dumps({"a": np.array([1, "s"], dtype=object)}, protocol=4))
    # protocol 2 encodes raw bytes through _codecs.encode, which is not an array helper
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        restricted_load(pickle.dumps(np.zeros(3), protocol=2))


def test_flatten_and_load_numpy_checkpoint(tmp_path):
    path = tmp_path / "w.ckpt"
    path.write_bytes(
        pickle.dumps({"a": {"b": np.zeros(2), "c": {"d": np.ones(3)}}, "e": np.arange(2)}, protocol=4)
    )
    flat = load_numpy_checkpoint(path)
    assert sorted(flat) == ["a/b", "a/c/d", "e"]
    np.testing.assert_array_equal(flat["a/c/d"], np.ones(3))
    with pytest.raises(ValueError, match="numpy array at 'a/x'"):
        flatten_arrays({"a": {"x": 3}})
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_numpy_checkpoint(tmp_path / "missing.ckpt")
