"""Evaluation metrics: per-frame PSNR/SSIM, bits/dim, and FVD with a Kinetics-400 I3D.

Importing this package is cheap (no weights are loaded); FVD loads I3D on first use from
``$WORLDMODEL_HOME/weights/i3d-kinetics-400.ckpt`` (fetch it with ``python experiments/fetch_weights.py i3d``).
"""

from worldmodel.metrics.bits import bits_per_dim, bits_per_token, video_dims
from worldmodel.metrics.fvd import (
    FVD_FRAMES,
    frechet_distance,
    frechet_distance_from_stats,
    fvd,
    get_i3d,
    i3d_embed,
    resolve_i3d_weights,
)
from worldmodel.metrics.i3d import InceptionI3d, load_i3d
from worldmodel.metrics.image import (
    PSNR_MAX_DB,
    fraction_off,
    laplacian_variance,
    psnr,
    sharpness_ratio,
    ssim,
)
from worldmodel.metrics.weights import (
    NumpyOnlyUnpickler,
    default_i3d_weights_path,
    fetch_i3d_weights,
    load_numpy_checkpoint,
    restricted_load,
)

__all__ = [
    "FVD_FRAMES",
    "PSNR_MAX_DB",
    "InceptionI3d",
    "NumpyOnlyUnpickler",
    "bits_per_dim",
    "bits_per_token",
    "default_i3d_weights_path",
    "fetch_i3d_weights",
    "frechet_distance",
    "frechet_distance_from_stats",
    "fvd",
    "get_i3d",
    "i3d_embed",
    "load_i3d",
    "load_numpy_checkpoint",
    "psnr",
    "resolve_i3d_weights",
    "restricted_load",
    "ssim",
    "video_dims",
    "fraction_off",
    "laplacian_variance",
    "sharpness_ratio",
]
