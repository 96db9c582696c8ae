"""Render dream rollouts for policy debugging: mp4 + gif + a PNG of per-step traces.

Examples:
    # lockstep: replay a held-out real episode's actions from the same context -> real · dream · |diff|
    python experiments/rollout.py --env vizdoom_hgs --policy episode
    # a policy acting in the dream (policy file or random) -> dream panel with overlays
    python experiments/rollout.py --env vizdoom_hgs --policy runs/vizdoom_hgs-tiny/policies/ppo_dream.safetensors
    python experiments/rollout.py --env gym:CarRacing-v3 --policy episode      # a bundle of any Gymnasium env

Overlays: step, action, predicted reward (and the real one in lockstep), termination probability,
mean token entropy (dream uncertainty). Files go to ``<checkpoint>/rollouts/`` unless ``--out``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from envs.dream import DreamEnv, load_world_model
from envs.policy import dream_trace, load_policy
from worldmodel.rollout_video import lockstep_trace, render_trace
from worldmodel.store import EpisodeStore


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Preset of the bundle (vizdoom_hgs, ..., or gym:<Gymnasium id>)."""
    checkpoint: str | None = None
    """Bundle directory (default: the newest bundle of --env under runs/ or $WORLDMODEL_HOME/runs)."""
    policy: str = "episode"
    """'episode' (lockstep replay of a recorded real episode), 'random', or the path of a policy file
    (train_policy.py's .safetensors)."""
    trust_pickle: bool = False
    """Also accept an SB3 PPO .zip as --policy. Loading a zip unpickles it: it RUNS ANY CODE the file holds.
    Only for zips of trusted origin."""
    episode_id: str | None = None
    """Lockstep: the store episode to replay (default: one drawn from the held-out split with --seed)."""
    store: str | None = None
    """Lockstep: episode store to read (default: the bundle's store)."""
    start: int = 0
    """Lockstep: first context frame in the episode."""
    context: int = 1
    """Real context frames the dream starts from."""
    steps: int = 64
    """Steps to render (lockstep: at most to the episode's end; policy: until predicted termination)."""
    upscale: int = 4
    """Nearest-neighbour upscaling factor of the panels."""
    temperature: float = 1.0
    """Sampling temperature of the dream's tokens."""
    top_k: int | None = None
    """Top-k sampling of the dream's tokens (None = off)."""
    seed: int = 0
    """Seed of the dream's sampling (and of the episode choice / random policy)."""
    out: str | None = None
    """Output path stem (default: <checkpoint>/rollouts/<mode>-<seed>)."""
    gif: bool = True
    """Also write a gif next to the mp4."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


def main(args: Args) -> dict[str, str]:
    try:
        wm = load_world_model(args.checkpoint, args.env, args.device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.policy == "episode":
        store_path = args.store or wm.store_path
        if not store_path or not Path(store_path, "store.json").exists():
            sys.exit(f"error: lockstep mode needs the episode store (bundle's store {store_path!r} not found); pass --store")
        store = EpisodeStore(store_path)
        eid = args.episode_id
        if eid is None:
            import numpy as np

            ids = [e for s in ("test", "val", "train") for e in store.episode_ids(s) if store.length(e) > args.context]
            if not ids:
                sys.exit(f"error: no episode in {store_path} is longer than the context ({args.context} frames)")
            held = [e for e in store.episode_ids("test") + store.episode_ids("val") if e in ids]
            pool = held or ids
            eid = pool[int(np.random.default_rng(args.seed).integers(len(pool)))]
        trace = lockstep_trace(wm, store, eid, start=args.start, context=args.context, steps=args.steps,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        mode = f"lockstep-{eid}"
    else:
        env = DreamEnv(world_model=wm, temperature=args.temperature, top_k=args.top_k, context_frames=args.context)
        try:
            pol = load_policy(args.policy, env.action_space, args.seed, trust_pickle=args.trust_pickle)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        trace = dream_trace(env, pol, args.steps, seed=args.seed)
        mode = "random" if args.policy == "random" else Path(args.policy).stem
    stem = Path(args.out) if args.out else Path(wm.path) / "rollouts" / f"{mode}-{args.seed}"
    paths = render_trace(trace, stem, scale=args.upscale, fps=wm.fps, gif=args.gif)
    summary = {k: str(v) for k, v in paths.items()}
    psnr = trace.psnr()
    if psnr is not None:
        summary["mean_psnr_db"] = f"{float(psnr.mean()):.2f}"
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
