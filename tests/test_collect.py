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


# ---------------------------------------------------------------------------------------------- controller policies


def _alternating_controller(bundle: Path, out: Path) -> Path:
    """A colour-key controller (Take Cover) that mostly alternates its action (it reads its previous action:
    0.5 - a_{t-1}, so an episode that does not start with a clean memory shows) and also reads the frames."""
    from envs.controller import (
        CMAESConfig,
        LinearController,
        controller_config,
        make_features,
        save_controller,
    )
    from worldmodel.bundle import WorldModel

    wm = WorldModel.from_pretrained(bundle)
    ccfg = controller_config(wm, 2, CMAESConfig(features="color_keys", last_action=True, motion=False))
    p = np.random.default_rng(0).normal(0, 0.3, ccfg.n_params).astype(np.float32)
    p[-2], p[-1] = -1.0, 0.5
    return save_controller(LinearController(ccfg, make_features(wm, ccfg), p), out)


def _replayed_actions(ctrl_dir: Path, bundle: Path, frames: np.ndarray) -> np.ndarray:
    """The controller's own actions on an episode's stored frames (a fresh memory at its first frame)."""
    from envs.controller import load_controller
    from worldmodel.bundle import WorldModel

    ctrl = load_controller(ctrl_dir, WorldModel.from_pretrained(bundle))
    return np.concatenate([ctrl.act(frames[t : t + 1]) for t in range(len(frames) - 1)])


def test_collect_with_a_controller_follows_it_and_epsilon_replaces_its_actions(tc_bundle, tmp_path):
    ctrl_dir = _alternating_controller(tc_bundle, tmp_path / "ctrl")
    kw = {
        "num_envs": 2,  # 3 episodes in 2 envs: one env starts a second episode (the controller's memory resets)
        "asynchronous": False,
        "progress": False,
        "checkpoint": tc_bundle,
        "env_kwargs": {"resolution": 32, "max_episode_steps": 12},
    }
    collect("vizdoom_take_cover", tmp_path / "s0", 3, policy=str(ctrl_dir), seed=3, **kw)
    store = EpisodeStore(tmp_path / "s0")
    for eid in store.episode_ids():
        ep = store.load(eid)
        assert ep.attrs["policy"] == str(ctrl_dir) and ep.attrs["policy_kind"] == "controller"
        assert ep.attrs["epsilon"] == 0.0
        np.testing.assert_array_equal(ep.actions, _replayed_actions(ctrl_dir, tc_bundle, ep.frames))

    eps = 0.4
    runs = []
    for out in ("s1", "s2"):  # the same seed twice: the same random replacements
        collect(
            "vizdoom_take_cover",
            tmp_path / out,
            6,
            policy=str(ctrl_dir),
            seed=5,
            epsilon=eps,
            **{**kw, "env_kwargs": {"resolution": 32, "max_episode_steps": 40}},
        )
        st = EpisodeStore(tmp_path / out)
        runs.append([st.load(e) for e in st.episode_ids()])
    differ = total = 0
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.attrs["epsilon"] == eps and a.attrs["policy_kind"] == "controller"
        differ += int((a.actions != _replayed_actions(ctrl_dir, tc_bundle, a.frames)).sum())
        total += len(a.actions)
    # a uniform random action of 2 differs from the controller's half the time: expected rate eps / 2
    assert total >= 150 and 0.5 * eps / 2 < differ / total < 1.5 * eps / 2, (differ, total)


def test_collect_with_a_latent_controller_acts_on_the_tracked_latents(tc_bundle, tmp_path):
    """A controller that reads the world model's latent state collects: the bundle follows each env's real frames
    and the actions taken, so replaying the stored episode through a fresh tracker gives every stored action."""
    from envs.controller import (
        CMAESConfig,
        LinearController,
        controller_config,
        load_controller,
        make_features,
        save_controller,
    )
    from envs.latent import LatentTracker
    from worldmodel.bundle import WorldModel

    wm = WorldModel.from_pretrained(tc_bundle)
    ccfg = controller_config(wm, 2, CMAESConfig(features="latent", last_action=True, motion=False))
    p = np.random.default_rng(1).normal(0, 1.0, ccfg.n_params).astype(np.float32)
    feats = make_features(wm, ccfg).fit(wm, EpisodeStore(wm.store_path), n_frames=64)  # unit-scale features
    ctrl_dir = save_controller(LinearController(ccfg, feats, p), tmp_path / "ctrl")
    collect(
        "vizdoom_take_cover",
        tmp_path / "s",
        3,
        policy=str(ctrl_dir),
        seed=2,
        num_envs=2,  # one env starts a second episode: its tracker row and the controller's memory restart
        asynchronous=False,
        progress=False,
        checkpoint=tc_bundle,
        env_kwargs={"resolution": 32, "max_episode_steps": 12},
    )
    store = EpisodeStore(tmp_path / "s")
    both = 0
    for eid in store.episode_ids():
        ep = store.load(eid)
        assert ep.attrs["policy_kind"] == "controller"
        ctrl, tracker = load_controller(ctrl_dir, wm), LatentTracker(wm, 1)
        replay = [ctrl.act(tracker.reset(ep.frames[:1]))]
        for t in range(1, len(ep.actions)):
            replay.append(ctrl.act(tracker.step(ep.frames[t : t + 1], ep.actions[t - 1 : t])))
        np.testing.assert_array_equal(ep.actions, np.concatenate(replay))
        both += len(set(ep.actions.tolist())) == 2
    assert both >= 1  # the latents do steer it: not a constant action


def test_collect_controller_errors_name_the_argument(tc_bundle, tmp_path):
    ctrl_dir = _alternating_controller(tc_bundle, tmp_path / "ctrl")
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="checkpoint: policy .* is a controller directory"):
        collect("vizdoom_take_cover", out, 1, policy=str(ctrl_dir), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without a controller.json; expected 'random', a policy file"):
        collect("vizdoom_take_cover", out, 1, policy=str(tmp_path / "empty"), checkpoint=tc_bundle)
    with pytest.raises(ValueError, match="checkpoint: only a controller"):
        collect("vizdoom_take_cover", out, 1, checkpoint=tc_bundle)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"epsilon: got .*, expected a probability in \[0, 1\]"):
            collect("vizdoom_take_cover", out, 1, epsilon=bad)
    assert not out.exists()  # every error came before any engine or store
    res = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "collect.py"), "--env", "vizdoom_take_cover"]
        + ["--out", str(out), "--episodes", "1", "--policy", str(ctrl_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "error: checkpoint: policy" in res.stderr and "--checkpoint" in res.stderr
    assert not out.exists()
