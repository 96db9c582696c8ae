"""Collect real ViZDoom episodes into an episode store (resumable: re-run the same command after a kill).

Example:
    python experiments/collect.py --env vizdoom_hgs --episodes 20 --out data/hgs
    python experiments/collect.py --env vizdoom_battle2 --episodes 20 --out data/battle2   # the packaged map
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

from envs.collect import collect


@dataclass
class Args:
    env: Literal["vizdoom_hgs", "vizdoom_battle2", "vizdoom_take_cover"] = "vizdoom_hgs"
    """Real environment to play."""
    episodes: int = 20
    """Total episodes the store should hold when done (already stored ones count)."""
    out: str = "data/hgs"
    """Episode store directory (created, or appended to when it exists)."""
    policy: str = "random"
    """'random' (sticky random actions) or the path of a Stable-Baselines3 policy zip."""
    num_envs: int = 2
    """Env processes stepping in parallel (one per CPU core is a good start)."""
    seed: int = 0
    """Base random seed (env and policy)."""
    mean_repeat: float = 4.0
    """Mean number of env steps a random action is held (sticky actions)."""
    resolution: int = 64
    """Observation height and width in pixels."""
    frame_skip: int = 4
    """Game tics per env step (ViZDoom runs at 35 tics/s)."""
    battle2_path: str | None = None
    """Directory holding D4_battle2.wad and D4_battle2.cfg (Battle2 only; or set VIZDOOM_BATTLE2_PATH; default: the map shipped with the package)."""
    health_bar: bool = True
    """Draw the player's health as a red bar over the bottom rows of each frame (a HUD legible at 64×64;
    the dream needs it to predict deaths). --no-health-bar collects the raw scenario frames."""
    episodes_per_shard: int = 8
    """Episodes per HDF5 shard; a kill loses at most the episodes of one unfinished shard."""


def main(args: Args) -> None:
    env_kwargs = {"resolution": args.resolution, "frame_skip": args.frame_skip, "health_bar": args.health_bar}
    if args.battle2_path is not None:
        env_kwargs["battle2_path"] = args.battle2_path
    try:
        r = collect(args.env, args.out, args.episodes, policy=args.policy, num_envs=args.num_envs, seed=args.seed,
                    mean_repeat=args.mean_repeat, episodes_per_shard=args.episodes_per_shard, env_kwargs=env_kwargs)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if r.collected == 0:
        print(f"{r.store}: already holds {r.already_present} >= {r.requested} episodes; nothing to do")
        return
    print(f"{r.store}: collected {r.collected} episodes ({r.env_steps} env steps); store now holds "
          f"{r.already_present + r.collected}. Return {np.mean(r.returns):.1f} ± {np.std(r.returns):.1f}, "
          f"length {np.mean(r.lengths):.0f} ± {np.std(r.lengths):.0f} frames")


if __name__ == "__main__":
    main(tyro.cli(Args))
