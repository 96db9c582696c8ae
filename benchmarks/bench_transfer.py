"""Dream-to-real transfer: policies trained only in a bundle's dream, scored in the real game. One JSON line.

For each seed, the learner trains from the world model only, then plays ``--real-episodes`` real episodes and
``--dream-episodes`` dream episodes. ``--learner cmaes`` (default): World Models' linear controller on frame
features, evolved by CMA-ES in the dream (envs/controller.py). ``--learner distill``: a small CNN policy on the
newest frames, trained to choose what a planner over the bundle's hazard unroll chooses at the stored states
(envs/planner.py; the planner imagines K-step branches from each state, the policy never meets the real env while
it learns). ``--planner`` also scores that planner itself (model-predictive control: the world model acts at
every step, nothing is trained). In the same run: a uniform random policy,
an "alternate every 10 steps" policy, and (``--real-baseline``) the same learner with the same
budget trained directly in the real game. Reported: real and dream return per seed (mean ± standard
error), their mean over seeds (± standard error over seeds), real/dream ratio, the real env steps
behind the world model (its store) and behind each learner, and CPU minutes of each part (the world
model's from ``<bundle>/timings.json``, written by experiments/train.py).

Usage:
    python benchmarks/bench_transfer.py --env vizdoom_take_cover [--checkpoint runs/vizdoom_take_cover-tiny]
        [--seeds 0 1 2] [--real-episodes 100] [--real-baseline]
    python benchmarks/bench_transfer.py --env gym:ALE/Pong-v5 --seeds 0 --real-episodes 10 --max-steps 1000

``--features latent``: the controller reads the world model's latent state (World Models' [z_t, h_t];
envs/latent.py): ``info["latent"]`` in the dream, the same world model run teacher-forced on the real frames in
the real game (the only real view then is ``latent``).

Any bundle with a real env works (``gym:<ID>`` too: the real env is rebuilt from the settings its store records);
the CMA-ES controller and the planner need discrete actions. "alternate every 10 steps" switches between actions 0
and 1.

Example (Take Cover, the distilled planner; needs a hazard unroll: experiments/train_hazard.py):
    python benchmarks/bench_transfer.py --env vizdoom_take_cover --learner distill --planner \
        --termination-source unroll --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from envs.controller import (
    FEATURES,
    FITNESSES,
    CMAESConfig,
    LinearController,
    cmaes_agent_steps,
    latent_env,
    save_controller,
    train_cmaes,
)
from envs.dream import DreamVectorEnv, load_world_model
from envs.planner import DistillConfig, FrameStackActor, HazardPlanner, distill_planner, save_frame_policy
from envs.policy import real_env_kwargs
from envs.real import check_real_env, make_real_env_fn
from envs.views import VIEWS, real_view
from worldmodel.memory import keep_freed_memory
from worldmodel.store import EpisodeStore


def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    return {
        "mean": round(float(x.mean()), 1),
        "se": round(float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0, 1),
        "n": len(x),
    }


def play(venv: gym.vector.VectorEnv, act, episodes: int, seed: int, max_steps: int) -> np.ndarray:
    """Returns of ``episodes`` episodes of ``act(obs, t) -> actions`` in ``venv`` (rows play in parallel)."""
    out: list[float] = []
    n = venv.num_envs
    k = 0
    while len(out) < episodes:
        obs, _ = venv.reset(seed=[seed + k * n + i for i in range(n)])
        k += 1
        ret, done = np.zeros(n), np.zeros(n, bool)
        if hasattr(act, "reset"):
            act.reset()
        for t in range(max_steps):
            obs, r, term, trunc, _ = venv.step(act(obs, t))
            ret += np.where(done, 0.0, r)
            done |= np.asarray(term) | np.asarray(trunc)
            if done.all():
                break
        out.extend(ret[: episodes - len(out)].tolist())
    return np.asarray(out)


class _Controller:
    def __init__(self, c: LinearController) -> None:
        self.c = c

    def reset(self) -> None:
        self.c.reset()

    def __call__(self, obs: np.ndarray, t: int) -> np.ndarray:
        return self.c.act(obs)


class _Actor:
    """``play``'s interface over a :class:`~envs.planner.FrameStackActor`."""

    def __init__(self, actor: FrameStackActor) -> None:
        self.actor = actor

    def reset(self) -> None:
        self.actor.reset()

    def __call__(self, obs: np.ndarray, t: int) -> np.ndarray:
        return self.actor(obs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--env",
        default="vizdoom_take_cover",
        help="preset with a real env (vizdoom_take_cover, vizdoom_hgs, ..., gym:<Gymnasium id>)",
    )
    p.add_argument("--checkpoint", help="bundle (default: the newest bundle of --env under runs/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="learner seeds")
    p.add_argument(
        "--learner",
        default="cmaes",
        choices=["cmaes", "distill"],
        help="cmaes: a linear controller evolved in the dream (envs/controller.py); distill: a CNN policy trained "
        "on the choices of the planner over the bundle's hazard unroll (envs/planner.py)",
    )
    p.add_argument(
        "--distill-steps", type=int, default=DistillConfig.steps, help="--learner distill: optimiser steps"
    )
    p.add_argument(
        "--planner",
        action="store_true",
        help="also score the planner over the hazard unroll (it acts with the world model at every step)",
    )
    p.add_argument("--real-episodes", type=int, default=100, help="real episodes per policy")
    p.add_argument("--dream-episodes", type=int, default=32, help="dream episodes per dream-trained policy")
    p.add_argument("--real-envs", type=int, default=4, help="real envs played in parallel during scoring")
    p.add_argument("--max-steps", type=int, default=525, help="steps per scored episode (525 = 2100 tics)")
    p.add_argument("--generations", type=int, default=CMAESConfig.generations, help="CMA-ES generations")
    p.add_argument(
        "--popsize", type=int, default=CMAESConfig.popsize, help="CMA-ES candidates per generation"
    )
    p.add_argument("--episodes", type=int, default=CMAESConfig.episodes, help="episodes per candidate")
    p.add_argument(
        "--train-max-steps",
        type=int,
        default=CMAESConfig.max_episode_steps,
        help="episode cap while evolving (dream and real baseline alike)",
    )
    p.add_argument(
        "--features",
        default=CMAESConfig.features,
        choices=list(FEATURES),
        help="what the controller reads (envs/controller.py); 'latent': the world model's latent state",
    )
    p.add_argument(
        "--motion",
        action=argparse.BooleanOptionalAction,
        default=CMAESConfig.motion,
        help="controller also reads f_t - f_{t-1}",
    )
    p.add_argument(
        "--last-action",
        action=argparse.BooleanOptionalAction,
        default=CMAESConfig.last_action,
        help="controller also reads its previous action",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="dream sampling temperature")
    p.add_argument(
        "--train-start",
        default="episode_start",
        choices=["episode_start", "random"],
        help="where the evolving controllers' dream episodes start: at held-out episodes' starts, or at random "
        "points of them (short branches from real states, MBPO-style, with --train-max-steps small)",
    )
    p.add_argument(
        "--train-context-frames",
        type=int,
        default=1,
        help="real frames each evolving controller's dream episode starts from",
    )
    p.add_argument(
        "--save-dir",
        default=None,
        help="also save each seed's dream-trained controller to SAVE_DIR/seed<S> (envs/controller.py format)",
    )
    p.add_argument(
        "--hazard-scale",
        type=float,
        default=1.0,
        help="dream hazard scale k: each predicted termination probability p becomes 1 - (1 - p)^k "
        "(evolution and dream scoring alike; envs/dream.py)",
    )
    p.add_argument(
        "--termination-source",
        default="head",
        choices=["head", "unroll"],
        help="dream termination (evolution and dream scoring alike): the prior's head on each generated frame, "
        "or the bundle's hazard unroll from the real context and the actions since (experiments/train_hazard.py)",
    )
    p.add_argument(
        "--fitness",
        default=CMAESConfig.fitness,
        choices=list(FITNESSES),
        help="CMA-ES fitness in the dream: 'sampled' (return until a drawn termination) or 'expected' "
        "(return expected under the predicted termination; episodes run to the cap)",
    )
    p.add_argument(
        "--real-baseline", action="store_true", help="also evolve the learner in the real game (seed 0)"
    )
    p.add_argument(
        "--real-views",
        nargs="+",
        choices=VIEWS,
        default=None,
        help="how dream-trained policies see the real game (envs/views.py): 'tokenized' (each real frame "
        "through the bundle's tokenizer, as the dream draws it) and/or 'raw'; each is scored on the "
        "same episodes, the first is the headline (default: tokenized raw); with --features latent only "
        "'latent' (the world model's latent state of the real frames, the default then)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on 2 cores)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # faster large-batch steps on CPU (worldmodel/memory.py)
    try:
        check_real_env(args.env, "--env")
    except ValueError as e:
        p.error(str(e))
    wm = load_world_model(args.checkpoint, args.env, "cpu")
    if wm.action_spec.kind != "discrete":
        p.error(
            f"--env {args.env}: the bundle's actions are {wm.action_spec.kind}; the CMA-ES controller needs "
            "discrete actions (score continuous-action policies with train_policy.py --eval-real)"
        )
    for flag, needed in (
        ("--termination-source unroll", args.termination_source == "unroll"),
        ("--learner distill", args.learner == "distill"),
        ("--planner", args.planner),
    ):
        if needed and wm.hazard is None:
            p.error(
                f"{flag}: the bundle has no hazard unroll; train one with "
                "python experiments/train_hazard.py --checkpoint <bundle>"
            )
    distill = args.learner == "distill"
    if distill and (args.real_baseline or args.features == "latent"):
        p.error(
            "--learner distill: the distilled policy reads raw frames and has no real-game counterpart; "
            "drop --real-baseline and --features latent (they are the CMA-ES controller's)"
        )
    if distill and args.real_views not in (None, ["raw"]):
        p.error(
            f"--real-views: got {args.real_views} with --learner distill, which reads raw frames: expected raw"
        )
    if distill:
        args.real_views = ["raw"]
    latent = args.features == "latent"
    if args.real_views is None:
        args.real_views = ["latent"] if latent else ["tokenized", "raw"]
    if latent and args.real_views != ["latent"]:
        p.error(
            f"--real-views: got {args.real_views} with --features latent, which reads latents: expected latent"
        )
    if not latent and "latent" in args.real_views:
        p.error(
            f"--real-views: 'latent' gives latent states, not frames; got it with --features {args.features}, "
            "expected tokenized and/or raw (or --features latent)"
        )
    H = wm.obs_shape[0]
    kw = real_env_kwargs(wm)
    cfg = CMAESConfig(
        generations=args.generations,
        popsize=args.popsize,
        episodes=args.episodes,
        max_episode_steps=args.train_max_steps,
        features=args.features,
        motion=args.motion,
        last_action=args.last_action,
        fitness=args.fitness,
    )
    real = gym.vector.SyncVectorEnv(
        [make_real_env_fn(args.env, resolution=H, **kw) for _ in range(args.real_envs)]
    )
    views = {v: real_view(real, wm, v) for v in args.real_views}  # wrappers over the same envs
    store = EpisodeStore(wm.store_path)
    out: dict = {
        "bench": "transfer",
        "env": args.env,
        "checkpoint": str(wm.path),
        "algo": args.learner,
        "cmaes": asdict(cfg) if not distill else None,
        "distill": asdict(DistillConfig(steps=args.distill_steps)) if distill else None,
        "dream": {
            "temperature": args.temperature,
            "hazard_scale": args.hazard_scale,
            "termination_source": args.termination_source,
            "train_start": args.train_start,
            "train_context_frames": args.train_context_frames,
        },
        "world_model_real_steps": int(sum(store.length(e) - 1 for e in store.episode_ids())),
    }
    timings = Path(wm.path) / "timings.json"
    out["world_model_minutes"] = json.loads(timings.read_text()) if timings.exists() else None

    t0 = time.process_time()
    out["real_random"] = _stats(
        play(
            real,
            lambda o, t: np.array([real.single_action_space.sample() for _ in o]),
            args.real_episodes,
            10_000,
            args.max_steps,
        )
    )
    out["real_alternate10"] = _stats(
        play(real, lambda o, t: np.full(len(o), (t // 10) % 2), args.real_episodes, 20_000, args.max_steps)
    )
    out["baselines_cpu_minutes"] = round((time.process_time() - t0) / 60, 2)
    if args.planner:
        t0 = time.process_time()
        planner = HazardPlanner(wm.hazard)
        out["real_planner"] = _stats(
            play(real, _Actor(FrameStackActor(planner)), args.real_episodes, 30_000, args.max_steps)
        )
        out["planner_sequences"] = len(planner.sequences)
        out["planner_cpu_minutes"] = round((time.process_time() - t0) / 60, 2)

    # the CMA-ES learner's evolution dream (the distilled policy learns from stored states, no dream)
    dream = (
        None
        if distill
        else DreamVectorEnv(
            cfg.popsize * cfg.episodes,
            world_model=wm,
            max_episode_steps=cfg.max_episode_steps,
            temperature=args.temperature,
            hazard_scale=args.hazard_scale,
            termination_source=args.termination_source,
            termination="never" if cfg.fitness == "expected" else "sample",
            start=args.train_start,
            context_frames=args.train_context_frames,
        )
    )
    score_dream = DreamVectorEnv(
        min(args.dream_episodes, 16),
        world_model=wm,
        max_episode_steps=args.max_steps,
        temperature=args.temperature,
        hazard_scale=args.hazard_scale,
        termination_source=args.termination_source,
    )
    if latent and not distill:  # the controller reads info["latent"] (train_cmaes wraps its own dream)
        score_dream = latent_env(score_dream, wm)
    per_seed = []
    for s in args.seeds:
        t0 = time.process_time()
        if distill:
            dcfg = DistillConfig(steps=args.distill_steps, seed=s)
            fp, hist = distill_planner(wm, store, dcfg, progress=False)
            act = _Actor(FrameStackActor(fp))
            steps = hist["imagined_steps"]
            if args.save_dir:
                save_frame_policy(Path(args.save_dir) / f"seed{s}.safetensors", fp, {"distill": hist})
        else:
            ctrl, hists = train_cmaes(wm, dream, cfg, seed=s)
            hist, act, steps = hists[-1], _Controller(ctrl), cmaes_agent_steps(hists, cfg)
            if args.save_dir:  # each seed's controller, for rollout.py videos or collection
                save_controller(
                    ctrl, Path(args.save_dir) / f"seed{s}", {"history": hists, "bench": vars(args)}
                )
        train_min = (time.process_time() - t0) / 60
        t0 = time.process_time()
        by_view = {
            v: _stats(play(views[v], act, args.real_episodes, 1_000_000 * (s + 1), args.max_steps))
            for v in args.real_views
        }
        d = play(score_dream, act, args.dream_episodes, 1_000_000 * (s + 1), args.max_steps)
        per_seed.append(
            {
                "seed": s,
                "real": by_view[args.real_views[0]],
                "real_by_view": by_view,
                "dream": _stats(d),
                "dream_agent_steps": steps,
                "train_cpu_minutes": round(train_min, 2),
                "score_cpu_minutes": round((time.process_time() - t0) / 60, 2),
                ("distill_metrics" if distill else "last_generation"): hist,
            }
        )
        print(json.dumps({"seed_done": per_seed[-1]}), flush=True)
    out["per_seed"] = per_seed
    out["real_view"] = args.real_views[0]
    out["real_dream_trained_by_view"] = {
        v: _stats(np.array([x["real_by_view"][v]["mean"] for x in per_seed])) for v in args.real_views
    }
    reals = np.array([x["real"]["mean"] for x in per_seed])
    dreams = np.array([x["dream"]["mean"] for x in per_seed])
    out["real_dream_trained"] = _stats(reals)
    out["dream_dream_trained"] = _stats(dreams)
    out["real_over_dream"] = round(float(reals.mean() / max(dreams.mean(), 1e-9)), 3)
    rnd = out["real_random"][
        "mean"
    ]  # a ratio only for positive returns (Pong's are -21..21): the difference always
    out["real_over_random"] = round(float(reals.mean() / rnd), 3) if rnd > 0 else None
    out["real_minus_random"] = round(float(reals.mean() - rnd), 1)
    out["every_seed_at_least_750"] = bool((reals >= 750).all())
    if args.real_baseline:
        t0 = time.process_time()
        rv = gym.vector.SyncVectorEnv(
            [make_real_env_fn(args.env, resolution=H, **kw) for _ in range(cfg.popsize * cfg.episodes)]
        )
        # the real game draws its own deaths: its fitness is the sampled return
        ctrl, hist = train_cmaes(wm, rv, replace(cfg, fitness="sampled"), seed=args.seeds[0])
        r = play(
            views["latent"] if latent else real,
            _Controller(ctrl),
            args.real_episodes,
            7_000_000,
            args.max_steps,
        )
        out["real_trained"] = {
            "seed": args.seeds[0],
            "real": _stats(r),
            "real_agent_steps": cmaes_agent_steps(hist, cfg),
            "cpu_minutes": round((time.process_time() - t0) / 60, 2),
        }
        out["dream_over_real_trained"] = round(float(reals.mean() / max(r.mean(), 1e-9)), 3)
        rv.close()
    real.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
