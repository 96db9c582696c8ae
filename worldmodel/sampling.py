"""Fast batched generation with the prior: KV cache across frames, sliding window, per-row resets.

A :class:`Rollout` holds ``B`` independent environments ("rows"). Each row has a window of at
most ``cfg.frames`` frames whose keys/values live in a preallocated :class:`~worldmodel.prior.KVCache`;
``step`` generates the next frame of every row at once, token by token, each token costing one
forward of a single position per row. When a row's window is full it *slides*: the oldest frames
are dropped and the most recent ``keep`` frames are re-encoded in one batched forward, so memory
stays flat however long the rollout runs (re-encoding is amortised over ``frames - keep`` steps).
A re-encoded window starts with the start condition, exactly like a training clip that starts
mid-episode.

Sampling: temperature, top-k, top-p (nucleus), with an optional seeded ``torch.Generator`` for
exact reproducibility.

Latent state. ``Rollout.hidden`` (B, C) is the prior's final normalised hidden state at the *last position of
each row's newest frame* (``h_last``): after :meth:`Rollout.start` the context's last frame, after
:meth:`Rollout.step` the generated frame, after :meth:`Rollout.observe` the given one. It is World Models'
[z_t, h_t] in one vector: it has read every frame <= t of the window and the actions into them, i.e.
everything known when the next action a_t is chosen; the reward head reads it, and the slot of the next block
-- whose hidden state the "history" termination head reads for the transition out of frame t -- attends to it
and adds only a_t. The slot of the newest block (``h_slot``) would be the state *before* frame t (what decided
whether frame t ended the episode), one frame stale for choosing a_t, so it is not the one exposed. The full
forward gives the same vector: ``Prior.forward(...).hidden[:, -1]`` on the window's tokens (tested for the
cached, fused, per-row and MaskGIT paths and for teacher forcing).

The token loop's one-position forward runs through :class:`~worldmodel.fast_decode.TokenDecoder`
(fp32 rows in lockstep, no cross-attention memory) and otherwise through ``Prior.forward_cached``;
both compute the same function (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from worldmodel.fast_decode import TokenDecoder
from worldmodel.prior import KVCache, Prior, StepEmbedding
from worldmodel.prior_heads import symexp

DECODES = ("autoregressive", "maskgit")


@dataclass
class Sampling:
    """How a step draws its tokens (see :meth:`Rollout.step`)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None  # one generator for the whole batch
    row_gens: list[torch.Generator] | None  # or one per row


@dataclass
class StepResult:
    tokens: torch.Tensor  # (B, h, w) int64, the new frame
    reward: torch.Tensor  # (B,) predicted reward of the transition if it did not end the episode
    terminated_prob: torch.Tensor  # (B,) predicted probability that the transition ended the episode
    entropy: torch.Tensor  # (B,) mean entropy (nats) of the sampled tokens' distributions
    reward_if_terminated: torch.Tensor  # (B,) predicted reward if it ended the episode (== reward for a
    #                                     one-output reward head, PriorConfig.reward_given_termination False)
    hidden: torch.Tensor | None = None  # (B, C) float32 the prior's latent state after the new frame
    #                                     (:attr:`Rollout.hidden`)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. ``logits`` (B, V)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        drop_orig = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop_orig, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    gumbel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens (B,), entropy (B,) of the unfiltered distribution).

    With ``gumbel`` (B, V) Gumbel(0, 1) noise the sample is ``argmax(filtered logits / T + gumbel)``
    (the Gumbel-max trick: an exact categorical sample whose randomness the caller owns per row).
    """
    logits = logits.float()
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if temperature <= 0:
        return logits.argmax(-1), entropy
    filtered = filter_logits(logits / temperature, top_k, top_p)
    if gumbel is not None:
        return (filtered + gumbel).argmax(-1), entropy
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1), entropy


def row_gumbel(
    generators: Sequence[torch.Generator], n: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, n, V), row b drawn from ``generators[b]`` only.

    Per-row generators make a row's samples independent of which other rows share the batch, so a
    vector of N envs reproduces N single envs seeded the same way.
    """
    if all(g.device == device for g in generators):
        u = torch.empty(len(generators), n, vocab, device=device)
        for b, g in enumerate(generators):  # each row written in place: no stack copy
            torch.rand(n, vocab, generator=g, device=device, out=u[b])
    else:
        u = torch.stack([torch.rand(n, vocab, generator=g, device=g.device) for g in generators]).to(device)
    return _gumbel_(u)


