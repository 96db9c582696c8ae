"""The model-based RL loop: one short iteration end to end on the real HGS env."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from envs.mbrl import store_transitions

ROOT = Path(__file__).resolve().parents[1]


def test_one_short_iteration(tmp_path):
    run = tmp_path / "mbrl"
    args = [sys.executable, str(ROOT / "experiments" / "mbrl.py"), "--env", "vizdoom_hgs", "--run-dir", str(run),
            "--no-progress", "--threads", "1", "--tokenizer-steps", "2", "--prior-steps", "2",
            "--mbrl.iterations", "1", "--mbrl.episodes-per-iteration", "2", "--mbrl.ppo-steps-per-iteration", "64",
            "--mbrl.eval-episodes", "1", "--mbrl.num-envs", "2", "--mbrl.max-episode-steps", "16",
            "--mbrl.ppo.n-steps", "16", "--mbrl.ppo.batch-size", "32", "--mbrl.ppo.n-epochs", "1"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((run / "mbrl.csv").open()))
    assert len(rows) == 1
    steps = store_transitions(run / "data")
    assert int(rows[0]["real_env_steps"]) == int(rows[0]["new_real_steps"]) == steps > 0  # every real step counted
    assert float(rows[0]["gap"]) == float(rows[0]["dream_return"]) - float(rows[0]["real_return"])
    report = json.loads((run / "mbrl_report.json").read_text())
    assert report["real_env_steps"] == steps and set(report) >= {"mbrl", "random", "direct_ppo", "mbrl_vs_random"}
    assert report["mbrl"]["mean"] == float(rows[0]["real_return"])
    assert steps <= report["direct_ppo"]["real_env_steps"] < steps + 2 * 16  # same budget, up to one rollout
    assert (run / "policies" / "ppo_mbrl.zip").exists() and any((run / "tb_mbrl").iterdir())
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["real_env_steps"] == steps and last["random"] > 0
