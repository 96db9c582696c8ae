"""A non-editable install works: the wheel carries the Battle2 map, and the installed package (not this
checkout) registers the dream ids and runs the Battle2 real env.

The wheel is built from a copy of the source tree (so no ``build/`` lands in the checkout) and installed
with ``pip install --no-deps --target``; the check runs in a fresh interpreter, from another directory,
with only that target on ``PYTHONPATH`` (ahead of site-packages, where this checkout's editable install
and the dependencies live) and asserts that ``envs`` and ``worldmodel`` were imported from the target.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ("D4_battle2.wad", "D4_battle2.cfg", "LICENSE")
# Not part of the source tree: local data, runs and build products (only at the top level: a package may
# legitimately hold a folder called data/); caches anywhere.
TOP_LEVEL_SKIP = {".git", "data", "runs", "build", "dist", "_vizdoom", "_vizdoom.ini"}
SKIP_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "*.pyc")


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = set(SKIP_ANYWHERE(directory, names))
    if Path(directory).resolve() == ROOT:
        skip |= TOP_LEVEL_SKIP & set(names)
    return skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_ignore)
    # the installed setuptools when there is one (no network needed); else pip's isolated build environment
    no_isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *no_isolation,
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("videogpt_worldmodel-*.whl")
    return whl


def test_wheel_holds_the_battle2_map_and_its_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in ASSETS:
            info = z.getinfo(f"envs/assets/vizdoom_battle2/{f}")
            assert info.file_size > 0, f
            assert z.read(info) == (ROOT / "envs/assets/vizdoom_battle2" / f).read_bytes(), f
        assert "MIT" in z.read("envs/assets/vizdoom_battle2/LICENSE").decode()
    assert {"envs/__init__.py", "envs/vizdoom.py", "envs/dream.py", "worldmodel/__init__.py"} <= names
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)


CHECK = r"""
import json, os, sys
import envs, gymnasium as gym, worldmodel
spec = gym.spec('VideoGPTDream-VizdoomBattle2-v0')
print(spec)
from envs.vizdoom import make_real_env, packaged_battle2_path
e = make_real_env('vizdoom_battle2')
obs, info = e.reset(seed=0)
obs2, reward, terminated, truncated, info = e.step(e.action_space.sample())
e.close()
print(json.dumps({"envs": envs.__file__, "worldmodel": worldmodel.__file__, "map": str(packaged_battle2_path()),
                  "spec_id": spec.id, "entry_point": str(spec.entry_point), "n_actions": int(e.action_space.n),
                  "obs": list(obs.shape), "dtype": str(obs.dtype), "step_obs": list(obs2.shape),
                  "path": [os.path.realpath(p or os.getcwd()) for p in sys.path]}))
"""


def test_installed_wheel_registers_dreams_and_runs_battle2_from_elsewhere(wheel, tmp_path):
    site = tmp_path / "site"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (site / "envs/assets/vizdoom_battle2/D4_battle2.wad").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIZDOOM_BATTLE2_PATH", "WORLDMODEL_HOME")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert str(ROOT.resolve()) not in out["path"] and out["path"].index(str(site.resolve())) < min(
        i for i, p in enumerate(out["path"]) if p.endswith("site-packages")
    )
    site_r = site.resolve()
    for mod in ("envs", "worldmodel"):  # the installed copy, not this checkout's editable install
        assert Path(out[mod]).resolve().is_relative_to(site_r), (mod, out[mod])
    assert Path(out["map"]).resolve() == site_r / "envs/assets/vizdoom_battle2"
    assert out["spec_id"] == "VideoGPTDream-VizdoomBattle2-v0" and out["entry_point"] == "envs.dream:DreamEnv"
    assert "VideoGPTDream-VizdoomBattle2-v0" in res.stdout.splitlines()[0]
    assert out["obs"] == out["step_obs"] == [64, 64, 3] and out["dtype"] == "uint8" and out["n_actions"] == 8
