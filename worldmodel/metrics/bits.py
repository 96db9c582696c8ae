"""Bits per token and bits per dimension from a prior's cross-entropy (as reported in VideoGPT).

A prior trained with cross-entropy reports the mean negative log-likelihood per token in nats. VideoGPT
(Yan et al. 2021, Table 1) reports **bits/dim**: the total NLL of a video's token sequence in bits,
divided by the number of pixel values of that video, T * H * W * 3. E.g. a 16-frame 64x64 BAIR clip has
196,608 dims; with 8x32x32 = 8,192 latent tokens at 3 nats/token it costs 8192 * 3 / ln 2 = 35,457 bits,
i.e. 0.180 bits/dim. It only compares models that see the same video shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def bits_per_token(nats_per_token: float) -> float:
    """Convert a mean NLL in nats per token to bits per token (divide by ln 2)."""
    return float(nats_per_token) / math.log(2.0)


def _positive_ints(shape: Sequence[int], name: str, expected: str) -> int:
    if len(shape) == 0 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in shape):
        raise ValueError(f"{name} must be {expected} of positive ints, got {tuple(shape)}")
    return math.prod(shape)


def video_dims(video_shape: Sequence[int]) -> int:
    """Number of pixel values of one video: T * H * W * C for ``video_shape`` = (T, H, W, C)."""
    if len(video_shape) != 4:
        raise ValueError(f"video_shape must be (T, H, W, C), got {tuple(video_shape)}")
    return _positive_ints(video_shape, "video_shape", "(T, H, W, C)")


def bits_per_dim(nats_per_token: float, token_shape: Sequence[int], video_shape: Sequence[int]) -> float:
    """VideoGPT bits/dim: total bits of one video's tokens / number of its pixel values.

    Args:
        nats_per_token: mean cross-entropy per token in nats (natural log).
        token_shape: latent grid of one video, e.g. (T', h, w) = (8, 32, 32); its product is the token count.
        video_shape: the pixel video those tokens encode, (T, H, W, C), e.g. (16, 64, 64, 3).

    Returns:
        bits per pixel dimension.
    """
    n_tokens = _positive_ints(token_shape, "token_shape", "a shape like (T', h, w)")
    return bits_per_token(nats_per_token) * n_tokens / video_dims(video_shape)
