"""The World Models controller: token features, linear policies, CMA-ES, save/load, and the transfer benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from envs.controller import (
    COLOR_KEYS,
    CMAESConfig,
    ColorKey,
    ColorKeyFeatures,
    ControllerConfig,
    LinearController,
    TokenFeatures,
    controller_config,
    is_controller,
    load_controller,
    save_controller,
    train_cmaes,
)
from tests.conftest import TINY_RES
from worldmodel.bundle import WorldModel
from worldmodel.store import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]


class BrightnessEnv(gym.Env):
    """Each step shows a bright or a dark frame (random); reward 1 when the action names it (1 = bright)."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (TINY_RES, TINY_RES, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(2)

    def _frame(self) -> np.ndarray:
        self.bright = bool(self.np_random.integers(2))
        return np.full((TINY_RES, TINY_RES, 3), 220 if self.bright else 30, np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._frame(), {}

    def step(self, action):
        r = float(int(action) == int(self.bright))
        return self._frame(), r, False, False, {}


def test_features_shape_and_normalisation(tc_bundle):
    wm = WorldModel.from_pretrained(tc_bundle)
    feats = TokenFeatures(wm, n_components=3)
    h, w = wm.tokenizer.grid
    assert feats.dim == w * 3
    store = EpisodeStore(wm.store_path)
    feats.fit(store, n_frames=64)
    frames = store.read_clip(store.episode_ids()[0], 0, 8)["frames"]
    f = feats(frames)
    assert f.shape == (8, w * 3) and f.dtype == np.float32
    assert np.all(np.isfinite(f)) and np.all(feats.std > 0)
    np.testing.assert_allclose(feats(frames), f)  # deterministic
    assert not np.allclose(feats(255 - frames), f)  # the features see the pixels


def test_linear_controller_actions_follow_weights(tc_bundle):
    wm = WorldModel.from_pretrained(tc_bundle)
    feats = TokenFeatures(wm)
    cfg = ControllerConfig(n_features=feats.dim, n_actions=2, n_components=feats.n_components)
    assert cfg.n_params == 2 * feats.dim + 1
    frames = np.random.default_rng(0).integers(0, 256, (3, TINY_RES, TINY_RES, 3), dtype=np.uint8)
    bias_only = np.zeros(cfg.n_params, np.float32)
    bias_only[-1] = 1.0
    assert LinearController(cfg, feats, bias_only).act(frames).tolist() == [1, 1, 1]
    # one policy per row: rows 0 and 2 prefer action 0, row 1 action 1
    rows = np.stack([-bias_only, bias_only, -bias_only])
    assert LinearController(cfg, feats, rows).act(frames).tolist() == [0, 1, 0]
    cfg3 = ControllerConfig(n_features=feats.dim, n_actions=3)
    p = np.zeros((3, cfg3.n_inputs), np.float32)
    p[2, -1] = 1.0  # the bias of action 2's output
    assert LinearController(cfg3, feats, p.reshape(-1)).act(frames).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="params"):
        LinearController(cfg, feats, np.zeros(5))


def test_motion_input_resets_at_episode_start(tc_bundle):
    wm = WorldModel.from_pretrained(tc_bundle)
    feats = TokenFeatures(wm)
    cfg = ControllerConfig(n_features=feats.dim, n_actions=2)
    p = np.zeros(cfg.n_params, np.float32)
    p[feats.dim : 2 * feats.dim] = 1.0  # reads only the difference f_t - f_{t-1}
    ctrl = LinearController(cfg, feats, p)
    a, b = (np.full((1, TINY_RES, TINY_RES, 3), v, np.uint8) for v in (0, 255))
    assert ctrl.predict(a, episode_start=np.array([True]))[0].tolist() == [
        0
    ]  # no previous frame: difference 0
    moved = ctrl.predict(b, episode_start=np.array([False]))[0]
    diff = feats(b) - feats(a)
    assert moved.tolist() == [int(diff.sum() > 0)]
    assert ctrl.predict(b, episode_start=np.array([True]))[0].tolist() == [
        0
    ]  # a new episode forgets the old frame


