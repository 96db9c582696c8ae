"""Dream envs: registration, checkers, seeding, vector env vs single envs, SB3 adapter and PPO, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.collect import collect
from envs.dream import DreamEnv
from envs.sb3_vec import DreamVecEnv
from tests.conftest import TINY_RES, make_bundle, tiny_experiment, write_continuous_store
from worldmodel.bundle import WorldModel
from worldmodel.prior_heads import symlog
from worldmodel.store import EpisodeStore

HGS = "VideoGPTDream-VizdoomHGS-v0"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bundle):
    """One bundle per registered id (random weights): HGS, Battle2, Take Cover on real data, BAIR/RoboNet-like continuous."""
    root = tmp_path_factory.mktemp("dream_bundles")
    b2_store = root / "b2_store"
    collect(
        "vizdoom_battle2",
        b2_store,
        3,
        num_envs=1,
        asynchronous=False,
        progress=False,
        env_kwargs={"resolution": TINY_RES, "max_episode_steps": 12},
    )
    tc_store = root / "tc_store"
    collect(
        "vizdoom_take_cover",
        tc_store,
        3,
        num_envs=1,
        asynchronous=False,
        progress=False,
        env_kwargs={"resolution": TINY_RES, "max_episode_steps": 12},
    )
    out = {
        "VizdoomHGS": tiny_bundle,
        "VizdoomBattle2": make_bundle(tiny_experiment(b2_store, name="vizdoom_battle2"), root / "b2"),
        "VizdoomTakeCover": make_bundle(tiny_experiment(tc_store, name="vizdoom_take_cover"), root / "tc"),
    }
    for name, preset, dim in (("BAIR", "bair", 4), ("RoboNet", "robonet", 5)):
        store = write_continuous_store(root / f"{preset}_store", source=preset, dim=dim)
        out[name] = make_bundle(tiny_experiment(store, name=preset), root / preset)
    return out


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory, hgs_store):
    """A vizdoom_hgs bundle (random weights) whose reward head predicts a reward for each outcome of a step
    (``reward_given_termination``, as the ViZDoom presets)."""
    cfg = tiny_experiment(hgs_store)
    return make_bundle(
        replace(cfg, prior=replace(cfg.prior, reward_given_termination=True)),
        tmp_path_factory.mktemp("split_bundle") / "vizdoom_hgs-tiny",
    )


def _run(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    frames, rewards = [obs], []
    for a in actions:
        obs, r, *_ = env.step(a)
        frames.append(obs)
        rewards.append(r)
    return np.stack(frames), np.array(rewards)


@pytest.mark.parametrize("name", list(envs.DREAM_IDS))
def test_every_id_passes_gymnasium_checker(bundles, name):
    env = gym.make(envs.dream_id(name), checkpoint=bundles[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=True)
    complaints = [
        str(w.message) for w in caught if "no held-out episodes" not in str(w.message)
    ]  # 3-episode store
    assert not complaints, complaints
    spec = envs.DREAM_IDS[name]
    assert env.spec.max_episode_steps == spec[1] and env.unwrapped.world_model.cfg.name == spec[0]
    if name in ("BAIR", "RoboNet"):
        assert isinstance(env.action_space, gym.spaces.Box) and env.action_space.shape == (
            (4,) if name == "BAIR" else (5,)
        )
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
        # [-1, 1] maps onto the data's range recorded in the bundle
        core = env.unwrapped.core
        assert np.allclose(core.check_actions(-np.ones((1, core.spec.dim))), core.a_low)
        assert np.all(core.a_low < 0) and np.all(core.a_high > 0)
    else:
        assert isinstance(env.action_space, gym.spaces.Discrete)
        assert env.action_space.n == {"VizdoomHGS": 5, "VizdoomTakeCover": 2}.get(name, 8)
    env.close()


def test_gymnasium_checker_with_split_reward_head(split_bundle):
    env = gym.make(HGS, checkpoint=split_bundle)
    assert env.unwrapped.world_model.prior.reward_head[-1].out_features == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=True)
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    env.reset(seed=0)
    _, r, terminated, _, info = env.step(0)
    assert r == (info["reward_if_terminated"] if terminated else info["reward_if_not_terminated"])
    env.close()


def test_dream_reward_is_the_terminal_reward_exactly_when_terminated(split_bundle):
    """The env reports the bundle's reward of the outcome it drew: forced termination (p ~ 1) gives the
    bundle's terminal reward, forced continuation (p ~ 0) the other one, p = 0.5 each where it falls."""
    wm = WorldModel.from_pretrained(split_bundle)
    term = wm.prior.term_head[-1]
    with torch.no_grad():  # outputs ~ +4 / ~ -100 (random weights on top), and a constant termination logit
        wm.prior.reward_head[-1].bias.copy_(symlog(torch.tensor([4.0, -100.0])))
        term.weight.zero_()
    store = EpisodeStore(wm.store_path)
    ctx = store.read_clip(store.episode_ids()[0], 0, 1)["frames"]  # (1, H, W, 3)
    for bias, mode in ((20.0, "sample"), (20.0, "threshold"), (-20.0, "sample")):
        with torch.no_grad():
            term.bias.fill_(bias)
        env = DreamEnv(world_model=wm, temperature=0.0, termination=mode)
        ref = wm.rollout(1)  # the bundle stepped directly, greedy: the same dream as the env's
        for a in (0, 3, 1, 4):
            env.reset(seed=a, options={"frames": ctx})
            ref.reset(ctx[None])
            obs, r, terminated, _, info = env.step(a)
            want = ref.step(np.array([a]), temperature=0.0)
            assert np.array_equal(obs, want.frames[0]) and terminated is (bias > 0), (bias, mode, a)
            r_term, r_cont = float(want.rewards_if_terminated[0]), float(want.rewards[0])
            assert r_term < -50 and r_cont > 2
            assert r == (r_term if terminated else r_cont)  # exactly the bundle's value
            assert (info["reward_if_terminated"], info["reward_if_not_terminated"]) == (r_term, r_cont)
            p = info["terminated_prob"]
            assert info["expected_reward"] == pytest.approx(p * r_term + (1 - p) * r_cont, rel=1e-5)
    with torch.no_grad():
        term.bias.fill_(0.0)  # p = 0.5: both outcomes, row by row, in the SB3 adapter PPO trains on
    venv = DreamVecEnv(16, world_model=wm)
    venv.seed(0)
    venv.reset()
    ends = []
    for _ in range(3):
        _, rew, done, infos = venv.step(np.zeros(16, np.int64))
        for i, info in enumerate(infos):
            assert info["terminated_prob"] == 0.5
            assert rew[i] == np.float32(
                info["reward_if_terminated"] if done[i] else info["reward_if_not_terminated"]
            )
            assert (rew[i] < -50) == bool(done[i])
        ends += done.tolist()
    assert 0 < sum(ends) < len(ends)


