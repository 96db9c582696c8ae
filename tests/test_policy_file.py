"""Policy files: SB3 policies saved and loaded without pickle; SB3 zips (which run code when loaded) refused
unless the caller trusts them, and run-state policy paths kept inside their run."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from envs.collect import SB3Policy, collect
from envs.mbrl import STATE_FILE, STATE_SCHEMA, MBRLConfig, _budgets, run_mbrl
from envs.policy import load_policy, save_policy
from envs.policy_file import PolicyFileError, load_algorithm, load_policy_file, load_sb3_zip, resolve_in_dir
from tests.conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


class _ImageEnv(gym.Env):
    """36×36 RGB observations (the smallest SB3's NatureCNN takes), 3 actions, episodes of 6 steps."""

    observation_space = gym.spaces.Box(0, 255, (36, 36, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(action == 1), self.t >= 6, False, {}


def _ppo(n_envs: int = 2) -> PPO:
    venv = DummyVecEnv([_ImageEnv for _ in range(n_envs)])
    model = PPO(
        "CnnPolicy",
        venv,
        n_steps=8,
        batch_size=8,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [16], "activation_fn": torch.nn.ReLU},
    )
    model.learn(16)
    return model


class _Payload:
    """Unpickling this writes ``marker``: what a hostile policy zip can do to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


def _evil_zip(path: Path, marker: Path) -> Path:
    """An SB3-shaped zip whose ``data`` holds a pickled payload where SB3 keeps its cloudpickled objects."""
    blob = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    data = {"policy_class": {":type:": "<class 'abc.ABCMeta'>", ":serialized:": blob}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data", json.dumps(data))
        z.writestr("_stable_baselines3_version", "2.9.2")
    return path


def test_round_trip_predicts_and_continues_training(tmp_path):
    model = _ppo()
    path = save_policy(model, tmp_path / "p" / "ppo.safetensors")
    assert not zipfile.is_zipfile(path) and path.stat().st_mode & 0o777 != 0o600
    obs = np.stack([_ImageEnv.observation_space.sample() for _ in range(5)])
    want = model.predict(obs, deterministic=True)[0]
    pol = load_policy_file(path)
    np.testing.assert_array_equal(pol.predict(obs, deterministic=True)[0], want)
    # a single observation (the dream env's) works too
    assert pol.predict(obs[0], deterministic=True)[0] == want[0]

    again = load_algorithm(path)
    assert isinstance(again, PPO) and again.num_timesteps == model.num_timesteps == 16
    assert (again.n_steps, again.batch_size, again.clip_range(1.0), again.policy_kwargs["activation_fn"]) == (
        8,
        8,
        model.clip_range(1.0),
        torch.nn.ReLU,
    )
    for a, b in zip(again.policy.parameters(), model.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    sa, sb = again.policy.optimizer.state_dict(), model.policy.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in sa["state"][i]:
            torch.testing.assert_close(sa["state"][i][k], sb["state"][i][k])
    again.set_env(DummyVecEnv([_ImageEnv, _ImageEnv]))
    again.learn(16, reset_num_timesteps=False)
    assert again.num_timesteps == 32


def test_a2c_mlp_round_trip(tmp_path):
    model = A2C("MlpPolicy", "CartPole-v1", n_steps=4, seed=0, device="cpu")
    model.learn(8)
    path = save_policy(model, tmp_path / "a2c.safetensors")
    again = load_algorithm(path)
    assert isinstance(again, A2C) and isinstance(again.policy.optimizer, torch.optim.RMSprop)
    obs = np.zeros((3, 4), np.float32)
    np.testing.assert_array_equal(
        again.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )


def test_bad_policy_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_policy(_ppo(), tmp_path / "ppo.zip")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(PolicyFileError, match="junk.safetensors"):
        load_policy_file(junk)
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(PolicyFileError, match=r"weights\.safetensors.*'format'"):
        load_policy_file(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_policy(str(tmp_path / "missing.safetensors"), gym.spaces.Discrete(3))


def test_policy_zip_payload_never_runs_without_trust(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = _evil_zip(tmp_path / "policy.zip", marker)
    for load in (
        lambda: SB3Policy(evil),
        lambda: load_policy(str(evil), gym.spaces.Discrete(3)),
        lambda: load_sb3_zip(evil),
        lambda: load_policy_file(evil),
        lambda: collect(
            "vizdoom_hgs",
            tmp_path / "store",
            1,
            policy=str(evil),
            num_envs=1,
            asynchronous=False,
            progress=False,
        ),
    ):
        with pytest.raises(ValueError, match="policy.zip"):
            load()
        assert not marker.exists()
    assert not (tmp_path / "store").exists()  # refused before anything was written
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "collect.py"),
            "--policy",
            str(evil),
            "--out",
            str(tmp_path / "store"),
            "--episodes",
            "1",
            "--num-envs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "--trust-pickle" in res.stderr and not marker.exists()
    # the payload is real: trusting the zip runs it (once: one class is tried, not PPO, A2C and DQN in turn)
    with pytest.raises(Exception):  # noqa: B017 - the zip holds no weights; what matters is the marker
        SB3Policy(evil, trust_pickle=True)
    assert marker.read_text() == "payload ran"


def test_mbrl_state_policy_stays_inside_the_run(tmp_path):
    marker = tmp_path / "marker.txt"
    outside = _evil_zip(tmp_path / "elsewhere.zip", marker)
    run = tmp_path / "run"
    (run / "policies").mkdir(parents=True)
    inside = _evil_zip(run / "policies" / "old.zip", marker)
    cfg = tiny_experiment(tmp_path / "data")
    m = MBRLConfig(iterations=1)

    def state(policy: str) -> None:
        (run / STATE_FILE).write_text(
            json.dumps(
                {
                    "schema": STATE_SCHEMA,
                    "budgets": _budgets(cfg, m),
                    "base_episodes": 0,
                    "rows": [],
                    "policy": policy,
                    "ret_rms": None,
                    "baselines": None,
                }
            )
        )

    for bad, match in (
        (str(outside), "absolute"),
        ("../elsewhere.zip", "outside"),
        ("policies/../../elsewhere.zip", "outside"),
        ("policies/old.zip", "trust"),
    ):
        state(bad)
        with pytest.raises(ValueError, match=match):
            run_mbrl(cfg, run, m, progress=False)
        assert not marker.exists() and not (tmp_path / "data").exists()
    (run / "policies" / "link.zip").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        resolve_in_dir(run, "policies/link.zip", "policy")
    assert resolve_in_dir(run, "policies/old.zip") == inside.resolve()