def test_color_keys_count_matching_pixels_per_strip():
    keys = (
        ColorKey("yellow", ((1, 0, 0, 170), (0, 1, 0, 140), (0, 0, -1, -130)), rows=(0, 32), scale=1.0),
        ColorKey("brown", ((1, 0, -1, 25),), scale=2.0),
    )
    feats = ColorKeyFeatures(keys, strips=4)
    frames = np.full((2, 64, 64, 3), 90, np.uint8)  # grey: passes neither key
    frames[0, 10:14, 20:22] = (250, 230, 60)  # 8 yellow pixels in strip 1 (columns 16-31), top half
    frames[0, 40:44, 50:52] = (250, 230, 60)  # yellow but below row 32: not counted by "yellow"
    frames[1, :, 48:] = (150, 100, 60)  # brown: the whole of strip 3
    f = feats(frames)
    assert f.shape == (2, 8) and feats.dim == 8
    np.testing.assert_allclose(f[0, :4], [0, 8 / (32 * 16), 0, 0])
    np.testing.assert_allclose(
        f[0, 4:], [0, 2 * 8 / (64 * 16), 0, 2 * 8 / (64 * 16)]
    )  # yellow has R - B > 25 too
    np.testing.assert_allclose(f[1], [0, 0, 0, 0, 0, 0, 0, 2.0])
    assert COLOR_KEYS["vizdoom_take_cover"][0].name == "fireball"
    with pytest.raises(ValueError, match="width"):
        feats(np.zeros((1, 64, 30, 3), np.uint8))


def test_previous_action_input_and_color_key_controller_roundtrip(tc_bundle, tmp_path):
    wm = WorldModel.from_pretrained(tc_bundle)
    cfg = CMAESConfig(features="auto", last_action=True, motion=False)
    ccfg = controller_config(wm, 2, cfg)  # the bundle is a vizdoom_take_cover preset: colour keys
    assert ccfg.features == "color_keys" and ccfg.n_inputs == ccfg.n_features + 2
    feats = ColorKeyFeatures(ccfg.color_keys, ccfg.strips)
    p = np.zeros(ccfg.n_params, np.float32)
    p[-2], p[-1] = -1.0, 0.5  # flip: 0.5 - previous action (+1 right, -1 left, 0 at the start)
    ctrl = LinearController(ccfg, feats, p)
    frames = np.zeros((1, TINY_RES, TINY_RES, 3), np.uint8)
    seq = [int(ctrl.predict(frames, episode_start=np.array([t == 0]))[0][0]) for t in range(4)]
    assert seq == [1, 0, 1, 0]  # it alternates because it reads what it did last
    assert int(ctrl.predict(frames, episode_start=np.array([True]))[0][0]) == 1  # a new episode forgets it
    out = save_controller(ctrl, tmp_path / "ck")
    back = load_controller(out, wm)
    assert back.cfg == ccfg and isinstance(back.features, ColorKeyFeatures)
    rng = np.random.default_rng(0)
    many = rng.integers(0, 256, (5, TINY_RES, TINY_RES, 3), dtype=np.uint8)
    w = rng.normal(size=ccfg.n_params).astype(np.float32)
    np.testing.assert_array_equal(
        LinearController(ccfg, feats, w).act(many), LinearController(back.cfg, back.features, w).act(many)
    )


def test_save_load_roundtrip_without_pickle(tc_bundle, tmp_path):
    wm = WorldModel.from_pretrained(tc_bundle)
    feats = TokenFeatures(wm).fit(EpisodeStore(wm.store_path), n_frames=32)
    cfg = ControllerConfig(n_features=feats.dim, n_actions=2, n_components=feats.n_components)
    params = np.random.default_rng(1).normal(size=cfg.n_params).astype(np.float32)
    ctrl = LinearController(cfg, feats, params)
    out = save_controller(ctrl, tmp_path / "c", {"note": "x"})
    assert is_controller(out) and sorted(p.name for p in out.iterdir()) == [
        "controller.json",
        "controller.safetensors",
    ]
    back = load_controller(out, wm)
    frames = np.random.default_rng(2).integers(0, 256, (6, TINY_RES, TINY_RES, 3), dtype=np.uint8)
    np.testing.assert_array_equal(back.act(frames), LinearController(cfg, feats, params).act(frames))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "controller.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a controller"):
        load_controller(tmp_path / "bad", wm)


