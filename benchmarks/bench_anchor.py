"""Generation and training speed against their FLOP limits at issue 22's anchor geometry. One JSON line.

Anchor geometry (the side-by-side comparison with the official VideoGPT code in issue 22): latent
(9, 8, 8) = 8 context frames + 1 new frame of 8×8 tokens, 512 codes, GPT 4 layers × 264 wide × 4 heads,
random weights, our defaults otherwise (conditional LayerNorm on 5 discrete actions, 3×3 previous-frame
path). The same is measured for the ``tiny`` preset's prior (vizdoom_hgs tiny: 2 × 128 × 4 heads, window
8 = 7 context + 1 new frame, 256 codes).

Measured in one process:

- ``fps_b{1,16,64}``: new frames/s through :class:`~worldmodel.sampling.Rollout` (KV-cached, token by
  token, temperature 1): each timed step draws one new frame per row after a full context (positions
  ``8*65 .. 9*65-1`` at the anchor); the context's prefill is not timed. Median of ``--repeats`` steps.
- ``train_tok_s_{fp32,bf16}``: training positions/s (forward + backward + the trainer's AdamW, batch 8 whole
  windows), fp32 and under bf16 autocast, interleaved (A, B, A, B...), medians (``time_train_steps``).
- ``fps_b{B}_bf16``: the same through ``Rollout(bf16=True)`` (the fused bf16 token loop).
- ``fps_b{B}_maskgit{K}_bf16``: the same geometry carrying the MaskGIT stream, decoded with each ``--maskgit-steps``
  K (default 3 and 4) whole-frame refinements (``decode="maskgit"``, bf16 ``TokenDecoder.block``): K + 1 passes of 64 positions
  read the cache K + 1 times instead of 65, for ~4.5x the FLOPs (``gflop_per_frame_maskgit{K}``).
- ``matmul_{fp32,bf16}_gflops``: this process's GEMM peak (2048² matmul; bf16 uses AMX/AVX512-BF16 when
  the CPU has them); ``stream_gbytes_s``: reading a 256 MB fp32 tensor.
- ``*_frac``: each figure as a fraction of its FLOP limit = peak GFLOP/s / FLOPs per unit (below), fp32
  figures against the fp32 peak, bf16 ones against the bf16 peak.
- ``cache_mb_per_frame``, ``fps_cache_limit[_bf16]``: the KV cache one row's new frame reads (every position
  reads every layer's keys and values up to itself; batching does not share it) and the frames/s that
  ``stream_gbytes_s`` allows for it in fp32 (bf16): the bound that one-query attention actually meets here.

FLOP count (multiply-adds × 2; C width, V codes, L layers, hw = 64 tokens, n = 1 + hw positions per frame):

- per generated position and layer: qkv 6C² + proj 2C² + MLP 16C² = 24C², plus attention 4·C·k over the
  k keys it sees (q·K and att·V); the token head 2·C·V at the hw positions that predict a token;
- MaskGIT with K refinements: the slot, K passes of the hw positions (each sees the prefix and the whole
  frame; the token head at every position) and one causal pass that writes the finished frame (no head);
- per generated frame and row, once: the previous-frame 3×3 conv, hw · 2·9C², and the conditional
  LayerNorms' gain/bias, (2L+1) · 2·C·2C;
- training, per position: 6 × (trunk + head parameters) (forward 2, backward 4) + causal attention
  3 × 2·C·S per layer and position for windows of S positions (forward q·K and att·V over S/2 keys on
  average, backward twice that), + the previous-frame conv 6·9C² (an upper bound: the last frame's is unused).

Timing on a shared machine only slows a run down; use ``--threads 1`` and compare ratios within a run.

Usage: python benchmarks/bench_anchor.py [--threads 1] [--quick] [--repeats 5] [--train-reps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from worldmodel.config import PriorConfig, TrainConfig, get_preset
from worldmodel.prior import Prior
from worldmodel.sampling import Rollout
from worldmodel.training import time_train_steps

ANCHOR = PriorConfig(
    n_layer=4,
    n_head=4,
    n_embd=264,
    dropout=0.0,
    attn_dropout=0.0,
    vocab_size=512,
    frames=9,
    tokens_h=8,
    tokens_w=8,
    action_kind="discrete",
    n_actions=5,
)
"""Issue 22's anchor: latent (9, 8, 8), 512 codes, 4 layers × 264 × 4 heads."""


