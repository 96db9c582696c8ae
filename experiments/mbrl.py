"""Model-based RL loop on a real ViZDoom env: collect -> world model -> PPO in the dream -> real eval.

Examples:
    python experiments/mbrl.py --env vizdoom_hgs
    python experiments/mbrl.py --env vizdoom_hgs --mbrl.iterations 5 --mbrl.ppo-steps-per-iteration 20000 --health-bar

Writes ``<run-dir>/mbrl.csv`` (one row per iteration: real env steps, real and dream return, gap),
TensorBoard scalars under ``<run-dir>/tb_mbrl`` and ``<run-dir>/mbrl_report.json`` comparing the loop's
policy with a random policy and with PPO trained directly on as many real steps. With the defaults
(3 iterations of 100 episodes, tiny world model, 10k PPO steps each) expect about an hour on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import tyro

from envs.mbrl import MBRLConfig, run_mbrl
from worldmodel.config import get_preset


@dataclass
class Args:
    env: Literal["vizdoom_hgs", "vizdoom_battle2"] = "vizdoom_hgs"
    """Real env (and preset) to run the loop on."""
    scale: Literal["tiny", "small", "paper"] = "tiny"
    """World-model size (preset scale)."""
    run_dir: str | None = None
    """Run directory (default: runs/<env>-mbrl). The store goes to <run-dir>/data unless --store."""
    store: str | None = None
    """Episode store the loop collects into."""
    health_bar: bool = False
    """Collect and evaluate with the health bar drawn into the frames (lets the model see what death depends on)."""
    battle2_path: str | None = None
    """Directory with D4_battle2.wad/.cfg (vizdoom_battle2)."""
    tokenizer_steps: int | None = None
    """Override the preset's tokenizer steps (round 0 only)."""
    prior_steps: int | None = None
    """Override the preset's prior steps of round 0."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    progress: bool = True
    """Progress bars."""
    mbrl: MBRLConfig = field(default_factory=MBRLConfig)
    """Loop budgets."""


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run_dir or f"runs/{args.env}-mbrl")
    cfg = get_preset(args.env, args.scale)
    cfg = replace(cfg, data=replace(cfg.data, store=args.store or str(run / "data")))
    if args.tokenizer_steps is not None:
        cfg = replace(cfg, tokenizer_train=replace(cfg.tokenizer_train, steps=args.tokenizer_steps))
    if args.prior_steps is not None:
        cfg = replace(cfg, prior_train=replace(cfg.prior_train, steps=args.prior_steps))
    kw: dict = {"health_bar": args.health_bar} if args.health_bar else {}
    if args.battle2_path:
        kw["battle2_path"] = args.battle2_path
    try:
        report = run_mbrl(cfg, run, args.mbrl, env_kwargs=kw, progress=args.progress)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"\n{'iteration':>9} {'real steps':>10} {'real return':>12} {'dream return':>13} {'gap':>9}")
    for r in report["iterations"]:
        print(f"{r['iteration']:>9} {r['real_env_steps']:>10} {r['real_return']:>12.1f} {r['dream_return']:>13.1f} {r['gap']:>+9.1f}")
    print(f"\nreal return after {report['real_env_steps']} real steps: mbrl {report['mbrl']['mean']:.1f}, random "
          f"{report['random']['mean']:.1f}" + (f", PPO directly on real {report['direct_ppo']['mean']:.1f}"
                                              if "direct_ppo" in report else ""))
    print(json.dumps({"real_env_steps": report["real_env_steps"], "mbrl": round(report["mbrl"]["mean"], 1),
                      "random": round(report["random"]["mean"], 1),
                      "direct_ppo": round(report["direct_ppo"]["mean"], 1) if "direct_ppo" in report else None,
                      "mbrl_vs_random": round(report["mbrl_vs_random"], 2)}))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
