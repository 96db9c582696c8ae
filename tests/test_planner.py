"""The planner over a hazard unroll and the policy distilled from it (envs/planner.py), and bench_transfer's
``--learner distill --planner``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from envs.collect import collect, load_collect_policy
from envs.planner import (
    DistillConfig,
    FramePolicy,
    FrameStackActor,
    HazardPlanner,
    action_sequences,
    distill_planner,
    is_frame_policy,
    load_frame_policy,
    save_frame_policy,
)
from envs.policy import load_policy
from envs.policy_probe import FramePolicyProbe, open_probe
from tests.conftest import TINY_RES, make_bundle, tiny_experiment, write_rule_store
from tests.test_readme_commands import train_micro
from worldmodel.bundle import WorldModel
from worldmodel.hazard import HazardConfig, HazardUnroll, fit_hazard
from worldmodel.store import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]
SHADES = (
    40,
    220,
)  # an episode's frames are one of two shades; from transition 2 on, action i ends a shade-i episode


@pytest.fixture(scope="module")
def shade_bundle(tmp_path_factory) -> Path:
    """A bundle of the shade store with a trained hazard unroll (context 2, horizon 2)."""
    root = tmp_path_factory.mktemp("planner")
    # from transition 2 on, action c ends an episode of shade c; the frames show c
    store = write_rule_store(
        root / "store", lambda i, t, a: a == i % 2 and t >= 2, lambda i: SHADES[i % 2], episodes=80
    )
    run = make_bundle(tiny_experiment(store, name="vizdoom_take_cover", clip_len=4), root / "bundle")
    wm = WorldModel.from_pretrained(run)
    cfg = HazardConfig(horizon=2, context=2, hidden=32, roots_per_episode=8, steps=400, batch=64, lr=2e-3)
    fit_hazard(wm, EpisodeStore(wm.store_path), cfg, progress=False)  # trained and written into the bundle
    return run


@pytest.fixture(scope="module")
def shade_policy(shade_bundle, tmp_path_factory) -> Path:
    """A frame-policy file distilled from the shade bundle's planner (it picks the action that does not kill)."""
    wm = WorldModel.from_pretrained(shade_bundle)
    cfg = DistillConfig(steps=150, batch=64, hidden=32, bf16=False)
    policy, _ = distill_planner(wm, EpisodeStore(wm.store_path), cfg, progress=False)
    return save_frame_policy(tmp_path_factory.mktemp("frame_policy") / "distill.safetensors", policy)


def shade_frames(c: int, n: int = 1, frames: int = 2) -> np.ndarray:
    return np.full((n, frames, TINY_RES, TINY_RES, 3), SHADES[c], np.uint8)


def test_action_sequences():
    s = action_sequences(2, 3)
    assert s.shape == (8, 3) and len({tuple(r) for r in s.tolist()}) == 8
    assert set(s.reshape(-1).tolist()) == {0, 1}
    holds = action_sequences(3, 6, max_sequences=64)  # 729 > 64: the holds only
    assert holds.tolist() == [[0] * 6, [1] * 6, [2] * 6]
    with pytest.raises(ValueError, match="horizon"):
        action_sequences(2, 0)


def test_planner_avoids_the_deadly_action(shade_bundle):
    wm = WorldModel.from_pretrained(shade_bundle)
    planner = HazardPlanner(wm.hazard)
    assert len(planner.sequences) == 4
    for c in (0, 1):
        q = planner.action_values(shade_frames(c))
        assert q[0, c] > q[0, 1 - c] + 0.1  # the shade's deadly action is valued worse
        assert planner.act(shade_frames(c)).tolist() == [1 - c]
    # a one-frame history is padded to the unroll's two
    assert planner.act(shade_frames(1, frames=1)).tolist() == [0]
    with pytest.raises(ValueError, match="discrete"):
        HazardPlanner(HazardUnroll(2, TINY_RES, "continuous", 2, horizon=2, hidden=8))


