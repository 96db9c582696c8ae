"""The GPT prior over token grids, conditioned on actions step by step (VideoGPT §3.2 + actions).

Token layout. Each frame t is a block of ``1 + h*w`` positions: a *slot* followed by the frame's
tokens in raster order; blocks follow each other frame after frame::

    [slot_0, z_0[0..hw-1], slot_1, z_1[0..hw-1], ..., slot_{T-1}, z_{T-1}[...]]

Position p predicts the item at p+1 when that is a token: the slot of block t predicts z_t[0],
z_t[j] predicts z_t[j+1]. The last token position of block t (which has seen all of frame t) has
no token to predict; it feeds the reward and termination heads for the transition into frame t.

Heads (an MLP each on that position's hidden state). Termination: one logit, BCE. Reward: symlog
regression, one output per frame, or with ``reward_given_termination`` two -- the reward if the
transition did not end the episode and the reward if it did, each trained only on transitions of its
kind -- so a rare terminal reward (HGS: about -100 on death against +4 per step) is not averaged into
the others. Consumers pick the output matching the termination they know (training, evaluation) or
draw (the dream env), or weight both by the predicted termination probability.

Action conditioning is causal by construction: every position of block t is conditioned on
``a_{t-1}`` (the action that led to frame t; block 0 gets a learned start vector), so frame t's
tokens and the transition's reward/termination see ``a_{<t}`` only. ``action_cond`` chooses how:

- ``"cond_ln"`` (paper's conditional LayerNorm): every LayerNorm's gain and bias are computed from
  the block's condition vector;
- ``"token"``: the slot's input embedding is the action embedding (an action token per frame);
- ``"add"``: the action embedding is added to the input of every position of the block.

With ``action_cond="clip"`` (the paper's ViZDoom/RoboNet protocol) every block instead reads one vector of the
whole clip's actions, so the prior samples clips but cannot be stepped action by action.

Class labels (UCF-101) join the condition vector; with no actions and no classes the condition
is a constant and the model is the unconditional VideoGPT prior.

Position embeddings are learned and broadcast per axis (T, H, W) and summed (the paper concatenates them).

The paper scale (docs/ARCHITECTURE.md "Paper scale") switches on the paper code's details: the strided sparse
attention mask (``attn_pattern``, :mod:`worldmodel.sparse_attention`), the code-vector input (``code_dim``) and
``paper_layers`` (bias-free attention projections, sigmoid GELU, no embedding dropout, and conditional
LayerNorms that read a fixed start/action/class vector through bias-free maps, the paper's affine norm).
Shapes: B batch, T frames, h×w tokens per frame, S = T*(1+h*w) positions, C = n_embd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from worldmodel.config import PriorConfig
from worldmodel.prior_heads import prior_loss, reward_head, termination_head
from worldmodel.resnet import PixelFrameEncoder
from worldmodel.sparse_attention import StridedSparsePattern


class CondLayerNorm(nn.Module):
    """LayerNorm whose gain and bias are affine functions of a condition vector (zero-initialised,
    so training starts from a plain LayerNorm)."""

    def __init__(self, dim: int, cond_dim: int | None, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.to_gain_bias = None
        if cond_dim:
            self.to_gain_bias = nn.Linear(cond_dim, 2 * dim, bias=bias)  # the paper's affine_norm: no bias
            nn.init.zeros_(self.to_gain_bias.weight)
            if bias:
                nn.init.zeros_(self.to_gain_bias.bias)

    def gain_bias(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 + gain, bias)`` for a condition (..., cond_dim); precompute once per frame when generating."""
        g, b = self.to_gain_bias(cond).chunk(2, dim=-1)
        return 1 + g, b

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        y = self.norm(x)
        if self.to_gain_bias is not None and cond is not None:
            scale, bias = cond if isinstance(cond, tuple) else self.gain_bias(cond)  # (B, S, C) each
            if self.training and y.dtype != bias.dtype and torch.is_autocast_enabled(y.device.type):
                # bf16 training: LayerNorm runs fp32, gain/bias come from a bf16 Linear; modulating in bf16 skips
                # two casts up and one down (the next Linear would round y to bf16 anyway): 5 % of a bf16 step.
                # Generation keeps the fp32 modulation, as the fused TokenDecoder does.
                y = y.to(bias.dtype)
            y = torch.addcmul(bias, y, scale)  # y * scale + bias in one op
        return y


