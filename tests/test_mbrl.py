"""The model-based RL loop on the real HGS env: one short iteration through the CLI, and a resumed
second iteration that continues the world model and the policy instead of starting over."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import tyro

from envs.controller import CMAESConfig, cmaes_agent_steps, is_controller
from envs.mbrl import CSV_FIELDS, MBRLConfig, run_mbrl, store_transitions
from envs.planner import DistillConfig, is_frame_policy, load_frame_policy
from envs.policy import PPOConfig
from tests.conftest import TINY_RES, tiny_experiment
from worldmodel.checkpoint import trainer_state_path
from worldmodel.config import ExperimentConfig
from worldmodel.hazard import HazardConfig
from worldmodel.store import EpisodeStore
from worldmodel.token_cache import TOKENS_FILE, TokenCache

ROOT = Path(__file__).resolve().parents[1]


def trained_steps(run: Path, stage: str) -> int:
    return int(torch.load(trainer_state_path(run, stage), weights_only=True)["step"])


def test_cli_one_short_iteration(tmp_path):
    run = tmp_path / "mbrl"
    args = [
        sys.executable,
        str(ROOT / "experiments" / "mbrl.py"),
        "--env",
        "vizdoom_hgs",
        "--run-dir",
        str(run),
        "--no-progress",
        "--threads",
        "1",
        "--tokenizer-steps",
        "2",
        "--prior-steps",
        "3",
        "--real-max-episode-steps",
        "40",
        "--mbrl.iterations",
        "1",
        "--mbrl.episodes-per-iteration",
        "2",
        "--mbrl.ppo-steps-per-iteration",
        "64",
        "--mbrl.eval-episodes",
        "2",
        "--mbrl.num-envs",
        "2",
        "--mbrl.max-episode-steps",
        "16",
        "--mbrl.ppo.n-steps",
        "16",
        "--mbrl.ppo.batch-size",
        "32",
        "--mbrl.ppo.n-epochs",
        "1",
    ]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    with (run / "mbrl.csv").open() as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_FIELDS and len(rows) == 1
    row = rows[0]
    steps = store_transitions(run / "data")
    assert len(EpisodeStore(run / "data")) == int(row["episodes"]) == 2
    assert int(row["real_env_steps"]) == int(row["new_real_steps"]) == steps > 0  # every real step counted
    assert float(row["gap"]) == float(row["dream_return"]) - float(row["real_return"])
    assert int(row["prior_steps"]) == trained_steps(run, "prior") == 3
    assert int(row["ppo_timesteps"]) == 64 and int(row["eval_episodes"]) == 2
    assert 1 <= float(row["real_length"]) <= 40  # the real-episode limit reached evaluation

    report = json.loads((run / "mbrl_report.json").read_text())
    assert report["real_env_steps"] == steps
    assert report["mbrl"]["mean"] == float(row["real_return"])
    # the direct baseline trained on the same real budget, rounded up to whole rollouts of 2 envs x n_steps
    n_steps = max(8, steps // 8)
    assert steps <= report["direct_ppo"]["real_env_steps"] < steps + 2 * n_steps
    assert report["mbrl_vs_random"] == pytest.approx(report["mbrl"]["mean"] / report["random"]["mean"])
    assert (run / "policies" / "ppo_mbrl.safetensors").exists() and any((run / "tb_mbrl").iterdir())

    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["real_env_steps"] == steps and last["random"] == round(report["random"]["mean"], 1) > 0
    assert last["direct_ppo_steps"] == report["direct_ppo"]["real_env_steps"]
    assert "PPO directly in the real env" in res.stdout  # the comparison table


@pytest.mark.filterwarnings("ignore:.*(no held-out episodes)")
def test_resume_continues_world_model_and_policy(tmp_path, one_thread):
    """Iteration 1, started after a finished iteration 0, grows the store, continues the tokenizer,
    prior and PPO from their step counters and leaves iteration 0's row as it was."""
    run = tmp_path / "run"
    cfg = tiny_experiment(tmp_path / "data", steps=3)
    cfg = replace(cfg, data=replace(cfg.data, resolution=64), tokenizer=replace(cfg.tokenizer, resolution=64))
    m = MBRLConfig(
        iterations=1,
        episodes_per_iteration=2,
        tokenizer_steps_per_iteration=2,
        prior_steps_per_iteration=4,
        ppo_steps_per_iteration=64,
        eval_episodes=1,
        num_envs=2,
        max_episode_steps=12,
        direct_ppo_baseline=False,
        ppo=PPOConfig(n_steps=16, batch_size=32, n_epochs=1),
    )
    kw = {
        "max_episode_steps": 24
    }  # real episodes of at most 24 steps (64x64: SB3's CnnPolicy needs >= 36 px)
    first = run_mbrl(cfg, run, m, env_kwargs=kw, progress=False)
    steps0 = store_transitions(cfg.data.store)
    assert first["real_env_steps"] == steps0 and "direct_ppo" not in first

    with pytest.raises(ValueError, match="prior_steps_per_iteration"):
        run_mbrl(
            cfg, run, replace(m, iterations=2, prior_steps_per_iteration=5), env_kwargs=kw, progress=False
        )

    second = run_mbrl(cfg, run, replace(m, iterations=2), env_kwargs=kw, progress=False)
    r0, r1 = second["iterations"]
    assert r0 == first["iterations"][0]  # not redone
    assert len(EpisodeStore(cfg.data.store)) == r1["episodes"] == 4
    assert r1["real_env_steps"] == store_transitions(cfg.data.store) == steps0 + r1["new_real_steps"]
    assert r1["new_real_steps"] > 0 and r1["collect_return"] is not None
    # world model continued: the step counters went on from round 0's (3) by the per-iteration budgets
    assert (r1["tokenizer_steps"], r1["prior_steps"]) == (3 + 2, 3 + 4)
    assert trained_steps(run, "tokenizer") == 5 and trained_steps(run, "prior") == 7
    assert len(TokenCache(run / TOKENS_FILE)) == 4  # re-encoded after the store grew
    # the same PPO model continued (its timestep counter too)
    assert (r0["ppo_timesteps"], r1["ppo_timesteps"]) == (64, 128)
    assert second["real_env_steps"] == r1["real_env_steps"] and second["mbrl"]["mean"] == r1["real_return"]
    with (run / "mbrl.csv").open() as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == [0, 1]
    state = json.loads((run / "mbrl_state.json").read_text())
    assert state["policy"] == "policies/mbrl-iter001.safetensors" and (run / state["policy"]).exists()


