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

from envs.planner import (
    DistillConfig,
    FramePolicy,
    FrameStackActor,
    HazardPlanner,
    action_sequences,
    distill_planner,
    load_frame_policy,
    save_frame_policy,
)
from tests.conftest import TINY_RES, make_bundle, tiny_experiment, write_rule_store
from worldmodel.bundle import WorldModel
from worldmodel.hazard import HazardConfig, HazardUnroll, save_hazard, train_hazard
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
    unroll, metrics = train_hazard(wm, EpisodeStore(wm.store_path), cfg, progress=False)
    save_hazard(run, unroll, cfg, metrics)
    return run


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