class KVCache:
    """Preallocated keys/values of every layer for B rows of up to ``capacity`` positions.

    With ``keys_transposed`` (the fp32 default) keys are stored transposed, ``kt`` (n_layer, B, nh, hs,
    capacity), because a single query's ``q @ K^T`` then reads contiguous rows (about 1.7x faster on CPU at
    batch 16); without it (the bf16 token loop, whose fused attention kernel needs unit-stride keys) they are
    stored as ``k`` (n_layer, B, nh, capacity, hs). ``k`` and ``kt`` are views of the same memory either
    way; ``v`` is always (n_layer, B, nh, capacity, hs).
    """

    def __init__(
        self,
        n_layer: int,
        B: int,
        n_head: int,
        capacity: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        keys_transposed: bool = True,
    ) -> None:
        shape = (n_layer, B, n_head) + ((head_dim, capacity) if keys_transposed else (capacity, head_dim))
        self._keys = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(n_layer, B, n_head, capacity, head_dim, device=device, dtype=dtype)
        self.capacity, self.keys_transposed = capacity, keys_transposed

    @property
    def k(self) -> torch.Tensor:
        """Keys (n_layer, B, nh, capacity, hs)."""
        return self._keys.transpose(-1, -2) if self.keys_transposed else self._keys

    @property
    def kt(self) -> torch.Tensor:
        """Keys transposed (n_layer, B, nh, hs, capacity)."""
        return self._keys if self.keys_transposed else self._keys.transpose(-1, -2)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (full, or under the prior's strided sparse pattern ``sparse``)."""

    def __init__(self, cfg: PriorConfig, sparse: StridedSparsePattern | None = None) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.attn_dropout
        bias = not cfg.paper_layers  # the paper's projections have no biases
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # the Prior owns the pattern (one for all layers); a tuple keeps it from being registered per layer
        self._sparse = (sparse,) if sparse is not None else None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rows: torch.Tensor | None = None,
        pos: torch.Tensor | int | None = None,
        attn_mask: torch.Tensor | None = None,
        write: bool = True,
    ) -> torch.Tensor:
        """Causal self-attention.

        Without ``cache``: full causal attention over ``x`` (B, S, C), or attention under ``attn_mask``
        (S, S) bool (True = may attend) when given.
        With ``cache``: ``x`` (B, n, C) are the next ``n`` positions of cache rows ``rows`` starting at
        ``pos`` (an int shared by all rows, or (B,) per row); their keys/values are written into the
        cache and they attend to everything before them in their row.
        With ``write=False`` (MaskGIT's masked queries, all rows): the cache's first ``pos`` slots are left as
        they are; the ``n`` positions attend to them and to each other (no causal order among them). Slots
        ``pos..pos+n`` serve as scratch (a row-major bf16 cache keeps the new keys/values there instead of
        copying the prefix): the caller writes the finished positions there afterwards.
        With the strided sparse pattern every cached path reads the pattern's rows of its positions (the
        uncached forward gets the whole pattern as ``attn_mask`` from :meth:`Prior.forward`).
        """
        B, S, C = x.shape
        sparse = None if self._sparse is None else self._sparse[0]
        # view + permute rather than einops here: this runs once per token per layer when generating
        q, k, v = (
            self.qkv(x).view(B, S, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        )  # 3 x (B, nh, S, hs)
        if cache is None:
            drop = self.dropout if self.training else 0.0
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        elif not write:
            ck, cv = cache.k[layer], cache.v[layer]  # (B, nh, cap, hs)
            if isinstance(pos, int) and not cache.keys_transposed:  # same prefix, row-major keys: the new
                # positions go to scratch slots pos..pos+S (free until the caller writes the finished block
                # there) and attend to slots < pos + S in place -- no copy of the cache, no mask
                ck[:, :, pos : pos + S], cv[:, :, pos : pos + S] = k.to(ck.dtype), v.to(cv.dtype)
                y = F.scaled_dot_product_attention(q, ck[:, :, : pos + S], cv[:, :, : pos + S])
            elif isinstance(pos, int):  # every row has the same prefix: no mask
                K = torch.cat([ck[:, :, :pos].to(q.dtype), k], 2)
                V = torch.cat([cv[:, :, :pos].to(q.dtype), v], 2)
                y = F.scaled_dot_product_attention(q, K, V)
            else:  # per-row prefixes: cache slots < pos[b] are visible, the new positions always
                K = torch.cat([ck.to(q.dtype), k], 2)
                V = torch.cat([cv.to(q.dtype), v], 2)
                visible = torch.arange(cache.capacity, device=x.device)[None] < pos[:, None]  # (B, cap)
                mask = torch.cat([visible, visible.new_ones(B, S)], 1)[:, None, None]  # (B, 1, 1, cap+S)
                y = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        elif isinstance(pos, int):  # every row at the same position: plain slicing, no mask needed
            ck, cv = cache.k[layer], cache.v[layer]  # (B_all, nh, cap, hs)
            if rows is None:
                ck[:, :, pos : pos + S] = k.to(ck.dtype)
                cv[:, :, pos : pos + S] = v.to(cv.dtype)
                K, V = ck[:, :, : pos + S], cv[:, :, : pos + S]
            else:
                ck[rows, :, pos : pos + S] = k.to(ck.dtype)
                cv[rows, :, pos : pos + S] = v.to(cv.dtype)
                K, V = ck[rows, :, : pos + S], cv[rows, :, : pos + S]
            if S == 1:  # one query per row: two small matmuls beat SDPA's kernel launch cost on CPU
                Kt = K.transpose(-1, -2)  # (B, nh, hs, pos+1): contiguous rows of the transposed store
                att = (q * q.shape[-1] ** -0.5) @ Kt.to(q.dtype)  # (B, nh, 1, pos+1)
                if sparse is not None:  # the pattern's row of this position: (1, pos+1)
                    keys = torch.arange(pos + 1, device=x.device)
                    att = att.masked_fill(~sparse.allowed(keys[-1:], keys), float("-inf"))
                y = att.softmax(-1) @ V.to(q.dtype)
            elif sparse is not None:  # queries at pos..pos+S-1: the pattern's rows, keys 0..pos+S-1
                keys = torch.arange(pos + S, device=x.device)
                mask = sparse.allowed(keys[pos:], keys)  # (S, pos+S)
                y = F.scaled_dot_product_attention(q, K.to(q.dtype), V.to(q.dtype), attn_mask=mask)
            elif pos == 0:  # a window encoded from its start: its own keys, plain causal (SDPA's fused kernel
                # needs unit-stride keys, which the transposed key store is not; ~2x the masked path)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # queries at pos..pos+S-1 see keys <= their own position: causal with a prefix offset
                mask = torch.ones(S, pos + S, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, K.to(q.dtype), V.to(q.dtype), attn_mask=mask)
        else:  # rows at different positions (after per-row resets): per-row slots and masks
            idx = pos[:, None] + torch.arange(S, device=x.device)[None]  # (B, S) cache slots
            ck, cv = cache.k[layer], cache.v[layer]  # (B_all, nh, cap, hs)
            r = (torch.arange(B, device=x.device) if rows is None else rows)[:, None].expand(B, S)
            ck[r, :, idx] = k.transpose(1, 2).to(ck.dtype)  # (B, S, nh, hs) written per row and slot
            cv[r, :, idx] = v.transpose(1, 2).to(cv.dtype)
            K, V = (ck, cv) if rows is None else (ck[rows], cv[rows])  # (B, nh, cap, hs)
            keys = torch.arange(cache.capacity, device=x.device)
            if sparse is not None:
                mask = sparse.allowed(idx, keys)  # (B, S, cap): the pattern's rows, causal
            else:
                mask = keys[None, None, :] <= idx[:, :, None]  # (B, S, cap): causal within each row
            y = F.scaled_dot_product_attention(q, K.to(q.dtype), V.to(q.dtype), attn_mask=mask[:, None])
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, S, C)))  # (B, S, C)


class CrossAttention(nn.Module):
    """Attention from the sequence to the conditioning frames' features (the paper's frame conditioning)."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.attn_dropout
        bias = not cfg.paper_layers
        mem_dim = (
            cfg.resnet_dim if cfg.cond_pixels else cfg.n_embd
        )  # the memory's width (paper: ResNet's 576)
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.kv = nn.Linear(mem_dim, 2 * cfg.n_embd, bias=bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, M, C_mem) -> keys, values (B, nh, M, hs); computed once per row when generating."""
        k, v = rearrange(self.kv(memory), "b m (two nh hs) -> two b nh m hs", two=2, nh=self.n_head)
        return k, v

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        k, v = memory if isinstance(memory, tuple) else self.keys_values(memory)
        q = rearrange(self.q(x), "b s (nh hs) -> b nh s hs", nh=self.n_head)
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(rearrange(y, "b nh s hs -> b s (nh hs)")))


