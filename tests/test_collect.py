"""Collection from real ViZDoom into a store, including resume after an interrupt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.collect import StickyRandomPolicy, collect
from worldmodel.store import EpisodeStore, StoreError
from worldmodel.training_data import ClipDataset

ROOT = Path(__file__).resolve().parents[1]


def test_collect_hgs_produces_valid_store(tmp_path):
    r = collect(
        "vizdoom_hgs",
        tmp_path / "s",
        3,
        num_envs=2,
        seed=1,
        progress=False,
        episodes_per_shard=2,
        env_kwargs={"max_episode_steps": 40},
    )
    assert r.collected == 3 and r.already_present == 0
    store = EpisodeStore(tmp_path / "s")
    assert (
        len(store) == 3 and store.meta.action_spec.kind == "discrete" and store.meta.obs_shape == (64, 64, 3)
    )
    total_steps = 0
    for ep in store.iter_episodes():
        T = len(ep)
        total_steps += T - 1
        assert ep.frames.dtype == np.uint8 and ep.actions.shape == (T - 1,)
        assert 1 < T <= 41
        assert ep.terminated[:-1].sum() == 0  # only the last transition can end an episode
        assert ep.truncated == (not ep.terminated[-1])
        # HGS pays +1 per tic alive, frame skip 4: every non-final step is worth 4
        np.testing.assert_allclose(ep.rewards[:-1], 4.0)
        # consecutive frames differ (the agent moves / turns)
        assert np.abs(np.diff(ep.frames.astype(int), axis=0)).mean() > 0
    assert total_steps <= r.env_steps  # steps of episodes still in flight at the end are dropped
    ds = ClipDataset(store, split=None, clip_len=8)
    assert ds[0]["frames"].shape == (8, 64, 64, 3)


def test_collect_battle2(tmp_path):
    r = collect(
        "vizdoom_battle2",
        tmp_path / "b",
        2,
        num_envs=1,
        progress=False,
        asynchronous=False,
        env_kwargs={"max_episode_steps": 20},
    )
    store = EpisodeStore(tmp_path / "b")
    assert len(store) == 2 == r.collected and store.meta.action_spec.n == 8
    assert all(len(e) == 21 for e in store.iter_episodes())


def test_resume_after_interrupt_gives_exact_count(tmp_path):
    out = tmp_path / "s"
    script = ROOT / "experiments" / "collect.py"
    cmd = [
        sys.executable,
        str(script),
        "--env",
        "vizdoom_hgs",
        "--episodes",
        "6",
        "--out",
        str(out),
        "--num-envs",
        "2",
        "--episodes-per-shard",
        "2",
    ]
    # First run is killed as soon as its first shard is durable (simulating a crash mid-run).
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.h5")) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.kill()
    finally:
        p.wait()
    first = len(EpisodeStore(out)) if (out / "store.json").exists() else 0
    assert 2 <= first <= 6
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    store = EpisodeStore(out)
    assert len(store) == 6
    assert len(set(store.episode_ids())) == 6
    # Nothing collected twice: the resumed run used other seeds, so no two episodes are identical.
    firsts = {store.load(i).frames.tobytes().__hash__() for i in store.episode_ids()}
    assert len(firsts) == 6
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "nothing to do" in res.stdout and len(EpisodeStore(out)) == 6


def test_sticky_random_policy_holds_actions():
    pol = StickyRandomPolicy(5, num_envs=64, mean_repeat=4.0, seed=0)
    acts = np.stack([pol(np.zeros((64, 1))) for _ in range(200)])
    switches = (np.diff(acts, axis=0) != 0).mean()
    # P(switch) = 1/4 and a switch redraws uniformly (1/5 keeps the same action): 0.25 * 0.8 = 0.2
    assert 0.17 < switches < 0.23
    assert set(np.unique(acts)) == set(range(5))
    with pytest.raises(ValueError, match="mean_repeat"):
        StickyRandomPolicy(5, 1, mean_repeat=0.5)


def test_collect_bad_args(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        collect("pong", tmp_path, 1)
    with pytest.raises(ValueError, match="episodes"):
        collect("vizdoom_hgs", tmp_path, 0)


def test_resume_with_other_env_settings_is_refused_unless_merged(tmp_path):
    kw = {"progress": False, "asynchronous": False, "num_envs": 1}
    out = tmp_path / "s"
    collect(
        "vizdoom_hgs", out, 1, env_kwargs={"resolution": 32, "max_episode_steps": 8, "frame_skip": 4}, **kw
    )
    before = (out / "store.json").read_text()
    with pytest.raises(StoreError, match=r"extra\.env_kwargs\.frame_skip: store has '4', got '2'"):
        collect(
            "vizdoom_hgs",
            out,
            2,
            env_kwargs={"resolution": 32, "max_episode_steps": 8, "frame_skip": 2},
            **kw,
        )
    assert (out / "store.json").read_text() == before
    r = collect(
        "vizdoom_hgs",
        out,
        2,
        env_kwargs={"resolution": 32, "max_episode_steps": 8, "frame_skip": 2},
        merge=True,
        **kw,
    )
    store = EpisodeStore(out)
    assert r.collected == 1 and len(store) == 2 and store.meta.extra["env_kwargs"]["frame_skip"] == "4"
    assert store.meta.extra["appended_with"] == [
        {"fps": 17.5, "extra.env_kwargs.frame_skip": "2"}
    ]  # 35 tics/s / 2
    assert {store.load(e).attrs["policy"] for e in store.episode_ids()} == {"random"}
