"""Train a bundle's hazard unroll: termination predicted from a root's real frames and the actions since.

Examples:
    python experiments/train_hazard.py --env vizdoom_take_cover --checkpoint runs/vizdoom_take_cover-tiny
    python experiments/train_hazard.py --env vizdoom_take_cover --hazard.steps 6000 --hazard.horizon 8

The unroll (worldmodel/hazard.py) reads ``--hazard.context`` real frames of the bundle's store (a root) and
predicts, for each k of the next ``--hazard.horizon`` actions, the probability that the episode has ended by
step k; the tokenizer and prior are not touched. It is written into the bundle (``hazard.*`` tensors of
``model.safetensors`` and ``hazard.json``, with held-out metrics). Dream envs use it with
``termination_source="unroll"`` (``bench_transfer.py --termination-source unroll``, ``bench_dodge.py
--termination-source unroll``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import tyro

from envs.dream import load_world_model
from worldmodel.hazard import HazardConfig, fit_hazard
from worldmodel.memory import keep_freed_memory
from worldmodel.store import EpisodeStore


@dataclass
class Args:
    env: str = "vizdoom_take_cover"
    """Preset of the bundle (used to find the newest bundle when --checkpoint is not given)."""
    checkpoint: str | None = None
    """Bundle directory (default: the newest bundle of --env under runs/ or $WORLDMODEL_HOME/runs)."""
    store: str | None = None
    """Episode store to draw roots from (default: the bundle's own store)."""
    hazard: HazardConfig = field(default_factory=HazardConfig)
    """Unroll shape and training."""
    threads: int = 2
    """Torch threads (0 = torch's default)."""
    progress: bool = True
    """Show progress bars."""


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # 1.5x faster steps on CPU (worldmodel/memory.py)
    args.hazard.check()
    wm = load_world_model(args.checkpoint, args.env, "cpu")
    path = args.store or wm.store_path
    if not path:
        raise SystemExit(
            "error: --store: the bundle records no store; pass the store the bundle was trained on"
        )
    metrics = fit_hazard(wm, EpisodeStore(path), args.hazard, progress=args.progress)
    out = {"checkpoint": str(wm.path), "store": str(path), **metrics}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