class FrameCondEncoder(nn.Module):
    """ResNet over the conditioning frames' token embeddings -> memory (B, k*h*w, C) for cross-attention.

    The paper encodes the conditioning *pixels* with a ResNet; our prior trains on the token cache
    only, so the ResNet reads the tokens' embeddings (which carry what the tokenizer kept of the
    pixels) — no pixels need to be stored next to the tokens.
    """

    def __init__(self, cfg: PriorConfig, n_blocks: int = 2) -> None:
        super().__init__()
        C = cfg.n_embd
        groups = 8 if C % 8 == 0 else 1
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(
                    nn.GroupNorm(groups, C),
                    nn.GELU(),
                    nn.Conv2d(C, C, 3, padding=1),
                    nn.GroupNorm(groups, C),
                    nn.GELU(),
                    nn.Conv2d(C, C, 3, padding=1),
                )
                for _ in range(n_blocks)
            ]
        )
        self.pos_f = nn.Parameter(torch.zeros(cfg.n_cond_frames, C))
        nn.init.normal_(self.pos_f, std=0.02)
        self.ln = nn.LayerNorm(C)

    def forward(self, emb: torch.Tensor, pos_hw: torch.Tensor) -> torch.Tensor:
        """emb (B, k, h, w, C) token embeddings, pos_hw (h*w, C) -> memory (B, k*h*w, C)."""
        B, k, h, w, C = emb.shape
        x = rearrange(emb, "b k h w c -> (b k) c h w")
        for blk in self.blocks:
            x = x + blk(x)
        x = rearrange(x, "(b k) c h w -> b k (h w) c", b=B) + pos_hw[None, None] + self.pos_f[None, :, None]
        return self.ln(rearrange(x, "b k n c -> b (k n) c"))


class SigmoidGELU(nn.Module):
    """The paper's ``GeLU2``: ``x * sigmoid(1.702 x)``, the sigmoid approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class FixedEmbedding(nn.Module):
    """A fixed (not learned) map into a condition vector of size ``dim`` at ``offset``: index i -> the unit vector
    e_{offset+i} (one-hot), or, ``continuous``, the (..., n) vector itself placed at ``offset``."""

    def __init__(self, n: int, dim: int, offset: int, continuous: bool = False) -> None:
        super().__init__()
        self.n, self.dim, self.offset, self.continuous = n, dim, offset, continuous

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (...,) int64 or (..., n) float -> (..., dim)
        if self.continuous:
            return F.pad(x.float(), (self.offset, self.dim - self.offset - self.n))
        return F.one_hot(x.long() + self.offset, self.dim).float()


class CodeEmbedding(nn.Module):
    """The paper's prior input (``fc_in``): a token's code vector from the tokenizer's codebook (a frozen copy,
    (V, D), loaded by :meth:`set_codes`) through a bias-free linear layer D -> C.

    Quacks like ``nn.Embedding``: ``emb(tokens)`` and ``emb.weight`` (V, C), so every path that embeds tokens
    works unchanged."""

    def __init__(self, vocab_size: int, code_dim: int, n_embd: int) -> None:
        super().__init__()
        self.register_buffer("codes", torch.randn(vocab_size, code_dim))  # replaced by the tokenizer's codes
        self.proj = nn.Linear(code_dim, n_embd, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        """Embedding of every token: (V, C)."""
        return self.proj(self.codes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (...,) int64 -> (..., C)
        return self.proj(F.embedding(tokens, self.codes))

    def set_codes(self, codes: torch.Tensor) -> None:
        """Copy the tokenizer's code vectors (V, D) in."""
        if tuple(codes.shape) != tuple(self.codes.shape):
            raise ValueError(
                f"codes: got {tuple(codes.shape)}, expected {tuple(self.codes.shape)} (the tokenizer's codebook "
                "size x prior.code_dim = tokenizer.embedding_dim)"
            )
        with torch.no_grad():
            self.codes.copy_(codes)


class Block(nn.Module):
    """Pre-LN transformer block with (optionally conditional) LayerNorms and optional cross-attention."""

    def __init__(
        self, cfg: PriorConfig, cond_dim: int | None, sparse: StridedSparsePattern | None = None
    ) -> None:
        super().__init__()
        self.ln1 = CondLayerNorm(cfg.n_embd, cond_dim, bias=not cfg.paper_layers)
        self.attn = SelfAttention(cfg, sparse)
        self.ln_x = nn.LayerNorm(cfg.n_embd) if cfg.n_cond_frames else None
        self.xattn = CrossAttention(cfg) if cfg.n_cond_frames else None
        self.ln2 = CondLayerNorm(cfg.n_embd, cond_dim, bias=not cfg.paper_layers)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            SigmoidGELU() if cfg.paper_layers else nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        cond2: object = None,
        memory: object = None,
        **cache_kw,
    ) -> torch.Tensor:
        """``cond``: the LayerNorm condition (B, S, C); or precomputed (scale, bias) pairs for ln1 in
        ``cond`` and for ln2 in ``cond2``. ``memory``: conditioning-frame features (B, M, C) or their
        precomputed (keys, values), for the cross-attention."""
        x = x + self.attn(self.ln1(x, cond), **cache_kw)
        if self.xattn is not None:
            x = x + self.xattn(self.ln_x(x), memory)
        return x + self.mlp(self.ln2(x, cond if cond2 is None else cond2))


@dataclass
class PriorOutput:
    logits: torch.Tensor  # (B, T, h*w, V): logits of every token of every frame
    reward: (
        torch.Tensor
    )  # (B, T) symlog reward of the transition into frame t if it did not end the episode (t >= 1)
    term_logit: torch.Tensor  # (B, T) termination logit of the transition into frame t
    reward_if_terminated: (
        torch.Tensor
    )  # (B, T) symlog reward of that transition if it ended the episode (== reward
    #                                     for a one-output head, PriorConfig.reward_given_termination False)
    mask_logits: torch.Tensor | None = None  # (B, T, h*w, V): MaskGIT stream's logits (forward with ``mask``)
    hidden: torch.Tensor | None = (
        None  # (B, T, C) final normalised hidden state at each block's last position
    )
    #                                     (has read frames <= t; what the reward head reads; Rollout.hidden)
    object_logits: torch.Tensor | None = None  # (B, T, h*w): logit that token (t, i) holds an object
    #                                     (the auxiliary object head, PriorConfig.object_aux_weight > 0)