def _micro_cmaes_loop(tmp_path: Path, **mbrl: Any) -> tuple[Path, ExperimentConfig, MBRLConfig]:
    """A seconds-long CMA-ES loop on real Take Cover: (run dir, micro preset at TINY_RES, MBRLConfig with
    ``mbrl`` over the micro budgets)."""
    cfg = tiny_experiment(tmp_path / "data", name="vizdoom_take_cover", steps=3)
    cfg = replace(cfg, data=replace(cfg.data, resolution=TINY_RES))
    base: dict[str, Any] = {
        "algo": "cmaes",
        "episodes_per_iteration": 2,
        "prior_steps_per_iteration": 2,
        "num_envs": 2,
        "max_episode_steps": 8,
        "direct_ppo_baseline": False,
    }
    return tmp_path / "run", cfg, MBRLConfig(**{**base, **mbrl})


@pytest.mark.filterwarnings("ignore:.*(no held-out episodes)")
def test_cmaes_loop_saves_a_controller_per_round_and_resumes(tmp_path, one_thread):
    """algo=cmaes on Take Cover: round 0 collects randomly and evolves controller-iter000; a second call with
    iterations=2 (as after a kill) keeps round 0 and lets that controller collect round 1 with epsilon."""
    run, cfg, m = _micro_cmaes_loop(
        tmp_path,
        iterations=1,
        eval_episodes=1,
        cmaes=CMAESConfig(generations=2, popsize=4, episodes=1, max_episode_steps=6, fitness="expected"),
        collect_epsilon=0.5,
        temperature=1.15,
        hazard_scale=1.5,
    )
    kw = {"max_episode_steps": 16}
    first = run_mbrl(cfg, run, m, env_kwargs=kw, progress=False)
    assert first["algo"] == "cmaes" and is_controller(run / "policies" / "controller-iter000")
    assert json.loads((run / "mbrl_state.json").read_text())["policy"] == "policies/controller-iter000"

    with pytest.raises(ValueError, match="collect_epsilon"):
        run_mbrl(cfg, run, replace(m, iterations=2, collect_epsilon=0.1), env_kwargs=kw, progress=False)
    with pytest.raises(ValueError, match="algo"):
        run_mbrl(cfg, run, replace(m, iterations=2, algo="ppo"), env_kwargs=kw, progress=False)
    with pytest.raises(ValueError, match="hazard_scale"):
        run_mbrl(cfg, run, replace(m, iterations=2, hazard_scale=1.0), env_kwargs=kw, progress=False)

    second = run_mbrl(cfg, run, replace(m, iterations=2), env_kwargs=kw, progress=False)
    r0, r1 = second["iterations"]
    assert r0 == first["iterations"][0]  # not redone
    assert is_controller(run / "policies" / "controller-iter001")
    assert json.loads((run / "mbrl_state.json").read_text())["policy"] == "policies/controller-iter001"
    store = EpisodeStore(cfg.data.store)
    assert len(store) == r1["episodes"] == 4 and r1["new_real_steps"] > 0
    attrs = [store.load(e).attrs for e in store.episode_ids()]
    assert [a["policy_kind"] for a in attrs].count("random") == 2  # round 0
    by_ctrl = [a for a in attrs if a["policy_kind"] == "controller"]
    assert len(by_ctrl) == 2 and all(a["epsilon"] == 0.5 for a in by_ctrl)
    assert all(Path(a["policy"]) == run / "policies" / "controller-iter000" for a in by_ctrl)
    assert r1["prior_steps"] == 3 + 2 and trained_steps(run, "prior") == 5
    # ppo_timesteps: the agent steps the round's controller was evolved with (popsize x episodes rows, <= 6 steps)
    for it, row in enumerate((r0, r1)):
        meta = json.loads((run / "policies" / f"controller-iter{it:03d}" / "controller.json").read_text())
        assert meta["round"] == it and len(meta["history"]) == 2
        assert row["ppo_timesteps"] == cmaes_agent_steps(meta["history"], m.cmaes)
        assert row["ppo_timesteps"] == 2 * 4 * 6  # expected fitness: every dream row runs to the cap
    assert not (run / "policies" / "ppo_mbrl.safetensors").exists()
    with (run / "mbrl.csv").open() as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == [0, 1]


