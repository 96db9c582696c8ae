"""Train a policy inside the dream of a world-model bundle, then (optionally) score it in the real env.

Examples:
    python experiments/train_policy.py --env vizdoom_hgs --timesteps 50000
    python experiments/train_policy.py --env vizdoom_hgs --checkpoint runs/vizdoom_hgs-tiny --eval-real
    python experiments/train_policy.py --env vizdoom_take_cover --algo cmaes --eval-real
    python experiments/train_policy.py --env gym:ALE/Pong-v5 --eval-real      # a bundle of any Gymnasium env

Three learners: ``--algo ppo`` (SB3 PPO ``CnnPolicy`` on the dream's pixels) and ``--algo cmaes`` (World
Models' recipe: a linear controller on frame features (colour keys or token features) or, with
``--cmaes.features latent``, on the world model's own latent state (World Models' [z_t, h_t]; in the real game
the world model follows the real frames, envs/latent.py), evolved by CMA-ES; see envs/controller.py); ``--algo distill`` (a small CNN on the newest frames trained on the choices of a planner
over the bundle's hazard unroll at the stored states, envs/planner.py; the bundle needs one:
experiments/train_hazard.py). ``--algo auto`` (default) picks the one measured best for the preset: for
vizdoom_take_cover distill when the bundle has a hazard unroll, else cmaes (README Results); ppo otherwise. The PPO policy is saved to
``<checkpoint>/policies/ppo_dream.safetensors``, the distilled one to ``<checkpoint>/policies/distill_dream.safetensors`` (a policy file: safetensors + JSON settings, no pickle), the controller to ``<checkpoint>/policies/cmaes_dream/``
(or ``--out``); TensorBoard logs go to ``<checkpoint>/tb_policy``. With ``--eval-real`` the policy
and a uniform random policy are scored in the dream and in the real env, side by side (the
dream–real gap): the real env the bundle's store was collected in, rebuilt from the settings the store
records (ViZDoom: frame skip, health bar; ``gym:<ID>``: id, gym.make kwargs, pixel source, frame skip,
sticky actions, episode cap). With ``--lockstep-every N`` (PPO), every N timesteps the policy being trained drives the
real game with the dream following, and the lockstep video and the dream-optimism figure go to
TensorBoard (``lockstep/video``, ``lockstep/optimism``), so the dream–real gap can be watched as it opens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import tyro

from envs import episode_limit
from envs.callbacks import LockstepVideoCallback
from envs.controller import CMAESConfig, save_controller, train_cmaes_in_dream
from envs.dream import load_world_model
from envs.follow import has_real_env, make_bundle_real_env
from envs.planner import DistillConfig, FrameStackActor, distill_planner, save_frame_policy
from envs.policy import (
    PPOConfig,
    real_env_kwargs,
    return_ratio,
    save_policy,
    score_dream,
    score_real,
    train_ppo,
)
from envs.real import is_real_env
from envs.sb3_vec import DreamVecEnv, VecLatentObservation
from envs.vizdoom import sigterm_exits
from worldmodel.atomic import write_json
from worldmodel.memory import keep_freed_memory
from worldmodel.store import EpisodeStore


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Preset of the bundle (vizdoom_hgs, vizdoom_battle2, ..., or gym:<Gymnasium id>)."""
    checkpoint: str | None = None
    """Bundle directory (default: the newest bundle of --env under runs/ or $WORLDMODEL_HOME/runs)."""
    algo: Literal["auto", "ppo", "cmaes", "distill"] = "auto"
    """Learner: PPO on pixels, CMA-ES linear controller on frame features (envs/controller.py), a CNN distilled
    from the planner over the bundle's hazard unroll (envs/planner.py), or auto (vizdoom_take_cover: distill when
    the bundle has a hazard unroll, else cmaes; ppo otherwise)."""
    timesteps: int = 50_000
    """Dream env steps to train for (all envs together; PPO)."""
    num_envs: int = 16
    """Dream envs stepped together in one model call."""
    max_episode_steps: int | None = None
    """Truncate dream episodes after this many steps (default: the bundle's dream time limit: ViZDoom's 2100-tic
    timeout at frame skip 4, 525; a gym:<ID> bundle's real env's own, e.g. CarRacing-v3 250; else 525)."""
    temperature: float = 1.0
    """Sampling temperature of the dream's frame tokens."""
    top_k: int | None = None
    """Top-k sampling of the dream's frame tokens (None = off)."""
    context_frames: int = 1
    """Real frames each dream episode starts from."""
    termination: Literal["sample", "threshold"] = "sample"
    """Dream episodes end by a Bernoulli draw of the predicted termination probability, or when it exceeds
    --termination-threshold (with --cmaes.fitness expected, CMA-ES's dream ignores it: episodes run to the cap,
    weighted by the predicted survival)."""
    hazard_scale: float = 1.0
    """Scale the dream's hazard: each predicted termination probability p becomes 1 - (1 - p)^k (k > 1: a
    pessimistic dream; envs/dream.py)."""
    termination_threshold: float = 0.5
    """Threshold of --termination threshold (evaluate.py's eval.json reports one tuned on validation episodes)."""
    decode: Literal["autoregressive", "maskgit"] = "autoregressive"
    """Token-by-token decoding, or MaskGIT (bundles trained with --config.prior.maskgit-weight > 0)."""
    maskgit_steps: int = 8
    """MaskGIT refinement steps per dream frame (--decode maskgit)."""
    seed: int = 0
    """Seed of PPO, the dream's sampling and the evaluations."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' (world model and policy)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    out: str | None = None
    """Where to save: PPO, a policy file ending in .safetensors (default <checkpoint>/policies/ppo_dream.safetensors); CMA-ES, a directory (default <checkpoint>/policies/cmaes_dream)."""
    eval_real: bool = False
    """After training, score the policy and a random policy in the dream and in the real env."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    battle2_path: str | None = None
    """Directory with D4_battle2.wad/.cfg (real-env evaluation of vizdoom_battle2) (default: the map shipped with the package)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO hyper-parameters."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation settings (--algo distill)."""
    cmaes: CMAESConfig = field(default_factory=CMAESConfig)
    """CMA-ES hyper-parameters (--algo cmaes); its max_episode_steps caps dream episodes during evolution."""
    progress: bool = True
    """Show a progress bar."""
    lockstep_every: int = 0
    """PPO: every this many timesteps, write a lockstep video (the policy drives the real env, the dream follows)
    and the dream-optimism figure to TensorBoard (<checkpoint>/tb_policy); 0 = off. Dataset-only bundles replay
    a recorded episode instead."""
    lockstep_steps: int = 32
    """Steps of each lockstep video."""
    lockstep_resync_every: int = 1
    """Re-sync the lockstep's second dream to the real frames every K steps (0 = no re-synced dream)."""