@dataclass
class StepEmbedding:
    """The inputs of one new block per row (:meth:`Prior.embed_step`), derived once per generated frame.

    Position 0 of the block is the slot, position 1 + j holds token z[j]; the input of the position that
    predicts z[j] also carries the previous-frame features ``prev[:, j]``.
    """

    cond: torch.Tensor  # (B, 1, C) the block's condition: emb(a_{t-1}) or the start vector (+ class)
    ln: (
        list[tuple[torch.Tensor, torch.Tensor]] | None
    )  # conditional-LayerNorm (scale, bias) of cond (Prior.ln_params)
    slot: torch.Tensor  # (B, 1, C) the slot's input, without previous-frame features
    pos_t: torch.Tensor  # (B, 1, C) the block's time position embedding
    pos_hw: torch.Tensor  # (hw, C) the tokens' spatial position embeddings
    token_pos: (
        torch.Tensor
    )  # (hw, B, C) what joins token j's embedding: pos_hw[j] + pos_t (+ cond with "add")
    prev: torch.Tensor | None  # (B, hw, C) previous-frame features (None without the previous-frame path)
    tok_weight: torch.Tensor  # (V, C) the token embedding table
    add_cond: bool  # action_cond == "add": the condition joins every position

    def slot_input(self) -> torch.Tensor:
        """Input of the slot (position 0), which predicts z[0]: (B, C)."""
        x = self.slot[:, 0]
        return x if self.prev is None else x + self.prev[:, 0]

    def token_input(self, tok: torch.Tensor, j: int) -> torch.Tensor:
        """Input of position 1 + j, holding the sampled token ``tok`` (B,) = z[j] and predicting z[j+1]: (B, C)."""
        x = self.tok_weight.index_select(0, tok) + self.token_pos[j]
        if self.prev is not None and j + 1 < self.token_pos.shape[0]:
            x = x + self.prev[:, j + 1]
        return x

    def frame_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inputs of positions 1..hw for a whole frame ``tokens`` (B, hw) at once (MaskGIT's clean pass): (B, hw, C)."""
        x = F.embedding(tokens, self.tok_weight) + self.pos_hw + self.pos_t  # (B, hw, C)
        if self.prev is not None:  # position 1+j holds z[j] and predicts z[j+1]
            x = torch.cat([x[:, :-1] + self.prev[:, 1:], x[:, -1:]], 1)
        if self.add_cond:
            x = x + self.cond
        return x


class Prior(nn.Module):
    """GPT prior; see the module docstring for the layout and conditioning."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
        if cfg.action_kind == "discrete" and cfg.n_actions < 1:
            raise ValueError("action_kind='discrete' needs n_actions >= 1")
        if cfg.action_kind == "continuous" and cfg.action_dim < 1:
            raise ValueError("action_kind='continuous' needs action_dim >= 1")
        if not 0 <= cfg.context_noise < 1:
            raise ValueError(f"context_noise: got {cfg.context_noise}, expected a probability in [0, 1)")
        if cfg.maskgit_weight < 0:
            raise ValueError(f"maskgit_weight: got {cfg.maskgit_weight}, expected >= 0")
        self.cfg = cfg
        C = cfg.n_embd
        self.hw = cfg.tokens_h * cfg.tokens_w
        self.block_len = 1 + self.hw
        self.tok_emb: nn.Module = (
            CodeEmbedding(cfg.vocab_size, cfg.code_dim, C)
            if cfg.code_dim
            else nn.Embedding(cfg.vocab_size, C)
        )
        self.pos_t = nn.Parameter(torch.zeros(cfg.frames, C))
        self.pos_h = nn.Parameter(torch.zeros(cfg.tokens_h, C))
        self.pos_w = nn.Parameter(torch.zeros(cfg.tokens_w, C))
        self.slot_emb = nn.Parameter(torch.zeros(C))
        # the condition vector of each block (size d_cond): learned embeddings, or the paper's fixed vector
        d_cond = self._paper_condition(cfg) if cfg.paper_layers else self._our_condition(cfg)
        self.cond_encoder = self._frame_conditioning(cfg)
        self._previous_frame_path(cfg)
        # MaskGIT stream (maskgit_weight > 0): a [MASK] embedding and a marker of masked-stream positions.
        self.maskgit = cfg.maskgit_weight > 0
        self.mask_emb = nn.Parameter(torch.zeros(C)) if self.maskgit else None
        self.mstream_emb = nn.Parameter(torch.zeros(C)) if self.maskgit else None
        for p in (
            self.pos_t,
            self.pos_h,
            self.pos_w,
            self.slot_emb,
            None if cfg.paper_layers else self.start_emb,
            self.mask_emb,
            self.mstream_emb,
        ):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        use_cond_ln = cfg.action_cond in ("cond_ln", "clip") or self.class_emb is not None
        if (
            cfg.paper_layers
        ):  # nothing to condition on: plain LayerNorms (the paper's unconditional LayerNorm)
            use_cond_ln = d_cond > 0
        cond_dim = d_cond if use_cond_ln else None
        self.drop = nn.Dropout(0.0 if cfg.paper_layers else cfg.dropout)  # the paper has no embedding dropout
        self.sparse = None
        if cfg.attn_pattern == "strided":
            if self.maskgit:
                raise ValueError("prior.attn_pattern='strided' has no MaskGIT stream: set maskgit_weight=0")
            self.sparse = StridedSparsePattern(
                cfg.frames, cfg.tokens_h, cfg.tokens_w, cfg.sparse_block, cfg.sparse_local_blocks
            )
        self.blocks = nn.ModuleList([Block(cfg, cond_dim, self.sparse) for _ in range(cfg.n_layer)])
        self.ln_f = CondLayerNorm(C, cond_dim, bias=not cfg.paper_layers)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        # outputs: symlog reward [if not terminated, if terminated] (reward_given_termination) or one for both
        self.reward_head = reward_head(C, cfg.reward_given_termination)
        self.term_head = termination_head(C)
        # reads the same positions as ``head``: does the token it predicts hold a small object?
        self.object_head = nn.Linear(C, 1) if cfg.object_aux_weight > 0 else None
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)  # uniform logits at the start
        for blk in self.blocks:  # GPT-2 scaling of residual projections
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            if blk.xattn is not None:
                nn.init.normal_(blk.xattn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(blk.mlp[2].weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # Token pattern of a block, used to lay out position embeddings.
        hh, ww = torch.meshgrid(torch.arange(cfg.tokens_h), torch.arange(cfg.tokens_w), indexing="ij")
        self.register_buffer("_grid_h", hh.flatten(), persistent=False)
        self.register_buffer("_grid_w", ww.flatten(), persistent=False)

    def _previous_frame_path(self, cfg: PriorConfig) -> None:
        """The previous-frame path's modules (``prev_frame_kernel``, ``prev_frames``; None where off)."""
        C = cfg.n_embd
        k = cfg.prev_frame_kernel
        if k and k % 2 == 0:
            raise ValueError(f"prev_frame_kernel must be odd (or 0 = off), got {k}")
        # Previous-frame path: position predicting z_t[j] also gets a k×k conv of the embeddings of
        # z_{t-1} around j; block 0 (no previous frame in the window) gets a learned vector.
        self.prev_conv = nn.Conv2d(C, C, k, padding=k // 2) if k else None
        self.no_prev = nn.Parameter(torch.zeros(C)) if k else None
        # prev_frames=2: a second k×k conv of z_{t-2}, added (local motion); block 1 gets a learned vector
        if cfg.prev_frames not in (1, 2):
            raise ValueError(f"prev_frames: got {cfg.prev_frames}, expected 1 or 2")
        if cfg.prev_frames == 2 and not k:
            raise ValueError("prev_frames=2 needs the previous-frame path: set prev_frame_kernel > 0")
        two = bool(k) and cfg.prev_frames == 2
        self.prev2_conv = nn.Conv2d(C, C, k, padding=k // 2) if two else None
        self.no_prev2 = nn.Parameter(torch.zeros(C)) if two else None

    def _our_condition(self, cfg: PriorConfig) -> int:
        """Learned start, action and class embeddings of size n_embd, summed into each block's condition."""
        C = cfg.n_embd
        self.start_emb = nn.Parameter(torch.zeros(C))  # the condition of block 0 (no previous action)
        if cfg.action_cond == "clip":  # the whole clip's fixed action vector through a learned map
            self.act_emb = nn.Linear(self.clip_dim(), C)
        elif cfg.action_kind == "discrete":
            self.act_emb: nn.Module | None = nn.Embedding(cfg.n_actions, C)
        elif cfg.action_kind == "continuous":
            self.act_emb = nn.Linear(cfg.action_dim, C)
        else:
            self.act_emb = None
        self.class_emb = nn.Embedding(cfg.n_classes, C) if cfg.n_classes else None
        return C

    def _paper_condition(self, cfg: PriorConfig) -> int:
        """Set up the paper's condition vector (``paper_layers``) and return its size d: [start flag | action
        (one-hot, or the continuous vector) | one-hot class], fixed maps rather than learned embeddings, so each
        conditional LayerNorm learns its own bias-free linear gain and bias of it (the paper's ``affine_norm``,
        which reads the one-hot class or action vector). d = 0 without actions and classes."""
        n_act = cfg.n_actions if cfg.action_kind == "discrete" else cfg.action_dim
        n_act = 0 if cfg.action_kind == "none" else n_act
        clip = cfg.action_cond == "clip"
        if clip:  # the whole clip's actions, flattened: every block gets the same vector, no start flag
            n_act = self.clip_dim()
        first = 1 if n_act and not clip else 0  # the start flag: block 0 has no previous action
        if cfg.action_cond not in ("cond_ln", "clip"):
            raise ValueError(
                "prior.paper_layers conditions through the LayerNorms: set action_cond='cond_ln' or 'clip'"
            )
        d = first + n_act + cfg.n_classes
        start = torch.zeros(d)
        if first:
            start[0] = 1.0
        self.register_buffer("start_emb", start)  # the condition of block 0 (no previous action)
        continuous = clip or cfg.action_kind == "continuous"  # a clip vector is placed as it is
        self.act_emb = FixedEmbedding(n_act, d, first, continuous) if n_act else None
        self.class_emb = FixedEmbedding(cfg.n_classes, d, first + n_act) if cfg.n_classes else None
        return d

    @staticmethod
    def _frame_conditioning(cfg: PriorConfig) -> nn.Module | None:
        """The conditioning frames' encoder: the paper's 3D ResNet over pixels (``cond_pixels``, its BAIR setup), a
        small ResNet over token embeddings (``n_cond_frames``), or None."""
        if cfg.cond_pixels:
            R = cfg.cond_resolution
            return PixelFrameEncoder(
                cfg.resnet_depth, cfg.resnet_width, cfg.resnet_dim, (cfg.n_cond_frames, R, R), cfg.resnet_out
            )
        return FrameCondEncoder(cfg) if cfg.n_cond_frames else None

    def clip_dim(self) -> int:
        """Size of the whole-clip action vector (``action_cond="clip"``): clip_actions x (n_actions one-hot or
        action_dim)."""
        cfg = self.cfg
        return cfg.clip_actions * (cfg.n_actions if cfg.action_kind == "discrete" else cfg.action_dim)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- validation ------------------------------------------------------------------------------
    def validate(
        self, tokens: torch.Tensor, actions: torch.Tensor | None, class_ids: torch.Tensor | None
    ) -> None:
        """Raise ValueError naming the argument when an input is not of the expected form."""
        cfg = self.cfg
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.ndim != 4
            or tuple(tokens.shape[2:]) != (cfg.tokens_h, cfg.tokens_w)
        ):
            raise ValueError(
                f"tokens: got {getattr(tokens, 'shape', type(tokens))}, expected int64 (B, T, {cfg.tokens_h}, {cfg.tokens_w})"
            )
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"tokens: got dtype {tokens.dtype}, expected int64")
        B, T = tokens.shape[:2]
        if not 1 <= T <= cfg.frames:
            raise ValueError(f"tokens: {T} frames, expected 1..{cfg.frames} (the trained context)")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"tokens: values must lie in [0, {cfg.vocab_size})")
        self.validate_actions(actions, B, T - 1)
        if self.class_emb is not None:
            if class_ids is None or class_ids.shape != (B,):
                raise ValueError(
                    f"class_ids: expected int64 ({B},) for a class-conditional prior, got "
                    f"{None if class_ids is None else tuple(class_ids.shape)}"
                )
            if int(class_ids.min()) < 0 or int(class_ids.max()) >= cfg.n_classes:
                raise ValueError(f"class_ids: values must lie in [0, {cfg.n_classes})")

    def validate_actions(self, actions: torch.Tensor | None, B: int, n: int) -> None:
        """Check ``actions`` for ``n`` transitions of a batch of ``B``."""
        cfg = self.cfg
        if cfg.action_kind == "none":
            return
        if cfg.action_cond == "clip":  # the whole clip's actions, whatever the number of frames
            n = cfg.clip_actions
        elif n == 0 and actions is None:
            return
        if not isinstance(actions, torch.Tensor):
            raise ValueError(
                f"actions: got {type(actions).__name__}, expected a tensor of {self._action_form(B, n)}"
            )
        if cfg.action_kind == "discrete":
            if (
                actions.ndim != 2
                or actions.shape[0] != B
                or actions.shape[1] < n
                or (cfg.action_cond == "clip" and actions.shape[1] != n)
                or actions.dtype.is_floating_point
            ):
                raise ValueError(
                    f"actions: got {actions.dtype}{tuple(actions.shape)}, expected {self._action_form(B, n)}"
                )
            a = actions[:, :n]
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= cfg.n_actions):
                raise ValueError(
                    f"actions: values must lie in [0, {cfg.n_actions}), got [{int(a.min())}, {int(a.max())}]"
                )
        else:
            if (
                actions.ndim != 3
                or actions.shape[0] != B
                or actions.shape[1] < n
                or (cfg.action_cond == "clip" and actions.shape[1] != n)
                or actions.shape[2] != cfg.action_dim
            ):
                raise ValueError(f"actions: got {tuple(actions.shape)}, expected {self._action_form(B, n)}")
            if not actions.dtype.is_floating_point or not torch.isfinite(actions[:, :n]).all():
                raise ValueError("actions: continuous actions must be finite floats (no NaN/inf)")

    def _action_form(self, B: int, n: int) -> str:
        if self.cfg.action_cond == "clip":
            n = f"{self.cfg.clip_actions} (the whole clip's actions, action_cond='clip')"
        if self.cfg.action_kind == "discrete":
            return f"int64 ({B}, {n}) in [0, {self.cfg.n_actions})"
        return f"float32 ({B}, {n}, {self.cfg.action_dim})"

    # -- embeddings ------------------------------------------------------------------------------
    def block_conditions(
        self, actions: torch.Tensor | None, B: int, T: int, class_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Condition vector of each block: start for block 0, ``emb(a_{t-1})`` for block t; with
        ``action_cond="clip"`` the embedding of the whole clip's actions (B, clip_actions[, A]) for every block.
        (B, T, C)."""
        start = self.start_emb.expand(B, 1, -1)
        if self.cfg.action_cond == "clip":
            cond = self.action_embedding(actions)[:, None].expand(B, T, -1)
        elif self.act_emb is not None and T > 1:
            cond = torch.cat([start, self.action_embedding(actions[:, : T - 1])], dim=1)
        else:
            cond = start.expand(B, T, -1)
        if self.class_emb is not None:
            cond = cond + self.class_emb(class_ids)[:, None]
        return cond

    def action_embedding(self, actions: torch.Tensor) -> torch.Tensor:
        """emb(a): actions (B, n) discrete or (B, n, A) continuous -> (B, n, C); with ``action_cond="clip"`` the
        whole clip's actions -> (B, C): one-hot per step (discrete) or the vectors, flattened, then mapped."""
        if self.cfg.action_cond == "clip":
            if self.cfg.action_kind == "discrete":
                vec = F.one_hot(actions.long(), self.cfg.n_actions).float()  # (B, n, n_actions)
            else:
                vec = actions.float()  # (B, n, A)
            return self.act_emb(rearrange(vec, "b n a -> b (n a)"))  # (B, C)
        a = actions.float() if self.cfg.action_kind == "continuous" else actions.long()
        return self.act_emb(a)

    def pos_hw(self) -> torch.Tensor:
        """Position embedding of each token of a frame, raster order: (hw, C)."""
        return self.pos_h[self._grid_h] + self.pos_w[self._grid_w]

    def prev_features(self, tokens: torch.Tensor, second: bool = False) -> torch.Tensor:
        """Previous-frame path features of frames ``tokens`` (B, T, h, w) -> (B, T, hw, C): for the next blocks
        (``prev_conv``), or with ``second`` for the blocks after those (``prev2_conv``, ``prev_frames=2``)."""
        B, T = tokens.shape[:2]
        e = rearrange(self.tok_emb(tokens.long()), "b t h w c -> (b t) c h w")
        conv = self.prev2_conv if second else self.prev_conv
        return rearrange(conv(e), "(b t) c h w -> b t (h w) c", b=B, t=T)

    def prev_stream(self, tokens: torch.Tensor) -> torch.Tensor:
        """Previous-frame features for every block of ``tokens`` (B, T, h, w): (B, T, hw, C), block 0 gets ``no_prev``;
        with ``prev_frames=2`` block t >= 2 also gets z_{t-2}'s features, block 1 ``no_prev2``."""
        B, T = tokens.shape[:2]
        out = torch.cat([self.no_prev.expand(B, 1, self.hw, -1), self.prev_features(tokens[:, :-1])], dim=1)
        if self.prev2_conv is None or T < 2:
            return out
        second = [torch.zeros_like(out[:, :1]), self.no_prev2.expand(B, 1, self.hw, -1)]
        if T > 2:
            second.append(self.prev_features(tokens[:, :-2], second=True))
        return out + torch.cat(second, dim=1)

    def embed_masked(
        self,
        tokens: torch.Tensor,
        known: torch.Tensor,
        cond: torch.Tensor,
        t_idx: torch.Tensor,
        prev: torch.Tensor | None,
    ) -> torch.Tensor:
        """Inputs of MaskGIT-stream blocks: position j of block t holds z_t[j] where ``known`` else [MASK],
        and predicts z_t[j].

        tokens, known (B, T, hw); cond (B, T, C); t_idx (B, T) window index of each block; prev
        (B, T, hw, C) previous-frame features (None without the previous-frame path). -> (B, T, hw, C).
        """
        tok = torch.where(
            known[..., None], self.tok_emb(tokens.long()), self.mask_emb.to(self.tok_emb.weight.dtype)
        )
        x = tok + (self.pos_hw()) + self.pos_t[t_idx][:, :, None] + self.mstream_emb
        if prev is not None:
            x = x + prev
        if self.cfg.action_cond in (
            "token",
            "add",
        ):  # no slot in this stream: the action joins every position
            x = x + cond[:, :, None]
        return x

    def maskgit_attention_mask(self, T: int, frames: torch.Tensor) -> torch.Tensor:
        """(S + n*hw, S + n*hw) bool attention mask of the training sequence [clean blocks | masked blocks
        of ``frames`` (n,)] (S = T*(1+hw); True = may attend).

        Clean positions are causal among themselves and never see the masked stream, so their keys and
        values are exactly what the KV cache holds at generation. Masked block t sees the clean blocks
        before t, the slot of clean block t (its condition, no token of frame t) and all of masked block t.
        """
        L, hw, device = self.block_len, self.hw, frames.device
        S, M = T * L, len(frames) * hw
        blk_c = torch.arange(S, device=device) // L  # (S,) block of each clean position
        slot_c = torch.arange(S, device=device) % L == 0
        blk_m = frames.repeat_interleave(hw)  # (M,) block of each masked position
        top = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        top = torch.cat([top, top.new_zeros(S, M)], 1)
        left = (blk_c[None] < blk_m[:, None]) | ((blk_c[None] == blk_m[:, None]) & slot_c[None])  # (M, S)
        bottom = torch.cat([left, blk_m[:, None] == blk_m[None]], 1)
        return torch.cat([top, bottom], 0)

    def embed_blocks(
        self, tokens: torch.Tensor, cond: torch.Tensor, t0: torch.Tensor | int = 0
    ) -> torch.Tensor:
        """Input embeddings of whole blocks: tokens (B, T, h, w), cond (B, T, C) -> (B, T*(1+hw), C).

        ``t0`` is the window index of the first block (scalar or per row (B,)).
        """
        B, T = tokens.shape[:2]
        t_idx = torch.as_tensor(t0, device=tokens.device).reshape(-1, 1) + torch.arange(
            T, device=tokens.device
        )
        pos_t = self.pos_t[t_idx].expand(B, T, -1)  # (B, T, C)
        tok = self.tok_emb(rearrange(tokens.long(), "b t h w -> b t (h w)"))  # (B, T, hw, C)
        tok = tok + (self.pos_hw())[None, None] + pos_t[:, :, None]
        slot = self.slot_emb + pos_t  # (B, T, C)
        if self.cfg.action_cond == "token":
            slot = slot + cond
        x = torch.cat([slot[:, :, None], tok], dim=2)  # (B, T, 1+hw, C)
        if (
            self.prev_conv is not None
        ):  # positions 0..hw-1 of block t predict z_t[0..hw-1]: add z_{t-1} features
            x = torch.cat([x[:, :, :-1] + self.prev_stream(tokens), x[:, :, -1:]], dim=2)
        if self.cfg.action_cond == "add":
            x = x + cond[:, :, None]
        return rearrange(x, "b t l c -> b (t l) c")

    def embed_step(
        self,
        action: torch.Tensor | None,
        t_idx: torch.Tensor,
        last_tokens: torch.Tensor | None,
        class_ids: torch.Tensor | None = None,
        second_last_tokens: torch.Tensor | None = None,
    ) -> StepEmbedding:
        """Inputs of one new block per row, for generation (the one-block counterpart of :meth:`block_conditions`
        + :meth:`embed_blocks`, computed once per frame and used by every sampler path).

        ``action`` (B,) or (B, A): a_{t-1}, the action into the new frame (None for a prior without actions;
        ignored on rows with ``t_idx == 0``, which get the start condition; with ``action_cond="clip"`` the whole
        clip's actions (B, clip_actions[, A])); ``t_idx`` (B,) the new block's
        window index; ``last_tokens`` (B, h, w) the frame before it (previous-frame path; ignored where
        ``t_idx == 0``); ``class_ids`` (B,) for a class-conditional prior; ``second_last_tokens`` (B, h, w) the frame
        before ``last_tokens`` (``prev_frames=2`` only; ignored where ``t_idx < 2``).
        """
        B = t_idx.shape[0]
        first = t_idx == 0  # rows started from nothing: block 0 gets the start condition
        start = self.start_emb.expand(B, 1, -1)
        clip = (
            self.cfg.action_cond == "clip"
        )  # ``action``: the whole clip's actions, the same for every block
        if self.act_emb is None:
            cond = start
        else:  # (B, 1, C)
            cond = self.action_embedding(action)[:, None] if clip else self.action_embedding(action[:, None])
        if self.class_emb is not None:
            cls = self.class_emb(class_ids)[:, None]
            cond, start = cond + cls, start + cls
        if self.act_emb is not None and not clip and bool(first.any()):
            cond = torch.where(first[:, None, None], start, cond)
        pos_t = self.pos_t[t_idx][:, None]  # (B, 1, C)
        slot = self.slot_emb + pos_t
        if self.cfg.action_cond in ("token", "add"):
            slot = slot + cond
        pos_hw = self.pos_hw()  # (hw, C)
        token_pos = pos_hw[:, None] + pos_t[:, 0]  # (hw, B, C)
        if self.cfg.action_cond == "add":
            token_pos = token_pos + cond[:, 0]
        prev = None
        if self.prev_conv is not None:  # features of the window's last frame, once per frame
            prev = self.prev_features(last_tokens[:, None])[:, 0]  # (B, hw, C)
            if bool(first.any()):  # no previous frame: the learned vector of block 0
                prev = torch.where(first[:, None, None], self.no_prev.to(prev.dtype).expand_as(prev), prev)
            if self.prev2_conv is not None:  # z_{t-2}: its features, the learned vector at block 1, none at 0
                if second_last_tokens is None:
                    raise ValueError(
                        "embed_step: prev_frames=2 needs second_last_tokens (the frame before the last)"
                    )
                p2 = self.prev_features(second_last_tokens[:, None], second=True)[:, 0]  # (B, hw, C)
                p2 = torch.where((t_idx == 1)[:, None, None], self.no_prev2.to(p2.dtype).expand_as(p2), p2)
                prev = prev + torch.where(first[:, None, None], torch.zeros_like(p2), p2)
        return StepEmbedding(
            cond,
            self.ln_params(cond),
            slot,
            pos_t,
            pos_hw,
            token_pos,
            prev,
            self.tok_emb.weight,
            self.cfg.action_cond == "add",
        )

    def ln_condition(self, cond: torch.Tensor) -> torch.Tensor | None:
        """Per-position condition for conditional LayerNorms: (B, T, C) -> (B, T*(1+hw), C)."""
        if self.ln_f.to_gain_bias is None:
            return None
        return repeat(cond, "b t c -> b (t l) c", l=self.block_len)

    def cond_memory(
        self, cond_tokens: torch.Tensor | None, B: int, cond_frames: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Conditioning-frame features (B, M, C_mem) from their tokens (B, k, h, w), or with ``cond_pixels`` from
        their pixels ``cond_frames`` uint8 (B, k, R, R, 3); None without frame conditioning."""
        cfg = self.cfg
        if self.cond_encoder is None or cfg.cond_pixels:
            if cond_tokens is not None:
                raise ValueError(
                    "cond_tokens: this prior has no token frame conditioning (n_cond_frames = 0 or cond_pixels)"
                )
        if self.cond_encoder is None:
            if cond_frames is not None:
                raise ValueError("cond_frames: this prior has no frame conditioning (n_cond_frames = 0)")
            return None
        if cfg.cond_pixels:
            R = cfg.cond_resolution
            shape = (B, cfg.n_cond_frames, R, R, 3)
            if cond_frames is None or tuple(cond_frames.shape) != shape or cond_frames.dtype != torch.uint8:
                got = None if cond_frames is None else f"{cond_frames.dtype}{tuple(cond_frames.shape)}"
                raise ValueError(
                    f"cond_frames: expected uint8 {shape} (the conditioning pixel frames), got {got}"
                )
            return self.cond_encoder(cond_frames)
        if cond_frames is not None:
            raise ValueError("cond_frames: this prior conditions on tokens (cond_tokens), not pixels")
        shape = (B, cfg.n_cond_frames, cfg.tokens_h, cfg.tokens_w)
        if cond_tokens is None or tuple(cond_tokens.shape) != shape:
            raise ValueError(
                f"cond_tokens: expected int64 {shape} (the conditioning frames' tokens), got "
                f"{None if cond_tokens is None else tuple(cond_tokens.shape)}"
            )
        if int(cond_tokens.min()) < 0 or int(cond_tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"cond_tokens: values must lie in [0, {cfg.vocab_size})")
        pos_hw = self.pos_hw()  # (hw, C)
        return self.cond_encoder(self.tok_emb(cond_tokens.long()), pos_hw)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's cross-attention keys/values of ``memory`` (computed once per row when generating)."""
        return [blk.xattn.keys_values(memory) for blk in self.blocks]

    # -- full forward (training, evaluation) ----------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor | None = None,
        class_ids: torch.Tensor | None = None,
        cond_tokens: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_frames: torch.Tensor | None = None,
        cond_frames: torch.Tensor | None = None,
    ) -> PriorOutput:
        """Teacher-forced forward over whole frames. tokens (B, T, h, w); actions (B, >=T-1[, A]), or with
        ``action_cond="clip"`` the whole clip's (B, clip_actions[, A]); ``cond_tokens`` (B, n_cond_frames, h, w)
        for a token frame-conditioned prior, ``cond_frames`` uint8 (B, n_cond_frames, R, R, 3) for a pixel one.

        ``mask`` (B, T, h, w) bool (MaskGIT priors only): also run the masked stream, where the True
        tokens of every frame are hidden, and return its logits in ``mask_logits`` (B, n, hw, V) for the
        frames ``mask_frames`` (n,) (default: all T). The clean stream's outputs are the same with or
        without it.
        """
        self.validate(tokens, actions, class_ids)
        B, T = tokens.shape[:2]
        memory = self.cond_memory(cond_tokens, B, cond_frames)
        cond = self.block_conditions(actions, B, T, class_ids)
        x = self.embed_blocks(tokens, cond)
        ln_cond = self.ln_condition(cond)
        attn_mask, S = None, x.shape[1]
        if mask is not None:
            if not self.maskgit:
                raise ValueError(
                    "mask: this prior has no MaskGIT stream (train with prior.maskgit_weight > 0)"
                )
            if mask.shape != tokens.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask: got {mask.dtype}{tuple(mask.shape)}, expected bool {tuple(tokens.shape)}"
                )
            fr = (
                torch.arange(T, device=tokens.device)
                if mask_frames is None
                else mask_frames.to(tokens.device).long()
            )
            known = ~rearrange(mask[:, fr], "b t h w -> b t (h w)")
            z = rearrange(tokens[:, fr], "b t h w -> b t (h w)")
            prev = self.prev_stream(tokens)[:, fr] if self.prev_conv is not None else None
            xm = self.embed_masked(z, known, cond[:, fr], fr.expand(B, -1), prev)  # (B, n, hw, C)
            x = torch.cat([x, rearrange(xm, "b t n c -> b (t n) c")], 1)  # (B, S + n*hw, C)
            if ln_cond is not None:
                ln_cond = torch.cat([ln_cond, repeat(cond[:, fr], "b t c -> b (t n) c", n=self.hw)], 1)
            attn_mask = self.maskgit_attention_mask(T, fr)
        elif self.sparse is not None:
            attn_mask = self.sparse.mask(S, x.device)  # (S, S) the strided pattern, causal
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x, ln_cond, memory=memory, **({} if attn_mask is None else {"attn_mask": attn_mask}))
        x = self.ln_f(x, ln_cond)
        xc = rearrange(x[:, :S], "b (t l) c -> b t l c", l=self.block_len)
        logits = self.head(xc[:, :, :-1])  # (B, T, hw, V): slot..z[hw-2] predict z[0..hw-1]
        last = xc[:, :, -1]  # (B, T, C): has seen all of frame t
        mask_logits = None
        if mask is not None:
            mask_logits = self.head(rearrange(x[:, S:], "b (t n) c -> b t n c", n=self.hw))  # (B, T, hw, V)
        reward, reward_term = self.rewards(last)
        obj = None if self.object_head is None else self.object_head(xc[:, :, :-1]).squeeze(-1)  # (B, T, hw)
        return PriorOutput(
            logits, reward, self.termination_logit(xc[:, :, 0], last), reward_term, mask_logits, last, obj
        )

    def termination_logit(self, h_slot: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
        """Termination logits (...,) of the transitions into the blocks whose slot hidden states are ``h_slot``
        (..., C; frames < t and a_{t-1}) and last-position ones ``h_last`` (..., C; frame t too): the head reads
        the one ``PriorConfig.termination_from`` names."""
        return self.term_head(h_slot if self.cfg.termination_from == "history" else h_last).squeeze(-1)

    def rewards(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symlog rewards (if not terminated, if terminated), each (...,), read by the reward head from
        hidden states ``h`` (..., C); both are the one output of a one-output head."""
        r = self.reward_head(h)  # (..., 1 or 2)
        return r[..., 0], r[..., -1]

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Token cross-entropy + weighted MaskGIT, reward and termination losses, and their metrics
        (:func:`worldmodel.prior_heads.prior_loss`, where the batch's form and each term are described)."""
        return prior_loss(self, batch)

    # -- incremental forward (generation) -------------------------------------------------------
    def ln_params(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Precomputed conditional-LayerNorm (scale, bias) of every LayerNorm, in order, for ``cond``."""
        if self.ln_f.to_gain_bias is None:
            return None
        return [ln.gain_bias(cond) for ln in self.layer_norms()]

    def layer_norms(self) -> list[CondLayerNorm]:
        """Every (conditional) LayerNorm of the trunk in the order :meth:`ln_params` lists them: ln1, ln2 of
        each block, then ln_f."""
        return [ln for blk in self.blocks for ln in (blk.ln1, blk.ln2)] + [self.ln_f]

    def forward_cached(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | list | None,
        cache: KVCache,
        rows: torch.Tensor | None,
        pos: torch.Tensor | int,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        write: bool = True,
    ) -> torch.Tensor:
        """Run input embeddings ``x`` (B, n, C) at cache positions ``pos..pos+n`` of ``rows`` (None: all rows).

        ``cond`` is the per-position LayerNorm condition (B, n, C), or the list from
        :meth:`ln_params`, or None. ``memory_kv``: per-block cross-attention keys/values of these
        rows (:meth:`memory_kv`) for a frame-conditioned prior. ``write=False`` (MaskGIT's masked
        queries, all rows): nothing enters the cache and the ``n`` positions see the first ``pos`` cache
        slots of their row and each other. Returns the final normalised hidden states (B, n, C).
        """
        params = cond if isinstance(cond, list) else None
        kw = {"cache": cache, "rows": rows, "pos": pos, "write": write}
        for i, blk in enumerate(self.blocks):
            mem = None if memory_kv is None else memory_kv[i]
            if params is not None:
                x = blk(x, params[2 * i], params[2 * i + 1], memory=mem, layer=i, **kw)
            else:
                x = blk(x, cond, memory=mem, layer=i, **kw)
        return self.ln_f(x, params[-1] if params is not None else cond)