def test_sb3_checker_without_warnings(tiny_bundle64):
    env = DreamEnv(checkpoint=tiny_bundle64, preset="vizdoom_hgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env)
    assert not caught, [str(w.message) for w in caught]


def test_same_seed_same_episode(tiny_bundle):
    a = gym.make(HGS, checkpoint=tiny_bundle)
    b = gym.make(HGS, checkpoint=tiny_bundle)
    acts = [0, 1, 2, 3, 4, 2, 2, 0]
    fa, ra = _run(a, acts, seed=7)
    fb, rb = _run(b, acts, seed=7)
    assert np.array_equal(fa, fb) and np.array_equal(ra, rb)
    fc, _ = _run(a, acts, seed=8)  # another seed: another context and/or other samples
    assert not np.array_equal(fa, fc)
    obs, info = a.reset(seed=7)
    assert np.array_equal(obs, fa[0]) and info["step"] == 0
    _, _, _, _, info = a.step(1)
    assert info["step"] == 1 and info["entropy"] > 0 and 0 <= info["terminated_prob"] <= 1


@pytest.mark.parametrize("bundle", ["tiny_bundle", "split_bundle"])
def test_vector_env_equals_single_envs(bundle, request):
    tiny_bundle = request.getfixturevalue(bundle)
    N, T, seed = 3, 8, 11
    vec = gym.make_vec(HGS, num_envs=N, checkpoint=tiny_bundle)
    assert type(vec).__name__ == "DreamVectorEnv"  # the vector entry point, not a SyncVectorEnv of N models
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 5, (T, N))
    vobs, _ = vec.reset(seed=seed)
    v_frames, v_rew, v_done = [vobs], [], []
    for t in range(T):
        o, r, te, tr, _ = vec.step(actions[t])
        v_frames.append(o)
        v_rew.append(r)
        v_done.append(te | tr)
    for i in range(N):  # env i alone, seeded seed + i, with next-step autoreset done by hand
        env = gym.make(HGS, checkpoint=tiny_bundle)
        obs, _ = env.reset(seed=seed + i)
        assert np.array_equal(obs, v_frames[0][i])
        done = False
        for t in range(T):
            if done:
                obs, _ = env.reset()
                r = 0.0
                done = False
            else:
                obs, r, te, tr, _ = env.step(int(actions[t, i]))
                done = te or tr
                assert done == v_done[t][i]
            assert np.abs(obs.astype(int) - v_frames[t + 1][i]).max() <= 1, (
                i,
                t,
            )  # batched vs single float rounding
            assert r == pytest.approx(v_rew[t][i], abs=1e-4)


