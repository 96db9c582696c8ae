"""Bring your own Gymnasium env: ``gym:<ID>`` as a real-env source (envs/gym_source.py), through collection, the
tokenizer and prior, the dream env and real-env scoring, on the toy envs of ``tests/toy_envs.py``; plus the real
Atari / CarRacing / ViZDoom ids when their extras are installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
import tests.toy_envs as toy
from envs.collect import collect
from envs.gym_source import (
    GymPixelEnv,
    NoPixelsError,
    UnsupportedActionSpace,
    make_gym_env,
    probe_gym_env,
    register_gym_preset,
)
from envs.policy import PPOConfig, real_env_kwargs, return_ratio, score_real, train_ppo
from envs.real import EnvOptions, make_real_env_fn
from worldmodel.bundle import WorldModel
from worldmodel.config import generic_preset, get_preset, safe_name
from worldmodel.stages import encode_tokens, train_prior, train_tokenizer
from worldmodel.store import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]
TOY = "gym:WorldmodelToy-v0"
TOY_BOX = "gym:WorldmodelToyBox-v0"
MODULE = "tests.toy_envs"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_atari = pytest.mark.skipif(
    not _has("ale_py"), reason="ale-py not installed (pip install -e '.[atari]')"
)
needs_box2d = pytest.mark.skipif(not _has("Box2D"), reason="box2d not installed (pip install -e '.[box2d]')")


def toy_env(name: str = TOY, **kw) -> GymPixelEnv:
    return make_gym_env(name, module=MODULE, **{"resolution": 32, "frame_skip": 1, **kw})


# ---------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize(
    "name, source",
    [
        (TOY, "key:screen"),
        ("gym:WorldmodelToyImage-v0", "obs"),
        ("gym:WorldmodelToyMD-v0", "obs"),
        ("gym:WorldmodelToyRender-v0", "render"),
    ],
)
def test_pixels_come_from_the_observation_a_dict_entry_or_render(name, source):
    env = toy_env(name, render_mode="rgb_array")
    try:
        obs, info = env.reset(seed=0)
        assert env.pixels == source and env.settings()["pixels"] == source
        assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
        full = env.render()
        assert full.shape == (toy.H, toy.W, 3)  # the frame before resizing (24x40: stretched to 32x32)
        assert obs.max() > 100  # the square
    finally:
        env.close()


def test_an_env_without_pixels_gets_an_error_naming_what_was_found():
    with pytest.raises(NoPixelsError) as e:
        toy_env("gym:WorldmodelToyNoPixels-v0")
    msg = str(e.value)
    assert (
        "gym:WorldmodelToyNoPixels-v0" in msg
        and "Box(-inf, inf, (2,), float32)" in msg
        and "render_modes []" in msg
    )
    assert "--pixels" in msg
    with pytest.raises(NoPixelsError, match=r"entry 'camera'.*\['position', 'screen'\]"):
        toy_env(TOY, pixels="key:camera")
    with pytest.raises(NoPixelsError, match="entry 'position'.*not a uint8 image"):
        toy_env(TOY, pixels="position")
    with pytest.raises(NoPixelsError, match="pixels='obs'.*Dict"):
        toy_env(TOY, pixels="obs")
    with pytest.raises(NoPixelsError, match="cannot render 'rgb_array'"):
        toy_env("gym:WorldmodelToyNoPixels-v0", pixels="render")


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="env: got 'WorldmodelToy-v0'"):
        make_gym_env("WorldmodelToy-v0")
    with pytest.raises(ValueError, match="not a registered Gymnasium id.*--env-module"):
        make_gym_env("gym:NoSuchToy-v0")
    with pytest.raises(ImportError, match="env_module: cannot import 'no_such_module_xyz'"):
        make_gym_env(TOY, module="no_such_module_xyz")
    with pytest.raises(ValueError, match="env_kwargs: got .*JSON object"):
        toy_env(make_kwargs="[1, 2]")
    with pytest.raises(ValueError, match="make_kwargs: 'render_mode' is chosen by pixels"):
        toy_env(make_kwargs={"render_mode": "rgb_array"})
    with pytest.raises(ValueError, match="unknown settings \\['health_bar'\\]"):
        make_real_env_fn(TOY, health_bar=True)
    for bad in ({"resolution": 4}, {"frame_skip": 0}, {"sticky_actions": 1.0}, {"max_episode_steps": 0}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            toy_env(**bad)
    with pytest.raises(ValueError, match="--pixels, --sticky-actions: only for gym:<ID> envs"):
        EnvOptions(pixels="obs", sticky_actions=0.1).env_kwargs_for("vizdoom_hgs")
    assert EnvOptions(frame_skip=2).env_kwargs_for("vizdoom_hgs") == {"frame_skip": 2}


# ---------------------------------------------------------------------------------------------- actions


def test_action_spaces_are_mapped_or_refused():
    env = toy_env(TOY)
    assert env.action_space == gym.spaces.Discrete(3) and env.store_action_spec().n == 3
    env.close()

    env = toy_env(TOY_BOX)
    env.reset(seed=0)
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (2,), np.float32)  # the dream's continuous space
    spec = env.store_action_spec()
    assert (
        spec.kind == "continuous" and spec.low == (-2.0, 0.0) and spec.high == (2.0, 1.0)
    )  # the env's bounds
    env.step(np.array([-1.0, 1.0], np.float32))
    np.testing.assert_allclose(env.env.unwrapped.last_action, [-2.0, 1.0])
    env.step(np.array([0.5, -1.0], np.float32))
    np.testing.assert_allclose(env.env.unwrapped.last_action, [1.0, 0.0])
    stored = env.store_actions(np.array([[0.5, -1.0], [3.0, 0.0]], np.float32))  # env units, clipped
    np.testing.assert_allclose(stored, [[1.0, 0.0], [2.0, 0.5]])
    with pytest.raises(ValueError, match="action: got .*shape \\(2,\\)"):
        env.step(np.zeros(3, np.float32))
    env.close()

    env = toy_env("gym:WorldmodelToyImage-v0")  # MultiBinary(2) -> Discrete(4): each button combination
    env.reset(seed=0)
    assert env.action_space == gym.spaces.Discrete(4) and env.store_action_spec().names == (
        "00",
        "01",
        "10",
        "11",
    )
    env.step(2)
    np.testing.assert_array_equal(env.env.unwrapped.last_action, [1, 0])
    env.close()

    env = toy_env("gym:WorldmodelToyMD-v0")  # MultiDiscrete([2, 3]) -> Discrete(6)
    env.reset(seed=0)
    assert env.action_space == gym.spaces.Discrete(6)
    env.step(5)
    np.testing.assert_array_equal(env.env.unwrapped.last_action, [1, 2])
    with pytest.raises(ValueError, match="action: got 6, expected an int in \\[0, 6\\)"):
        env.step(6)
    env.close()

    with pytest.raises(
        UnsupportedActionSpace, match="MultiBinary\\(12\\).*2\\*\\*12 button combinations.*accepted"
    ):
        toy_env("gym:WorldmodelToyBigMB-v0")
    with pytest.raises(UnsupportedActionSpace, match="unbounded dimensions.*RescaleAction"):
        toy_env("gym:WorldmodelToyFree-v0")


def test_frame_skip_sums_rewards_and_stops_at_the_end_and_sticky_actions_repeat():
    env = make_gym_env(TOY, module=MODULE, resolution=32)
    assert env.frame_skip == 4 and env.own_frame_skip == 1  # the toy does not skip frames itself: default 4
    env.reset(seed=3)
    inner = toy_env(TOY)  # the same env without frame skip, same seed: the skipped steps summed
    inner.reset(seed=3)
    for _ in range(5):
        _, r, term, trunc, info = env.step(2)
        total, steps = 0.0, 0
        for _ in range(4):
            _, r1, t1, u1, _ = inner.step(2)
            total += r1
            steps += 1
            if t1 or u1:
                break
        assert r == pytest.approx(total) and term == t1 and trunc == u1
        if term or trunc:
            break
    env.close()
    inner.close()

    sticky = toy_env(TOY, sticky_actions=0.9)  # with p = 0.9 most steps keep the first action
    sticky.reset(seed=0)
    sticky.step(2)
    kept = 0
    for _ in range(8):
        _, _, term, trunc, _ = sticky.step(0)
        kept += int(sticky.env.unwrapped.last_action == 2)
        if term or trunc:
            break
    assert kept >= 1 and sticky.settings()["sticky_actions"] == 0.9
    sticky.close()


@pytest.mark.parametrize("name", [TOY, TOY_BOX, "gym:WorldmodelToyRender-v0"])
def test_the_source_passes_the_gymnasium_and_sb3_checkers(name):
    env = toy_env(name, resolution=40)
    try:
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env)
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------- collection


def test_collect_keeps_terminated_and_truncated_apart_and_records_the_env(tmp_path):
    r = collect(
        TOY,
        tmp_path / "s",
        10,
        num_envs=2,
        seed=0,
        progress=False,
        asynchronous=False,
        env_kwargs={"module": MODULE, "resolution": 32, "frame_skip": 1, "make_kwargs": {}},
    )
    store = EpisodeStore(tmp_path / "s")
    assert (
        len(store) == 10 == r.collected and store.meta.source == TOY and store.meta.obs_shape == (32, 32, 3)
    )
    ends = {"terminated": 0, "truncated": 0}
    for ep in store.iter_episodes():
        assert not ep.terminated[:-1].any()
        if ep.terminated[-1]:
            assert not ep.truncated and ep.rewards[-1] == toy.TERMINAL_REWARD
            ends["terminated"] += 1
        else:
            assert ep.truncated and len(ep) == toy.MAX_STEPS + 1  # the TimeLimit: 12 steps, 13 frames
            ends["truncated"] += 1
        assert ep.actions.dtype == np.int64 and set(ep.actions) <= {0, 1, 2}
    assert ends["terminated"] and ends["truncated"], ends  # random play gives both endings
    extra = store.meta.extra
    assert extra["env"] == TOY
    assert extra["env_kwargs"] == {
        "module": MODULE,
        "make_kwargs": {},
        "pixels": "key:screen",
        "resolution": 32,
        "frame_skip": 1,
        "sticky_actions": 0.0,
        "max_episode_steps": None,
    }
    gym_meta = extra["gym"]
    assert gym_meta["id"] == "WorldmodelToy-v0" and gym_meta["action_mapping"] == "discrete"
    assert "'screen': Box(0, 255, (24, 40, 3), uint8)" in gym_meta["observation_space"]
    assert gym_meta["spec_max_episode_steps"] == toy.MAX_STEPS and gym_meta["episode_limit"] == toy.MAX_STEPS
    assert "stretched" in gym_meta["resize"]
    # appending with other wrapper settings names them
    from worldmodel.store import StoreError

    with pytest.raises(StoreError, match="extra.env_kwargs.frame_skip"):
        collect(
            TOY,
            tmp_path / "s",
            12,
            progress=False,
            asynchronous=False,
            num_envs=1,
            env_kwargs={"module": MODULE, "resolution": 32, "frame_skip": 2},
        )


def test_collect_box_actions_in_the_env_units(tmp_path):
    collect(
        TOY_BOX,
        tmp_path / "b",
        3,
        num_envs=2,
        progress=False,
        asynchronous=True,  # env worker processes
        env_kwargs={"module": MODULE, "resolution": 32, "frame_skip": 1},
    )
    store = EpisodeStore(tmp_path / "b")
    spec = store.meta.action_spec
    assert spec.kind == "continuous" and spec.dim == 2 and spec.low == (-2.0, 0.0) and spec.high == (2.0, 1.0)
    acts = np.concatenate([ep.actions for ep in store.iter_episodes()])
    assert acts.dtype == np.float32 and acts.shape[1] == 2
    assert (acts >= np.array(spec.low) - 1e-6).all() and (acts <= np.array(spec.high) + 1e-6).all()
    assert (
        acts[:, 1].min() >= 0 and acts[:, 0].min() < 0 < acts[:, 0].max()
    )  # the env's own units, not [-1, 1]


# ---------------------------------------------------------------------------------------------- the pipeline


def _micro(cfg, store: Path):
    from tests.conftest import tiny_experiment

    t = tiny_experiment(store, name=cfg.name)
    return replace(
        cfg,
        data=replace(cfg.data, store=str(store), clip_len=4),
        tokenizer=replace(t.tokenizer, resolution=cfg.tokenizer.resolution),
        prior=replace(t.prior, reward_given_termination=True),
        tokenizer_train=replace(t.tokenizer_train, steps=2),
        prior_train=replace(t.prior_train, steps=2),
    )


@pytest.mark.parametrize("name", [TOY, TOY_BOX])
def test_collect_tokenizer_prior_dream_and_real_scoring(tmp_path, name, one_thread):
    kw = {"module": MODULE, "frame_skip": 1}
    register_gym_preset(name, **kw)  # the generic preset from the env's spaces
    cfg = get_preset(name, "tiny")
    assert cfg.data.resolution == 24  # bounded by the 24x40 frames: no upsampling
    assert cfg.prior.action_kind == ("discrete" if name == TOY else "continuous")
    # 64x64 frames: SB3's CnnPolicy needs them
    cfg = replace(cfg, data=replace(cfg.data, resolution=64), tokenizer=replace(cfg.tokenizer, resolution=64))
    store = tmp_path / safe_name(name)
    collect(
        name, store, 8, num_envs=2, progress=False, asynchronous=False, env_kwargs={**kw, "resolution": 64}
    )
    cfg = _micro(cfg, store)
    run = tmp_path / "run"
    train_tokenizer(cfg, run, progress=False)
    encode_tokens(cfg, run, progress=False)
    train_prior(cfg, run, progress=False)

    dream = gym.make("VideoGPTDream-v0", checkpoint=str(run))  # every bundle, by its directory
    real = make_gym_env(name, resolution=64, **real_env_kwargs(WorldModel.from_pretrained(run)))
    try:
        assert dream.observation_space == real.observation_space
        assert dream.action_space == real.action_space  # Discrete(3), or Box(-1, 1, (2,)) for both
        gym_check_env(dream.unwrapped, skip_render_check=True)
        sb3_check_env(dream.unwrapped)
    finally:
        dream.close()
        real.close()
    wm = WorldModel.from_pretrained(run)
    kw_real = real_env_kwargs(wm)
    assert kw_real["module"] == MODULE and kw_real["pixels"] == "key:screen" and "resolution" not in kw_real
    random = score_real(None, name, 64, 2, seed=0, **kw_real)
    model, venv = train_ppo(
        wm,
        32,
        num_envs=2,
        seed=0,
        max_episode_steps=6,
        progress_bar=False,
        ppo=PPOConfig(n_steps=16, batch_size=32, n_epochs=1),
    )
    venv.close()
    trained = score_real(
        model, name, 64, 2, seed=0, **kw_real
    )  # the dream-trained policy in the same real env
    assert random.episodes == trained.episodes == 2 and 1 <= trained.mean_length <= toy.MAX_STEPS


def test_generic_preset_from_the_spaces():
    cfg = generic_preset("gym:X-v0", "tiny", frame_size=210, action_kind="discrete", n_actions=6)
    assert (cfg.data.resolution, cfg.tokenizer.resolution, cfg.tokenizer.stride) == (64, 64, (1, 8, 8))
    assert (
        cfg.prior.n_actions == 6 and cfg.prior.reward_given_termination and cfg.data.store == "data/gym-X-v0"
    )
    assert generic_preset("gym:X-v0", "paper", frame_size=96).data.resolution == 96
    assert generic_preset("gym:X-v0", "paper", frame_size=300).data.resolution == 128
    assert get_preset("gym:Unprobed-v1", "small").env == "gym:Unprobed-v1"  # without a probe: the defaults
    found = probe_gym_env(TOY_BOX, module=MODULE)
    assert found.frame_hw == (toy.H, toy.W) and found.action_spec.dim == 2


# ---------------------------------------------------------------------------------------------- dream ids


def test_dream_time_limits_and_return_ratios():
    assert envs.episode_limit("vizdoom_take_cover") == 525
    assert envs.episode_limit("gym:CarRacing-v3", {"extra": {"gym": {"episode_limit": 250}}}) == 250
    assert envs.episode_limit("gym:X-v0", {"extra": {"gym": {"episode_limit": None}}}) is None
    assert envs.episode_limit("gym:X-v0") is None
    # a ratio of returns only where the baseline is positive (CarRacing's random policy scores about -24)
    assert return_ratio(3.0, 2.0) == 1.5
    assert return_ratio(-35.4, -24.1) is None and return_ratio(1.0, 0.0) is None


def test_dream_names_are_deterministic_and_apart_from_the_fixed_ids():
    assert envs.dream_name("gym:ALE/Pong-v5") == "GymALEPongV5"
    assert envs.id_for_preset("gym:CarRacing-v3") == "VideoGPTDream-GymCarRacingV3-v0"
    assert (
        envs.dream_name("gym:VizdoomTakeCover-v1")
        == "GymVizdoomTakeCoverV1"
        != envs.dream_name("vizdoom_take_cover")
    )
    assert envs.id_for_preset("vizdoom_hgs") == "VideoGPTDream-VizdoomHGS-v0"
    with pytest.raises(ValueError, match="has no dream env id"):
        envs.id_for_preset("ucf101")
    with pytest.raises(ValueError, match="checkpoint: required"):
        gym.make("VideoGPTDream-v0")


def test_import_envs_registers_ids_of_gym_bundles_under_runs(tmp_path, monkeypatch):
    from tests.conftest import make_bundle, tiny_experiment

    store = tmp_path / "store"
    collect(
        TOY,
        store,
        3,
        num_envs=1,
        progress=False,
        asynchronous=False,
        env_kwargs={"module": MODULE, "resolution": 32, "frame_skip": 1, "max_episode_steps": 7},
    )
    home = tmp_path / "home"
    cfg = replace(tiny_experiment(store, name=TOY), env=TOY)
    make_bundle(cfg, home / "runs" / f"{safe_name(TOY)}-tiny")
    (home / "runs" / "not-a-bundle").mkdir()
    (home / "runs" / "broken").mkdir()
    (home / "runs" / "broken" / "config.json").write_text("{not json")
    env_id = "VideoGPTDream-GymWorldmodelToyV0-v0"
    # a fresh interpreter: `import envs` finds the bundle under $WORLDMODEL_HOME/runs
    code = (
        "import warnings, envs, gymnasium as gym\n"
        f"e = gym.make({env_id!r})\n"
        "o, _ = e.reset(seed=0)\n"
        "print(e.spec.max_episode_steps, o.shape, e.unwrapped.world_model.path.name)\n"
    )
    env = {
        **os.environ,
        "WORLDMODEL_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == [
        "7",
        "(32,",
        "32,",
        "3)",
        f"{safe_name(TOY)}-tiny",
    ]  # the real env's episode cap
    assert "skipping bundle" in res.stderr and "broken" in res.stderr
    # in this process: register_bundle_ids picks up bundles trained after the import
    monkeypatch.setenv("WORLDMODEL_HOME", str(home))
    try:
        with pytest.warns(UserWarning, match="skipping bundle"):
            assert envs.register_bundle_ids() == {env_id: TOY}
        assert gym.spec(env_id).kwargs == {"preset": TOY}
    finally:
        gym.registry.pop(env_id, None)


# ---------------------------------------------------------------------------------------------- CLIs


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLDMODEL_HOME": "",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("WORLDMODEL_HOME")
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_train_then_policy_scored_in_the_real_env(tmp_path):
    from tests.test_readme_commands import POLICY_MICRO, train_micro

    train = _run(
        [
            str(ROOT / "experiments/train.py"),
            "--env",
            TOY,
            "--env-module",
            MODULE,
            "--frame-skip",
            "1",
            *train_micro(2),
            "--config.collect-episodes",
            "6",
            "--config.data.resolution",
            "64",
            "--no-rollout-videos",
        ],
        tmp_path,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    run = tmp_path / "runs" / "gym-WorldmodelToy-v0-tiny"
    store = EpisodeStore(tmp_path / "data" / "gym-WorldmodelToy-v0")
    assert len(store) == 6 and store.meta.obs_shape == (64, 64, 3)
    summary = train.stdout.split("== summary ==")[1]
    assert "VideoGPTDream-GymWorldmodelToyV0-v0" in summary and str(run.resolve()) in summary
    i = POLICY_MICRO.index("--max-episode-steps")  # no cap given: the dream's is the real env's own
    micro = POLICY_MICRO[:i] + POLICY_MICRO[i + 2 :]
    pol = _run([str(ROOT / "experiments/train_policy.py"), "--env", TOY, "--eval-real", *micro], tmp_path)
    assert pol.returncode == 0, pol.stdout[-2000:] + pol.stderr[-3000:]
    report = json.loads(pol.stdout.strip().splitlines()[-1])
    assert {"real_ppo", "real_random", "dream_ppo", "real_return_minus_random"} <= set(report)
    # the dream's episodes end where the real env's do: the toy's TimeLimit, not ViZDoom's 525
    full = json.loads((run / "policies" / "ppo_dream.eval.json").read_text())
    assert full["max_episode_steps"] == toy.MAX_STEPS
    assert all(s["dream"]["mean_length"] <= toy.MAX_STEPS for s in full["scores"].values())
    bad = _run(
        [
            str(ROOT / "experiments/collect.py"),
            "--env",
            "gym:WorldmodelToyNoPixels-v0",
            "--env-module",
            MODULE,
            "--episodes",
            "1",
        ],
        tmp_path,
    )
    assert bad.returncode != 0 and "has no pixels" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------- real ids


def test_missing_extras_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # import ale_py fails as if not installed
    with pytest.raises(ImportError, match=r"install the 'atari' extra: pip install .*\.\[atari\]"):
        make_gym_env("gym:ALE/Pong-v5")
    monkeypatch.setitem(sys.modules, "Box2D", None)
    for mod in [m for m in sys.modules if m.startswith("gymnasium.envs.box2d")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(ImportError, match=r"'box2d' extra"):
        make_gym_env("gym:CarRacing-v3")


@needs_atari
def test_atari_pong():
    env = make_gym_env("gym:ALE/Pong-v5")
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (64, 64, 3) and env.pixels == "obs" and env.module == "ale_py"
        assert env.frame_skip == 1 and env.own_frame_skip == 4  # ALE v5 skips 4 frames itself
        assert env.store_action_spec().names[:2] == ("NOOP", "FIRE")
        assert env.description()["spec_kwargs"]["repeat_action_probability"] == 0.25
        env.step(1)
    finally:
        env.close()


@needs_box2d
def test_car_racing_box_actions():
    env = make_gym_env("gym:CarRacing-v3", max_episode_steps=3)
    try:
        env.reset(seed=0)
        assert env.action_space == gym.spaces.Box(-1.0, 1.0, (3,), np.float32) and env.frame_skip == 4
        spec = env.store_action_spec()
        assert spec.low == (-1.0, 0.0, 0.0) and spec.high == (1.0, 1.0, 1.0)
        for _ in range(3):
            _, _, term, trunc, _ = env.step(np.zeros(3, np.float32))
        assert trunc and not term
    finally:
        env.close()


def test_vizdoom_gymnasium_id_dict_screen():
    env = make_gym_env("gym:VizdoomDefendCenter-v1")
    try:
        obs, _ = env.reset(seed=0)
        assert (
            env.pixels == "key:screen"
            and env.module == "vizdoom.gymnasium_wrapper"
            and obs.shape == (64, 64, 3)
        )
        assert env.action_space == gym.spaces.Discrete(4) and env.frame_skip == 4
        env.step(0)
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------- README


def test_readme_own_env_commands_name_real_scripts_and_flags():
    """The "Your own env" section's commands parse (flags exist; the envs are not made here) and its ids follow
    dream_name. Running them is the tiny runs' job; test_cli_train_then_policy_scored_in_the_real_env runs the same
    scripts end to end on a toy env."""
    import importlib.util
    import re
    import shlex

    import tyro

    from tests.test_readme_commands import README, _sections

    body = _sections(README.read_text())["Your own env"]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", body, flags=re.M | re.S)
    lines = [ln for lang, code in blocks if lang == "bash" for ln in code.splitlines() if ln.strip()]
    assert len(lines) >= 6
    for line in lines:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "python" and argv[1].startswith("experiments/"), line
        spec = importlib.util.spec_from_file_location(f"_readme_{Path(argv[1]).stem}", ROOT / argv[1])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses and tyro look the module up to resolve annotations
        try:
            spec.loader.exec_module(mod)
            args = tyro.cli(mod.Args, args=argv[2:])
        finally:
            del sys.modules[spec.name]
        assert args.env.startswith("gym:"), line
    (python,) = [code for lang, code in blocks if lang == "python"]
    for env_id in re.findall(r'gym\.make\("(VideoGPTDream-[^"]+)"', python):
        assert env_id == "VideoGPTDream-v0" or env_id in {
            envs.id_for_preset(p) for p in ("gym:ALE/Pong-v5",)
        }, env_id
