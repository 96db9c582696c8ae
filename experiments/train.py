"""Train a VideoGPT world model: collect (real envs) -> tokenizer -> token cache -> prior (-> hazard unroll -> policy).

Examples:
    python experiments/train.py --env vizdoom_hgs --scale tiny                 # the whole pipeline
    python experiments/train.py --env vizdoom_take_cover                       # ... and a policy trained in the dream
    python experiments/train.py --env gym:ALE/Pong-v5 --scale tiny             # any Gymnasium id with pixels
    python experiments/train.py --env gym:MyEnv-v0 --env-module my_package --pixels key:camera
    python experiments/train.py --env vizdoom_hgs --stage tokenizer --scale tiny
    python experiments/train.py --env vizdoom_hgs --stage prior --config.prior.n-layer 6
    torchrun --nproc_per_node 2 experiments/train.py --env vizdoom_hgs --stage tokenizer

``--env gym:<ID>`` collects that Gymnasium env (envs/gym_source.py) into ``data/gym-<ID>`` (``/`` and ``:``
as ``-``) and trains the generic preset built from its spaces (worldmodel.config.generic_preset) into
``runs/gym-<ID>-<scale>``. Every field of the preset can be overridden with a flag (``--config.<section>.<field>``); the
resolved config is printed and saved as ``<run-dir>/config.json``. Training resumes from the last
checkpoint of a stage unless ``--no-resume`` is given.

Presets with ``--config.dream-policy distill`` (``vizdoom_take_cover``) then fit the hazard unroll
(worldmodel/hazard.py) and distil the planner over it into ``<run-dir>/policies/distill_dream.safetensors``
(envs/planner.py), and render that policy in the real game with the dream following.

Expected time on 2 CPU cores: ``--scale tiny`` ~10 min for the whole pipeline (vizdoom_take_cover, with its
4000 episodes and the policy: ~40 min); ``small`` a few hours; ``paper`` is meant for GPUs. ``--budget-minutes M`` sizes both training stages to finish in about M minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from envs.gym_source import is_gym_env, register_gym_preset
from envs.planner import DistillConfig
from envs.real import EnvOptions, is_real_env
from envs.vizdoom import sigterm_exits
from worldmodel.atomic import write_json
from worldmodel.config import SCALES, ExperimentConfig, get_preset, is_preset, preset_names
from worldmodel.hazard import HazardConfig
from worldmodel.memory import keep_freed_memory
from worldmodel.paths import default_run_dir
from worldmodel.training import setup_distributed


@dataclass
class Args:
    env: str = "vizdoom_hgs"
    """Preset name: one of the presets in worldmodel/config.py (vizdoom_hgs, vizdoom_battle2, ...), or gym:<ID>
    for any Gymnasium env with pixels (e.g. gym:ALE/Pong-v5, gym:CarRacing-v3, gym:VizdoomDefendCenter-v1)."""
    scale: Literal["tiny", "small", "paper"] = "tiny"
    """Size axis of the preset: tiny (minutes on 2 CPU cores), small (CPU quality), paper (the paper's)."""
    stage: Literal["all", "collect", "tokenizer", "encode", "prior", "hazard", "policy"] = "all"
    """Which stage to run; 'all' runs every stage in order (collecting first if the store is missing; then, for presets
    with --config.dream-policy distill, such as vizdoom_take_cover, 'hazard' (the termination unroll) and 'policy'
    (the planner distilled into policies/distill_dream.safetensors))."""
    run_dir: str | None = None
    """Run directory = world-model bundle (default: runs/<env>-<scale>, under $WORLDMODEL_HOME if set)."""
    resume: bool = True
    """Continue a stage from its last checkpoint in the run directory."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    battle2_path: str | None = None
    """Directory with D4_battle2.wad/.cfg, for collecting vizdoom_battle2 data (default: the map shipped with the package)."""
    real_max_episode_steps: int | None = None
    """Truncate collected real episodes after this many steps (recorded in the store; None: the env's own limits)."""
    real: Annotated[EnvOptions, tyro.conf.arg(name="")] = field(default_factory=EnvOptions)
    """How to make the real env for collection (--frame-skip; gym:<ID>: --env-module, --env-kwargs, --pixels,
    --sticky-actions)."""
    rollout_videos: bool = True
    """After the whole pipeline (--stage all), render a lockstep (real · dream · |diff|) and a random-policy rollout video."""
    paper_actions: Literal["clip", "step"] = "clip"
    """Action protocol of vizdoom_hgs, vizdoom_battle2 and robonet at --scale paper: 'clip' the paper's (stride
    (2, 2, 2) tokenizer, 8x32x32 latents, the whole clip's actions condition the prior; it samples clips and FVD
    but cannot be stepped as a dream env), 'step' ours (per-step causal actions, 16x32x32 latents, steppable).
    The tiny/small scales always use per-step actions."""
    budget_minutes: float = 0.0
    """Wall-clock minutes for the whole pipeline (--stage all; 0 = off: the preset's step counts). After collection,
    the tokenizer gets a share of what is left (worldmodel.stages.stage_minutes) and the prior what is left at its start less a reserve for
    the videos; each stage times a few of its steps on this device and sizes its step count so that its learning
    rate schedule ends on time (--config.*-train.fit-minutes, worldmodel.training.plan_steps). The hazard and policy
    stages (--config.dream-policy distill) keep their step counts and are not part of the budget."""
    config: ExperimentConfig = ExperimentConfig()
    """The preset's configuration; override any field, e.g. --config.prior-train.steps 500."""
    hazard: HazardConfig = field(default_factory=HazardConfig)
    """The hazard unroll's stage (--stage hazard; part of 'all' with --config.dream-policy distill)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distilled policy's stage (--stage policy; part of 'all' with --config.dream-policy distill)."""
    print_config: bool = False
    """Print the resolved config and exit (nothing is trained). At --scale paper also print, side by side, every
    hyperparameter ours vs the paper's code (wilson1yan/VideoGPT-Paper) with the reason of each difference, and
    the parameter counts of tokenizer and prior, ours and the paper code's."""


def train_hazard_stage(run_dir: Path, cfg: HazardConfig, device: str | torch.device) -> dict:
    """Fit the bundle's hazard unroll on its store and write it into the bundle (experiments/train_hazard.py's work);
    returns its held-out metrics."""
    from worldmodel.bundle import WorldModel
    from worldmodel.hazard import fit_hazard
    from worldmodel.store import EpisodeStore

    wm = WorldModel.from_pretrained(run_dir, device=device)
    metrics = fit_hazard(wm, EpisodeStore(wm.store_path), cfg)
    record_minutes(run_dir, "hazard", metrics["minutes"])
    return metrics


def distill_stage(run_dir: Path, cfg: DistillConfig, device: str | torch.device) -> tuple[Path, dict]:
    """Distil the planner over the bundle's hazard unroll into a frame policy, saved to
    ``<run_dir>/policies/distill_dream.safetensors`` (train_policy.py --algo distill's work); returns (path, metrics)."""
    from envs.planner import distill_planner, save_frame_policy
    from worldmodel.bundle import WorldModel
    from worldmodel.store import EpisodeStore

    wm = WorldModel.from_pretrained(run_dir, device=device)
    if wm.hazard is None:
        sys.exit(
            f"error: --stage policy: the bundle {run_dir} has no hazard unroll yet; run --stage hazard first"
        )
    policy, metrics = distill_planner(wm, EpisodeStore(wm.store_path), cfg)
    extra = {"config": asdict(cfg), "distill": metrics}
    path = save_frame_policy(run_dir / "policies" / "distill_dream.safetensors", policy, extra)
    record_minutes(run_dir, "policy", metrics["minutes"])
    return path, metrics


def render_rollouts(
    run_dir: Path, seed: int = 0, steps: int = 64, policy: Path | None = None
) -> dict[str, Path]:
    """Lockstep and random-policy rollout videos of a finished bundle (see experiments/rollout.py), and with
    ``policy`` (a policy file) that policy driving the real game with the dream following (``--mode follow``)."""
    from envs.dream import DreamEnv
    from envs.policy import dream_trace, load_policy
    from worldmodel.bundle import WorldModel
    from worldmodel.rollout_video import lockstep_trace, render_trace
    from worldmodel.store import EpisodeStore

    wm = WorldModel.from_pretrained(run_dir)
    store = EpisodeStore(wm.store_path)
    ids = store.episode_ids("test") or store.episode_ids("val") or store.episode_ids()
    eid = max(ids, key=store.length)  # the longest held-out episode: the most steps to compare
    out = {}
    trace = lockstep_trace(wm, store, eid, steps=steps, seed=seed)
    out["lockstep real · dream · |diff|"] = render_trace(
        trace, run_dir / "rollouts" / f"lockstep-{eid}", fps=wm.fps
    )["mp4"]
    env = DreamEnv(world_model=wm)
    trace = dream_trace(env, load_policy("random", env.action_space, seed), steps, seed=seed)
    out["random policy in the dream"] = render_trace(
        trace, run_dir / "rollouts" / f"random-{seed}", fps=wm.fps
    )["mp4"]
    if policy is not None:
        from envs.follow import follow_trace, make_bundle_real_env
        from envs.policy_probe import open_probe

        real = make_bundle_real_env(wm)
        try:
            trace = follow_trace(wm, real, open_probe(policy, wm), steps=steps, context=1, seed=seed)
        finally:
            real.close()
        out[f"{policy.stem} in the real game, the dream following"] = render_trace(
            trace, run_dir / "rollouts" / f"follow-{policy.stem}-{seed}", fps=wm.fps
        )["mp4"]
    return out


def record_minutes(run_dir: Path, stage: str, minutes: float) -> None:
    """Add ``stage``'s wall-clock minutes (this run's; a resumed stage counts only its own part) to
    ``<run_dir>/timings.json``, which benchmarks read to report what a bundle cost."""
    path = run_dir / "timings.json"
    d = json.loads(path.read_text()) if path.exists() else {}
    d[stage] = round(minutes, 2)
    write_json(path, d)


def parse(argv: list[str] | None = None) -> Args:
    """Two-phase parse: --env/--scale pick the preset, whose values become the flags' defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default="vizdoom_hgs")
    pre.add_argument("--scale", default="tiny")
    pre.add_argument("--paper-actions", default="clip", choices=("clip", "step"))
    for flag, default in (
        ("--env-module", None),
        ("--env-kwargs", "{}"),
        ("--pixels", "auto"),
        ("--frame-skip", None),
        ("--sticky-actions", 0.0),
    ):
        pre.add_argument(flag, default=default, type=type(default) if default is not None else None)
    known, _ = pre.parse_known_args(argv)
    if not is_preset(known.env):
        sys.exit(
            f"--env {known.env!r}: unknown preset; expected one of {preset_names()} or gym:<Gymnasium id>"
        )
    if known.scale not in SCALES:
        sys.exit(f"--scale {known.scale!r}: expected one of {list(SCALES)}")
    if is_gym_env(known.env):  # the generic preset, built from the env's spaces (one probe of the env)
        opts = EnvOptions(
            env_module=known.env_module,
            env_kwargs=known.env_kwargs,
            pixels=known.pixels,
            frame_skip=None if known.frame_skip is None else int(known.frame_skip),
            sticky_actions=known.sticky_actions,
        )
        try:
            register_gym_preset(known.env, **opts.env_kwargs_for(known.env))
        except (ImportError, ValueError) as e:
            sys.exit(f"error: {e}")
    default = Args(
        env=known.env,
        scale=known.scale,
        paper_actions=known.paper_actions,
        config=get_preset(known.env, known.scale, paper_actions=known.paper_actions),
    )
    return tyro.cli(Args, default=default, args=argv, description=__doc__)


def print_config(args: Args) -> None:
    """``--print-config``: the resolved config, and at ``--scale paper`` the side-by-side table with the paper."""
    print(json.dumps(args.config.to_dict(), indent=1))
    if args.scale == "paper":
        from worldmodel.paper_reference import paper_setup, side_by_side

        try:
            paper_setup(args.config)
        except ValueError as e:
            print(f"\n{e}")
            return
        print("\n" + side_by_side(args.config))


def main(args: Args) -> None:
    if args.print_config:
        print_config(args)
        return
    sigterm_exits()  # SIGTERM runs the cleanup (every ViZDoom engine closed) instead of killing outright
    if args.threads:
        torch.set_num_threads(args.threads)
    di = setup_distributed(args.device)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.env, args.scale)
    cfg = args.config
    if (
        args.real != EnvOptions()
    ):  # env flags given with a preset they do not apply to: say so, do not ignore them
        try:
            args.real.env_kwargs_for(cfg.env)
        except ValueError as e:
            sys.exit(f"error: {e}")
    if di.is_main:
        print(f"run directory: {run_dir}\nconfig: {json.dumps(cfg.to_dict(), indent=1)}")

    from worldmodel import stages

    if args.budget_minutes < 0 or (args.budget_minutes > 0 and args.stage != "all"):
        sys.exit(
            f"--budget-minutes: got {args.budget_minutes:g} with --stage {args.stage}; expected 0 (off), or minutes > 0 "
            f"for --stage all (single stages: --config.tokenizer-train.fit-minutes / --config.prior-train.fit-minutes)"
        )
    t_start = time.monotonic()

    def budgeted(stage: str) -> ExperimentConfig:
        """``cfg`` with ``stage``'s fit_minutes set from the pipeline budget (unchanged without one)."""
        if not args.budget_minutes:
            return cfg
        try:
            minutes = stages.stage_minutes(args.budget_minutes, (time.monotonic() - t_start) / 60, stage)
        except ValueError as e:
            sys.exit(f"error: {e}")
        key = f"{stage}_train"
        return replace(cfg, **{key: replace(getattr(cfg, key), fit_minutes=round(minutes, 3))})

    distill = cfg.dream_policy == "distill"
    if (distill or args.stage in ("hazard", "policy")) and cfg.prior.action_kind != "discrete":
        sys.exit(
            f"error: --stage {args.stage} with --config.dream-policy {cfg.dream_policy}: the hazard unroll and the "
            f"distilled policy need discrete actions; preset {cfg.name!r} has {cfg.prior.action_kind} actions "
            "(use --config.dream-policy none)"
        )
    try:
        args.hazard.check()
        args.distill.check()
    except ValueError as e:
        sys.exit(f"error: {e}")
    stage_list = ["collect", "tokenizer", "encode", "prior"] if args.stage == "all" else [args.stage]
    if args.stage == "all" and distill:
        stage_list += ["hazard", "policy"]
    results = {}
    if "collect" in stage_list:
        if args.stage == "collect" or not (Path(cfg.data.store) / "store.json").exists():
            if not is_real_env(cfg.env):
                sys.exit(
                    f"store {cfg.data.store} is missing and preset {args.env!r} has no real env to collect from; "
                    f"convert a dataset first (python experiments/convert.py ...)"
                )
            if di.is_main:
                from envs.collect import collect

                try:
                    kw = args.real.env_kwargs_for(cfg.env)
                except ValueError as e:
                    sys.exit(f"error: {e}")
                if is_gym_env(cfg.env):
                    kw["resolution"] = cfg.data.resolution
                if args.battle2_path:
                    kw["battle2_path"] = args.battle2_path
                if args.real_max_episode_steps is not None:
                    kw["max_episode_steps"] = args.real_max_episode_steps
                if cfg.collect_object_masks:
                    if is_gym_env(cfg.env):
                        sys.exit("error: --config.collect-object-masks applies to ViZDoom envs only")
                    kw["object_mask"] = True
                t0 = time.monotonic()
                r = collect(cfg.env, cfg.data.store, cfg.collect_episodes, env_kwargs=kw)
                record_minutes(run_dir, "collect", (time.monotonic() - t0) / 60)
                print(f"collected {r.collected} episodes into {r.store}")
            if di.world_size > 1:
                torch.distributed.barrier()
    if "tokenizer" in stage_list:
        results["tokenizer"] = stages.train_tokenizer(
            budgeted("tokenizer"), run_dir, dist_info=di, resume=args.resume
        )
    if "encode" in stage_list and di.is_main:
        t0 = time.monotonic()
        print(f"token cache: {stages.encode_tokens(cfg, run_dir, device=di.device)}")
        record_minutes(run_dir, "encode", (time.monotonic() - t0) / 60)
    if "prior" in stage_list:
        results["prior"] = stages.train_prior(budgeted("prior"), run_dir, dist_info=di, resume=args.resume)
    if di.is_main:
        for name, r in results.items():
            record_minutes(run_dir, name, r.minutes)
    dream_policy = None
    if ("hazard" in stage_list or "policy" in stage_list) and di.is_main:
        keep_freed_memory()  # 1.5x faster unroll steps on CPU (worldmodel/memory.py)
        if "hazard" in stage_list:
            hazard_metrics = train_hazard_stage(run_dir, args.hazard, di.device)
            print(f"hazard unroll: {json.dumps(hazard_metrics)}")
        if "policy" in stage_list:
            dream_policy, distill_metrics = distill_stage(run_dir, args.distill, di.device)
            print(f"distilled policy: {dream_policy}\n{json.dumps(distill_metrics)}")
    videos: dict[str, Path] = {}
    steppable = cfg.prior.action_kind != "none" and cfg.prior.action_cond != "clip"  # a dream env can step it
    if args.stage == "all" and di.is_main and args.rollout_videos and steppable:
        videos = render_rollouts(run_dir, seed=cfg.prior_train.seed, policy=dream_policy)
    if di.is_main:
        print("\n== summary ==")
        print(f"bundle:      {run_dir.resolve()}")
        print(f"tensorboard: tensorboard --logdir {(run_dir / 'tb').resolve()}")
        for name, path in videos.items():
            print(f"video:       {path}  ({name})")
        for png in ("recon.png", "action_strips.png"):
            if (run_dir / png).exists():
                print(f"image:       {(run_dir / png).resolve()}")
        from envs import GENERIC_ID, id_for_preset

        if args.stage in ("all", "prior") and cfg.prior.action_kind != "none":
            try:
                dream_id = id_for_preset(cfg.name)
            except ValueError:
                dream_id = GENERIC_ID  # every bundle: gym.make("VideoGPTDream-v0", checkpoint=DIR)
            print(
                f"dream env:   import envs, gymnasium as gym; env = gym.make({dream_id!r}, "
                f"checkpoint={str(run_dir.resolve())!r})"
            )
            if dream_policy is not None:
                print(
                    f"policy:      {dream_policy}  (trained in the dream; debug it in the real game: python "
                    f"experiments/rollout.py --env {cfg.name} --checkpoint {run_dir} --policy {dream_policy} --mode follow)"
                )
            elif is_real_env(cfg.env):
                print(
                    f"policy:      python experiments/train_policy.py --env {cfg.name} --checkpoint {run_dir} --eval-real"
                )
        for name, r in results.items():
            print(
                f"{name}: {r.step} steps in {r.minutes:.1f} min; val {json.dumps({k: round(v, 4) for k, v in r.val_metrics.items()})}"
            )
    if di.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from worldmodel.store import StoreError

    try:
        main(parse())
    except (StoreError, FileNotFoundError) as e:
        sys.exit(
            f"error: {e}\n(collect with experiments/collect.py or convert a dataset with experiments/convert.py, "
            f"then pass --config.data.store DIR)"
        )
