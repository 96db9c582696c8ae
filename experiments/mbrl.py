"""Model-based RL loop on a real env: collect -> world model -> PPO, CMA-ES or a distilled planner -> real eval.

Examples:
    python experiments/mbrl.py --env vizdoom_hgs
    python experiments/mbrl.py --env vizdoom_hgs --health-bar --mbrl.iterations 5 --mbrl.ppo-steps-per-iteration 20000
    python experiments/mbrl.py --env gym:ALE/Pong-v5 --real-max-episode-steps 500     # any Gymnasium id with pixels
    python experiments/mbrl.py --env vizdoom_take_cover                      # the distilled planner
    python experiments/mbrl.py --env vizdoom_take_cover --mbrl.algo cmaes --mbrl.episodes-per-iteration 300
    python experiments/mbrl.py --env vizdoom_take_cover --mbrl.algo ppo --mbrl.temperature 1.0

Each iteration collects real episodes with the current policy (the first with random actions),
continues the world model on the grown store (prior resumed, token cache re-encoded), trains the
learner in the batched dream and scores it in the real env and in the dream. Learners (--mbrl.algo):
ppo continues the same PPO policy; cmaes evolves a fresh World Models linear controller each round
(--mbrl.cmaes.*); distill fits a fresh hazard unroll on the grown store (--mbrl.hazard.*) and distils the
planner over it into a fresh frame policy (--mbrl.distill.*). The controller or the frame policy then collects
the next round's episodes with --mbrl.collect-epsilon random actions. Per-env defaults (envs.mbrl.ENV_DEFAULTS),
used for the flags not given: vizdoom_take_cover runs distill with 1000 episodes per round and dream scores at
temperature 1.15 (measured best there, README "Take Cover"); every other env runs ppo at 1.0.
``--env vizdoom_take_cover --help`` shows the defaults so resolved. Writes
``<run-dir>/mbrl.csv`` (one row per iteration: real env steps, real and dream return, gap),
TensorBoard scalars under ``<run-dir>/tb_mbrl`` and ``<run-dir>/mbrl_report.json`` comparing the
loop's policy with a random policy and with PPO trained directly in the real env on as many real
steps; the last line printed is the report as one JSON line. A killed run resumes after its last
finished iteration when started again with the same flags; a larger ``--mbrl.iterations``
continues a finished one.

Expected time on 2 CPU cores with the defaults (3 iterations of 100 episodes, tiny world model
trained 600 + 3000 steps then +1000 prior steps per iteration, 10k dream PPO steps per iteration):
about 45 minutes; see the README's results for a measured run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

from envs.gym_source import is_gym_env, register_gym_preset
from envs.mbrl import MBRLConfig, run_mbrl
from envs.real import EnvOptions, check_real_env
from envs.vizdoom import sigterm_exits
from worldmodel.config import get_preset, safe_name
from worldmodel.memory import keep_freed_memory
from worldmodel.paths import runs_dir


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Real env (and preset) to run the loop on: vizdoom_hgs, vizdoom_battle2, vizdoom_take_cover or
    gym:<Gymnasium id> (e.g. gym:ALE/Pong-v5; its preset is built from the env's spaces)."""
    scale: Literal["tiny", "small", "paper"] = "tiny"
    """World-model size (preset scale)."""
    run_dir: str | None = None
    """Run directory = world-model bundle (default: runs/<env>-<scale>-mbrl, under $WORLDMODEL_HOME if set; gym:
    ids with ':' and '/' as '-')."""
    store: str | None = None
    """Episode store the loop collects into (default: <run-dir>/data). Episodes already in it count as real steps used."""
    health_bar: bool = True
    """Collect and evaluate with the health bar drawn into the frames (lets the model see what death depends on;
    ViZDoom presets only, ignored for gym: envs)."""
    battle2_path: str | None = None
    """Directory with D4_battle2.wad/.cfg (vizdoom_battle2) (default: the map shipped with the package)."""
    real_max_episode_steps: int | None = None
    """Truncate real episodes (collection, evaluation, baselines) after this many steps (None: the env's own limit)."""
    tokenizer_steps: int | None = None
    """Tokenizer steps of iteration 0 (default: the preset's)."""
    prior_steps: int | None = None
    """Prior steps of iteration 0 (default: the preset's)."""
    threads: int = 1
    """torch intra-op threads; 1 is fastest for tiny models on a shared 2-core machine (0 = torch's default)."""
    progress: bool = True
    """Progress bars."""
    trust_pickle: bool = False
    """Resume a run whose state names an SB3 .zip policy (runs from before safetensors policy files). Loading a
    zip unpickles it: it RUNS ANY CODE the file holds. Only for runs of trusted origin."""
    mbrl: MBRLConfig = field(default_factory=MBRLConfig)
    """Loop budgets and learner (defaults per --env: vizdoom_take_cover --mbrl.algo distill --mbrl.temperature 1.15
    --mbrl.episodes-per-iteration 1000; otherwise ppo at 1.0)."""
    real: Annotated[EnvOptions, tyro.conf.arg(name="")] = field(default_factory=EnvOptions)
    """How to make the real env (--frame-skip; gym:<ID> envs: --env-module, --env-kwargs, --pixels, --sticky-actions)."""


