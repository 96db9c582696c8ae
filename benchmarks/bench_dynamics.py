"""Action-following benchmark of a world-model bundle on held-out real episodes. Prints one JSON line.

Open-loop PSNR and SSIM (greedy decoding) at steps 1/4/8/16 with the true actions, with shuffled
actions, for copy-last-frame and for the decode-true-tokens ceiling (worldmodel.dynamics_eval); plus
held-out teacher-forced nats/token on first frames vs frames with history (true and shuffled actions).
The full report (reward, termination, FVD, bits/dim, plots) is experiments/evaluate.py.

Usage: python benchmarks/bench_dynamics.py --checkpoint runs/vizdoom_hgs-tiny [--store DIR] [--n 48]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from cli_args import add_decode_arguments, decode_kwargs

from worldmodel.bundle import WorldModel
from worldmodel.dynamics_eval import evaluate_dynamics, heldout_nll
from worldmodel.store import EpisodeStore
from worldmodel.token_cache import TOKENS_FILE, TokenCache
from worldmodel.training_data import ClipDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="bundle / run directory")
    p.add_argument("--store", help="episode store (default: the one the bundle was trained on)")
    p.add_argument("--split", default="test", help="held-out split to evaluate on")
    p.add_argument("--n", type=int, default=48, help="start points")
    p.add_argument("--context", type=int, default=4, help="real context frames")
    p.add_argument("--horizon", type=int, default=16, help="open-loop steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    add_decode_arguments(p, maskgit_steps=8)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wm = WorldModel.from_pretrained(args.checkpoint)
    store = EpisodeStore(args.store or wm.store_path)
    kw = decode_kwargs(args)
    rep = evaluate_dynamics(
        wm, store, split=args.split, n=args.n, context=args.context, horizon=args.horizon, **kw
    )
    pick = [s for s in (1, 4, 8, 16) if s <= args.horizon]
    out = {
        "bench": "dynamics",
        "checkpoint": str(args.checkpoint),
        "split": rep.extra["split"],
        "n": rep.n_starts,
        "context": args.context,
        "decode": args.decode if args.decode == "autoregressive" else f"maskgit{args.maskgit_steps}",
        "seconds_true_actions": round(rep.rollouts["true"].seconds, 2),
    }
    for name in ("true", "shuffled", "copy_last", "ceiling"):
        vals = getattr(rep, f"psnr_{name}")
        out[f"psnr_{name}"] = {str(s): round(vals[s - 1], 2) for s in pick}
    for name in ("true", "copy_last"):
        vals = getattr(rep, f"ssim_{name}")
        out[f"ssim_{name}"] = {str(s): round(vals[s - 1], 4) for s in pick}
    out["true_beats_shuffled_and_copy_at_all_steps"] = bool(
        all(rep.psnr_true[s - 1] > max(rep.psnr_shuffled[s - 1], rep.psnr_copy_last[s - 1]) for s in pick)
    )
    cache_path = Path(args.checkpoint) / TOKENS_FILE
    if cache_path.exists():
        cache = TokenCache(cache_path)
        split = args.split if cache.episode_ids(args.split) else "val"
        ds = ClipDataset(cache, split=split, clip_len=wm.cfg.prior.frames)
        idx = np.random.default_rng(0).choice(len(ds), size=min(256, len(ds)), replace=False)
        out.update({k: round(v, 4) for k, v in heldout_nll(wm, [ds[int(i)] for i in idx]).items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