def test_cmaes_learns_a_pixel_rule(tc_bundle):
    """In a toy env where the reward names the frame's brightness, evolution beats chance clearly."""
    wm = WorldModel.from_pretrained(tc_bundle)
    cfg = CMAESConfig(
        generations=6,
        popsize=8,
        episodes=1,
        max_episode_steps=20,
        sigma0=1.0,
        features="tokens",
        motion=True,
        last_action=False,
    )
    venv = gym.vector.SyncVectorEnv([BrightnessEnv for _ in range(cfg.popsize * cfg.episodes)])
    ctrl, hist = train_cmaes(wm, venv, cfg, seed=0)
    assert len(hist) == 6 and all(h["mean_length"] == 20 for h in hist)
    test_env = gym.vector.SyncVectorEnv([BrightnessEnv for _ in range(4)])
    obs, _ = test_env.reset(seed=123)
    correct = 0
    for _ in range(25):
        a = ctrl.act(obs)
        obs, r, *_ = test_env.step(a)
        correct += int(r.sum())
    assert correct >= 0.9 * 100, correct  # chance is 50 %
    with pytest.raises(ValueError, match="popsize"):
        train_cmaes(wm, test_env, cfg)


def test_expected_fitness_weighs_rewards_by_predicted_survival(tc_bundle):
    """``episode_returns(expected=True)`` = sum_t S_{t-1} e_t over a dream run to its cap: with no hazard it is
    the plain sum of rewards, with a hazard that ends everything at once it is the first step's expected
    reward, and in between it lies strictly between them; a real env (no hazard in info) is refused."""
    from envs.controller import episode_returns, train_cmaes_in_dream
    from envs.dream import DreamVectorEnv

    wm = WorldModel.from_pretrained(tc_bundle)
    ccfg = controller_config(wm, 2, CMAESConfig())
    ctrl = LinearController(ccfg, ColorKeyFeatures(ccfg.color_keys), np.zeros(ccfg.n_params))

    def returns(k, expected=True):
        venv = DreamVectorEnv(3, world_model=wm, max_episode_steps=6, termination="never", hazard_scale=k)
        return episode_returns(venv, ctrl, [0, 1, 2], 6, expected=expected)

    plain, length = returns(1.0, expected=False)  # "never": every row runs 6 steps, no drawn end
    assert np.all(length == 6)
    np.testing.assert_allclose(returns(0.0)[0], plain, rtol=1e-5)  # no hazard: the plain sum

    def replay(k):  # the same seeds and actions (the zero controller always plays 0), read step by step
        venv = DreamVectorEnv(3, world_model=wm, max_episode_steps=6, termination="never", hazard_scale=k)
        venv.reset(seed=[0, 1, 2])
        infos = [venv.step(np.zeros(3, np.int64))[4] for _ in range(6)]
        p = np.stack([i["terminated_prob"] for i in infos]).astype(np.float64)  # (6, 3)
        e = np.stack([i["expected_reward"] for i in infos]).astype(np.float64)
        return p, e

    p, e = replay(1e9)
    assert np.all(p[0] > 0.999)  # everyone dies at step 1: the return is that step's expected reward
    np.testing.assert_allclose(returns(1e9)[0], e[0], rtol=1e-5, atol=1e-6)
    p, e = replay(1.0)
    alive = np.vstack([np.ones((1, 3)), np.cumprod(1 - p, 0)[:-1]])  # S_{t-1}
    np.testing.assert_allclose(returns(1.0)[0], (alive * e).sum(0), rtol=1e-5, atol=1e-6)
    assert 0 < p.min() and p.max() < 1  # a real mix of both cases above
    real_like = gym.vector.SyncVectorEnv([BrightnessEnv for _ in range(2)])
    with pytest.raises(ValueError, match="terminated_prob"):
        episode_returns(real_like, ctrl, [0, 1], 3, expected=True)
    with pytest.raises(ValueError, match="fitness='expected'"):
        train_cmaes_in_dream(wm, CMAESConfig(fitness="expected", popsize=2, episodes=1), termination="sample")
    with pytest.raises(ValueError, match="fitness"):
        train_cmaes(wm, real_like, CMAESConfig(fitness="mean", popsize=2, episodes=1))


