"""Hand-fused forward of one new position per row: the inner loop of token-by-token generation.

:meth:`Prior.forward_cached` is the general incremental forward (any number of positions, per-row
cache slots, cross-attention memory, bf16 autocast). Token-by-token generation calls it once per
token -- 65 times per 8x8 frame -- with the simplest arguments: one position per row, every row at
the same cache slot. At the tiny and small scales that call is dominated by PyTorch's per-op and
per-module overhead (about 80 small ops, most of them views, casts and module dispatch), not by
arithmetic. :class:`TokenDecoder` computes exactly the same function for that case with about 17 ops
per layer on 2-D (B, C) tensors:

- every Linear is one ``addmm`` on weights transposed once (the 1/sqrt(head size) attention scale
  folded into the query weights), the residual add fused into ``addmm``'s input;
- conditional LayerNorms are ``layer_norm`` without affine + one ``addcmul`` whose gain and bias fold
  the LayerNorm's own affine into the per-frame condition (computed once per frame);
- attention of the single query is two ``bmm`` on the cache's storage (keys stored transposed, so
  ``q @ K^T`` reads contiguous rows) with the new key/value written in place.

bf16 (``TokenDecoder(prior, torch.bfloat16)``, ``Rollout(bf16=True)``): the same loop with bf16 weights
(cast once), a bf16 cache with row-major keys and attention through ``scaled_dot_product_attention``'s
fused kernel; LayerNorms, the residual stream and the logits stay fp32, as under autocast. At issue 22's
anchor geometry one-query attention is bound by reading the cache (about 4.7 MB per row and position in
fp32, at ~20 GB/s on this machine), so halving its bytes is what pays (docs/ARCHITECTURE.md "Generation").
The bf16 loop's MLP uses ``F.gelu`` on bf16 weights that are not rescaled (faster than erf + addcmul on
bf16 tensors here); the fp32 loop keeps the folded erf form, bit for bit as recorded.

:meth:`TokenDecoder.block` is the same bf16 forward for ``n`` positions per row at once (MaskGIT's whole-frame
passes in ``Rollout(bf16=True)``): the weights are cast once instead of on every call under autocast.

Hand-written rather than ``torch.compile``d: on this CPU inductor made the loop 4-5x slower (its
guards and graph launches cost more than the ops it fuses), and TorchScript is deprecated. The
derived weights are refreshed whenever a parameter changes in place (``Tensor._version``), so a
decoder stays valid while its prior keeps training. A test checks it against ``forward_cached``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worldmodel.prior import KVCache, Prior


class TokenDecoder:
    """Single-position incremental forward of ``prior`` for rows in lockstep, without cross-attention
    memory, in fp32 (bit-for-bit the fp32 ``forward_cached`` up to summation order) or bf16 (``dtype``;
    bf16 GEMMs and cache). :meth:`supported` says when it applies; otherwise use :meth:`Prior.forward_cached`."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, prior: Prior, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in self.DTYPES:
            raise ValueError(f"dtype: got {dtype}, expected one of {self.DTYPES}")
        self.prior, self.dtype = prior, dtype
        self._params = list(prior.parameters())
        self._version: tuple[int, ...] | None = None
        self.layers: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def supported(prior: Prior, cache: KVCache, memory: object) -> bool:
        """True when the fused path computes what ``forward_cached`` would: fp32 weights, no cross-attention
        memory, eval mode (no dropout), full attention and nanoGPT's layers (biases, exact GELU; not
        ``paper_layers``), and an fp32 cache with transposed keys or a bf16 one with row-major keys."""
        layout_ok = cache.keys_transposed == (cache.v.dtype == torch.float32)
        return (
            memory is None
            and prior.sparse is None
            and not prior.cfg.paper_layers
            and cache.v.dtype in TokenDecoder.DTYPES
            and layout_ok
            and not prior.training
            and next(prior.parameters()).dtype == torch.float32
        )

    def _refresh(self) -> None:
        """(Re)derive the fused weights when any parameter changed since the last call."""
        version = tuple(p._version for p in self._params)
        if version == self._version:
            return
        prior, C = self.prior, self.prior.cfg.n_embd
        scale = (C // prior.cfg.n_head) ** -0.5
        self.layers = []
        with torch.no_grad():
            for blk in prior.blocks:
                w, b = blk.attn.qkv.weight.detach().clone(), blk.attn.qkv.bias.detach().clone()
                w[:C] *= scale  # (3C, C): fold the attention scale into the query rows
                b[:C] *= scale
                # fp32: GELU(z) = z * (1 + erf(z / sqrt 2)) / 2: fc computes z' = z / sqrt 2 and fc2 reads
                # z' * (1 + erf(z')) scaled by 1 / sqrt 2 (erf + addcmul cost ~2 us against ~8 us
                # for the exact-erf F.gelu kernel on a 512-vector on this CPU). bf16: F.gelu on the
                # unscaled z, 2.4x faster than erf + addcmul on bf16 tensors here (0.29 vs 0.69 ms for
                # MaskGIT's 1024 x 1056 at the anchor geometry, 0.015 vs 0.022 ms for 16 rows)
                r2 = 2**-0.5 if self.dtype == torch.float32 else 1.0
                layer = {
                    "qkv_t": w.t().contiguous(),
                    "qkv_b": b,
                    "proj_t": blk.attn.proj.weight.detach().t().contiguous(),
                    "proj_b": blk.attn.proj.bias.detach(),
                    "fc_t": (blk.mlp[0].weight.detach() * r2).t().contiguous(),
                    "fc_b": blk.mlp[0].bias.detach() * r2,
                    "fc2_t": (blk.mlp[2].weight.detach() * r2).t().contiguous(),
                    "fc2_b": blk.mlp[2].bias.detach(),
                }
                self.layers.append({k: t.to(self.dtype) for k, t in layer.items()})
            self.head_t = prior.head.weight.detach().t().contiguous().to(self.dtype)  # (C, V)
        self._version = version

    def frame_norms(
        self, ln_params: list[tuple[torch.Tensor, torch.Tensor]] | None, B: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-frame (gain, bias) of every LayerNorm (ln1, ln2 of each block, then ln_f), each (B, C) or (C,),
        with the LayerNorm's own affine folded in: ``LN(x) = layer_norm(x) * gain + bias``.

        ``ln_params``: :meth:`Prior.ln_params` of the frame's condition (scale, bias each (B, 1, C); the
        ``ln`` of :meth:`Prior.embed_step`), or None for a prior without conditional LayerNorms.
        """
        self._refresh()
        out = []
        for i, ln in enumerate(self.prior.layer_norms()):
            w, b = ln.norm.weight.detach(), ln.norm.bias.detach()
            if ln_params is None:
                out.append((w, b))
            else:
                s, c = ln_params[i]  # (B, 1, C): y * s + c with y = n(x) * w + b
                out.append(((w * s).reshape(B, -1), torch.addcmul(c, b, s).reshape(B, -1)))
        return out

    def block_norms(
        self, ln_params: list[tuple[torch.Tensor, torch.Tensor]] | None, B: int, block_len: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-position (gain, bias) of every LayerNorm for whole windows (:meth:`block`'s prefill), the LayerNorm's
        own affine folded in: ``ln_params`` of the windows' block conditions (scale, bias each (B, T, C)) -> each
        (B, T * block_len, C); (C,) ones for a prior without conditional LayerNorms."""
        self._refresh()
        out = []
        for i, ln in enumerate(self.prior.layer_norms()):
            w, b = ln.norm.weight.detach(), ln.norm.bias.detach()
            if ln_params is None:
                out.append((w, b))
                continue
            s, c = ln_params[i]  # (B, T, C)
            g, bias = (w * s).reshape(B, -1, w.shape[0]), torch.addcmul(c, b, s).reshape(B, -1, w.shape[0])
            out.append((g.repeat_interleave(block_len, 1), bias.repeat_interleave(block_len, 1)))
        return out

    def __call__(
        self, x: torch.Tensor, norms: list[tuple[torch.Tensor, torch.Tensor]], cache: KVCache, pos: int
    ) -> torch.Tensor:
        """Input embeddings ``x`` (B, C) of cache slot ``pos`` of every row -> final normalised hidden (B, C).

        Writes the position's keys/values into ``cache`` (all B rows); it attends to slots ``0..pos``.
        """
        if self.dtype != torch.float32:
            return self._forward_low(x, norms, cache, pos)
        B, C = x.shape
        nh = self.prior.cfg.n_head
        hs, L = C // nh, pos + 1
        eps = self.prior.ln_f.norm.eps
        for i, lw in enumerate(self.layers):
            g, c = norms[2 * i]
            h = torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g)
            qkv = torch.addmm(lw["qkv_b"], h, lw["qkv_t"]).view(B, 3, nh, hs)  # q pre-scaled
            kt, v = cache.kt[i], cache.v[i]  # (B, nh, hs, cap), (B, nh, cap, hs)
            kt[:, :, :, pos] = qkv[:, 1]
            v[:, :, pos] = qkv[:, 2]
            att = torch.bmm(
                qkv[:, 0].reshape(B * nh, 1, hs), kt[:, :, :, :L].reshape(B * nh, hs, L)
            )  # (B*nh, 1, L)
            y = torch.bmm(torch.softmax(att, -1), v[:, :, :L].reshape(B * nh, L, hs)).view(B, C)
            x = torch.addmm(x, y, lw["proj_t"]).add_(lw["proj_b"])  # x + proj(y)
            g, c = norms[2 * i + 1]
            h = torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g)
            z = torch.addmm(lw["fc_b"], h, lw["fc_t"])  # z / sqrt 2
            h = torch.addcmul(z, z, torch.erf(z))  # sqrt 2 * GELU(z), fc2 rescales
            x = torch.addmm(x, h, lw["fc2_t"]).add_(lw["fc2_b"])  # x + mlp(h)
        g, c = norms[-1]
        return torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g)

    def _forward_low(
        self, x: torch.Tensor, norms: list[tuple[torch.Tensor, torch.Tensor]], cache: KVCache, pos: int
    ) -> torch.Tensor:
        """:meth:`__call__` in bf16: GEMMs and attention in bf16 on a row-major bf16 cache; LayerNorms and the
        residual stream ``x`` (B, C) in fp32 (what autocast keeps in fp32)."""
        B, C = x.shape
        nh, dt = self.prior.cfg.n_head, self.dtype
        hs, L = C // nh, pos + 1
        eps = self.prior.ln_f.norm.eps
        for i, lw in enumerate(self.layers):
            g, c = norms[2 * i]
            h = torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g).to(dt)
            qkv = torch.addmm(lw["qkv_b"], h, lw["qkv_t"]).view(B, 3, nh, hs)  # q pre-scaled
            k, v = cache.k[i], cache.v[i]  # (B, nh, cap, hs) each
            k[:, :, pos] = qkv[:, 1]
            v[:, :, pos] = qkv[:, 2]
            y = F.scaled_dot_product_attention(
                qkv[:, 0, :, None], k[:, :, :L], v[:, :, :L], scale=1.0
            )  # (B, nh, 1, hs)
            x = x + torch.addmm(lw["proj_b"], y.view(B, C), lw["proj_t"])  # fp32 + bf16 -> fp32
            g, c = norms[2 * i + 1]
            h = torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g).to(dt)
            h = F.gelu(torch.addmm(lw["fc_b"], h, lw["fc_t"]))  # bf16 weights are not rescaled (_refresh)
            x = x + torch.addmm(lw["fc2_b"], h, lw["fc2_t"])
        g, c = norms[-1]
        return torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g)

    def block(
        self,
        x: torch.Tensor,
        norms: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        pos: int,
        causal: bool,
    ) -> torch.Tensor:
        """``n`` positions of every row at cache slots ``pos..pos+n``: input embeddings ``x`` (B, n, C) -> final
        normalised hidden states (B, n, C). bf16 decoders only (a row-major bf16 cache): MaskGIT's whole-frame
        passes, and the re-encoding of a slid window, whose GEMMs have B * n rows and whose weights are cast once
        here instead of on every call under autocast (their casts took about a tenth of a bf16 MaskGIT frame at the
        anchor geometry). ``norms``: :meth:`frame_norms` (one frame: (B, C) each) or :meth:`block_norms` (whole
        windows: (B, n, C) each).

        The positions' keys/values are written into slots ``pos..pos+n``. They attend to slots ``< pos`` and to
        each other: causally (``causal=True``: the pass that writes a finished frame into the cache) or all to
        all (``causal=False``: MaskGIT's masked queries, whose slots are scratch until the finished frame is
        written there, as in :meth:`Prior.forward_cached` with ``write=False``).
        """
        if self.dtype == torch.float32:
            raise ValueError("TokenDecoder.block: bf16 decoders only (fp32 keeps Prior.forward_cached)")
        B, n, C = x.shape
        nh, dt = self.prior.cfg.n_head, self.dtype
        hs, L = C // nh, pos + n
        eps = self.prior.ln_f.norm.eps
        mask = torch.ones(n, L, dtype=torch.bool, device=x.device).tril(diagonal=pos) if causal else None
        # per-frame (B, C) LayerNorm gains/biases broadcast over the frame's positions; (B, n, C) and (C,) as they are
        per_pos = [tuple(t[:, None] if t.ndim == 2 else t for t in gc) for gc in norms]
        x = x.float()
        for i, lw in enumerate(self.layers):
            g, c = per_pos[2 * i]
            h = torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g).to(dt).view(B * n, C)
            qkv = torch.addmm(lw["qkv_b"], h, lw["qkv_t"]).view(B, n, 3, nh, hs).permute(2, 0, 3, 1, 4)
            k, v = cache.k[i], cache.v[i]  # (B, nh, cap, hs) each
            k[:, :, pos:L], v[:, :, pos:L] = qkv[1], qkv[2]
            y = F.scaled_dot_product_attention(
                qkv[0], k[:, :, :L], v[:, :, :L], attn_mask=mask, scale=1.0
            )  # (B, nh, n, hs); q pre-scaled
            x = x + torch.addmm(lw["proj_b"], y.transpose(1, 2).reshape(B * n, C), lw["proj_t"]).view(B, n, C)
            g, c = per_pos[2 * i + 1]
            h = torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g).to(dt).view(B * n, C)
            h = F.gelu(torch.addmm(lw["fc_b"], h, lw["fc_t"]))
            x = x + torch.addmm(lw["fc2_b"], h, lw["fc2_t"]).view(B, n, C)
        g, c = per_pos[-1]
        return torch.addcmul(c, F.layer_norm(x, (C,), eps=eps), g)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Token logits (..., V) fp32 of final hidden states ``h`` (..., C), the head in this decoder's dtype."""
        return torch.matmul(h.to(self.dtype), self.head_t).float()

    def logits(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Token logits of final hidden states ``h`` (B, C) into ``out`` (B, V) fp32 (the head in this decoder's dtype)."""
        if self.dtype == torch.float32:
            return torch.mm(h, self.head_t, out=out)
        out.copy_(torch.mm(h.to(self.dtype), self.head_t))
        return out
