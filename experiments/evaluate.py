"""Evaluate a world-model bundle on held-out real episodes: writes eval.json and PNG plots.

Example:
    python experiments/evaluate.py --checkpoint runs/vizdoom_hgs-tiny
    python experiments/evaluate.py --checkpoint runs/vizdoom_hgs-tiny --store data/hgs --n-episodes 64 --out /tmp/ev

Measures tokenizer reconstruction PSNR/SSIM, open-loop prediction PSNR/SSIM per step against a
copy-last-frame baseline, reward MAE, termination precision/recall, bits/dim, FVD/FVD* (when the I3D
weights are available: ``python experiments/fetch_weights.py i3d``) and sampling frames/s. See
``worldmodel/evaluation.py`` for the definitions. A whole-clip action-conditioned bundle (the paper's protocol,
``prior.action_cond="clip"``) cannot be stepped: its report has reconstruction, FVD/FVD* on clips of the prior's
window sampled under their real actions and sampling speed only (``--context``/``--horizon`` do not apply).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from worldmodel.evaluation import EvalSettings, evaluate_checkpoint
from worldmodel.store import StoreError


@dataclass
class Args:
    checkpoint: str
    """Bundle (run directory with config.json and model.safetensors) to evaluate."""
    store: str | None = None
    """Episode store with the held-out episodes (default: the store the bundle was trained on)."""
    out: str | None = None
    """Directory for eval.json and the plots (default: the bundle directory)."""
    split: Literal["test", "val", "train"] = "test"
    """Held-out split (falls back to 'val', then 'train'; the report records which was used)."""
    n_episodes: int = 32
    """Open-loop start points (clips of context + horizon frames), and whole episodes for the reward/termination heads."""
    context: int = 4
    """Real frames (and the actions between them) the open-loop rollouts start from."""
    horizon: int = 16
    """Open-loop steps per clip (FVD needs 16)."""
    temperature: float = 0.0
    """Token sampling temperature of the rollouts (0 = greedy, deterministic)."""
    seed: int = 0
    """Seed of the clip draw and of the sampler."""
    i3d_weights: str | None = None
    """I3D Kinetics-400 checkpoint for FVD (default: $WORLDMODEL_HOME/weights/i3d-kinetics-400.ckpt)."""
    fvd: bool = True
    """Compute FVD/FVD* (--no-fvd skips it: I3D at 224x224 costs about 1-3 CPU-seconds per clip, 3 sets of n-episodes clips)."""
    dream_episodes: int = 16
    """Dream rollouts from held-out first frames under a sticky random policy, for the dream episode lengths (0 = skip)."""
    dream_max_steps: int = 0
    """Cut a dream rollout that has not terminated after this many steps (0 = twice the longest real episode)."""
    device: str = "cpu"
    """Torch device of the world model and I3D."""
    threads: int = 0
    """Torch CPU threads (0 = torch's default)."""


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        split=args.split,
        n_episodes=args.n_episodes,
        context=args.context,
        horizon=args.horizon,
        temperature=args.temperature,
        seed=args.seed,
        fvd=args.fvd,
        i3d_weights=args.i3d_weights,
        dream_episodes=args.dream_episodes,
        dream_max_steps=args.dream_max_steps,
    )
    try:
        report, path = evaluate_checkpoint(
            args.checkpoint, store=args.store, out=args.out, settings=settings, device=args.device
        )
    except (ValueError, FileNotFoundError, StoreError) as e:
        sys.exit(f"error: {e}")
    if report.get("protocol") == "clip":  # a whole-clip conditioned bundle: sampled clips and FVD only
        keys = {"recon_psnr": round(report["reconstruction"]["psnr"], 2), "fvd": report["fvd"]}
        keys["fvd_reason"] = report["fvd_info"].get("reason")
        print(json.dumps({"eval_json": str(path), **keys, "seconds": round(report["seconds"], 1)}))
        return
    ol = report["open_loop"]["at_horizon"]
    print(
        json.dumps(
            {
                "eval_json": str(path),
                "recon_psnr": round(report["reconstruction"]["psnr"], 2),
                f"psnr_step{ol['step']}": round(ol["psnr_model"], 2),
                f"copy_last_step{ol['step']}": round(ol["psnr_copy_last"], 2),
                "termination_recall": report["termination"]["recall"],
                "termination_recall_tuned": report["termination"]["tuned"].get("recall"),
                "termination_threshold_tuned": report["termination"]["tuned"]["threshold"],
                "dream_mean_length": report["dream_episodes"].get("sample", {}).get("mean_length"),
                "real_mean_length": report["dream_episodes"].get("real_mean_length"),
                "bits_per_dim": report["bits"].get("bits_per_dim"),
                "fvd": report["fvd"],
                "fvd_reason": report["fvd_info"].get("reason"),
                "frames_per_s": round(report["sampling"]["frames_per_s"], 1),
                "seconds": round(report["seconds"], 1),
            }
        )
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