def test_sb3_vecenv_autoreset_and_terminal_observation(tiny_bundle):
    venv = DreamVecEnv(4, tiny_bundle, "vizdoom_hgs", max_episode_steps=3, termination="threshold")
    venv.seed(5)
    obs = venv.reset()
    assert obs.shape == (4, TINY_RES, TINY_RES, 3) and obs.dtype == np.uint8
    ever_done = np.zeros(4, bool)
    for _t in range(3):
        obs, rew, done, infos = venv.step(np.array([0, 1, 2, 3]))
        assert rew.dtype == np.float32 and done.dtype == bool
        for i, info in enumerate(infos):
            assert ("terminal_observation" in info) == bool(done[i])
            if done[i]:
                assert info["terminal_observation"].shape == (TINY_RES, TINY_RES, 3)
                assert info["TimeLimit.truncated"] == (info["step"] == 3 and info["terminated_prob"] <= 0.5)
                assert venv.core.steps[i] == 0 and np.array_equal(
                    obs[i], venv.core.obs[i]
                )  # reset inside step_wait
        ever_done |= done
    assert ever_done.all()  # the 3-step limit ends every episode by step 3


def test_ppo_trains_in_the_dream(tiny_bundle64):
    venv = DreamVecEnv(4, tiny_bundle64, "vizdoom_hgs", max_episode_steps=20)
    torch.manual_seed(0)
    model = PPO("CnnPolicy", venv, n_steps=32, batch_size=64, n_epochs=2, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    assert any(not torch.equal(b, p) for b, p in zip(before, model.policy.parameters()))


def test_bad_input_raises_and_env_stays_usable(tiny_bundle, tmp_path):
    env = DreamEnv(checkpoint=tiny_bundle, preset="vizdoom_hgs")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"out of range"):
        env.step(7)
    with pytest.raises(ValueError, match=r"scalar integer"):
        env.step([1, 2])
    with pytest.raises(
        TypeError, match=r"action: got 0\.5 of dtype float64, expected a scalar integer in \[0, 5\)"
    ):
        env.step(0.5)
    with pytest.raises(ValueError, match=r"unknown keys \['framez'\]"):
        env.reset(options={"framez": 1})
    with pytest.raises(ValueError, match=r"options\['frames'\].*uint8"):
        env.reset(options={"frames": np.zeros((2, 5, 5, 3), np.uint8)})
    with pytest.raises(ValueError, match=r"need 1 actions"):
        env.reset(options={"frames": np.zeros((2, TINY_RES, TINY_RES, 3), np.uint8)})
    with pytest.raises(
        ValueError,
        match=r"options\['actions'\]: got .*\[9\], out of range; expected int64 \(1,\) in \[0, 5\)",
    ):
        env.reset(options={"frames": np.zeros((2, TINY_RES, TINY_RES, 3), np.uint8), "actions": [9]})
    # still usable; and options-provided contexts are honoured
    ctx = np.full((2, TINY_RES, TINY_RES, 3), 100, np.uint8)
    obs, _ = env.reset(seed=1, options={"frames": ctx, "actions": [2]})
    assert np.array_equal(obs, ctx[-1])
    obs, r, term, trunc, info = env.step(2)
    assert obs.shape == (TINY_RES, TINY_RES, 3) and info["step"] == 1
    with pytest.raises(ValueError, match=r"render_mode"):
        DreamEnv(checkpoint=tiny_bundle, render_mode="video")
    with pytest.raises(ValueError, match=r"context_frames"):
        DreamEnv(checkpoint=tiny_bundle, context_frames=99)