def print_report(report: dict[str, Any]) -> None:
    """Per-iteration table, the comparison table, then the report as one JSON line (printed last)."""
    print(f"\n{'iteration':>9} {'real steps':>10} {'real return':>12} {'dream return':>13} {'gap':>9}")
    for r in report["iterations"]:
        print(
            f"{r['iteration']:>9} {r['real_env_steps']:>10} {r['real_return']:>12.1f} {r['dream_return']:>13.1f} "
            f"{r['gap']:>+9.1f}"
        )
    n = report["real_env_steps"]
    print(f"\n{'policy (real env)':<34} {'real steps':>10} {'return':>18} {'length':>7}")
    learner = {"ppo": "PPO", "cmaes": "CMA-ES", "distill": "distilled planner"}[report.get("algo", "ppo")]
    lines = [
        (f"model-based loop ({learner} in the dream)", n, report["mbrl"]),
        ("random", 0, report["random"]),
    ]
    if "direct_ppo" in report:
        lines.append(
            ("PPO directly in the real env", report["direct_ppo"]["real_env_steps"], report["direct_ppo"])
        )
    for name, steps, s in lines:
        print(f"{name:<34} {steps:>10} {s['mean']:>10.1f} ± {s['std']:>5.1f} {s['mean_length']:>7.0f}")
    summary = {
        "env": report["env"],
        "real_env_steps": n,
        "mbrl": round(report["mbrl"]["mean"], 1),
        "random": round(report["random"]["mean"], 1),
        "direct_ppo": round(report["direct_ppo"]["mean"], 1) if "direct_ppo" in report else None,
        "direct_ppo_steps": report["direct_ppo"]["real_env_steps"] if "direct_ppo" in report else None,
        "mbrl_vs_random": _round(report["mbrl_vs_random"]),
        "mbrl_vs_direct_ppo": _round(report.get("mbrl_vs_direct_ppo")),
        "iterations": len(report["iterations"]),
        "minutes": report["minutes"],
    }
    print(json.dumps(summary))


def _round(ratio: float | None) -> float | None:
    """A ratio of returns for the JSON line (None where the baseline's mean return is not positive)."""
    return None if ratio is None else round(ratio, 3)


def default_args(argv: list[str]) -> Args:
    """The defaults for the ``--env`` in ``argv``: :class:`Args` with ``MBRLConfig.for_env(env)`` (the per-env
    defaults of :data:`envs.mbrl.ENV_DEFAULTS`); flags given on the command line override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default=Args.env)
    env = pre.parse_known_args(argv)[0].env
    return Args(env=env, mbrl=MBRLConfig.for_env(env))


def main(args: Args) -> dict[str, Any]:
    sigterm_exits()  # SIGTERM runs the cleanup (every ViZDoom engine closed) instead of killing outright
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # faster large-batch steps on CPU (worldmodel/memory.py)
    try:
        check_real_env(args.env, "--env")
        env_kw = args.real.env_kwargs_for(args.env)
        if is_gym_env(args.env):  # the preset is built from the env's spaces
            register_gym_preset(args.env, **env_kw)
    except (ImportError, ValueError) as e:
        sys.exit(f"error: {e}")
    run = Path(args.run_dir) if args.run_dir else runs_dir() / f"{safe_name(args.env)}-{args.scale}-mbrl"
    cfg = get_preset(args.env, args.scale)
    cfg = replace(cfg, data=replace(cfg.data, store=args.store or str(run / "data")))
    if args.tokenizer_steps is not None:
        cfg = replace(cfg, tokenizer_train=replace(cfg.tokenizer_train, steps=args.tokenizer_steps))
    if args.prior_steps is not None:
        cfg = replace(cfg, prior_train=replace(cfg.prior_train, steps=args.prior_steps))
    kw: dict[str, Any] = dict(env_kw) if is_gym_env(args.env) else {**env_kw, "health_bar": args.health_bar}
    if args.battle2_path:
        kw["battle2_path"] = args.battle2_path
    if args.real_max_episode_steps is not None:
        kw["max_episode_steps"] = args.real_max_episode_steps
    print(f"run directory: {run}\nstore: {cfg.data.store}")
    try:
        report = run_mbrl(
            cfg, run, args.mbrl, env_kwargs=kw, progress=args.progress, trust_pickle=args.trust_pickle
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print_report(report)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args, default=default_args(sys.argv[1:]), description=__doc__))
