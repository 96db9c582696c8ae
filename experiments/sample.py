"""Sample videos from a bundle and write them as an mp4 (and gif) grid.

Examples:
    python experiments/sample.py --checkpoint runs/ucf101-tiny --n 8 --class-id 3     # class-conditional
    python experiments/sample.py --checkpoint runs/ucf101-tiny --n 2 --class-name ApplyEyeMakeup Archery
    python experiments/sample.py --checkpoint runs/tgif-tiny --n 8                    # unconditional
    python experiments/sample.py --checkpoint runs/bair-tiny --n 4 --from-store       # continue held-out episodes

With ``--from-store`` (implied for action- and frame-conditioned bundles) each sample starts from
``--context`` real frames of a held-out episode of the bundle's store and, for action-conditioned
bundles, replays that episode's actions; the real frames are shown in the top row for comparison. Writes ``<out>.mp4`` (the grid), and with
``--gif`` (default) ``<out>.gif`` plus one ``<out>-<i>.gif`` per sample.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import read_run_config
from worldmodel.store import EpisodeStore, StoreError
from worldmodel.video import grid, upscale, write_video
from worldmodel.video_sampling import sample_videos


@dataclass
class Args:
    checkpoint: str
    """Bundle directory."""
    n: int = 4
    """Number of videos (columns of the grid)."""
    class_id: list[int] | None = None
    """Class label(s) for a class-conditional bundle: one for all samples, or one per sample."""
    class_name: list[str] | None = None
    """Class name(s) instead of --class-id (as in the store's class list, e.g. UCF-101's classInd.txt)."""
    from_store: bool = False
    """Start from real context frames (and actions) of held-out store episodes."""
    context: int = 1
    """Real frames of context with --from-store (latent frames when the tokenizer's temporal stride is 1)."""
    frames: int | None = None
    """Latent frames per video (default: the prior's window)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int | None = None
    """Top-k sampling (None = off)."""
    seed: int = 0
    """Seed of the sampling and of the choice of episodes."""
    upscale: int = 2
    """Nearest-neighbour upscaling of the grid."""
    out: str | None = None
    """Output path stem (default: <checkpoint>/samples/sample-<seed>)."""
    gif: bool = True
    """Also write the grid and each sample as gifs."""


def main(args: Args) -> dict[str, str]:
    try:
        read_run_config(args.checkpoint)
        wm = WorldModel.from_pretrained(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    cfg = wm.cfg.prior
    class_ids = None
    if args.class_name is not None:
        if args.class_id is not None:
            sys.exit("error: give --class-id or --class-name, not both")
        names = [str(c).lower() for c in wm.store_meta.get("extra", {}).get("class_names", [])]
        unknown = [c for c in args.class_name if c.lower() not in names]
        if unknown:
            sys.exit(f"error: --class-name {unknown} not among the store's classes (e.g. {names[:3]})")
        args.class_id = [names.index(c.lower()) for c in args.class_name]
    if args.class_id is not None:
        if len(args.class_id) not in (1, args.n):
            sys.exit(
                f"error: --class-id/--class-name: give 1 or {args.n} (= --n) labels, got {len(args.class_id)}"
            )
        class_ids = np.array(args.class_id * args.n if len(args.class_id) == 1 else args.class_id)
    context = actions = real = None
    total = args.frames or cfg.frames
    k = cfg.n_cond_frames  # a frame-conditioned prior takes its conditioning frames from the store
    k_tok = (
        0 if cfg.cond_pixels else k
    )  # latent frames of it (pixel conditioning: k pixel frames, all modelled)
    clip = cfg.action_cond == "clip" and cfg.action_kind != "none"  # the whole clip's actions condition
    if args.from_store or cfg.action_kind != "none" or k:
        try:
            store = EpisodeStore(wm.store_path or "")
        except (StoreError, FileNotFoundError) as e:
            sys.exit(f"error: the bundle's store is needed for context frames: {e}")
        st = wm.cfg.tokenizer.stride[0]
        length = (total + k_tok) * st
        ids: list[str] = []
        for split in ("test", "val", "train"):  # held-out episodes first
            ids = [e for e in store.episode_ids(split) if store.length(e) >= length]
            if ids:
                break
        if not ids:
            sys.exit(f"error: no episode of {store.root} has the {length} frames a sample needs")
        pick = [
            ids[i]
            for i in np.random.default_rng(args.seed).choice(len(ids), size=args.n, replace=len(ids) < args.n)
        ]
        clips = [store.read_clip(e, 0, length) for e in pick]
        real = np.stack([c["frames"] for c in clips])
        context = real[:, : max(args.context, k_tok) * st]
        if cfg.cond_pixels:  # the first pixel frames condition; the prior draws every latent frame
            context = real[:, :k]
        elif clip and not args.context:  # whole-clip actions: the clip is drawn from scratch under them
            context = None
        if cfg.action_kind != "none":
            actions = np.stack([c["actions"] for c in clips])
            if clip:
                actions = actions[:, : cfg.clip_actions]
        if cfg.n_classes and class_ids is None:  # continue each real clip under its own label
            labels = [store.load(e).attrs.get("label") for e in pick]
            if all(lab is not None for lab in labels):
                class_ids = np.array(labels, np.int64)
    if cfg.n_classes and class_ids is None:
        class_ids = np.random.default_rng(args.seed).integers(0, cfg.n_classes, args.n)
    try:
        videos = sample_videos(
            wm,
            args.n,
            class_ids=class_ids,
            context=context,
            actions=actions,
            frames=total,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    T = videos.shape[1]
    frames = [
        upscale(grid([videos[:, t]] if real is None else [real[:, t], videos[:, t]]), args.upscale)
        for t in range(T)
    ]
    stem = Path(args.out) if args.out else Path(args.checkpoint) / "samples" / f"sample-{args.seed}"
    paths = {"mp4": str(write_video(frames, stem.with_suffix(".mp4"), fps=wm.fps))}
    if args.gif:
        paths["gif"] = str(write_video(frames, stem.with_suffix(".gif"), fps=wm.fps))
        for i in range(args.n):
            paths[f"gif{i}"] = str(
                write_video(
                    upscale(videos[i], args.upscale), stem.with_name(f"{stem.name}-{i}.gif"), fps=wm.fps
                )
            )
    paths["frames"] = str(videos.shape[1])
    if class_ids is not None:
        paths["class_ids"] = " ".join(str(int(c)) for c in class_ids)
    print(json.dumps(paths))
    return paths


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(tyro.cli(Args, description=__doc__))