def tiny_config() -> PriorConfig:
    """The vizdoom_hgs ``tiny`` preset's prior, without dropout (generation and speed do not use it)."""
    return replace(get_preset("vizdoom_hgs", "tiny").prior, dropout=0.0, attn_dropout=0.0, context_noise=0.0)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """Best-of GFLOP/s of an n×n×n GEMM in ``dtype`` (2·n³ FLOPs per product)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def stream_gbytes_s(mbytes: int = 256, seconds: float = 0.5) -> float:
    """Best-of GB/s of summing an fp32 tensor of ``mbytes`` MB: what reading a KV cache far larger than L2 costs."""
    x = torch.randn(mbytes * 2**20 // 4)
    x.sum()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def frame_cache_bytes(cfg: PriorConfig, bytes_per_value: int = 4) -> float:
    """Bytes of KV cache that one row's new frame reads: every position reads the keys and values of every
    layer up to itself (the one-query attention's memory traffic, which no batching shares)."""
    n = 1 + cfg.tokens_h * cfg.tokens_w
    first = (cfg.frames - 1) * n
    keys = sum(first + j + 1 for j in range(n))
    return 2 * keys * cfg.n_embd * cfg.n_layer * bytes_per_value


def frame_flops(cfg: PriorConfig) -> float:
    """FLOPs to generate one new frame per row after ``frames - 1`` context frames (module docstring)."""
    C, Lyr, V, hw = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.tokens_h * cfg.tokens_w
    n = 1 + hw
    first = (cfg.frames - 1) * n  # cache slot of the new block's first position
    per_pos = 24 * C * C * Lyr  # projections and MLP of one position, all layers
    attn = sum(4 * C * (first + j + 1) * Lyr for j in range(n))  # position j sees first + j + 1 keys
    head = hw * 2 * C * V
    prev = hw * 2 * cfg.prev_frame_kernel**2 * C * C
    cond_ln = (2 * Lyr + 1) * 2 * C * 2 * C if cfg.action_cond == "cond_ln" else 0
    return n * per_pos + attn + head + prev + cond_ln


def maskgit_frame_flops(cfg: PriorConfig, steps: int) -> float:
    """FLOPs of one new frame per row by MaskGIT decoding with ``steps`` refinements (module docstring): the slot,
    ``steps`` whole-frame masked passes (every position sees the prefix and the frame; the token head at all hw
    positions) and the pass that writes the finished frame (causal, no head)."""
    C, Lyr, V, hw = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.tokens_h * cfg.tokens_w
    first = (cfg.frames - 1) * (1 + hw)  # cache slot of the new block's slot position
    per_pos = 24 * C * C * Lyr
    slot = per_pos + 4 * C * (first + 1) * Lyr
    masked = steps * hw * (per_pos + 4 * C * (first + 1 + hw) * Lyr + 2 * C * V)
    clean = hw * per_pos + sum(4 * C * (first + 2 + j) * Lyr for j in range(hw))
    prev = hw * 2 * cfg.prev_frame_kernel**2 * C * C
    cond_ln = (2 * Lyr + 1) * 2 * C * 2 * C if cfg.action_cond == "cond_ln" else 0
    return slot + masked + clean + prev + cond_ln


def train_flops_per_position(cfg: PriorConfig) -> float:
    """FLOPs of one training position (forward + backward) in whole windows of ``frames`` blocks."""
    C, Lyr, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    S = cfg.frames * (1 + cfg.tokens_h * cfg.tokens_w)
    params = 12 * C * C * Lyr + C * V  # trunk matrices + head (biases, norms, embeddings: negligible)
    attn = 3 * 2 * C * S * Lyr  # causal: each position sees S/2 keys on average; 4·C per key, x3 fwd+bwd
    prev = 6 * cfg.prev_frame_kernel**2 * C * C
    return 6 * params + attn + prev


def _context(prior: Prior, B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = prior.cfg
    tok = torch.randint(0, cfg.vocab_size, (B, cfg.frames - 1, cfg.tokens_h, cfg.tokens_w), generator=g)
    return tok, torch.randint(0, cfg.n_actions, (B, cfg.frames - 2), generator=g)


def generation_step_seconds(prior: Prior, B: int, repeats: int, bf16: bool = False, **step_kw) -> float:
    """Median seconds of one ``Rollout.step`` (B rows, one new frame each) after a full context."""
    g = torch.Generator().manual_seed(0)
    r = Rollout(prior, B, bf16=bf16)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        r.start(*_context(prior, B, g))
        a = torch.randint(0, prior.cfg.n_actions, (B,), generator=g)
        t0 = time.perf_counter()
        r.step(a, generator=g, **step_kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def training_step_seconds(prior: Prior, bf16_reps: int, batch: int = 8) -> tuple[float, float]:
    """Median seconds of one training step (fp32, bf16 autocast), measured interleaved by the trainer's own
    probe (:func:`~worldmodel.training.time_train_steps`: the trainer's AdamW, its default settings) on a copy
    of ``prior``, on ``batch`` random whole windows."""
    cfg = prior.cfg
    g = torch.Generator().manual_seed(0)
    data = {
        "tokens": torch.randint(
            0, cfg.vocab_size, (batch, cfg.frames, cfg.tokens_h, cfg.tokens_w), generator=g
        ),
        "actions": torch.randint(0, cfg.n_actions, (batch, cfg.frames - 1), generator=g),
        "rewards": torch.randn(batch, cfg.frames - 1, generator=g),
        "terminated": torch.zeros(batch, cfg.frames - 1, dtype=torch.bool),
    }
    seconds, _ = time_train_steps(prior, data, TrainConfig(), torch.device("cpu"), steps=bf16_reps)
    return seconds[False], seconds[True]


def bf16_divergence(cfg: PriorConfig, B: int = 16, contexts: int = 2) -> dict:
    """How far the bf16 token loop's next-token distributions are from fp32's: mean and max KL(p_fp32 || p_bf16)
    (nats) over every position of ``contexts`` × ``B`` generated frames, teacher-forced on tokens sampled
    from the fp32 distributions, for the fused bf16 decoder and for the bf16 autocast path through
    ``Prior.forward_cached``; and the mean entropy of p_fp32 (nats) for scale.

    The prior has random weights with a head of std 2/sqrt(C) (logits of std ~2; the default zero-initialised
    head would give uniform logits, and any two paths would agree).
    """
    torch.manual_seed(1)
    prior = Prior(cfg).eval()
    torch.nn.init.normal_(prior.head.weight, std=2 * cfg.n_embd**-0.5)
    with torch.inference_mode():
        return _divergence(prior, B, contexts)


def _divergence(prior: Prior, B: int, contexts: int) -> dict:
    cfg = prior.cfg
    L, hw, V = prior.block_len, prior.hw, cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    paths = {"fp32": Rollout(prior, B), "bf16_fused": Rollout(prior, B, bf16=True)}
    paths["bf16_autocast"] = Rollout(prior, B, bf16=True)
    paths["bf16_autocast"].decoder = None  # no fused decoder: the general forward_cached path
    kl: dict[str, list[torch.Tensor]] = {k: [] for k in paths if k != "fp32"}
    ent = []
    for _ in range(contexts):
        tok, act = _context(prior, B, g)
        a = torch.randint(0, cfg.n_actions, (B,), generator=g)
        loops = {}
        for name, r in paths.items():
            r.start(tok, act)
            t_idx = r._advance(a)
            with r._autocast():
                emb = r._embed_step(t_idx)
                logits = torch.empty(hw, B, V)
                loops[name] = (r, emb, logits, *r._position_forward(emb, int(t_idx[0]) * L, logits))
        xs = {name: lp[1].slot_input() for name, lp in loops.items()}
        for j in range(hw):
            for name, (r, _emb, _logits, forward, head) in loops.items():
                with r._autocast():
                    head(forward(xs[name], int(t_idx[0]) * L + j), j)
            logp32 = loops["fp32"][2][j].log_softmax(-1)  # (B, V)
            ent.append(-(logp32.exp() * logp32).sum(-1))
            nxt = torch.multinomial(logp32.exp(), 1, generator=g)[:, 0]  # the same history for every path
            for name in kl:
                kl[name].append((logp32.exp() * (logp32 - loops[name][2][j].log_softmax(-1))).sum(-1))
            for name, (r, emb, *_rest) in loops.items():
                with r._autocast():
                    xs[name] = emb.token_input(nxt, j)
    out = {"entropy_fp32_nats": round(float(torch.cat(ent).mean()), 3)}
    for name, v in kl.items():
        v = torch.cat(v)
        out[f"kl_{name}_mean"], out[f"kl_{name}_max"] = float(f"{v.mean():.2e}"), float(f"{v.max():.2e}")
    return out


def measure(
    cfg: PriorConfig,
    batches: tuple[int, ...],
    repeats: int,
    train_reps: int,
    peaks: dict[str, float],
    maskgit_steps: tuple[int, ...] = (3, 4),
) -> dict:
    """Every figure of one geometry (module docstring), with fractions of the ``peaks`` (``fp32``, ``bf16``
    GFLOP/s, ``stream`` GB/s)."""
    torch.manual_seed(0)
    prior = Prior(cfg).eval()
    ff, peak = frame_flops(cfg), peaks["fp32"]
    out: dict = {
        "model": f"{cfg.n_layer}x{cfg.n_embd}x{cfg.n_head}h latent ({cfg.frames},{cfg.tokens_h},{cfg.tokens_w}) "
        f"V={cfg.vocab_size}",
        "params_M": round(sum(p.numel() for p in prior.parameters()) / 1e6, 2),
        "gflop_per_frame": round(ff / 1e9, 4),
        "fps_limit": round(peak * 1e9 / ff, 1),
        "cache_mb_per_frame": round(frame_cache_bytes(cfg) / 1e6, 1),
        "fps_cache_limit": round(peaks["stream"] * 1e9 / frame_cache_bytes(cfg), 1),
        "fps_cache_limit_bf16": round(peaks["stream"] * 1e9 / frame_cache_bytes(cfg, 2), 1),
    }
    for B in batches:
        fps = B / generation_step_seconds(prior, B, repeats)
        out[f"fps_b{B}"] = round(fps, 1)
        out[f"fps_b{B}_frac"] = round(fps * ff / (peak * 1e9), 3)
        fps16 = B / generation_step_seconds(prior, B, repeats, bf16=True)
        out[f"fps_b{B}_bf16"] = round(fps16, 1)
        out[f"fps_b{B}_bf16_frac"] = round(fps16 * ff / (peaks["bf16"] * 1e9), 3)
    mg = Prior(replace(cfg, maskgit_weight=1.0)).eval()  # carries the MaskGIT stream (two more vectors)
    for K in maskgit_steps:
        mf = maskgit_frame_flops(cfg, K)
        out[f"gflop_per_frame_maskgit{K}"] = round(mf / 1e9, 4)
        for B in batches:
            kw = {"decode": "maskgit", "maskgit_steps": K}
            fps = B / generation_step_seconds(mg, B, repeats, bf16=True, **kw)
            out[f"fps_b{B}_maskgit{K}_bf16"] = round(fps, 1)
            out[f"fps_b{B}_maskgit{K}_bf16_frac"] = round(fps * mf / (peaks["bf16"] * 1e9), 3)
    tf = train_flops_per_position(cfg)
    positions = 8 * cfg.frames * prior.block_len
    t32, t16 = training_step_seconds(prior, train_reps)
    out["train_flop_per_tok"] = round(tf / 1e6, 3) * 1e6
    out["train_tok_s_fp32"] = round(positions / t32)
    out["train_tok_s_bf16"] = round(positions / t16)
    out["train_fp32_frac"] = round(positions / t32 * tf / (peak * 1e9), 3)
    out["train_bf16_frac"] = round(positions / t16 * tf / (peaks["bf16"] * 1e9), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats and no batch 64 (a smoke run of ~20 s)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed generation steps per batch size (median)")
    p.add_argument("--train-reps", type=int, default=4, help="timed training steps per precision (median)")
    p.add_argument(
        "--bf16-check",
        action="store_true",
        help="also measure how far the bf16 token loop's distributions are from fp32's (KL, 2 x 16 frames)",
    )
    p.add_argument(
        "--geometry", choices=["anchor", "tiny", "both"], default="both", help="which prior(s) to measure"
    )
    p.add_argument(
        "--maskgit-steps",
        type=int,
        nargs="*",
        default=[3, 4],
        help="also measure bf16 MaskGIT decoding with each of these numbers of refinements per frame (none: skip)",
    )
    args = p.parse_args()
    if any(k < 1 for k in args.maskgit_steps):
        p.error(f"--maskgit-steps: got {args.maskgit_steps}, expected numbers of refinements >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = (1, 16) if args.quick else (1, 16, 64)
    repeats, train_reps = (2, 2) if args.quick else (args.repeats, args.train_reps)
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    peaks["stream"] = stream_gbytes_s()
    out: dict = {
        "bench": "anchor",
        "threads": torch.get_num_threads(),
        "matmul_fp32_gflops": round(peaks["fp32"], 1),
        "matmul_bf16_gflops": round(peaks["bf16"], 1),
        "stream_gbytes_s": round(peaks["stream"], 1),
    }
    geometries = {"anchor": ANCHOR, "tiny": tiny_config()}
    for name, cfg in geometries.items():
        if args.geometry in (name, "both"):
            out[name] = measure(cfg, batches, repeats, train_reps, peaks, tuple(args.maskgit_steps))
            if args.bf16_check:
                out[name]["bf16_vs_fp32"] = bf16_divergence(cfg)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
