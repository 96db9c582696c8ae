"""Render rollouts for policy debugging: mp4 + gif + a PNG of per-step traces + a summary and an HTML report.

Examples:
    # follow: the policy drives the REAL game, the dream follows with the same actions (open loop, and
    # re-synced to the real frames every --resync-every steps) -> real · dream · |diff| + where they part
    python experiments/rollout.py --env vizdoom_hgs --policy runs/vizdoom_hgs-tiny/policies/ppo_dream.safetensors --mode follow
    # episode: replay a held-out real episode's actions from the same context -> real · dream · |diff|
    python experiments/rollout.py --env vizdoom_hgs --policy episode
    # dream: a policy acting in the dream alone (policy file, controller directory or random) -> dream panel
    python experiments/rollout.py --env vizdoom_hgs --policy runs/vizdoom_hgs-tiny/policies/ppo_dream.safetensors
    python experiments/rollout.py --env gym:CarRacing-v3 --policy episode      # a bundle of any Gymnasium env

Overlays: step, action, predicted reward (and the real one in lockstep), termination probability,
mean token entropy (dream uncertainty); in follow mode also the policy's action probabilities (a bar per
action) and value estimate on the real and on the dream frame. Each rollout writes
``<stem>.{mp4,gif,png,json,html}`` (+ ``<stem>-optimism.png`` in the lockstep modes) and prints the path of
the HTML report, which opens from disk. Files go to ``<checkpoint>/rollouts/`` unless ``--out``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from envs.dream import DreamEnv, load_world_model
from envs.follow import follow_trace, has_real_env, make_bundle_real_env
from envs.policy import dream_trace, load_policy
from envs.policy_probe import open_probe
from envs.vizdoom import sigterm_exits
from worldmodel.bundle import WorldModel
from worldmodel.rollout_report import write_report
from worldmodel.rollout_summary import DEFAULT_PSNR_THRESHOLD, RolloutSummary
from worldmodel.rollout_video import RolloutTrace, lockstep_trace
from worldmodel.store import EpisodeStore

MODES = ("auto", "follow", "episode", "dream")


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Preset of the bundle (vizdoom_hgs, ..., or gym:<Gymnasium id>)."""
    checkpoint: str | None = None
    """Bundle directory (default: the newest bundle of --env under runs/ or $WORLDMODEL_HOME/runs)."""
    policy: str = "episode"
    """'episode' (lockstep replay of a recorded real episode), 'random', the path of a policy file
    (train_policy.py's .safetensors: --algo ppo, or --algo distill, which acts greedily on its newest frames) or
    of a CMA-ES controller directory (train_policy.py --algo cmaes)."""
    mode: Literal["auto", "follow", "episode", "dream"] = "auto"
    """'follow': the policy drives the real game, the dream follows (ViZDoom bundles; dataset-only bundles
    fall back to 'episode' with a message); 'episode': replay a recorded episode's actions; 'dream': the
    policy acts in the dream alone; 'auto': 'episode' for --policy episode, else 'dream'."""
    resync_every: int = 1
    """Follow mode: re-sync the second dream to the real frames every K steps (1 = one-step-ahead
    predictions; 0 = no re-synced dream)."""
    deterministic: bool = False
    """Follow mode: the policy takes its most likely action instead of sampling its distribution."""
    psnr_threshold: float = DEFAULT_PSNR_THRESHOLD
    """The summary's 'first divergence' is the first step whose dream-vs-real PSNR falls below this (dB)."""
    battle2_path: str | None = None
    """Follow mode, vizdoom_battle2: directory with D4_battle2.wad/.cfg (default: the map shipped with the package)."""
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
    """Steps to render (lockstep: at most to the episode's end; dream: until predicted termination)."""
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


