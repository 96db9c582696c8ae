"""Vector-quantisation codebook with EMA updates, data-dependent init and dead-code restart.

Follows VQ-VAE-2 / VideoGPT: codes are the running means (exponential moving averages, decay
``ema_decay``) of the encoder outputs assigned to them; the encoder gets a commitment loss
``beta * ||z - sg(e)||²`` and straight-through gradients. All state lives in buffers so a saved
state dict restores the codebook exactly. Under ``torch.distributed`` the assignment counts and
sums are all-reduced and rank 0's random choices are broadcast, so every rank keeps an identical
codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _dist():
        dist.all_reduce(x)
    return x


def _broadcast(x: torch.Tensor) -> torch.Tensor:
    if _dist():
        dist.broadcast(x, src=0)
    return x


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, T, H, W) quantised, straight-through
    codes: torch.Tensor  # (B, T, H, W) int64
    commitment: torch.Tensor  # scalar, already multiplied by beta
    perplexity: torch.Tensor  # scalar, exp(entropy of code usage in this batch)
    usage: torch.Tensor  # scalar, fraction of codes used in this batch


class Codebook(nn.Module):
    """``K`` codes of dimension ``D``.

    Args:
        n_codes: K.
        dim: D.
        beta: commitment loss weight.
        decay: EMA decay of counts and sums.
        restart_threshold: a code whose EMA count falls below this is restarted from an encoder
            output of the current batch.
    """

    def __init__(
        self,
        n_codes: int,
        dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        restart_threshold: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_codes, self.dim, self.beta, self.decay = n_codes, dim, beta, decay
        self.restart_threshold, self.eps = restart_threshold, eps
        self.register_buffer("embeddings", torch.randn(n_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(n_codes))
        self.register_buffer("embed_sum", self.embeddings.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))

    def _sample_vectors(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` rows of ``flat`` (repeated with noise if it has fewer), identical on every rank."""
        if flat.shape[0] < n:
            reps = (n + flat.shape[0] - 1) // flat.shape[0]
            flat = flat.repeat(reps, 1)
            flat = flat + 0.01 / flat.shape[1] ** 0.5 * torch.randn_like(flat)
        idx = torch.randperm(flat.shape[0], device=flat.device)[:n]
        return _broadcast(flat[idx].contiguous())

    @torch.no_grad()
    def _init(self, flat: torch.Tensor) -> None:
        e = self._sample_vectors(flat, self.n_codes)
        self.embeddings.copy_(e)
        self.embed_sum.copy_(e)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def codes_for(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code index for each row of ``flat`` (N, D)."""
        d = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.embeddings.t()
            + self.embeddings.pow(2).sum(1)[None]
        )  # (N, K) squared distances
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, T, H, W = z.shape
        flat = rearrange(z, "b d t h w -> (b t h w) d").float()
        if self.training and not bool(self.initialized):
            self._init(flat.detach())
        codes = self.codes_for(flat.detach())
        onehot = F.one_hot(codes, self.n_codes).type(flat.dtype)  # (N, K)
        if self.training:
            with torch.no_grad():
                counts = _all_reduce(onehot.sum(0))
                sums = _all_reduce(onehot.t() @ flat.detach())
                self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                # Laplace smoothing keeps rarely used codes from dividing by ~0.
                size = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n
                self.embeddings.copy_(self.embed_sum / size[:, None])
                dead = self.cluster_size < self.restart_threshold
                dead = _broadcast(dead.to(torch.uint8)).bool()
                n_dead = int(dead.sum())
                if n_dead:
                    new = self._sample_vectors(flat.detach(), n_dead)
                    self.embeddings[dead] = new
                    self.embed_sum[dead] = new
                    self.cluster_size[dead] = 1.0
                    self.restarts += n_dead
        z_q = F.embedding(codes, self.embeddings)  # (N, D)
        commitment = self.beta * F.mse_loss(flat, z_q.detach())
        z_q = flat + (z_q - flat).detach()  # straight-through estimator
        z_q = rearrange(z_q, "(b t h w) d -> b d t h w", b=B, t=T, h=H, w=W).type(z.dtype)
        probs = onehot.mean(0)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (probs > 0).float().mean()
        return QuantizerOutput(
            z_q, rearrange(codes, "(b t h w) -> b t h w", b=B, t=T, h=H, w=W), commitment, perplexity, usage
        )

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``codes`` (B, T, H, W) as (B, D, T, H, W)."""
        return rearrange(F.embedding(codes, self.embeddings), "b t h w d -> b d t h w")