def test_train_policy_cmaes_cli_and_bench_transfer(tc_bundle, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "train_policy.py"),
            "--env",
            "vizdoom_take_cover",
            "--checkpoint",
            str(tc_bundle),
            "--out",
            str(tmp_path / "ctrl"),
            "--eval-real",
            "--eval-episodes",
            "2",
            "--num-envs",
            "2",
            "--max-episode-steps",
            "8",
            "--cmaes.generations",
            "2",
            "--cmaes.popsize",
            "4",
            "--cmaes.episodes",
            "1",
            "--cmaes.max-episode-steps",
            "6",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"real_cmaes", "dream_cmaes", "real_random"} <= set(
        report
    )  # --algo auto picks cmaes for Take Cover
    assert is_controller(tmp_path / "ctrl") and (tmp_path / "ctrl" / "eval.json").exists()
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_transfer.py"),
            "--env",
            "vizdoom_take_cover",
            "--checkpoint",
            str(tc_bundle),
            "--seeds",
            "0",
            "1",
            "--real-episodes",
            "2",
            "--dream-episodes",
            "2",
            "--real-envs",
            "2",
            "--max-steps",
            "10",
            "--generations",
            "1",
            "--popsize",
            "2",
            "--episodes",
            "1",
            "--train-max-steps",
            "5",
            "--real-baseline",
            "--fitness",
            "expected",
            "--hazard-scale",
            "2",
            "--save-dir",
            str(tmp_path / "ctrls"),
            "--train-start",
            "random",
            "--train-context-frames",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [s["seed"] for s in out["per_seed"]] == [0, 1]
    assert (
        out["real_dream_trained"]["n"] == 2
        and out["real_random"]["n"] == 2
        and out["real_alternate10"]["n"] == 2
    )
    assert out["world_model_real_steps"] == sum(
        len(e) - 1 for e in EpisodeStore(out_store(tc_bundle)).iter_episodes()
    )
    assert 0 < out["real_trained"]["real_agent_steps"] <= 1 * 2 * 1 * 5
    # expected fitness: every dream row runs to the 5-step cap; the real baseline draws its own deaths
    assert out["cmaes"]["fitness"] == "expected" and out["dream"]["hazard_scale"] == 2.0
    assert (out["dream"]["train_start"], out["dream"]["train_context_frames"]) == ("random", 2)
    assert all(s["dream_agent_steps"] == 1 * 2 * 1 * 5 for s in out["per_seed"])
    wm = WorldModel.from_pretrained(tc_bundle)
    for s in (0, 1):  # each seed's controller saved, loadable, acting
        ctrl = load_controller(tmp_path / "ctrls" / f"seed{s}", wm)
        assert ctrl.act(np.zeros((1, *wm.obs_shape), np.uint8)).shape == (1,)
    assert out["real_view"] == "tokenized"  # the default headline: the real game seen through the tokenizer
    for seed in out["per_seed"]:
        assert (
            set(seed["real_by_view"]) == {"tokenized", "raw"}
            and seed["real"] == seed["real_by_view"]["tokenized"]
        )
    assert {v: s["n"] for v, s in out["real_dream_trained_by_view"].items()} == {"tokenized": 2, "raw": 2}


def test_tokenizer_view_shows_the_real_game_as_the_tokenizer_draws_it(tc_bundle):
    from envs.real import make_real_env_fn
    from envs.views import TokenizerView, real_view
    from worldmodel.dynamics_eval import reconstruct

    wm = WorldModel.from_pretrained(tc_bundle)
    kw = {"resolution": TINY_RES}
    raw = gym.vector.SyncVectorEnv([make_real_env_fn("vizdoom_take_cover", **kw) for _ in range(2)])
    seen = real_view(
        gym.vector.SyncVectorEnv([make_real_env_fn("vizdoom_take_cover", **kw) for _ in range(2)]),
        wm,
        "tokenized",
    )
    try:
        for env in (raw, seen):
            env.reset(seed=[5, 6])
        for _ in range(3):  # same seeds, same actions: the same real frames underneath
            (o_raw, *_), (o_seen, *_) = raw.step(np.array([0, 1])), seen.step(np.array([0, 1]))
            assert o_seen.shape == o_raw.shape and o_seen.dtype == np.uint8
            assert np.array_equal(
                o_seen, reconstruct(wm, o_raw[:, None])[:, 0]
            )  # each frame a one-frame clip
            assert not np.array_equal(o_seen, o_raw)
        assert real_view(raw, wm, "raw") is raw
        with pytest.raises(ValueError, match="view: got 'pixels'"):
            real_view(raw, wm, "pixels")
        with pytest.raises(ValueError, match=r"frames: got uint8 \(2, 8, 8, 3\)"):
            TokenizerView(wm)(np.zeros((2, 8, 8, 3), np.uint8))
    finally:
        raw.close()
        seen.close()


def out_store(bundle: Path) -> str:
    return WorldModel.from_pretrained(bundle).store_path


