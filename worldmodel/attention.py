"""Axial self-attention over the T, H and W axes of a video feature map (VideoGPT §3.1).

Attention along one axis treats every position of the other two axes as an independent
sequence, so its cost is linear in the other axes. With ``causal_time`` the temporal axis is
masked so that position t only attends to positions <= t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis of ``(B, C, T, H, W)``.

    Args:
        dim: channels C.
        n_heads: attention heads (C must be divisible by it).
        axis: 2 (T), 3 (H) or 4 (W).
        causal: mask future positions along the axis.
    """

    def __init__(self, dim: int, n_heads: int, axis: int, causal: bool = False) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"channels {dim} must be divisible by n_heads {n_heads}")
        if axis not in (2, 3, 4):
            raise ValueError(f"axis must be 2 (T), 3 (H) or 4 (W), got {axis}")
        self.n_heads, self.axis, self.causal = n_heads, axis, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        pattern = {
            2: "b c t h w -> (b h w) t c",
            3: "b c t h w -> (b t w) h c",
            4: "b c t h w -> (b t h) w c",
        }[self.axis]
        seq = rearrange(x, pattern)  # (N, L, C): one sequence per position of the other two axes
        q, k, v = rearrange(self.qkv(seq), "n l (three nh hs) -> three n nh l hs", three=3, nh=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (N, nh, L, hs)
        y = self.proj(rearrange(y, "n nh l hs -> n l (nh hs)"))
        back = {2: "(b h w) t c -> b c t h w", 3: "(b t w) h c -> b c t h w", 4: "(b t h) w c -> b c t h w"}[
            self.axis
        ]
        return rearrange(y, back, b=B, t=T, h=H, w=W)


class BroadcastPosEmbed(nn.Module):
    """The paper's position embedding of a (T, h, w) feature map: a learned table per axis of ``dim / 3``
    channels each, broadcast over the other axes and concatenated to ``dim`` channels (t, h, w order)."""

    def __init__(self, dim: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        if dim % 3:
            raise ValueError(
                f"channels {dim} must be divisible by 3 for the paper's broadcast position embedding"
            )
        T, h, w = shape
        self.t = nn.Parameter(torch.randn(T, dim // 3) * 0.01)  # the paper's init: normal, std 0.01
        self.h = nn.Parameter(torch.randn(h, dim // 3) * 0.01)
        self.w = nn.Parameter(torch.randn(w, dim // 3) * 0.01)

    def forward(self, T: int) -> torch.Tensor:
        """Embedding of the first ``T`` frames: (dim, T, h, w)."""
        if T > self.t.shape[0]:
            raise ValueError(f"clip of {T} latent frames exceeds the position embedding's {self.t.shape[0]}")
        h, w = self.h.shape[0], self.w.shape[0]
        return torch.cat(
            [
                repeat(self.t[:T], "t c -> c t h w", h=h, w=w),
                repeat(self.h, "h c -> c t h w", t=T, w=w),
                repeat(self.w, "w c -> c t h w", t=T, h=h),
            ],
            dim=0,
        )


class AxialBlock(nn.Module):
    """Sum of axial attention over T, H and W, with learned per-axis position embeddings.

    The temporal position embedding is left out when ``causal_time`` is set: causal masking
    already orders frames, and without an absolute time index a frame's features do not depend on
    where it sits in the window, which keeps encodings consistent under sliding windows.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        spatial: tuple[int, int],
        max_frames: int,
        causal_time: bool,
        shared_pos: BroadcastPosEmbed | None = None,
    ) -> None:
        super().__init__()
        # shared_pos (the paper's layout): one embedding owned by the VQ-VAE and added by every block; kept in
        # a tuple so that it is not registered (and saved) once per block
        self._shared_pos = (shared_pos,) if shared_pos is not None else None
        if shared_pos is None:
            h, w = spatial
            self.pos_h = nn.Parameter(torch.zeros(dim, 1, h, 1))
            self.pos_w = nn.Parameter(torch.zeros(dim, 1, 1, w))
            self.pos_t = None if causal_time else nn.Parameter(torch.zeros(dim, max_frames, 1, 1))
            nn.init.normal_(self.pos_h, std=0.02)
            nn.init.normal_(self.pos_w, std=0.02)
            if self.pos_t is not None:
                nn.init.normal_(self.pos_t, std=0.02)
        self.attn_t = AxialAttention(dim, n_heads, 2, causal=causal_time)
        self.attn_h = AxialAttention(dim, n_heads, 3)
        self.attn_w = AxialAttention(dim, n_heads, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[2]
        if self._shared_pos is not None:
            x = x + self._shared_pos[0](T)
            return self.attn_t(x) + self.attn_h(x) + self.attn_w(x)
        x = x + self.pos_h + self.pos_w
        if self.pos_t is not None:
            if T > self.pos_t.shape[1]:
                raise ValueError(f"clip of {T} latent frames exceeds max_frames={self.pos_t.shape[1]}")
            x = x + self.pos_t[:, :T]
        return self.attn_t(x) + self.attn_h(x) + self.attn_w(x)
