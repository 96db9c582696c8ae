"""Finite scalar quantisation (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the d channels of an encoder output is squashed to a bounded range and rounded to one of ``levels[i]``
values; a token is the tuple of d digits, read as one integer in a mixed-radix system, so the implicit codebook
is the grid of all prod(levels) tuples. There is nothing to learn in the quantiser, no commitment loss, no EMA
statistics and no dead codes: every grid point is reachable, which is the paper's claim against codebook
collapse. Gradients pass the rounding straight through.

The module quacks like :class:`~worldmodel.codebook.Codebook` (``forward`` -> ``QuantizerOutput``,
``codes_for``, ``lookup``, ``embeddings``), so the tokenizer, the bundle and the prior's code-vector input
use it unchanged.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from worldmodel.codebook import QuantizerOutput


class FSQ(nn.Module):
    """Finite scalar quantiser with per-channel ``levels`` (each >= 2): prod(levels) codes of dimension
    len(levels), code vectors on a grid in [-1, 1]."""

    def __init__(self, levels: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        levels = tuple(int(n) for n in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"levels: got {levels}, expected one or more integers >= 2")
        self.levels, self.dim, self.n_codes = levels, len(levels), math.prod(levels)
        L = torch.tensor(levels, dtype=torch.float32)
        # buffers, not parameters (nothing is learned), and not saved: they follow from cfg.fsq_levels
        self.register_buffer("_L", L, persistent=False)
        self.register_buffer("_half_width", torch.floor(L / 2), persistent=False)
        radix = torch.cumprod(torch.tensor((1,) + levels[:-1]), 0)  # mixed-radix place values, (d,)
        self.register_buffer("_radix", radix, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Channels last (..., d) squashed so that rounding gives ``levels[i]`` values: integers in
        [-floor(L/2), L - 1 - floor(L/2)] (an even L gets one more value below zero)."""
        eps = 1e-3
        half_l = (self._L - 1) * (1 + eps) / 2
        offset = torch.where(self._L % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _digits_to_codes(self, q: torch.Tensor) -> torch.Tensor:
        """Rounded values (..., d) -> int64 codes (...)."""
        return ((q + self._half_width).round().long() * self._radix).sum(-1)

    def codes_for(self, flat: torch.Tensor) -> torch.Tensor:
        """The code of each row of ``flat`` (N, d): (N,) int64 in [0, n_codes)."""
        if flat.ndim != 2 or flat.shape[1] != self.dim:
            raise ValueError(
                f"flat: got shape {tuple(flat.shape)}, expected (N, {self.dim}) (one column per level)"
            )
        return self._digits_to_codes(torch.round(self._bound(flat.float())))

    def _vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (...) -> code vectors (..., d) in [-1, 1]."""
        digits = (codes[..., None] // self._radix) % self._L.long()
        return (digits - self._half_width) / self._half_width

    @property
    def embeddings(self) -> torch.Tensor:
        """Every code's vector: (n_codes, d), row i is code i."""
        return self._vectors(torch.arange(self.n_codes, device=self._L.device))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise encoder outputs ``z`` (B, d, T, H, W): grid vectors ``z_q`` (B, d, T, H, W) in [-1, 1] with
        straight-through gradients, ``codes`` (B, T, H, W) int64, a zero commitment loss, and this batch's code
        perplexity and fraction of codes used."""
        B, D, T, H, W = z.shape
        if D != self.dim:
            raise ValueError(f"z: got {D} channels, expected {self.dim} (one per FSQ level)")
        flat = rearrange(z, "b d t h w -> (b t h w) d").float()
        bounded = self._bound(flat)
        q = bounded + (torch.round(bounded) - bounded).detach()  # rounding, straight-through
        codes = self._digits_to_codes(q.detach())
        z_q = q / self._half_width  # (N, d) in [-1, 1]
        counts = torch.bincount(codes, minlength=self.n_codes).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return QuantizerOutput(
            rearrange(z_q, "(b t h w) d -> b d t h w", b=B, t=T, h=H, w=W).type(z.dtype),
            rearrange(codes, "(b t h w) -> b t h w", b=B, t=T, h=H, w=W),
            z.new_zeros(()),  # no commitment loss: the grid does not move
            perplexity,
            (probs > 0).float().mean(),
        )

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``codes`` (B, T, H, W) as (B, d, T, H, W)."""
        return rearrange(self._vectors(codes), "b t h w d -> b d t h w")
