"""The paper's strided sparse attention, as a boolean attention mask (VideoGPT §3.2, ``attn_type='sparse'``).

The paper's priors (wilson1yan/VideoGPT-Paper, ``layers/attention/sparse_attention.py``) run DeepSpeed's
block-sparse kernels with their own ``StridedSparsityConfig``: the flattened token sequence of a latent grid
(T, h, w) is cut into blocks of ``block`` tokens (32: one row of a 32-wide grid), the blocks are laid out on a
*block grid* (the grid's leading axes, the trailing axes merged and divided by ``block``: (T, h, w) =
(8, 32, 32) -> (8, 32)), and block row r may read block column c when

- *local*: c is one of the ``num_local_blocks`` blocks before r, or r itself (``r - n_local <= c <= r``);
- *strided*: c equals r on every block-grid axis but one (not the last) and is not later on that axis: the same
  row of every earlier frame, for (T, rows).

Inside an allowed pair the attention is causal (``key <= query``). Here the same pattern is a boolean mask
(True = may attend) that the training forward and every cached sampling path apply, so KV caching works
unchanged: a cached query at position p reads the mask row of p.

Our sequence has one more position per frame than the paper's (the frame's *slot*, see
:mod:`worldmodel.prior`). Position ``l`` of block t (``l = 0`` is the slot) is mapped to the paper's sequence
index ``t*hw + l``: the slot and the tokens hold exactly what the paper's right-shifted positions hold (the slot
predicts z_t[0] as the paper's position t*hw does); the block's last position (it holds z_t[hw-1] and feeds the
reward/termination heads) shares the index of the next slot. Restricted to the slots and tokens, the mask is
the paper's token mask exactly (tests/test_sparse_attention.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def block_grid(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """The paper's block grid of a token grid ``shape``: trailing axes are merged until their product exceeds
    ``block``, then divided by it ((8, 32, 32), 32 -> (8, 32)). ``ValueError`` when ``block`` does not tile it."""
    if math.prod(shape) <= block:
        raise ValueError(f"strided sparse attention: grid {shape} has <= {block} tokens (one block)")
    merged, i = 1, len(shape)
    while i > 0:
        i -= 1
        merged *= shape[i]
        if merged > block:
            break
    if merged % block:
        raise ValueError(
            f"strided sparse attention: block {block} does not divide the merged trailing axes {shape[i:]} "
            f"of the grid {shape} ({merged} tokens)"
        )
    return (*shape[:i], merged // block)


def block_layout(shape: tuple[int, ...], block: int, num_local_blocks: int) -> torch.Tensor:
    """Causal block layout (n_blocks, n_blocks) bool of a token grid ``shape``: row r may read column c (see the
    module docstring for the local and strided rules)."""
    if num_local_blocks < 0:
        raise ValueError(f"num_local_blocks: got {num_local_blocks}, expected >= 0")
    grid = block_grid(shape, block)
    n = math.prod(grid)
    r = torch.arange(n)
    coords = torch.stack(torch.unravel_index(r, grid), -1)  # (n, len(grid)) block-grid coordinates
    rows, cols = r[:, None], r[None, :]
    local = (cols <= rows) & (cols >= rows - num_local_blocks)
    same = coords[:, None, :] == coords[None, :, :]  # (n, n, axes)
    strided = torch.zeros(n, n, dtype=torch.bool)
    for d in range(
        len(grid) - 1
    ):  # no strided reads along the last block-grid axis (the local rule covers it)
        others = torch.cat([same[..., :d], same[..., d + 1 :]], -1).all(-1)
        strided |= others & (coords[None, :, d] <= coords[:, None, d])
    return local | strided


def token_mask(shape: tuple[int, ...], block: int, num_local_blocks: int) -> torch.Tensor:
    """The paper's token-level mask (N, N) bool, N = prod(shape): the block layout expanded to tokens, causal."""
    layout = block_layout(shape, block, num_local_blocks)
    idx = torch.arange(math.prod(shape))
    return layout[idx[:, None] // block, idx[None, :] // block] & (idx[None, :] <= idx[:, None])


class StridedSparsePattern(nn.Module):
    """The strided sparse mask over our prior's positions (T frames of ``1 + h*w`` positions each).

    :meth:`allowed` gives any rows of it, so training (all positions) and cached generation (the new
    positions' rows) apply the same pattern. Holds no parameters and saves nothing.
    """

    def __init__(self, frames: int, tokens_h: int, tokens_w: int, block: int, num_local_blocks: int) -> None:
        super().__init__()
        self.hw, self.n_tokens, self.block = tokens_h * tokens_w, frames * tokens_h * tokens_w, block
        layout = block_layout((frames, tokens_h, tokens_w), block, num_local_blocks)
        self.register_buffer("layout", layout, persistent=False)  # (n_blocks, n_blocks)

    def blocks(self, pos: torch.Tensor) -> torch.Tensor:
        """Paper block of each of our positions ``pos`` (any shape, int64) -> same shape."""
        t, j = pos // (1 + self.hw), pos % (1 + self.hw)  # frame, position in its block
        return (t * self.hw + j).clamp(max=self.n_tokens - 1) // self.block

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Queries at positions ``q_pos`` (..., S) may read keys at ``k_pos`` (K,): (..., S, K) bool, causal."""
        q = q_pos[..., None]  # (..., S, 1)
        return self.layout[self.blocks(q), self.blocks(k_pos)] & (k_pos <= q)

    def mask(self, S: int, device: torch.device | None = None) -> torch.Tensor:
        """The (S, S) mask of the first ``S`` positions (the training forward's)."""
        pos = torch.arange(S, device=device or self.layout.device)
        return self.allowed(pos, pos)