def main(args: Args) -> dict:
    sigterm_exits()  # SIGTERM runs the cleanup (every ViZDoom engine closed) instead of killing outright
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # faster large-batch steps on CPU (worldmodel/memory.py)
    algo = args.algo if args.algo != "auto" else ("cmaes" if args.env == "vizdoom_take_cover" else "ppo")
    if (
        algo in ("ppo", "distill") and args.out is not None and not args.out.endswith(".safetensors")
    ):  # checked before training
        sys.exit(
            f"error: --out {args.out!r}: a {algo} policy file is safetensors; expected a name ending in "
            "'.safetensors' (--algo cmaes saves a directory)"
        )
    if args.eval_real and not is_real_env(args.env):  # checked before training
        sys.exit(
            f"error: --eval-real: --env {args.env!r} has no real env; expected a ViZDoom preset or gym:<Gymnasium id>"
        )
    if args.lockstep_every < 0:
        sys.exit(f"error: --lockstep-every {args.lockstep_every}: expected timesteps >= 1, or 0 (off)")
    if algo != "ppo" and args.lockstep_every:
        sys.exit(
            "error: --lockstep-every is an SB3 callback of --algo ppo; for a controller, run "
            "rollout.py --policy <controller dir> --mode follow after training"
        )
    try:
        wm = load_world_model(args.checkpoint, args.env, args.device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    run = Path(wm.path)
    if args.algo == "auto" and algo == "cmaes":
        if wm.hazard is not None:
            algo = "distill"  # measured best on Take Cover (README Results): 475 real tics against cmaes' 305
            if args.out is not None and not args.out.endswith(".safetensors"):
                sys.exit(
                    f"error: --out {args.out!r}: --algo auto trains distill here, a policy file ending in '.safetensors'"
                )
        else:
            print(
                "note: --algo auto: the bundle has no hazard unroll, so the learner is cmaes; with one "
                f"(python experiments/train_hazard.py --checkpoint {run}) it is distill, measured best on Take Cover",
                file=sys.stderr,
            )
    if algo == "distill" and wm.hazard is None:
        sys.exit(
            f"error: --algo distill: the bundle {run} has no hazard unroll to distil; train one with "
            f"python experiments/train_hazard.py --checkpoint {run}"
        )
    if (
        args.max_episode_steps is None
    ):  # the dream's episodes end where the real env's do (an honest dream vs real)
        args.max_episode_steps = episode_limit(wm.cfg.name, wm.store_meta) or 525
    elif args.max_episode_steps < 1:
        sys.exit(f"error: --max-episode-steps {args.max_episode_steps}: expected steps >= 1")
    callbacks = []
    if args.lockstep_every:
        real_env = (
            (lambda: make_bundle_real_env(wm, battle2_path=args.battle2_path)) if has_real_env(wm) else None
        )
        if real_env is None:
            print(
                f"note: the bundle models {wm.cfg.env!r}, which has no real env here: the lockstep videos replay "
                "held-out recorded episodes in the dream instead",
                file=sys.stderr,
            )
        callbacks.append(
            LockstepVideoCallback(
                wm,
                real_env,
                every=args.lockstep_every,
                steps=args.lockstep_steps,
                resync_every=args.lockstep_resync_every,
                seed=args.seed,
            )
        )
    dream_kw = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "context_frames": args.context_frames,
        "termination": args.termination,
        "termination_threshold": args.termination_threshold,
        "decode": args.decode,
        "maskgit_steps": args.maskgit_steps,
        "hazard_scale": args.hazard_scale,
    }
    seen_real = None  # how the trained policy sees the real game (None: its frames)
    if algo == "ppo":
        model, venv = train_ppo(
            wm,
            args.timesteps,
            num_envs=args.num_envs,
            ppo=args.ppo,
            seed=args.seed,
            max_episode_steps=args.max_episode_steps,
            tensorboard_log=run / "tb_policy",
            callbacks=callbacks or None,
            progress_bar=args.progress,
            **dream_kw,
        )
        out = save_policy(model, args.out or run / "policies" / "ppo_dream.safetensors")
    elif algo == "distill":
        policy, metrics = distill_planner(
            wm, EpisodeStore(wm.store_path), args.distill, progress=args.progress
        )
        out = save_frame_policy(
            args.out or run / "policies" / "distill_dream.safetensors",
            policy,
            {"config": asdict(args.distill), "distill": metrics},
        )
        print(json.dumps({"distill": metrics}))
        model = FrameStackActor(policy)
        venv = DreamVecEnv(
            args.num_envs, world_model=wm, max_episode_steps=args.max_episode_steps, **dream_kw
        )
    else:

        def log(row: dict[str, float]) -> None:
            if args.progress:
                print(
                    f"generation {row['generation']:3d}: mean {row['mean_return']:7.1f}  best {row['best_return']:7.1f}  "
                    f"length {row['mean_length']:5.1f}  sigma {row['sigma']:.3f}  ({row['seconds']:.1f} s)"
                )

        # expected fitness runs its own dream to the cap (termination "never"); scoring keeps the drawn ends
        evolve_kw = {
            k: v for k, v in dream_kw.items() if k != "termination" or args.cmaes.fitness == "sampled"
        }
        model, history = train_cmaes_in_dream(wm, args.cmaes, seed=args.seed, log=log, **evolve_kw)
        out = save_controller(model, args.out or run / "policies" / "cmaes_dream", {"history": history})
        venv = DreamVecEnv(
            args.num_envs, world_model=wm, max_episode_steps=args.max_episode_steps, **dream_kw
        )
        if (
            model.cfg.features == "latent"
        ):  # it reads the world model's latent state, in the dream and the real game
            venv = VecLatentObservation(venv, wm)
            seen_real = partial(VecLatentObservation, wm=wm)
    print(f"policy: {out}")
    report: dict = {
        "policy": str(out),
        "algo": algo,
        "timesteps": args.timesteps,
        "max_episode_steps": args.max_episode_steps,  # the dream's time limit (dream vs real lengths)
    }
    if args.eval_real:
        H = wm.obs_shape[0]
        kw = real_env_kwargs(wm)  # the real env the bundle's data came from (frame skip, health bar)
        if args.battle2_path:
            kw["battle2_path"] = args.battle2_path
        n, s = args.eval_episodes, args.seed
        rows = {
            f"{algo} (dream-trained)": (
                score_dream(model, venv, n, seed=s),
                score_real(model, args.env, H, n, seed=s, wrap=seen_real, **kw),
            ),
            "random": (score_dream(None, venv, n, seed=s), score_real(None, args.env, H, n, seed=s, **kw)),
        }
        print(f"\n{'policy':22s} {'dream return':>40s}   {'real return':>40s}   gap (dream - real)")
        for name, (d, r) in rows.items():
            print(f"{name:22s} {d!s:>40s}   {r!s:>40s}   {d.mean - r.mean:+.1f}")
        report["scores"] = {k: {"dream": vars(d), "real": vars(r)} for k, (d, r) in rows.items()}
        report["real_return_vs_random"] = return_ratio(
            rows[f"{algo} (dream-trained)"][1].mean, rows["random"][1].mean
        )
        # the ratio means little where returns can be negative (Pong: -21..21); the difference always does
        report["real_return_minus_random"] = rows[f"{algo} (dream-trained)"][1].mean - rows["random"][1].mean
        write_json(out.with_suffix(".eval.json") if out.is_file() else out / "eval.json", report)
        trained = rows[f"{algo} (dream-trained)"]
        print(
            json.dumps(
                {
                    f"real_{algo}": round(trained[1].mean, 1),
                    "real_random": round(rows["random"][1].mean, 1),
                    f"dream_{algo}": round(trained[0].mean, 1),
                    "real_return_vs_random": None
                    if report["real_return_vs_random"] is None
                    else round(report["real_return_vs_random"], 2),
                    "real_return_minus_random": round(report["real_return_minus_random"], 1),
                }
            )
        )
    return report


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
