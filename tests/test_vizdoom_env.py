"""Real ViZDoom envs (no mocks): checker, determinism, rewards, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.vizdoom import (
    BATTLE2_REWARD_WEIGHTS,
    VizdoomEnv,
    action_names,
    make_real_env,
    make_real_env_fn,
    packaged_battle2_path,
)

KW = {
    "vizdoom_hgs": {},
    "vizdoom_battle2": {},
    "vizdoom_take_cover": {},
}  # Battle2: the map shipped with the package
N_ACTIONS = {"vizdoom_hgs": 5, "vizdoom_battle2": 8, "vizdoom_take_cover": 2}


@pytest.mark.parametrize("name", list(KW))
def test_env_checker_passes_without_warnings(name):
    env = make_real_env(name, **KW[name], render_mode="rgb_array")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(
                env, skip_render_check=True
            )  # render is checked below; the render-mode check needs a spec
        ours = [w for w in caught if "envs" in str(w.filename) or "gymnasium" in str(w.filename)]
        assert not ours, [str(w.message) for w in ours]
        assert env.observation_space.shape == (64, 64, 3) and env.observation_space.dtype == np.uint8
        assert env.action_space.n == len(action_names(name)) == N_ACTIONS[name]
        assert env.render().shape == (120, 160, 3)
    finally:
        env.close()


@pytest.mark.parametrize("name", list(KW))
def test_same_seed_same_trajectory(name):
    def run(seed):
        env = make_real_env(name, **KW[name], resolution=32)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        for a in [2, 2, 0, 3, 4, 1, 2, 2]:
            frames.append(env.step(a % N_ACTIONS[name])[0])
        env.close()
        return np.stack(frames)

    a, b = run(7), run(7)
    assert a.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.diff(a.astype(int), axis=0)).sum() > 0  # the actions changed the view


def test_hgs_rewards_and_death():
    env = make_real_env("vizdoom_hgs", frame_skip=4)
    env.reset(seed=3)
    rewards, term, trunc, steps = [], False, False, 0
    while not (term or trunc):
        _, r, term, trunc, info = env.step(0)  # spinning in place never reaches a medikit
        rewards.append(r)
        steps += 1
    env.close()
    assert term and not trunc  # death, well before the 2100-tic timeout
    np.testing.assert_allclose(rewards[:-1], 4.0)  # +1 per tic alive × frame skip 4
    assert rewards[-1] < -90  # the -100 death penalty lands on the last step
    assert steps < 2100 // 4


def test_max_episode_steps_truncates():
    env = make_real_env("vizdoom_hgs", max_episode_steps=5)
    env.reset(seed=0)
    out = [env.step(2) for _ in range(5)]
    assert [o[3] for o in out] == [False] * 4 + [True] and not any(o[2] for o in out)
    env.close()


def test_battle2_reward_follows_game_variable_formula():
    env = make_real_env("vizdoom_battle2", **KW["vizdoom_battle2"])
    _, info = env.reset(seed=1)
    prev = info
    checked = 0
    rng = np.random.default_rng(0)
    for _ in range(150):
        _, r, term, trunc, info = env.step(int(rng.integers(0, 8)))
        if term or trunc:
            break
        expected = sum(w * (info[k] - prev[k]) for k, w in BATTLE2_REWARD_WEIGHTS.items())
        assert r == pytest.approx(expected)
        checked += 1
        prev = info
    env.close()
    assert checked > 20


def test_battle2_missing_map_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VIZDOOM_BATTLE2_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="missing D4_battle2.wad, D4_battle2.cfg.*--battle2-path"):
        make_real_env("vizdoom_battle2", battle2_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        make_real_env_fn("vizdoom_battle2", battle2_path=tmp_path)
    monkeypatch.setenv("VIZDOOM_BATTLE2_PATH", str(tmp_path))  # the environment variable is honoured too
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        make_real_env("vizdoom_battle2")


def test_battle2_map_ships_with_the_package(monkeypatch):
    monkeypatch.delenv("VIZDOOM_BATTLE2_PATH", raising=False)
    root = packaged_battle2_path()
    assert root.is_relative_to(Path(envs.__file__).parent)
    assert {"D4_battle2.wad", "D4_battle2.cfg", "LICENSE"} <= {p.name for p in root.iterdir()}
    assert "MIT" in (root / "LICENSE").read_text()
    env = make_real_env("vizdoom_battle2")  # no path anywhere: the packaged map
    assert env.action_space.n == 8
    env.close()


def test_bad_action_raises_and_env_stays_usable():
    env = VizdoomEnv("vizdoom_hgs")
    env.reset(seed=0)
    for bad in (5, -1, 1.5, "left"):
        with pytest.raises(ValueError, match=r"expected an int in \[0, 5\)"):
            env.step(bad)
    obs, r, *_ = env.step(2)
    assert obs.shape == (64, 64, 3) and r == 4.0
    env.close()
    with pytest.raises(ValueError, match="expected one of"):
        VizdoomEnv("doom3")


def test_health_bar_shows_health():
    env = make_real_env("vizdoom_hgs", health_bar=True, seed=0)
    plain = make_real_env("vizdoom_hgs", health_bar=False, seed=0)
    obs, info = env.reset(seed=3)
    ref, _ = plain.reset(seed=3)
    for _ in range(12):  # the acid floor drains health: the bar shrinks
        obs, _, term, trunc, info = env.step(2)
        ref, *_ = plain.step(2)
    bar = obs[-4:]  # 64 // 16 rows
    width = int(round(64 * info["HEALTH"] / 100))
    assert 0 < width < 64
    assert (bar[:, :width] == (255, 0, 0)).all() and (bar[:, width:] == 0).all()
    assert np.array_equal(obs[:-4], ref[:-4])  # the rest of the frame is the plain observation
    env.close()
    plain.close()


def test_take_cover_rewards_death_and_cap():
    """+1 per tic alive (×4 per step); standing still, fireballs kill well before the 2100-tic cap."""
    env = make_real_env("vizdoom_take_cover")
    assert action_names("vizdoom_take_cover") == ["move_left", "move_right"]
    lengths = []
    for seed in range(3):
        env.reset(seed=seed)
        rewards, term, trunc = [], False, False
        while not (term or trunc):
            _, r, term, trunc, info = env.step(len(rewards) % 2)  # left, right, left...: about in place
            rewards.append(r)
        assert term and not trunc  # death ends the episode
        np.testing.assert_allclose(rewards[:-1], 4.0)
        lengths.append(len(rewards))
    assert env.game.get_episode_timeout() == 2100  # World Models' cap; the scenario itself has none
    env.close()
    assert max(lengths) < 2100 // 4 and len(set(lengths)) > 1  # seeds give different games


@pytest.mark.parametrize("name", list(KW))
def test_spaces_without_an_engine_match_the_real_env(name):
    from envs.vizdoom import RealEnvSpaces

    env = make_real_env(name, resolution=32, frame_skip=2)
    try:
        spaces = RealEnvSpaces(name, resolution=32, frame_skip=2)
        assert spaces.observation_space == env.observation_space and spaces.action_space == env.action_space
        assert spaces.metadata == env.metadata
    finally:
        env.close()
    with pytest.raises(RuntimeError, match="spaces only"):
        spaces.reset()
    with pytest.raises(ValueError, match="resolution must be >= 8"):
        RealEnvSpaces(name, resolution=4)
    # a factory made for AsyncVectorEnv hands its creator the spaces only; any other process gets the real env
    assert isinstance(make_real_env_fn(name, engines_in_workers=True, resolution=32)(), RealEnvSpaces)


def test_engines_starting_together_in_a_fresh_directory(tmp_path, monkeypatch):
    """Four env workers start their engines at once in a directory without ``_vizdoom/``: the engine's own
    check-then-create of that directory raced there (one worker died with "File exists", a reset pipe for the
    parent); every worker must come up and step."""
    import gymnasium as gym

    monkeypatch.chdir(tmp_path)
    for attempt in range(2):  # a fresh directory each time: the race is only on its creation
        workdir = tmp_path / f"fresh{attempt}"
        workdir.mkdir()
        monkeypatch.chdir(workdir)
        venv = gym.vector.AsyncVectorEnv(
            [make_real_env_fn("vizdoom_take_cover", resolution=32, engines_in_workers=True) for _ in range(4)]
        )
        try:
            obs, _ = venv.reset(seed=attempt)
            obs, *_ = venv.step(np.zeros(4, dtype=np.int64))
            assert obs.shape == (4, 32, 32, 3)
        finally:
            venv.close()
        assert (workdir / "_vizdoom").is_dir()
