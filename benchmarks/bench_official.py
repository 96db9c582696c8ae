"""Side by side with the official VideoGPT code at issue 22's anchor geometry, in one process. One JSON line.

The official code is not a dependency: point ``--official`` at a checkout of https://github.com/wilson1yan/VideoGPT
(measured at commit 733d2b1). Only its ``videogpt/attention.py`` and ``videogpt/utils.py`` are imported, as
published; its package ``__init__`` (which pulls in its data and VQ-VAE code) is not run, and scikit-video, which
``utils.py`` imports only to save videos, is stubbed when missing.

Both sides have latent (9, 8, 8), 512 codes, 4 layers × 264 wide × 4 heads, random weights, 2 threads by default.

- Sampling, batch 16: ``official`` times the official ``VideoGPT.sample`` loop (per position: embed the previous
  sample, ``AttentionStack`` with its decode cache, ``LayerNorm``, ``fc_out``, ``multinomial``) over the last frame's
  64 positions after the 512 context positions went through the same loop untimed; ``official_rolling`` times the
  whole 576 positions, which is what each new frame of a sliding window costs it (it has no parallel prefill).
  Ours: ``Rollout.step`` after a full context, fp32 token by token and bf16 MaskGIT with ``--maskgit-steps``
  (a prior carrying the MaskGIT stream). Medians of ``--repeats`` interleaved rounds.
- Training, batch 8 windows: forward + backward + optimizer step, tokens/s. Official: ``fc_in`` → ``AttentionStack``
  → ``LayerNorm`` → ``fc_out`` → cross-entropy with Adam, fp32 (its own precision) and under bf16 autocast (which
  its code never uses); its blocks use activation checkpointing as published, and ``*_no_ckpt`` times them
  without. Ours: the trainer's own step probe (``bench_anchor.training_step_seconds``), fp32 and bf16.
  Official tokens are the 9 × 64 codes of a window; ours also count each frame's slot position (9 × 65):
  ``ratio_train_bf16_vs_official_fp32_codes_only`` discounts them.

Usage: python benchmarks/bench_official.py --official PATH/TO/VideoGPT [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import statistics
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_anchor import ANCHOR, generation_step_seconds, training_step_seconds

from worldmodel.prior import Prior

SHAPE, EMB_DIM, SAMPLE_BATCH, TRAIN_BATCH = (9, 8, 8), 64, 16, 8


def load_official(root: Path) -> types.ModuleType:
    """The official ``videogpt.attention`` module from a checkout at ``root``, without running its package
    ``__init__``."""
    pkg_dir = root / "videogpt"
    if not (pkg_dir / "attention.py").is_file():
        raise FileNotFoundError(
            f"--official: {root} has no videogpt/attention.py; expected a checkout of "
            "https://github.com/wilson1yan/VideoGPT"
        )
    # utils.py imports scikit-video at the top, only to save videos
    if importlib.util.find_spec("skvideo") is None:
        for name in ("skvideo", "skvideo.io"):
            sys.modules[name] = types.ModuleType(name)
    pkg = types.ModuleType("videogpt")
    pkg.__path__ = [str(pkg_dir)]  # a bare package: `from .utils import ...` resolves, __init__ is skipped
    sys.modules["videogpt"] = pkg
    return importlib.import_module("videogpt.attention")


@contextlib.contextmanager
def no_checkpointing(attention: types.ModuleType) -> Iterator[None]:
    """The official blocks without their activation checkpointing (which re-runs each block's forward in
    backward to save GPU memory): what its training step would cost without that choice."""
    original = attention.checkpoint
    attention.checkpoint = lambda fn, *args: fn(*args)
    try:
        yield
    finally:
        attention.checkpoint = original


class OfficialGPT(nn.Module):
    """The official GPT's forward without Lightning and the VQ-VAE: code embeddings in, logits out."""

    def __init__(self, attention: types.ModuleType) -> None:
        super().__init__()
        C, V = ANCHOR.n_embd, ANCHOR.vocab_size
        self.fc_in = nn.Linear(EMB_DIM, C, bias=False)
        self.attn_stack = attention.AttentionStack(
            SHAPE, C, ANCHOR.n_head, ANCHOR.n_layer, 0.0, "full", 0.0, None, None
        )
        self.norm = attention.LayerNorm(C, None)
        self.fc_out = nn.Linear(C, V, bias=False)
        nn.init.normal_(self.fc_out.weight, std=0.02)
        self.register_buffer("codebook", torch.randn(V, EMB_DIM))

    def forward(self, x: torch.Tensor, decode_step: int | None = None, decode_idx=None) -> torch.Tensor:
        return self.fc_out(self.norm(self.attn_stack(self.fc_in(x), {}, decode_step, decode_idx), {}))