def _gumbel_(u: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) ``u`` turned into Gumbel(0, 1) noise ``-log(-log(u))`` in place (1.6x fewer passes over
    memory than the out-of-place form, same values): returns ``u``."""
    return u.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()


def frame_gumbel(
    B: int,
    n: int,
    vocab: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, n, V) for the n tokens of a frame, drawn in one call per frame (per row with
    ``row_generators``, see :func:`row_gumbel`). One draw per frame instead of one ``multinomial`` per
    token: a token is then ``argmax(filtered logits / T + noise)`` (the Gumbel-max trick), which is cheaper
    in the token loop."""
    if row_generators is not None:
        return row_gumbel(row_generators, n, vocab, device)
    u = torch.rand(
        B, n, vocab, generator=generator, device=device
    )  # (rand is ~5x faster than exponential_ on CPU)
    return _gumbel_(u)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) over the positions of ``logits`` (B, n, V): (B,)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


class Rollout:
    """Batched, cached generation for ``batch_size`` rows. See the module docstring.

    Args:
        prior: a trained :class:`~worldmodel.prior.Prior` (put in eval mode here).
        batch_size: number of rows (environments).
        keep: frames kept when a full window slides (default ``frames // 2``).
        bf16: run the forwards under bf16 autocast.
    """

    def __init__(self, prior: Prior, batch_size: int, keep: int | None = None, bf16: bool = False) -> None:
        self.prior = prior.eval()
        cfg = prior.cfg
        if cfg.frames < 2:
            raise ValueError("generation needs a prior trained on at least 2 frames")
        self.B, self.cfg = batch_size, cfg
        self.keep = keep if keep is not None else max(1, cfg.frames // 2)
        if not 1 <= self.keep < cfg.frames:
            raise ValueError(f"keep must lie in [1, {cfg.frames}), got {self.keep}")
        p = next(prior.parameters())
        self.device = p.device
        self.bf16 = bf16
        hs = cfg.n_embd // cfg.n_head
        self.cache = KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            cfg.frames * prior.block_len,
            hs,
            self.device,
            torch.bfloat16 if bf16 else p.dtype,
            keys_transposed=not bf16,  # the bf16 token loop's fused attention reads row-major keys
        )
        h, w = cfg.tokens_h, cfg.tokens_w
        self.tokens = torch.zeros(batch_size, cfg.frames, h, w, dtype=torch.long, device=self.device)
        # per-step actions of each window (a_t between frames t and t+1), or the whole clip's (action_cond="clip")
        self.clip = cfg.action_cond == "clip" and cfg.action_kind != "none"
        n_act = cfg.clip_actions if self.clip else cfg.frames
        if cfg.action_kind == "continuous":
            self.actions = torch.zeros(batch_size, n_act, cfg.action_dim, device=self.device)
        else:
            self.actions = torch.zeros(batch_size, n_act, dtype=torch.long, device=self.device)
        self.class_ids = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.mem_k = self.mem_v = None  # frame conditioning: cross-attention keys/values per layer and row
        if prior.cond_encoder is not None:
            M = (
                math.prod(cfg.resnet_out)
                if cfg.cond_pixels
                else cfg.n_cond_frames * cfg.tokens_h * cfg.tokens_w
            )
            self.mem_k = torch.zeros(
                cfg.n_layer, batch_size, cfg.n_head, M, hs, device=self.device, dtype=p.dtype
            )
            self.mem_v = torch.zeros_like(self.mem_k)
        # fused single-position forward of the token loop (fp32, or bf16 GEMMs and cache with bf16)
        self.decoder = TokenDecoder(prior, torch.bfloat16 if bf16 else torch.float32)
        self.n_frames = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # frames in each window
        self.started = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        # (B, C) fp32 latent state of each row's newest frame (module docstring, "Latent state"); zeros for a row
        # started from nothing (Tc = 0: no frame has been read yet, there is no state to report)
        self.hidden = torch.zeros(batch_size, cfg.n_embd, device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # -- context --------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(
        self,
        tokens: torch.Tensor,
        actions: torch.Tensor | None = None,
        rows: torch.Tensor | list[int] | None = None,
        class_ids: torch.Tensor | None = None,
        cond_tokens: torch.Tensor | None = None,
        cond_frames: torch.Tensor | None = None,
    ) -> None:
        """Set the context of ``rows`` (default: all): tokens (k, Tc, h, w), actions (k, Tc-1[, A]), or for a
        whole-clip conditioned prior (``action_cond="clip"``) the clip's actions (k, clip_actions[, A]), which
        condition every frame the rows generate (``step`` then takes no actions); ``cond_tokens``
        (k, n_cond_frames, h, w) for a token frame-conditioned prior, ``cond_frames`` uint8
        (k, n_cond_frames, R, R, 3) for a pixel frame-conditioned one (``cond_pixels``).

        Only the most recent ``frames - 1`` context frames are kept (room for the next frame).
        ``Tc = 0`` starts rows from nothing: their next ``step`` draws a first frame conditioned on the
        start vector (+ class, + conditioning frames) like block 0 of a training clip, ignoring that
        step's action (video sampling from scratch).
        """
        rows_t = (
            torch.arange(self.B, device=self.device)
            if rows is None
            else torch.as_tensor(rows, device=self.device).long()
        )
        k = len(rows_t)
        if tokens.ndim != 4 or tokens.shape[0] != k:
            raise ValueError(
                f"tokens: got {tuple(tokens.shape)}, expected ({k}, Tc, {self.cfg.tokens_h}, {self.cfg.tokens_w}) "
                f"for {k} rows"
            )
        Tc = tokens.shape[1]
        if class_ids is None and self.prior.class_emb is not None:
            raise ValueError("class_ids: required by a class-conditional prior")
        cut = max(0, Tc - (self.cfg.frames - 1))
        tokens = tokens[:, cut:].to(self.device)
        if actions is not None:
            actions = (actions if self.clip else actions[:, cut:]).to(self.device)
        # an empty context (Tc = 0) is validated as one placeholder frame: class ids and token grid
        check = tokens if Tc else torch.zeros(k, 1, *tokens.shape[2:], dtype=torch.long, device=self.device)
        self.prior.validate(
            check,
            actions if Tc or self.clip else None,
            None if class_ids is None else class_ids.to(self.device),
        )
        T = tokens.shape[1]
        self.tokens[rows_t, :T] = tokens.long()
        if self.clip:
            self.actions[rows_t] = actions.to(self.actions.dtype)
        elif actions is not None and T > 1:
            self.actions[rows_t, : T - 1] = actions[:, : T - 1].to(self.actions.dtype)
        if class_ids is not None:
            self.class_ids[rows_t] = class_ids.to(self.device).long()
        memory = self.prior.cond_memory(
            None if cond_tokens is None else cond_tokens.to(self.device),
            k,
            None if cond_frames is None else cond_frames.to(self.device),
        )
        if memory is not None:
            for i, (mk, mv) in enumerate(self.prior.memory_kv(memory)):
                self.mem_k[i, rows_t], self.mem_v[i, rows_t] = (
                    mk.to(self.mem_k.dtype),
                    mv.to(self.mem_v.dtype),
                )
        self.n_frames[rows_t] = T
        self.started[rows_t] = True
        self.hidden[rows_t] = 0.0
        self._prefill(rows_t)

    def _memory(self, rows: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if self.mem_k is None:
            return None
        if rows is None:
            return list(zip(self.mem_k, self.mem_v))
        return [(mk[rows], mv[rows]) for mk, mv in zip(self.mem_k, self.mem_v)]

    def _prefill(self, rows: torch.Tensor) -> None:
        """Encode the stored windows of ``rows`` into the cache from position 0 (rows may differ in length:
        they are grouped by length); :attr:`hidden` of those rows becomes their window's last position."""
        for T in torch.unique(self.n_frames[rows]).tolist():
            if T == 0:  # started from nothing: no context to encode
                continue
            r = rows[self.n_frames[rows] == T]
            tok = self.tokens[r, :T]
            acts = self.actions[r] if self.clip else self.actions[r, : max(T - 1, 0)]
            cls = self.class_ids[r] if self.prior.class_emb is not None else None
            every_row = len(r) == self.B and bool(
                (r == torch.arange(self.B, device=self.device)).all()
            )  # plain slicing
            # bf16, every row, no memory: the fused whole-window forward (weights cast once)
            fused = (
                self.bf16 and every_row and TokenDecoder.supported(self.prior, self.cache, self._memory(None))
            )
            with self._autocast():
                cond = self.prior.block_conditions(acts, len(r), T, cls)
                x = self.prior.embed_blocks(tok, cond)
                if fused:
                    norms = self.decoder.block_norms(self.prior.ln_params(cond), len(r), self.prior.block_len)
                    h = self.decoder.block(x, norms, self.cache, 0, causal=True)  # (B, T * (1 + hw), C)
                else:
                    h = self.prior.forward_cached(
                        x,
                        self.prior.ln_condition(cond),
                        self.cache,
                        None if every_row else r,
                        0,
                        self._memory(None if every_row else r),
                    )  # (k, T * (1 + hw), C)
            self.hidden[r] = h[:, -1].float()

    def _slide(self, rows: torch.Tensor) -> None:
        keep, F_ = self.keep, self.cfg.frames
        self.tokens[rows, :keep] = self.tokens[rows, F_ - keep :].clone()
        if keep > 1 and not self.clip:
            self.actions[rows, : keep - 1] = self.actions[rows, F_ - keep : F_ - 1].clone()
        self.n_frames[rows] = keep
        self._prefill(rows)

    # -- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(
        self,
        actions: torch.Tensor | None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        decode: str = "autoregressive",
        maskgit_steps: int = 8,
    ) -> StepResult:
        """Generate the next frame of every row given ``actions`` (B,) discrete or (B, A) continuous.

        ``generator``: one ``torch.Generator`` for the whole batch, or a sequence of B generators
        (one per row; row b's samples then depend on ``generator[b]`` only).
        ``decode``: ``"autoregressive"`` (token by token, h*w + 1 single-position forwards) or
        ``"maskgit"`` (priors trained with ``maskgit_weight > 0``: ``maskgit_steps`` parallel
        refinements of the whole frame, then one forward that writes it into the cache).
        """
        self._check_decode(decode, maskgit_steps)
        sampling = self._sampling(temperature, top_k, top_p, generator)
        t_idx = self._advance(self._check_actions(actions))
        with self._autocast():
            emb = self._embed_step(t_idx)
            # rows in lockstep (the usual case) share one cache position: the fast sliced path
            L = self.prior.block_len
            base = int(t_idx[0]) * L if bool((t_idx == t_idx[0]).all()) else t_idx * L
            if decode == "maskgit":
                frame = self._maskgit_frame(emb, t_idx, base, maskgit_steps, sampling)
            else:
                frame = self._token_frame(emb, base, sampling)
            return self._finish(t_idx, *frame)

    @torch.inference_mode()
    def observe(self, tokens: torch.Tensor, actions: torch.Tensor | None) -> StepResult:
        """Append a *known* next frame to every row (teacher forcing, nothing is sampled): ``tokens`` (B, h, w)
        reached by ``actions`` (B,) discrete or (B, A) continuous, exactly as :meth:`step` appends a generated
        frame (the same window, slide and cache), in one forward of the block's 1 + hw positions.

        Returns the model's reading of the transition: its reward and termination predictions, the mean entropy
        of its token distributions over the given frame, and the latent state after it (:attr:`hidden`). This
        is how the same world model follows the real game (:class:`envs.latent.LatentTracker`).
        """
        shape = (self.B, self.cfg.tokens_h, self.cfg.tokens_w)
        if tokens.ndim != 3 or tuple(tokens.shape) != shape:
            raise ValueError(f"tokens: got {tuple(tokens.shape)}, expected {shape} (one frame per row)")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size:
            raise ValueError(f"tokens: values must lie in [0, {self.cfg.vocab_size})")
        t_idx = self._advance(self._check_actions(actions))
        frame = rearrange(tokens.to(self.device).long(), "b h w -> b (h w)")
        with self._autocast():
            emb = self._embed_step(t_idx)
            L = self.prior.block_len
            base = int(t_idx[0]) * L if bool((t_idx == t_idx[0]).all()) else t_idx * L
            x = torch.cat([emb.slot_input()[:, None], emb.frame_inputs(frame)], 1)  # (B, 1 + hw, C)
            h = self.prior.forward_cached(
                x, emb.ln, self.cache, None, base, self._memory(None)
            )  # (B, 1+hw, C)
            entropy = mean_entropy(self.prior.head(h[:, :-1]))  # slot..z[hw-2] predict z[0..hw-1]
            return self._finish(t_idx, frame, entropy, h[:, -1], h[:, 0])

    def _check_decode(self, decode: str, maskgit_steps: int) -> None:
        if decode not in DECODES:
            raise ValueError(f"decode: got {decode!r}, expected one of {DECODES}")
        if decode == "maskgit":
            if not self.prior.maskgit:
                raise ValueError(
                    "decode='maskgit' needs a prior trained with the MaskGIT objective "
                    "(prior.maskgit_weight > 0); this one was not"
                )
            if not 1 <= maskgit_steps <= self.prior.hw:
                raise ValueError(
                    f"maskgit_steps: got {maskgit_steps}, expected 1..{self.prior.hw} (tokens per frame)"
                )

    def _sampling(
        self,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> Sampling:
        """The step's sampling settings, with ``generator`` split into one for the batch or one per row."""
        if generator is None or isinstance(generator, torch.Generator):
            return Sampling(temperature, top_k, top_p, generator, None)
        row_gens = list(generator)
        if len(row_gens) != self.B:
            raise ValueError(f"generator: got {len(row_gens)} per-row generators, expected {self.B}")
        return Sampling(temperature, top_k, top_p, None, row_gens)

    def _check_actions(self, actions: torch.Tensor | None) -> torch.Tensor | None:
        """``actions`` on the device after checking them (None for a prior without actions)."""
        if not bool(self.started.all()):
            raise RuntimeError(
                f"rows {torch.nonzero(~self.started).flatten().tolist()} have no context; call start() first"
            )
        if self.cfg.action_kind == "none":
            return None
        if self.clip:  # the whole clip's actions came with start()
            if actions is not None:
                raise ValueError(
                    "actions: a whole-clip conditioned prior (action_cond='clip') takes the clip's actions in "
                    "start(); step() takes None"
                )
            return None
        if not isinstance(actions, torch.Tensor):
            raise ValueError(f"actions: got {type(actions).__name__}, expected a tensor of {self.B} actions")
        self.prior.validate_actions(actions.to(self.device)[:, None], self.B, 1)
        return actions.to(self.device)

    def _advance(self, actions: torch.Tensor | None) -> torch.Tensor:
        """Slide the full windows, record each row's action into its new block; the new block's window index (B,)."""
        full = self.n_frames >= self.cfg.frames
        if bool(full.any()):
            self._slide(torch.nonzero(full).flatten())
        t_idx = self.n_frames.clone()  # window index of the new block, per row
        if actions is not None:
            self.actions[torch.arange(self.B, device=self.device), t_idx - 1] = actions.to(self.actions.dtype)
        return t_idx

    def _embed_step(self, t_idx: torch.Tensor) -> StepEmbedding:
        """The new blocks' inputs (:meth:`Prior.embed_step`) from each row's last action and frame (and the frame
        before it for a ``prev_frames=2`` prior)."""
        rows, last = torch.arange(self.B, device=self.device), (t_idx - 1).clamp(min=0)
        action = None
        if self.cfg.action_kind != "none":
            action = self.actions if self.clip else self.actions[rows, last]
        cls = self.class_ids if self.prior.class_emb is not None else None
        second = self.tokens[rows, (t_idx - 2).clamp(min=0)] if self.prior.prev2_conv is not None else None
        return self.prior.embed_step(action, t_idx, self.tokens[rows, last], cls, second)

    def _token_frame(
        self,
        emb: StepEmbedding,
        base: torch.Tensor | int,
        s: Sampling,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame token by token: hw + 1 single-position forwards (the slot, then each sampled token).
        Returns tokens (B, hw), mean entropy (B,), the last position's hidden state h_last (B, C) and the slot's
        h_slot (B, C)."""
        B, hw, V = self.B, self.prior.hw, self.cfg.vocab_size
        noise = None  # drawn once per frame (one call, not one per token)
        if s.temperature > 0:  # (hw, B, V): noise[j] is contiguous
            noise = frame_gumbel(B, hw, V, self.device, s.generator, s.row_gens).transpose(0, 1).contiguous()
        out = torch.empty(hw, B, dtype=torch.long, device=self.device)
        all_logits = torch.empty(hw, B, V, device=self.device)  # entropy computed once per frame
        forward, head = self._position_forward(emb, base, all_logits)
        x = emb.slot_input()  # (B, C)
        for j in range(hw + 1):
            h = forward(x, base + j)  # (B, C)
            if j == 0:
                h_slot = (
                    h  # the slot: has seen frames < t and the block's action (termination_from="history")
                )
            if j == hw:
                break
            logits = head(h, j)  # (B, V)
            if noise is None:
                tok = logits.argmax(-1)
            else:
                if s.temperature != 1.0:
                    logits = logits / s.temperature
                tok = (filter_logits(logits, s.top_k, s.top_p) + noise[j]).argmax(-1)
            out[j] = tok
            x = emb.token_input(tok, j)
        return out.t(), mean_entropy(all_logits.transpose(0, 1)), h, h_slot

    def _position_forward(
        self,
        emb: StepEmbedding,
        base: torch.Tensor | int,
        all_logits: torch.Tensor,
    ) -> tuple[Callable[[torch.Tensor, Any], torch.Tensor], Callable[[torch.Tensor, int], torch.Tensor]]:
        """The token loop's one-position forward ``(x (B, C), pos) -> h (B, C)`` and token head ``(h, j) -> logits
        (B, V)`` (written into ``all_logits[j]``): the fused :class:`TokenDecoder` for fp32 rows in lockstep without
        memory, else :meth:`Prior.forward_cached`."""
        prior, memory = self.prior, self._memory(None)
        fused = self.decoder is not None and isinstance(base, int)
        if fused and TokenDecoder.supported(prior, self.cache, memory):
            norms = self.decoder.frame_norms(emb.ln, self.B)

            def forward(x: torch.Tensor, pos: int) -> torch.Tensor:
                return self.decoder(x, norms, self.cache, pos)

            def head(h: torch.Tensor, j: int) -> torch.Tensor:
                return self.decoder.logits(h, all_logits[j])

            return forward, head

        def forward_general(x: torch.Tensor, pos: torch.Tensor | int) -> torch.Tensor:
            return prior.forward_cached(x[:, None], emb.ln, self.cache, None, pos, memory)[:, 0]

        def head_general(h: torch.Tensor, j: int) -> torch.Tensor:
            all_logits[j] = prior.head(h).float()
            return all_logits[j]

        return forward_general, head_general

    def _finish(
        self,
        t_idx: torch.Tensor,
        out: torch.Tensor,
        entropy: torch.Tensor,
        h_last: torch.Tensor,
        h_slot: torch.Tensor,
    ) -> StepResult:
        """Store the new frames ``out`` (B, hw) at window index ``t_idx`` and read the reward head from
        ``h_last`` (B, C), the hidden state of each new block's last position, and the termination head from it
        or from the block's slot ``h_slot`` (B, C) (``PriorConfig.termination_from``)."""
        prior = self.prior
        reward, reward_term = (symexp(r.float()) for r in prior.rewards(h_last))  # (B,) each
        term = torch.sigmoid(prior.termination_logit(h_slot, h_last).float())
        frame = rearrange(out, "b (h w) -> b h w", h=self.cfg.tokens_h)
        self.tokens[torch.arange(self.B, device=self.device), t_idx] = frame
        self.n_frames += 1
        self.hidden.copy_(h_last)  # a copy: the fused decoder may reuse h_last's storage
        return StepResult(frame, reward, term, entropy, reward_term, self.hidden.clone())

    def _maskgit_frame(
        self, emb: StepEmbedding, t_idx: torch.Tensor, base: torch.Tensor | int, steps: int, s: Sampling
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame by MaskGIT decoding (Chang et al. 2022) on top of the KV cache.

        The block's slot is written into the cache first (position ``base``). Then, ``steps`` times, the
        masked stream of the frame -- committed tokens, [MASK] elsewhere -- attends to the cache and to
        itself (nothing is written); a token is sampled at every position and the most confident ones
        (log-probability of the sampled token) are committed until ``hw * (1 - cos(pi/2 * (k+1)/steps))``
        are known (MaskGIT's cosine schedule; the last step commits all). Finally the committed frame is
        run through the clean stream at positions ``base+1 .. base+hw`` -- exactly what token-by-token
        decoding would have cached -- whose last position feeds the reward/termination heads.
        Returns tokens (B, hw), mean entropy (B,) of the committed tokens' distributions, h_last (B, C) and
        the slot's hidden state h_slot (B, C).
        """
        prior, B, hw = self.prior, self.B, self.prior.hw
        block, head = self._block_forward(emb, base)
        h_slot = block(emb.slot_input()[:, None], base, True)[:, 0]  # (B, C)
        out = torch.zeros(B, hw, dtype=torch.long, device=self.device)
        known = torch.zeros(B, hw, dtype=torch.bool, device=self.device)
        ent = torch.zeros(B, device=self.device)
        prev_b = None if emb.prev is None else emb.prev[:, None]  # (B, 1, hw, C)
        for k in range(steps):
            xm = prior.embed_masked(out[:, None], known[:, None], emb.cond, t_idx[:, None], prev_b)[
                :, 0
            ]  # (B, hw, C)
            h = block(xm, base + 1, False)  # (B, hw, C), nothing written
            cand, e, conf = self._maskgit_candidates(head(h), s)
            conf = conf.masked_fill(known, float("inf"))  # committed tokens stay
            n_known = (
                hw
                if k == steps - 1
                else max(
                    int(known[0].sum()) + 1, math.ceil(hw * (1 - math.cos(math.pi / 2 * (k + 1) / steps)))
                )
            )
            new = torch.zeros_like(known).scatter_(1, conf.topk(n_known, dim=1).indices, True) & ~known
            out = torch.where(new, cand, out)
            ent += (e * new).sum(1)
            known |= new
        h = block(emb.frame_inputs(out), base + 1, True)  # (B, hw, C), cached
        return out, ent / hw, h[:, -1], h_slot

    def _block_forward(
        self, emb: StepEmbedding, base: torch.Tensor | int
    ) -> tuple[Callable[[torch.Tensor, Any, bool], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """MaskGIT's whole-frame forward ``(x (B, n, C), pos, write) -> h (B, n, C)`` (``write=False``: the masked
        queries, nothing kept in the cache) and token head ``h -> logits (..., V)`` fp32: the fused bf16
        :meth:`TokenDecoder.block` for bf16 rows in lockstep without memory, else :meth:`Prior.forward_cached`."""
        prior, memory = self.prior, self._memory(None)
        fused = self.bf16 and isinstance(base, int) and self.decoder is not None
        if fused and TokenDecoder.supported(prior, self.cache, memory):
            norms = self.decoder.frame_norms(emb.ln, self.B)

            def block(x: torch.Tensor, pos: Any, write: bool) -> torch.Tensor:
                return self.decoder.block(x, norms, self.cache, pos, causal=write)

            return block, self.decoder.head_logits

        def block_general(x: torch.Tensor, pos: Any, write: bool) -> torch.Tensor:
            return prior.forward_cached(x, emb.ln, self.cache, None, pos, memory, write=write)

        return block_general, lambda h: prior.head(h).float()

    def _maskgit_candidates(
        self, logits: torch.Tensor, s: Sampling
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A token sampled at every position of ``logits`` (B, hw, V): tokens (B, hw), the entropy of each
        position's distribution (B, hw) and the sampled token's log-probability, its confidence (B, hw)."""
        B, hw, V = logits.shape
        noise = None
        if s.temperature > 0:
            noise = rearrange(
                frame_gumbel(B, hw, V, self.device, s.generator, s.row_gens), "b n v -> (b n) v"
            )
        cand, e = sample_logits(
            rearrange(logits, "b n v -> (b n) v"), s.temperature, s.top_k, s.top_p, s.generator, noise
        )
        cand, e = cand.view(B, hw), e.view(B, hw)
        return cand, e, logits.log_softmax(-1).gather(-1, cand[..., None])[..., 0]

    def window(self, row: int) -> torch.Tensor:
        """Tokens currently in ``row``'s window: (n, h, w)."""
        return self.tokens[row, : int(self.n_frames[row])].clone()


@torch.inference_mode()
def generate_uncached(
    prior: Prior,
    tokens: torch.Tensor,
    actions: torch.Tensor | None,
    next_action: torch.Tensor | None,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference generation of one frame by full recomputation (no cache): one whole forward per token.

    tokens (B, Tc, h, w) with ``Tc < cfg.frames``; returns the new frame's tokens (B, h, w). Used by
    tests and the benchmark as the baseline the cache must match and beat.
    """
    prior.eval()
    B, Tc, h, w = tokens.shape
    frame = torch.zeros(B, 1, h, w, dtype=torch.long, device=tokens.device)
    if actions is not None and next_action is not None:
        acts = torch.cat([actions[:, : Tc - 1], next_action[:, None]], 1)
    else:
        acts = next_action[:, None] if next_action is not None else None
    for j in range(h * w):
        out = prior(torch.cat([tokens, frame], 1), acts)  # later tokens of the frame are placeholders: causal
        tok, _ = sample_logits(out.logits[:, -1, j], temperature, generator=generator)
        frame.view(B, -1)[:, j] = tok
    return frame[:, 0]


def teacher_forced_nll(prior: Prior, tokens: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
    """Per-frame mean token NLL (nats), (B, T), under teacher forcing."""
    out = prior(tokens, actions)
    target = rearrange(tokens.long(), "b t h w -> b t (h w)")
    return F.cross_entropy(
        rearrange(out.logits.float(), "b t n v -> b v t n"), target, reduction="none"
    ).mean(-1)
