"""Per-frame PSNR and SSIM of uint8 RGB frames.

Both take two uint8 arrays (numpy or torch) of the same shape (..., H, W, 3), any number of leading
batch/time axes, and return a float64 numpy array of shape (...): one value per frame (a 0-d array
for a single image). Average them yourself (e.g. per time step over a batch of rollouts).

PSNR uses peak 255: ``10 * log10(255**2 / MSE)`` with the MSE over the frame's H*W*3 values. Identical
frames (MSE = 0) would give +inf, which poisons means over frames; instead every value is clipped to
``PSNR_MAX_DB`` = 100 dB, so identical frames give exactly 100 dB. (The smallest non-zero MSE of a
uint8 frame, one value off by one, gives 10*log10(255**2 * H*W*3) dB: 89 dB at 64x64, 99.8 dB at
224x224, so the clip never changes a real value for frames up to 224x224.)

SSIM is scikit-image's ``structural_similarity`` with the settings of Wang et al. 2004 (the paper's
reference implementation): an 11x11 Gaussian window with sigma 1.5 (``gaussian_weights=True``),
population rather than sample covariance (``use_sample_covariance=False``), K1 = 0.01, K2 = 0.03 and
``data_range=255``. For RGB it is the mean of the three per-channel SSIMs (``channel_axis=-1``), each
the mean of the SSIM map over the pixels whose window fits in the frame (a 5-pixel border is dropped).
Frames must be at least 11x11.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

PSNR_MAX_DB = 100.0


def _as_uint8_frames(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array or torch tensor of shape (..., H, W, 3), got {type(x).__name__}"
        )
    if x.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 frames in [0, 255] of shape (..., H, W, 3), got dtype {x.dtype}"
        )
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., H, W, 3), got {x.shape}")
    return x


def _check_pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_uint8_frames(a, "a"), _as_uint8_frames(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (..., H, W, 3), got {a.shape} and {b.shape}")
    return a, b


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per frame, peak 255, clipped to ``PSNR_MAX_DB``.

    Args:
        a, b: uint8 frames of the same shape (..., H, W, 3).

    Returns:
        float64 array of shape (...) in dB.
    """
    a, b = _check_pair(a, b)
    diff = a.astype(np.int32) - b.astype(np.int32)
    mse = np.mean(np.square(diff, dtype=np.float64), axis=(-3, -2, -1))  # (...)
    out = np.full(mse.shape, PSNR_MAX_DB)
    nz = mse > 0
    out[nz] = np.minimum(10.0 * np.log10(255.0**2 / mse[nz]), PSNR_MAX_DB)
    return out


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Structural similarity per frame (Wang et al. 2004 settings; see the module docstring).

    Args:
        a, b: uint8 frames of the same shape (..., H, W, 3) with H, W >= 11.

    Returns:
        float64 array of shape (...), 1.0 for identical frames.
    """
    a, b = _check_pair(a, b)
    h, w = a.shape[-3:-1]
    if h < 11 or w < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels (its Gaussian window), got {h}x{w}")
    lead = a.shape[:-3]
    fa, fb = a.reshape(-1, h, w, 3), b.reshape(-1, h, w, 3)
    out = np.array(
        [
            structural_similarity(
                x,
                y,
                data_range=255,
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for x, y in zip(fa, fb, strict=True)
        ],
        dtype=np.float64,
    )
    return out.reshape(lead)


OFF_THRESHOLD = 48  # grey levels (of 255): a pixel this far off is visibly wrong, not noise


def _grey(x: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float64 luma (..., H, W) in [0, 255] (ITU-R 601 weights)."""
    return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def laplacian_variance(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each frame's grey image (interior pixels, no padding):
    uint8 (..., H, W, 3) with H, W >= 3 -> float64 (...). Fine detail and edges raise it; blur lowers it."""
    g = _grey(_as_uint8_frames(frames, "frames"))
    if g.shape[-1] < 3 or g.shape[-2] < 3:
        raise ValueError(f"frames: got {g.shape[-2]}x{g.shape[-1]} pixels, expected at least 3x3")
    lap = g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * g[..., 1:-1, 1:-1]
    return lap.reshape(*lap.shape[:-2], -1).var(axis=-1)


def sharpness_ratio(recon: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor) -> float:
    """Mean Laplacian variance of ``recon`` over that of ``real`` (uint8 (..., H, W, 3) of one shape): the
    share of the real frames' fine detail the reconstructions keep (1 = as sharp, < 1 blurred). A ratio
    of means over all frames, not a mean of per-frame ratios, which flat real frames would blow up."""
    a, b = _check_pair(recon, real)
    den = float(laplacian_variance(b).mean())
    if den <= 0:
        raise ValueError(
            "real: every frame is flat (zero Laplacian variance); the sharpness ratio is undefined"
        )
    return float(laplacian_variance(a).mean()) / den


def fraction_off(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, threshold: int = OFF_THRESHOLD
) -> np.ndarray:
    """Per frame, the fraction of pixels whose largest channel difference exceeds ``threshold`` grey levels:
    uint8 (..., H, W, 3) pairs -> float64 (...)."""
    a, b = _check_pair(a, b)
    off = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) > threshold
    return off.reshape(*off.shape[:-2], -1).mean(-1)