def test_distilled_policy_reads_the_frames_and_round_trips(shade_bundle, tmp_path):
    wm = WorldModel.from_pretrained(shade_bundle)
    store = EpisodeStore(wm.store_path)
    policy, m = distill_planner(
        wm, store, DistillConfig(steps=150, batch=64, hidden=32, bf16=False), progress=False
    )
    train_steps = sum(store.length(e) - 1 for e in store.episode_ids("train"))
    assert m["train_roots"] == train_steps and m["val_roots"] > 0
    assert m["val_agreement"] > 0.9
    # the policy has no world model: it reads the shade and picks the other action
    for c in (0, 1):
        assert policy.act(shade_frames(c, n=3)).tolist() == [1 - c] * 3
    path = save_frame_policy(tmp_path / "p.safetensors", policy, {"note": "shade"})
    back, doc = load_frame_policy(path)
    x = torch.as_tensor(np.concatenate([shade_frames(0), shade_frames(1)]))
    assert torch.equal(back(x), policy(x)) and doc["extra"] == {"note": "shade"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a policy")
    with pytest.raises(ValueError, match="not a frame-policy file"):
        load_frame_policy(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="'.safetensors'"):
        save_frame_policy(tmp_path / "p.pt", policy)
    with pytest.raises(ValueError, match="distill.steps"):
        distill_planner(wm, store, DistillConfig(steps=0))


def test_frame_stack_actor_keeps_each_rows_newest_frames():
    torch.manual_seed(0)
    policy = FramePolicy(3, TINY_RES, 2, hidden=16)
    actor = FrameStackActor(policy)
    rng = np.random.default_rng(0)
    obs = [rng.integers(0, 256, (2, TINY_RES, TINY_RES, 3), dtype=np.uint8) for _ in range(4)]
    got = [actor(o) for o in obs]
    # step 0 repeats the first frame; step 3 reads frames 1..3
    assert np.array_equal(got[0], policy.act(np.repeat(obs[0][:, None], 3, 1)))
    assert np.array_equal(got[3], policy.act(np.stack(obs[1:4], 1)))
    assert np.array_equal(actor.window, np.stack(obs[1:4], 1))
    actor.reset(np.array([1]))  # row 1 starts over: its window is refilled with its next frame
    nxt = rng.integers(0, 256, (2, TINY_RES, TINY_RES, 3), dtype=np.uint8)
    actor(nxt)
    assert np.array_equal(actor.window[1], np.repeat(nxt[1][None], 3, 0))
    assert np.array_equal(actor.window[0], np.stack([obs[2][0], obs[3][0], nxt[0]]))


def _bench(bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_transfer.py"),
            "--env",
            "vizdoom_take_cover",
            "--checkpoint",
            str(bundle),
            "--real-episodes",
            "2",
            "--dream-episodes",
            "2",
            "--real-envs",
            "2",
            "--max-steps",
            "8",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bench_transfer_distill_and_planner(shade_bundle, tmp_path):
    res = _bench(
        shade_bundle,
        "--learner",
        "distill",
        "--planner",
        "--distill-steps",
        "3",
        "--seeds",
        "0",
        "--termination-source",
        "unroll",
        "--save-dir",
        str(tmp_path / "pols"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["algo"] == "distill" and out["cmaes"] is None and out["distill"]["steps"] == 3
    assert out["real_planner"]["n"] == 2 and out["planner_sequences"] == 4 and out["real_view"] == "raw"
    (seed,) = out["per_seed"]
    m = seed["distill_metrics"]
    # every stored root's 4 sequences of 2 imagined steps
    assert seed["dream_agent_steps"] == (m["train_roots"] + m["val_roots"]) * 4 * 2
    assert seed["real"]["n"] == 2 and seed["dream"]["n"] == 2
    policy, _ = load_frame_policy(tmp_path / "pols" / "seed0.safetensors")
    assert policy.n_frames == 2 and policy.resolution == TINY_RES
    bad = _bench(shade_bundle, "--learner", "distill", "--real-baseline", "--seeds", "0")
    assert bad.returncode == 2 and "--learner distill" in bad.stderr


def test_bench_transfer_needs_the_unroll(shade_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(shade_bundle, dst)
    (dst / "hazard.json").unlink()
    res = _bench(dst, "--learner", "distill", "--seeds", "0")
    assert res.returncode == 2 and "train_hazard.py" in res.stderr and "--learner distill" in res.stderr


def test_train_policy_distill_cli(shade_bundle, tmp_path):
    out = tmp_path / "d.safetensors"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "train_policy.py"),
        "--env",
        "vizdoom_take_cover",
        "--checkpoint",
        str(shade_bundle),
        "--algo",
        "auto",  # Take Cover with a hazard unroll: distill
        "--distill.steps",
        "150",
        "--distill.batch",
        "64",
        "--distill.hidden",
        "32",
        "--out",
        str(out),
        "--eval-real",
        "--eval-episodes",
        "2",
        "--num-envs",
        "2",
        "--max-episode-steps",
        "6",
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"real_distill", "dream_distill", "real_random"} <= set(report)
    policy, doc = load_frame_policy(out)
    assert doc["extra"]["distill"]["val_agreement"] > 0.9
    assert policy.act(shade_frames(0)).tolist() == [1]
    assert json.loads(out.with_suffix(".eval.json").read_text())["algo"] == "distill"
    bad = subprocess.run(
        cmd[:-10] + ["--out", str(tmp_path / "d.pt")], capture_output=True, text=True, timeout=600
    )
    assert bad.returncode != 0 and "'.safetensors'" in bad.stderr


def test_a_frame_policy_file_loads_wherever_a_policy_file_does(shade_bundle, shade_policy):
    assert is_frame_policy(shade_policy)
    assert not is_frame_policy(shade_bundle / "model.safetensors") and not is_frame_policy(shade_bundle)
    wm = WorldModel.from_pretrained(shade_bundle)
    frame = {c: shade_frames(c)[0, 0] for c in (0, 1)}  # one (R, R, 3) frame of each shade
    rng = np.random.default_rng(0)
    # the debugging probe (rollout.py --mode follow): greedy, with its action probabilities
    probe = open_probe(shade_policy, wm)
    assert isinstance(probe, FramePolicyProbe) and probe.n_actions == 2
    r = probe.read(frame[0], rng)
    assert r.action == r.choice == 1 and r.value is None
    assert r.probs[1] > 0.5 and abs(float(r.probs.sum()) - 1) < 1e-5
    twin = probe.fork()  # the dream's copy: its window moves on, the real one's does not
    twin.read(frame[1], rng)
    assert twin.read(frame[1], rng).choice == 0
    assert (probe.actor.window == SHADES[0]).all() and (twin.actor.window == SHADES[1]).all()
    probe.reset()  # a new episode: its first frame fills the window
    assert probe.read(frame[1], rng).choice == 0 and (probe.actor.window == SHADES[1]).all()
    other = save_frame_policy(shade_policy.parent / "r16.safetensors", FramePolicy(2, 16, 2, hidden=8))
    with pytest.raises(ValueError, match="reads 16x16 frames"):  # a policy for other frames than the bundle's
        open_probe(other, wm)
    # collection (collect.py --policy): one window per env row
    act, name, kind = load_collect_policy(str(shade_policy))
    assert kind == "frame_policy" and name == str(shade_policy)
    assert act(np.stack([frame[0], frame[1]])).tolist() == [1, 0]
    # one episode's function (rollout.py's dream mode, the main job's videos)
    one = load_policy(str(shade_policy), spaces.Discrete(2))
    assert int(one(frame[1])) == 0


def test_collect_with_a_frame_policy_replays_its_choices(shade_policy, tmp_path):
    kw = {"num_envs": 2, "asynchronous": False, "progress": False}
    # 3 episodes in 2 envs: one env starts a second episode, whose window must start afresh
    collect(
        "vizdoom_take_cover",
        tmp_path / "s",
        3,
        policy=str(shade_policy),
        seed=2,
        env_kwargs={"resolution": TINY_RES, "max_episode_steps": 10},
        **kw,
    )
    store = EpisodeStore(tmp_path / "s")
    policy, _ = load_frame_policy(shade_policy)
    assert len(store.episode_ids()) == 3
    for eid in store.episode_ids():
        ep = store.load(eid)
        assert ep.attrs["policy_kind"] == "frame_policy" and ep.attrs["policy"] == str(shade_policy)
        actor = FrameStackActor(policy)  # a fresh window per episode
        replay = np.concatenate([actor(ep.frames[t : t + 1]) for t in range(len(ep.frames) - 1)])
        np.testing.assert_array_equal(ep.actions, replay)


def test_take_cover_main_job_trains_the_unroll_and_the_distilled_policy(tmp_path):
    """``train.py --env vizdoom_take_cover`` at micro scale: collect (live ViZDoom) -> tokenizer -> prior -> hazard
    unroll -> distilled policy -> videos, one of them the policy in the real game with the dream following."""
    run = tmp_path / "runs" / "tc"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "--env",
        "vizdoom_take_cover",
        "--run-dir",
        str(run),
        "--config.data.store",
        str(tmp_path / "data"),
        "--real-max-episode-steps",
        "24",
        *train_micro(2),
        *("--hazard.steps", "3", "--hazard.context", "2", "--hazard.horizon", "2", "--hazard.batch", "8"),
        *("--distill.steps", "3", "--distill.batch", "8", "--distill.hidden", "16"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(EpisodeStore(tmp_path / "data").episode_ids()) == 4
    wm = WorldModel.from_pretrained(run)
    assert wm.hazard is not None and json.loads((run / "hazard.json").read_text())["config"]["steps"] == 3
    policy_file = run / "policies" / "distill_dream.safetensors"
    policy, doc = load_frame_policy(policy_file)
    assert policy.n_frames == 2 and doc["extra"]["config"]["steps"] == 3
    timings = json.loads((run / "timings.json").read_text())
    assert {"collect", "tokenizer", "prior", "hazard", "policy"} <= set(timings)
    summary = res.stdout.split("== summary ==")[1]
    assert f"policy:      {policy_file}" in summary and "--mode follow" in summary
    follow = run / "rollouts" / "follow-distill_dream-0.mp4"
    assert follow.stat().st_size > 1000 and str(follow) in summary
    # a bundle without the unroll: the policy stage refuses, naming the stage to run first
    bare = tmp_path / "runs" / "bare"
    shutil.copytree(run, bare)
    (bare / "hazard.json").unlink()
    bad = subprocess.run(
        [*cmd, "--stage", "policy", "--run-dir", str(bare)], capture_output=True, text=True, timeout=600
    )
    assert bad.returncode != 0 and "run --stage hazard first" in bad.stderr
