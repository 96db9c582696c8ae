"""Dream env throughput for the vizdoom_hgs bundle geometry. Prints one JSON line.

Env steps/s (frames generated and decoded, rewards and terminations predicted) through
``gym.make_vec(id, num_envs=N)`` at N = 1 and 16, through the single ``gym.make`` env, and through
the SB3 ``VecEnv`` adapter at N = 16, measured in one run. Episodes are long (``max_episode_steps``
well above the measured steps) and resets are counted in, as a policy sees them.

Bundle: ``--checkpoint`` or the newest vizdoom_hgs bundle under runs/; without one, a bundle of the
vizdoom_hgs preset at ``--scale`` with random weights over a small synthetic 64×64 store (speed does
not depend on the weights, but termination frequency does: random heads end episodes often).

``--decode maskgit --maskgit-steps K --bf16`` measures the dream with MaskGIT decoding under bf16 (a bundle trained
with ``--config.prior.maskgit-weight 1.0``; without ``--checkpoint`` a random bundle carrying the MaskGIT stream).
Every env then takes those settings.

Usage: python benchmarks/bench_dream_env.py [--checkpoint RUN] [--scale tiny] [--steps 16] [--threads 0]
       [--decode maskgit --maskgit-steps 4 --bf16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from cli_args import add_decode_arguments, decode_kwargs

import envs
from envs.sb3_vec import DreamVecEnv
from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import read_run_config
from worldmodel.config import get_preset
from worldmodel.paths import find_bundles
from worldmodel.stages import prepare_run
from worldmodel.store import ActionSpec, StoreWriter

ID = envs.id_for_preset("vizdoom_hgs")


def random_bundle(root: Path, scale: str, maskgit: bool = False) -> Path:
    """A vizdoom_hgs bundle with random weights over a synthetic 64×64 store (8 episodes of noise); with
    ``maskgit`` its prior carries the MaskGIT stream."""
    rng = np.random.default_rng(0)
    with StoreWriter(
        root / "store",
        source="synthetic",
        obs_shape=(64, 64, 3),
        action_spec=ActionSpec.discrete(5),
        fps=8.75,
    ) as w:
        for _ in range(8):
            w.add_episode(rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8), rng.integers(0, 5, 19))
    cfg = get_preset("vizdoom_hgs", scale)
    cfg = replace(cfg, data=replace(cfg.data, store=str(root / "store")))
    if maskgit:
        cfg = replace(cfg, prior=replace(cfg.prior, maskgit_weight=1.0))
    cfg, _ = prepare_run(cfg, root / "run")
    WorldModel(cfg, read_run_config(root / "run")["store"]).save_pretrained(root / "run")
    return root / "run"


def steps_per_s(step, steps: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    n = sum(step() for _ in range(steps))
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", help="bundle directory (default: newest vizdoom_hgs bundle, else a random one)"
    )
    p.add_argument("--scale", default="tiny", help="preset scale of the random bundle")
    p.add_argument("--steps", type=int, default=16, help="timed vector steps per setting")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    add_decode_arguments(p)
    p.add_argument("--bf16", action="store_true", help="run the prior in bf16 (Rollout(bf16=True))")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    mg = args.decode == "maskgit"
    # the default pipeline's bundles carry no MaskGIT stream: a MaskGIT run measures --checkpoint or a random one
    found = [] if mg else find_bundles("vizdoom_hgs")
    ckpt = (
        Path(args.checkpoint)
        if args.checkpoint
        else (found[0] if found else random_bundle(Path(tmp.name), args.scale, maskgit=mg))
    )
    wm = WorldModel.from_pretrained(ckpt)
    out = {
        "bench": "dream_env",
        "checkpoint": str(ckpt) if (args.checkpoint or found) else f"random ({args.scale})",
        "obs": list(wm.obs_shape),
        "tokens_per_frame": wm.cfg.prior.tokens_h * wm.cfg.prior.tokens_w,
        "prior": f"{wm.cfg.prior.n_layer}x{wm.cfg.prior.n_embd}",
        "threads": torch.get_num_threads(),
        "decode": args.decode,
        "bf16": args.bf16,
    }
    kw = {"world_model": wm, "max_episode_steps": 10_000, "bf16": args.bf16, **decode_kwargs(args)}
    if mg:
        out["maskgit_steps"] = args.maskgit_steps

    env = gym.make(ID, **kw)
    env.reset(seed=0)
    a = env.action_space

    def single() -> int:
        _, _, term, trunc, _ = env.step(a.sample())
        if term or trunc:
            env.reset()
        return 1

    out["steps_per_s_single_env"] = round(steps_per_s(single, args.steps), 1)
    for N in (1, 16):
        vec = gym.make_vec(ID, num_envs=N, **kw)
        vec.reset(seed=0)
        out[f"steps_per_s_make_vec_{N}"] = round(
            steps_per_s(lambda v=vec: v.step(v.action_space.sample()) and v.num_envs, args.steps), 1
        )
    venv = DreamVecEnv(16, **kw)
    venv.reset()
    out["steps_per_s_sb3_vecenv_16"] = round(
        steps_per_s(
            lambda: venv.step(np.array([venv.action_space.sample() for _ in range(16)])) and 16, args.steps
        ),
        1,
    )
    out["speedup_vec16_vs_single"] = round(out["steps_per_s_make_vec_16"] / out["steps_per_s_single_env"], 2)
    print(json.dumps(out))
    tmp.cleanup()


if __name__ == "__main__":
    main()