@pytest.mark.filterwarnings("ignore:.*(no held-out episodes)")
def test_distill_loop_refits_the_unroll_and_lets_the_policy_collect(tmp_path, one_thread):
    """algo=distill on Take Cover: each round fits the unroll on the grown store and distils a fresh frame policy;
    round 1's episodes are collected by round 0's policy with epsilon; its dream score ends episodes by the unroll."""
    run, cfg, m = _micro_cmaes_loop(
        tmp_path,
        algo="distill",
        iterations=2,
        episodes_per_iteration=3,
        eval_episodes=1,
        collect_epsilon=0.3,
        hazard=HazardConfig(horizon=2, context=2, hidden=16, roots_per_episode=4, steps=4, batch=8),
        distill=DistillConfig(steps=3, batch=8, hidden=16, bf16=False, seed=7),
    )
    report = run_mbrl(cfg, run, m, env_kwargs={"max_episode_steps": 16}, progress=False)
    assert report["algo"] == "distill"
    r0, r1 = report["iterations"]
    store = EpisodeStore(cfg.data.store)
    attrs = [store.load(e).attrs for e in store.episode_ids()]
    assert [a["policy_kind"] for a in attrs].count("random") == 3  # round 0
    by_policy = [a for a in attrs if a["policy_kind"] == "frame_policy"]
    assert len(by_policy) == 3 and all(a["epsilon"] == 0.3 for a in by_policy)
    assert all(Path(a["policy"]) == run / "policies" / "distill-iter000.safetensors" for a in by_policy)
    metas = []
    for it, row in enumerate((r0, r1)):
        policy, doc = load_frame_policy(run / "policies" / f"distill-iter{it:03d}.safetensors")
        meta = doc["extra"]
        assert meta["round"] == it and policy.n_frames == 2
        d = meta["distill"]  # every labelled root (held-out ones once) x 4 sequences x 2 steps
        unique = d["train_roots"] + (d["val_roots"] if d["val_split"] != "train" else 0)
        assert row["ppo_timesteps"] == d["imagined_steps"] == unique * 4 * 2
        metas.append(meta)
    # round 1 refitted the unroll and relabelled on the grown store: more roots for both
    assert metas[1]["distill"]["train_roots"] > metas[0]["distill"]["train_roots"]
    assert metas[1]["hazard"]["train_roots"] > metas[0]["hazard"]["train_roots"]
    hazard = json.loads((run / "hazard.json").read_text())  # the bundle holds the last round's unroll
    assert hazard["config"]["steps"] == 4 and is_frame_policy(
        run / "policies" / "distill-iter001.safetensors"
    )
    assert (
        json.loads((run / "mbrl_state.json").read_text())["policy"] == "policies/distill-iter001.safetensors"
    )
    with pytest.raises(ValueError, match="distill"):  # a resumed run keeps the learner's budgets
        run_mbrl(cfg, run, replace(m, iterations=3, distill=replace(m.distill, steps=5)), progress=False)