def _episode_trace(args: Args, wm: WorldModel) -> tuple[RolloutTrace, str]:
    store_path = args.store or wm.store_path
    if not store_path or not Path(store_path, "store.json").exists():
        sys.exit(
            f"error: lockstep mode needs the episode store (bundle's store {store_path!r} not found); pass --store"
        )
    store = EpisodeStore(store_path)
    eid = args.episode_id
    if eid is None:
        ids = [
            e
            for s in ("test", "val", "train")
            for e in store.episode_ids(s)
            if store.length(e) > args.context
        ]
        if not ids:
            sys.exit(f"error: no episode in {store_path} is longer than the context ({args.context} frames)")
        held = [e for e in store.episode_ids("test") + store.episode_ids("val") if e in ids]
        pool = held or ids
        eid = pool[int(np.random.default_rng(args.seed).integers(len(pool)))]
    trace = lockstep_trace(
        wm,
        store,
        eid,
        start=args.start,
        context=args.context,
        steps=args.steps,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    return trace, f"lockstep-{eid}"


def _policy_name(policy: str) -> str:
    return "random" if policy == "random" else Path(policy.rstrip("/")).stem


def _follow_trace(args: Args, wm: WorldModel) -> tuple[RolloutTrace, str]:
    try:
        probe = open_probe(args.policy, wm, deterministic=args.deterministic, trust_pickle=args.trust_pickle)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    env = make_bundle_real_env(wm, battle2_path=args.battle2_path)
    try:
        trace = follow_trace(
            wm,
            env,
            probe,
            steps=args.steps,
            context=args.context,
            resync_every=args.resync_every,
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    finally:
        env.close()
    return trace, f"follow-{_policy_name(args.policy)}"


def _dream_trace(args: Args, wm: WorldModel) -> tuple[RolloutTrace, str]:
    env = DreamEnv(
        world_model=wm, temperature=args.temperature, top_k=args.top_k, context_frames=args.context
    )
    try:
        if args.policy != "random" and Path(args.policy).is_dir():
            probe = open_probe(args.policy, wm)  # a controller directory: its deterministic choice

            def pol(obs: np.ndarray) -> int:
                return probe.read(obs, np.random.default_rng(args.seed)).action
        else:
            pol = load_policy(args.policy, env.action_space, args.seed, trust_pickle=args.trust_pickle)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return dream_trace(env, pol, args.steps, seed=args.seed), _policy_name(args.policy)


def print_summary(summary: RolloutSummary) -> None:
    """Print the summary of a lockstep rollout as a few readable lines."""
    s = summary
    never = "never"
    print(
        f"steps {s.steps}: mean PSNR dream vs real {s.mean_psnr_db:.2f} dB (open loop)"
        + (f", {s.mean_psnr_resync_db:.2f} dB (re-synced every {s.resync_every})" if s.resync_every else "")
    )
    print(
        f"first step below {s.psnr_threshold_db:g} dB: {s.first_divergence_step or never} (open loop)"
        + (f", {s.first_divergence_step_resync or never} (re-synced)" if s.resync_every else "")
    )
    print(
        f"return: real {s.real_return:.2f}, predicted {s.predicted_return:.2f} -> dream optimism {s.optimism:+.2f}"
        + (f" (re-synced {s.optimism_resync:+.2f})" if s.resync_every else "")
    )
    if s.disagreement_steps is not None:
        steps = ", ".join(map(str, s.disagreement_steps)) or "none"
        print(
            f"policy {s.policy}: chooses differently on the dream frame at {len(s.disagreement_steps)}/{s.steps} "
            f"steps: {steps}"
        )


def main(args: Args) -> dict[str, Any]:
    sigterm_exits()  # SIGTERM runs the cleanup (the ViZDoom engine closed) instead of killing outright
    try:
        wm = load_world_model(args.checkpoint, args.env, args.device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    mode = args.mode if args.mode != "auto" else ("episode" if args.policy == "episode" else "dream")
    if mode in ("follow", "dream") and args.policy == "episode":
        sys.exit(
            f"error: --mode {mode} needs a policy: --policy random, a policy file or a controller directory"
        )
    if mode == "follow" and not has_real_env(wm):
        print(
            f"note: the bundle models {wm.cfg.env!r}, a dataset without a real env here, so no policy can drive "
            f"it: falling back to the recorded-episode lockstep (--mode episode), which replays a held-out "
            f"episode's recorded actions; --policy {args.policy} is not run",
            file=sys.stderr,
        )
        mode = "episode"
    if mode == "episode":
        trace, name = _episode_trace(args, wm)
    elif mode == "follow":
        trace, name = _follow_trace(args, wm)
    else:
        trace, name = _dream_trace(args, wm)
    stem = Path(args.out) if args.out else Path(wm.path) / "rollouts" / f"{name}-{args.seed}"
    meta = {
        "bundle": str(wm.path),
        "mode": mode,
        "policy": args.policy,
        "seed": args.seed,
        "steps": trace.steps,
        "context": args.context,
        "temperature": args.temperature,
    }
    if mode == "follow":
        meta.update(resync_every=args.resync_every, deterministic=args.deterministic)
    files, summary = write_report(
        trace,
        stem,
        scale=args.upscale,
        fps=wm.fps,
        gif=args.gif,
        psnr_threshold=args.psnr_threshold,
        title=f"{mode} rollout: {name}",
        meta=meta,
    )
    if summary is not None:
        print_summary(summary)
    print(f"report: {files['html']}")
    out: dict[str, Any] = {k: str(v) for k, v in files.items()}
    out["mode"] = mode
    if summary is not None:
        out.update(
            mean_psnr_db=round(summary.mean_psnr_db, 2),
            dream_optimism=round(summary.optimism, 2),
            first_divergence_step=summary.first_divergence_step,
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