def _step_ok(env, action) -> None:
    obs, *_ = env.step(action)
    assert obs.shape == env.observation_space.shape


def test_discrete_inputs_are_checked_not_truncated(tiny_bundle):
    """Item 9 of issue 16: each bad input raises TypeError/ValueError naming the argument, the value and what
    is accepted, and the env steps normally afterwards."""
    from decimal import Decimal

    env = DreamEnv(checkpoint=tiny_bundle, preset="vizdoom_hgs")
    env.reset(seed=0)
    two = np.zeros((2, TINY_RES, TINY_RES, 3), np.uint8)
    cases = [
        (
            lambda: env.step(Decimal("1.9")),
            TypeError,
            r"action: got Decimal\('1\.9'\).*expected a scalar integer in \[0, 5\)",
        ),
        (
            lambda: env.step(np.array(1.9, dtype=object)),
            TypeError,
            r"action: got .*1\.9.*type float.*integer in \[0, 5\)",
        ),
        (lambda: env.step(None), TypeError, r"action: got None.*NoneType.*integer in \[0, 5\)"),
        (lambda: env.step(2**70), ValueError, r"action: got 1180591620717411303424.*out of range.*\[0, 5\)"),
        (lambda: env.step(1 + 2j), TypeError, r"action: got .*complex.*integer in \[0, 5\)"),
        (lambda: env.step(True), TypeError, r"action: got .*bool.*integer in \[0, 5\)"),
        (lambda: env.step("1"), TypeError, r"action: got .*'1'.*integer in \[0, 5\)"),
        (
            lambda: env.reset(options={"frames": two, "actions": 2}),
            ValueError,
            r"options\['actions'\]: got the scalar 2; expected a sequence of int64 \(1,\)",
        ),
        (
            lambda: env.reset(options={"frames": two, "actions": [Decimal("1.9")]}),
            TypeError,
            r"options\['actions'\]: got .*Decimal.*int64 \(1,\) in \[0, 5\)",
        ),
        (
            lambda: env.reset(options={"frames": two, "actions": [10**9]}),
            ValueError,
            r"options\['actions'\].*out of range",
        ),
        (
            lambda: env.reset(options={"start": "x"}),
            TypeError,
            r"options\['start'\]: got 'x', expected an integer frame index in 0\.\.\d+",
        ),
        (
            lambda: env.reset(options={"start": 10**6}),
            ValueError,
            r"options\['start'\]: got 1000000, expected an integer frame index",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        _step_ok(env, 1)
    for kw, exc, match in (
        ({"temperature": None}, TypeError, r"temperature: got None, expected a number >= 0"),
        ({"context_frames": 1.5}, TypeError, r"context_frames: got 1\.5, expected an integer"),
        ({"top_k": 0}, ValueError, r"top_k: got 0, expected None or an integer >= 1"),
        ({"clip_actions": "yes"}, TypeError, r"clip_actions: got 'yes', expected True or False"),
    ):
        with pytest.raises(exc, match=match):
            DreamEnv(checkpoint=tiny_bundle, **kw)

    venv = gym.make_vec(HGS, num_envs=2, checkpoint=tiny_bundle, vectorization_mode="vector_entry_point")
    venv.reset(seed=0)
    for mask in ([True, True, True], [True], [1, 0], np.ones(3, bool)):
        with pytest.raises(ValueError, match=r"options\['reset_mask'\]: got .*expected 2 booleans"):
            venv.reset(options={"reset_mask": mask})
    with pytest.raises(TypeError, match=r"actions: got .*Decimal.*2 integer action\(s\) in \[0, 5\)"):
        venv.step(np.array([Decimal("1.9"), 1], dtype=object))
    with pytest.raises(ValueError, match=r"actions: got .*shape \(3,\), expected 2 integer action"):
        venv.step(np.array([1, 1, 1]))
    obs, *_ = venv.step(np.array([1, 2]))
    assert obs.shape == (2, TINY_RES, TINY_RES, 3)
    venv.reset(options={"reset_mask": np.array([True, False])})
    sb3 = DreamVecEnv(2, tiny_bundle)
    sb3.reset()
    with pytest.raises(ValueError, match=r"actions: got .*shape \(3,\)"):
        sb3.step(np.array([0, 1, 2]))
    sb3.step(np.array([0, 1]))


def test_continuous_inputs_are_checked_and_clipped_only_on_request(tmp_path):
    from decimal import Decimal

    store = write_continuous_store(tmp_path / "store", source="bair", dim=4)
    bundle = make_bundle(tiny_experiment(store, name="bair"), tmp_path / "bair")
    env = DreamEnv(checkpoint=bundle)
    env.reset(seed=0)
    spec = env.core.spec
    two = np.zeros((2, TINY_RES, TINY_RES, 3), np.uint8)
    cases = [
        (
            lambda: env.step(np.array([1.5, 0, 0, 0], np.float32)),
            ValueError,
            r"action: got .*1\.5.*outside \[-1, 1\].*clip_actions=True",
        ),
        (
            lambda: env.step(np.array([0.5j, 0, 0, 0])),
            TypeError,
            r"action: got .*complex128.*real actions of shape \(4,\)",
        ),
        (lambda: env.step([Decimal("0.5")] * 4), TypeError, r"action: got .*dtype object.*real actions"),
        (lambda: env.step(None), TypeError, r"action: got None.*real actions of shape \(4,\)"),
        (
            lambda: env.step(np.zeros(3)),
            ValueError,
            r"action: got .*shape \(3,\), expected real actions of shape \(4,\)",
        ),
        (lambda: env.step(np.array([np.nan, 0, 0, 0])), ValueError, r"action: .*NaN or inf"),
        (
            lambda: env.reset(options={"frames": two, "actions": [[1e9, 0, 0, 0]]}),
            ValueError,
            r"options\['actions'\]: got \[\[1000000000\.0, 0, 0, 0\]\], outside the data's range low=",
        ),
        (
            lambda: env.reset(options={"frames": two, "actions": 0.5}),
            ValueError,
            r"options\['actions'\]: got the scalar",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        _step_ok(env, np.zeros(4, np.float32))
    # clip_actions=True: an out-of-range action acts exactly as the clipped one
    clip = DreamEnv(world_model=env.world_model, clip_actions=True)
    a = np.array([1.5, -3.0, 0.25, 1.0], np.float32)
    clip.reset(seed=3)
    got = clip.step(a)[0]
    env.reset(seed=3)
    want = env.step(np.clip(a, -1, 1))[0]
    assert np.array_equal(got, want)
    lo = np.asarray(spec.low, np.float32)
    obs, _ = clip.reset(seed=3, options={"frames": two, "actions": [lo - 5]})  # clipped to the data's range
    assert np.array_equal(obs, two[-1])


def test_missing_or_mismatched_bundle_says_how_to_train(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLDMODEL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python experiments/train.py --env vizdoom_hgs"):
        gym.make(HGS)
    with pytest.raises(FileNotFoundError, match=r"not a bundle"):
        gym.make(HGS, checkpoint=tmp_path)
    with pytest.raises(ValueError, match=r"is a 'vizdoom_hgs' bundle but this env is 'vizdoom_battle2'"):
        gym.make("VideoGPTDream-VizdoomBattle2-v0", checkpoint=tiny_bundle)
    # default discovery: the newest complete bundle of the preset under $WORLDMODEL_HOME/runs
    runs = tmp_path / "home" / "runs"
    old = make_bundle(tiny_experiment(tiny_bundle_store(tiny_bundle)), runs / "old")
    new = make_bundle(tiny_experiment(tiny_bundle_store(tiny_bundle)), runs / "new", seed=1)
    os.utime(old / "model.safetensors", (1, 1))
    env = gym.make(HGS)
    assert env.unwrapped.world_model.path.resolve() == new.resolve()


def tiny_bundle_store(bundle) -> str:
    from worldmodel.checkpoint import read_run_config

    return read_run_config(bundle)["store"]["path"]


def test_make_with_module_prefix_in_fresh_interpreter(tiny_bundle):
    code = (
        f"import gymnasium as gym; e = gym.make('envs:VideoGPTDream-VizdoomHGS-v0', checkpoint={str(tiny_bundle)!r}); "
        "o, _ = e.reset(seed=0); o2, r, *_ = e.step(1); print(o.shape, o2.dtype)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"({TINY_RES}, {TINY_RES}, 3) uint8" in res.stdout


def test_render_modes(tiny_bundle, monkeypatch):
    env = DreamEnv(checkpoint=tiny_bundle, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert np.array_equal(env.render(), obs)
    obs, *_ = env.step(2)
    assert np.array_equal(env.render(), obs) and env.metadata["render_fps"] > 0
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # a real pygame window, on a virtual display
    human = DreamEnv(checkpoint=tiny_bundle, render_mode="human")
    human.reset(seed=0)
    human.step(1)
    assert human._viewer is not None and human._viewer.screen.get_size() == (TINY_RES * 6, TINY_RES * 6)
    human.close()
    assert human._viewer is None


def test_sampled_termination_follows_predicted_probability(tiny_bundle):
    venv = DreamVecEnv(16, tiny_bundle, "vizdoom_hgs")  # default: terminated ~ Bernoulli(terminated_prob)
    venv.seed(0)
    venv.reset()
    probs, ends = [], []
    for _ in range(12):
        _, _, done, infos = venv.step(np.zeros(16, np.int64))
        probs += [i["terminated_prob"] for i in infos]
        ends += [bool(d) for d in done]
    n = len(ends)
    expected, got = float(np.sum(probs)), float(np.sum(ends))
    assert abs(got - expected) < 4 * np.sqrt(n * 0.25) + 1, (
        got,
        expected,
    )  # within 4 sigma of the Bernoulli sum
    with pytest.raises(ValueError, match="termination"):
        DreamVecEnv(2, tiny_bundle, termination="sometimes")


def test_hazard_scale_and_never_termination(tiny_bundle):
    """``hazard_scale`` k reports and draws 1 - (1 - p)^k; ``termination="never"`` runs episodes to the time
    limit; neither changes the frames a seed samples."""
    from envs.dream import DreamVectorEnv

    wm = WorldModel.from_pretrained(tiny_bundle)

    def run(**kw):
        venv = DreamVectorEnv(4, world_model=wm, max_episode_steps=5, **kw)
        obs, _ = venv.reset(seed=3)
        frames, probs, expected, ends = [obs], [], [], []
        for _ in range(5):
            obs, r, term, trunc, info = venv.step(np.ones(4, np.int64))
            frames.append(obs)
            probs.append(info["terminated_prob"])
            expected.append(info["expected_reward"])
            ends.append((term.copy(), trunc.copy(), r.copy(), info))
        return np.stack(frames), np.stack(probs), np.stack(expected), ends

    f1, p1, e1, ends1 = run(termination="never")
    f3, p3, e3, ends3 = run(termination="never", hazard_scale=3.0)
    f0, p0, _, _ = run(termination="never", hazard_scale=0.0)
    assert np.array_equal(f1, f3) and np.array_equal(f1, f0)  # the hazard never touches the frames' sampling
    assert p1.max() > 0
    np.testing.assert_allclose(p3, 1 - (1 - p1.astype(np.float64)) ** 3, rtol=1e-5, atol=1e-7)
    assert np.all(p3 >= p1) and np.all(p0 == 0)
    for (term, _trunc, r, info), (_, _, _, info1) in zip(ends3, ends1):
        assert not term.any()  # "never": no drawn ending, whatever the hazard
        mix = (1 - info["terminated_prob"]) * info["reward_if_not_terminated"] + info[
            "terminated_prob"
        ] * info["reward_if_terminated"]
        np.testing.assert_allclose(info["expected_reward"], mix, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            r, info1["reward_if_not_terminated"]
        )  # never ends: the non-terminal reward
    assert ends1[-1][1].all() and not any(t.any() for _, t, _, _ in ends1[:-1])  # truncated at the limit only

    # a hazard scaled up ends sampled episodes sooner (same seeds: the same uniform draws, larger p)
    def ended(k):
        venv = DreamVectorEnv(16, world_model=wm, max_episode_steps=12, hazard_scale=k)
        venv.reset(seed=0)
        done = np.zeros(16, bool)
        for _ in range(12):
            _, _, term, _, _ = venv.step(np.zeros(16, np.int64))
            done |= term
        return done.sum()

    assert ended(200.0) >= ended(1.0) and ended(200.0) > 0
    for bad, err in ((-1.0, ValueError), ("2", TypeError), (float("nan"), ValueError)):
        with pytest.raises(err, match="hazard_scale"):
            DreamVectorEnv(2, world_model=wm, hazard_scale=bad)


def test_termination_threshold(bundles):
    def first_step_terminated(threshold):
        env = gym.make(
            HGS, checkpoint=bundles["VizdoomHGS"], termination="threshold", termination_threshold=threshold
        )
        env.reset(seed=0)
        _, _, terminated, _, info = env.step(0)
        return terminated, info["terminated_prob"]

    low, p = first_step_terminated(1e-9)
    high, p2 = first_step_terminated(1 - 1e-9)
    assert p == p2 and 0 < p < 1 and low and not high
    with pytest.raises(ValueError, match="termination_threshold"):
        gym.make(HGS, checkpoint=bundles["VizdoomHGS"], termination_threshold=1.5)


@torch.no_grad()
def test_info_latent_is_the_world_models_state_of_the_returned_frame(tiny_bundle):
    """``info["latent"]`` (reset, every step, an autoreset, the single env) is the prior's hidden state at the
    newest frame of the env's window, as a full forward over that window computes it."""
    from envs.dream import DreamVectorEnv

    vec = DreamVectorEnv(2, checkpoint=tiny_bundle, context_frames=2, max_episode_steps=3)
    wm, s = vec.world_model, vec.core.rollout.sampler
    C = wm.cfg.prior.n_embd

    def full(row: int) -> np.ndarray:
        tok = s.window(row)[None]
        return wm.prior(tok, s.actions[row, : tok.shape[1] - 1][None]).hidden[0, -1].numpy()

    _, info = vec.reset(seed=3)
    first = info["latent"].copy()
    assert first.shape == (2, C) and first.dtype == np.float32 and np.abs(first).sum() > 0
    for r in range(2):
        np.testing.assert_allclose(first[r], full(r), atol=1e-4)
    for t in range(5):  # crosses the 3-step limit: the next step restarts both rows from a new context
        *_, info = vec.step(np.array([0, 1]))
        assert info["latent"].shape == (2, C)
        for r in range(2):
            np.testing.assert_allclose(info["latent"][r], full(r), atol=1e-4, err_msg=f"step {t}, row {r}")
    single = DreamEnv(checkpoint=tiny_bundle, context_frames=2)
    _, info = single.reset(seed=3)
    np.testing.assert_allclose(info["latent"], first[0], atol=1e-5)  # env 0 of the vector env, alone
    *_, info = single.step(0)
    assert info["latent"].shape == (C,) and info["latent"].dtype == np.float32


def test_bf16_rollout_decodes_frames_within_one_level_of_fp32(tiny_bundle64):
    """``bf16=True`` also runs the tokenizer's decoder under bf16 autocast: the frames it returns for the same
    tokens stay within a level or two of fp32's (uint8), and single roundings do differ."""
    wm = WorldModel.from_pretrained(tiny_bundle64)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 3, *wm.obs_shape), dtype=np.uint8)
    actions = rng.integers(0, wm.action_spec.n, (4, 2))
    got = {}
    for bf16 in (False, True):
        r = wm.rollout(4, bf16=bf16, decode_context=2)
        r.reset(frames, actions)
        got[bf16] = r.decode_latest()
    assert got[True].dtype == np.uint8 and got[True].shape == got[False].shape
    diff = np.abs(got[True].astype(int) - got[False].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert diff.any(), "bf16 decoded exactly as fp32: the decoder did not run in bf16"