def test_latent_controller_evolves_in_the_dream_plays_the_real_game_and_reloads(tc_bundle, tmp_path):
    """features="latent": the controller reads the world model's latent state (C numbers): info["latent"] in the
    dream, the tracker's in the real game; its normalisation is measured on held-out episodes and saved."""
    from envs.controller import LatentFeatures, episode_returns, train_cmaes_in_dream
    from envs.latent import LatentObservation
    from envs.real import make_real_env_fn

    wm = WorldModel.from_pretrained(tc_bundle)
    C = wm.cfg.prior.n_embd
    cfg = CMAESConfig(generations=2, popsize=3, episodes=1, max_episode_steps=4, features="latent")
    ccfg = controller_config(wm, 2, cfg)
    assert (ccfg.features, ccfg.n_features, ccfg.motion, ccfg.n_inputs) == ("latent", C, False, C + 2)
    ctrl, hist = train_cmaes_in_dream(wm, cfg, seed=0)
    assert len(hist) == 2 and isinstance(ctrl.features, LatentFeatures) and ctrl.cfg == ccfg
    f = ctrl.features
    assert np.all(f.std > 1e-3) and np.abs(f.mean).sum() > 0  # measured, not the identity
    real = LatentObservation(
        gym.vector.SyncVectorEnv(
            [
                make_real_env_fn("vizdoom_take_cover", resolution=TINY_RES, max_episode_steps=6)
                for _ in range(2)
            ]
        ),
        wm,
    )
    try:
        ret, length = episode_returns(real, ctrl, [0, 1], 6)
        assert np.all(length >= 1) and np.all(ret > 0)  # Take Cover: +1 per tic alive
        back = load_controller(save_controller(ctrl, tmp_path / "lat"), wm)
        assert back.cfg == ctrl.cfg
        np.testing.assert_array_equal(back.features.mean, f.mean)
        np.testing.assert_array_equal(back.features.std, f.std)
        obs, _ = real.reset(seed=5)
        ctrl.reset()
        for _ in range(4):  # the reloaded controller acts identically on the same latents
            a = ctrl.act(obs)
            np.testing.assert_array_equal(back.act(obs), a)
            obs, *_ = real.step(a)
        a1, _ = back.predict(obs[0], episode_start=np.array([True]))  # one latent (C,): one action
        assert np.ndim(a1) == 0
    finally:
        real.close()
    with pytest.raises(ValueError, match="LatentObservation"):
        back.act(np.zeros((1, *wm.obs_shape), np.uint8))  # frames are not latents: say how to get them
    with pytest.raises(ValueError, match="'latent'"):
        controller_config(wm, 2, CMAESConfig(features="latents"))


def test_latent_controller_clis(tc_bundle, tmp_path):
    """``train_policy.py --cmaes.features latent --eval-real`` and ``bench_transfer.py --features latent`` run end to
    end: the dream-trained latent controller is scored in the real game through the tracker."""
    common = ["--env", "vizdoom_take_cover", "--checkpoint", str(tc_bundle)]
    res = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train_policy.py"), *common, "--algo", "cmaes"]
        + ["--out", str(tmp_path / "ctrl"), "--eval-real", "--eval-episodes", "2", "--num-envs", "2"]
        + [
            "--max-episode-steps",
            "6",
            "--cmaes.generations",
            "1",
            "--cmaes.popsize",
            "2",
            "--cmaes.episodes",
            "1",
        ]
        + ["--cmaes.max-episode-steps", "4", "--cmaes.features", "latent", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["real_cmaes"] > 0
    meta = json.loads((tmp_path / "ctrl" / "controller.json").read_text())
    assert meta["config"]["features"] == "latent"
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_transfer.py"), *common, "--seeds", "0"]
    bench += ["--real-episodes", "2", "--dream-episodes", "2", "--real-envs", "2", "--max-steps", "6"]
    bench += ["--generations", "1", "--popsize", "2", "--episodes", "1", "--train-max-steps", "4"]
    res = subprocess.run(
        [*bench, "--features", "latent", "--real-baseline"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["real_view"] == "latent" and out["cmaes"]["features"] == "latent"
    assert out["real_dream_trained"]["n"] == 1 and out["real_trained"]["real"]["n"] == 2
    res = subprocess.run(
        [*bench, "--features", "latent", "--real-views", "raw"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 2 and "--real-views" in res.stderr and "expected latent" in res.stderr
