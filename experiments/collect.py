"""Collect real episodes into an episode store (resumable: re-run the same command after a kill).

Examples:
    python experiments/collect.py --env vizdoom_hgs --episodes 20 --out data/hgs
    python experiments/collect.py --env vizdoom_battle2 --episodes 20 --out data/battle2   # the packaged map
    python experiments/collect.py --env gym:ALE/Pong-v5 --episodes 20                       # -> data/gym-ALE-Pong-v5
    python experiments/collect.py --env gym:CarRacing-v3 --episodes 20 --max-episode-steps 250
    python experiments/collect.py --env gym:MyEnv-v0 --env-module my_package --pixels key:camera
    python experiments/collect.py --env vizdoom_take_cover --episodes 300 --out runs/vizdoom_take_cover-tiny/data \
        --policy runs/vizdoom_take_cover-tiny/policies/cmaes_dream --checkpoint runs/vizdoom_take_cover-tiny \
        --epsilon 0.2 --merge                  # a dream-trained controller plays, 20 % random actions

``--env gym:<ID>`` collects any Gymnasium env with pixels (an image observation, an image entry of a Dict
observation, or render_mode='rgb_array'; envs/gym_source.py); the store records the env id, the gym.make
kwargs and the wrapper settings, so a policy trained in its dream is later scored in the same real env.

``--policy`` is ``random``, a policy file (train_policy.py --algo ppo or --algo distill) or a controller directory
(train_policy.py --algo cmaes; it reads frames with its world-model bundle: give ``--checkpoint``). ``--epsilon``
replaces the policy's action by a uniform random one with that probability per step. Each episode records
the policy, its kind and epsilon in its attrs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import tyro

from envs.collect import collect
from envs.gym_source import is_gym_env
from envs.real import EnvOptions, check_real_env
from envs.vizdoom import sigterm_exits
from worldmodel.config import safe_name
from worldmodel.store import StoreError


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Real environment to play: vizdoom_hgs, vizdoom_battle2, vizdoom_take_cover or gym:<Gymnasium id>
    (e.g. gym:ALE/Pong-v5, gym:CarRacing-v3, gym:VizdoomDefendCenter-v1)."""
    episodes: int = 20
    """Total episodes the store should hold when done (already stored ones count)."""
    out: str | None = None
    """Episode store directory (created, or appended to when it exists; default: data/<env>, the store
    experiments/train.py reads, with ':' and '/' of gym: ids as '-')."""
    policy: str = "random"
    """'random' (sticky random actions), the path of a policy file (train_policy.py's .safetensors: --algo ppo,
    or --algo distill, which acts greedily on the newest frames) or a controller directory (train_policy.py
    --algo cmaes; needs --checkpoint)."""
    checkpoint: str | None = None
    """World-model bundle directory a controller directory given as --policy reads frames with (required for a
    controller, refused with any other policy)."""
    epsilon: float = 0.0
    """Probability per env step of a uniform random action instead of the policy's (0..1; deterministic under
    --seed)."""
    trust_pickle: bool = False
    """Also accept an SB3 PPO .zip as --policy. Loading a zip unpickles it: it RUNS ANY CODE the file holds.
    Only for zips of trusted origin."""
    num_envs: int = 2
    """Env processes stepping in parallel (one per CPU core is a good start)."""
    seed: int = 0
    """Base random seed (env and policy)."""
    mean_repeat: float = 4.0
    """Mean number of env steps a random action is held (sticky actions)."""
    resolution: int = 64
    """Observation height and width in pixels."""
    max_episode_steps: int | None = None
    """Truncate episodes after this many steps (recorded: evaluation plays the same cap; None: the env's own limits)."""
    battle2_path: str | None = None
    """Directory holding D4_battle2.wad and D4_battle2.cfg (Battle2 only; or set VIZDOOM_BATTLE2_PATH; default: the map shipped with the package)."""
    health_bar: bool = True
    """Draw the player's health as a red bar over the bottom rows of each frame (a HUD legible at 64×64;
    the dream needs it to predict deaths; ViZDoom presets only). --no-health-bar collects the raw scenario frames."""
    object_mask: bool = False
    """Also store each frame's object mask (ViZDoom only: the boxes of the medkits / fireballs from the labels buffer,
    extras/object_mask), which the tokenizer's and prior's object_weight losses read."""
    merge: bool = False
    """Append to a store collected with other settings (env, frame skip, resolution, health bar); without it
    that is an error naming the differing settings."""
    episodes_per_shard: int = 8
    """Episodes per HDF5 shard; a kill loses at most the episodes of one unfinished shard."""
    real: Annotated[EnvOptions, tyro.conf.arg(name="")] = field(default_factory=EnvOptions)
    """How to make the env (--frame-skip; gym:<ID> envs: --env-module, --env-kwargs, --pixels, --sticky-actions)."""


def main(args: Args) -> None:
    sigterm_exits()  # SIGTERM runs the cleanup (every ViZDoom engine closed) instead of killing outright
    try:
        check_real_env(args.env, "--env")
        env_kwargs = {**args.real.env_kwargs_for(args.env), "resolution": args.resolution}
        if is_gym_env(args.env):
            if args.battle2_path is not None or args.object_mask:
                raise ValueError("--battle2-path and --object-mask apply to ViZDoom envs only")
        else:
            env_kwargs = {"frame_skip": 4, **env_kwargs, "health_bar": args.health_bar}
            if args.battle2_path is not None:
                env_kwargs["battle2_path"] = args.battle2_path
            if args.object_mask:
                env_kwargs["object_mask"] = True
        if args.max_episode_steps is not None:
            env_kwargs["max_episode_steps"] = args.max_episode_steps
        out = args.out or f"data/{safe_name(args.env)}"
        r = collect(
            args.env,
            out,
            args.episodes,
            policy=args.policy,
            num_envs=args.num_envs,
            seed=args.seed,
            mean_repeat=args.mean_repeat,
            episodes_per_shard=args.episodes_per_shard,
            env_kwargs=env_kwargs,
            trust_pickle=args.trust_pickle,
            merge=args.merge,
            epsilon=args.epsilon,
            checkpoint=args.checkpoint,
        )
    except (FileNotFoundError, ImportError, ValueError, StoreError) as e:
        sys.exit(f"error: {e}")
    if r.collected == 0:
        print(f"{r.store}: already holds {r.already_present} >= {r.requested} episodes; nothing to do")
        return
    print(
        f"{r.store}: collected {r.collected} episodes ({r.env_steps} env steps); store now holds "
        f"{r.already_present + r.collected}. Return {np.mean(r.returns):.1f} ± {np.std(r.returns):.1f}, "
        f"length {np.mean(r.lengths):.0f} ± {np.std(r.lengths):.0f} frames"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