@torch.no_grad()
def official_frame_seconds(gpt: OfficialGPT, start: int) -> float:
    """Seconds the official sampling loop spends on positions ``start ..`` of a (9, 8, 8) latent, batch 16."""
    gpt.eval()
    samples = torch.zeros((SAMPLE_BATCH,) + SHAPE, dtype=torch.long)
    prev, t0 = None, time.perf_counter()
    for i, idx in enumerate(itertools.product(*[range(s) for s in SHAPE])):
        if i == start:
            t0 = time.perf_counter()
        emb = gpt.codebook[samples]  # (B, 9, 8, 8, D)
        sl = (slice(None), *[slice(j, j + 1) for j in idx])
        x = emb[sl] if prev is None else emb[prev]  # the previous position's sample, (B, 1, 1, 1, D)
        logits = gpt(x, i, idx).squeeze()  # (B, V)
        samples[(slice(None), *idx)] = torch.multinomial(F.softmax(logits, -1), 1).squeeze(-1)
        prev = sl
    return time.perf_counter() - t0


def official_train_seconds(gpt: OfficialGPT, opt: torch.optim.Optimizer, bf16: bool) -> float:
    """Seconds of one official training step on a batch of 8 random windows."""
    gpt.train()
    tgt = torch.randint(0, ANCHOR.vocab_size, (TRAIN_BATCH,) + SHAPE)
    x = gpt.codebook[tgt]
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(gpt(x).movedim(-1, 1), tgt)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="a checkout of wilson1yan/VideoGPT")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0 = PyTorch's default)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    p.add_argument(
        "--maskgit-steps", type=int, nargs="*", default=[3], help="our bf16 MaskGIT refinements to measure"
    )
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats: got {args.repeats}, expected >= 1")
    if any(k < 1 for k in args.maskgit_steps):
        p.error(f"--maskgit-steps: got {args.maskgit_steps}, expected integers >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        attention = load_official(args.official)
    except FileNotFoundError as e:
        p.error(str(e))
    gpt = OfficialGPT(attention)
    opt = torch.optim.Adam(gpt.parameters(), lr=3e-4)
    plain, mg = Prior(ANCHOR).eval(), Prior(replace(ANCHOR, maskgit_weight=1.0)).eval()
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    (
        official_frame_seconds(gpt, 512),
        official_train_seconds(gpt, opt, False),
        official_train_seconds(gpt, opt, True),
    )
    for _ in range(args.repeats):
        add("fps_official", SAMPLE_BATCH / official_frame_seconds(gpt, 512))
        add("fps_official_rolling", SAMPLE_BATCH / official_frame_seconds(gpt, 0))
        add("fps_ours_fp32", SAMPLE_BATCH / generation_step_seconds(plain, SAMPLE_BATCH, 3))
        for K in args.maskgit_steps:
            s = generation_step_seconds(mg, SAMPLE_BATCH, 3, bf16=True, decode="maskgit", maskgit_steps=K)
            add(f"fps_ours_maskgit{K}_bf16", SAMPLE_BATCH / s)
        official_codes = TRAIN_BATCH * 9 * 64
        add("train_tok_s_official_fp32", official_codes / official_train_seconds(gpt, opt, False))
        add("train_tok_s_official_bf16", official_codes / official_train_seconds(gpt, opt, True))
        with no_checkpointing(attention):
            add("train_tok_s_official_fp32_no_ckpt", official_codes / official_train_seconds(gpt, opt, False))
        t32, t16 = training_step_seconds(plain, 2, TRAIN_BATCH)
        ours_positions = TRAIN_BATCH * ANCHOR.frames * plain.block_len
        add("train_tok_s_ours_fp32", ours_positions / t32)
        add("train_tok_s_ours_bf16", ours_positions / t16)
    out: dict[str, object] = {"bench": "official_side_by_side", "threads": torch.get_num_threads()}
    out.update({k: round(statistics.median(v), 1) for k, v in res.items()})
    for k in list(res):
        if k.startswith("fps_ours"):
            out[f"ratio_{k[4:]}_vs_official_rolling"] = round(out[k] / out["fps_official_rolling"], 1)
            out[f"ratio_{k[4:]}_vs_official"] = round(out[k] / out["fps_official"], 1)
    off32 = out["train_tok_s_official_fp32"]
    out["ratio_train_bf16_vs_official_fp32"] = round(out["train_tok_s_ours_bf16"] / off32, 2)
    out["ratio_train_bf16_vs_official_fp32_codes_only"] = round(
        out["train_tok_s_ours_bf16"] * 64 / 65 / off32, 2
    )
    out["ratio_train_bf16_vs_official_fp32_no_ckpt"] = round(
        out["train_tok_s_ours_bf16"] / out["train_tok_s_official_fp32_no_ckpt"], 2
    )
    out["ratio_train_fp32_vs_official_fp32"] = round(out["train_tok_s_ours_fp32"] / off32, 2)
    out["ratio_train_bf16_vs_official_bf16"] = round(
        out["train_tok_s_ours_bf16"] / out["train_tok_s_official_bf16"], 2
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