def test_take_cover_defaults_to_distill_unless_the_flags_say_otherwise(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mbrl_cli", ROOT / "experiments" / "mbrl.py")
    cli = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mbrl_cli", cli)  # its dataclasses look their module up
    spec.loader.exec_module(cli)

    def parse(*argv: str) -> MBRLConfig:
        return tyro.cli(cli.Args, default=cli.default_args(list(argv)), args=list(argv)).mbrl

    assert MBRLConfig().algo == "ppo" and MBRLConfig().temperature == 1.0
    tc = parse("--env", "vizdoom_take_cover")
    assert (tc.algo, tc.temperature, tc.collect_epsilon, tc.episodes_per_iteration) == (
        "distill",
        1.15,
        0.2,
        1000,
    )
    assert (parse("--env=vizdoom_take_cover", "--mbrl.algo", "ppo").algo) == "ppo"
    assert parse("--env", "vizdoom_take_cover", "--mbrl.temperature", "1.0").temperature == 1.0
    assert (parse("--env", "vizdoom_hgs").algo, parse().algo) == ("ppo", "ppo")
    for bad, match in (
        ({"algo": "sac"}, "mbrl.algo: got 'sac', expected 'ppo', 'cmaes' or 'distill'"),
        ({"distill": DistillConfig(steps=0)}, "distill.steps"),
        ({"hazard": HazardConfig(lr=-1.0)}, "hazard.lr"),
        ({"collect_epsilon": 2.0}, r"mbrl.collect_epsilon: got 2.0, expected a probability in \[0, 1\]"),
        ({"temperature": 0.0}, "mbrl.temperature"),
        ({"hazard_scale": -1.0}, "mbrl.hazard_scale"),
        ({"cmaes": CMAESConfig(popsize=1)}, "mbrl.cmaes.popsize"),
    ):
        with pytest.raises(ValueError, match=match):
            MBRLConfig(**bad).validate()


@pytest.mark.filterwarnings("ignore:.*(no held-out episodes)")
def test_cmaes_loop_with_latent_features_collects_and_scores_through_the_tracker(tmp_path, one_thread):
    """features="latent": the controller reads the world model's state in the dream, in the real evaluation and
    while it collects round 1 (the bundle follows the real frames for it)."""
    run, cfg, m = _micro_cmaes_loop(
        tmp_path,
        iterations=2,
        eval_episodes=2,
        cmaes=CMAESConfig(generations=1, popsize=4, episodes=1, max_episode_steps=6, features="latent"),
        collect_epsilon=0.2,
    )
    report = run_mbrl(cfg, run, m, env_kwargs={"max_episode_steps": 16}, progress=False)
    for it, row in enumerate(report["iterations"]):
        meta = json.loads((run / "policies" / f"controller-iter{it:03d}" / "controller.json").read_text())
        assert meta["config"]["features"] == "latent"
        assert row["eval_episodes"] == 2 and 1 <= row["real_length"] <= 16 and 1 <= row["dream_length"] <= 8
    store = EpisodeStore(cfg.data.store)
    kinds = [store.load(e).attrs["policy_kind"] for e in store.episode_ids()]
    assert kinds.count("random") == 2 and kinds.count("controller") == 2
