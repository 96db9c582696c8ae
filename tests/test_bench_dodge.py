"""benchmarks/bench_dodge.py on real Take Cover (ViZDoom) and a tiny random-weight bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _bench(tc_bundle: Path, *extra: str) -> dict:
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_dodge.py"),
            "--env",
            "vizdoom_take_cover",
            "--checkpoint",
            str(tc_bundle),
            "--horizon",
            "3",
            "--context",
            "2",
            "--samples",
            "2",
            "--threads",
            "1",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bench_dodge_replays_real_deaths_and_scores_dream_branches(tc_bundle):
    out = _bench(tc_bundle, "--episodes", "3", "--temperature", "1.15")
    # random Take Cover episodes end by death long before 525 steps: every one gives a death branch point
    assert out["death_points"] == 3 and out["control_points"] == 3
    # the real game replays deterministically from its seed: the recorded frame comes back at every branch
    # point, the recorded actions die again at the recorded step, and a control point's actions survive
    assert out["replay_exact"] == 1.0
    real, dream, forced = out["real"], out["dream"], out["teacher_forced"]
    assert real["death_taken"]["mean"] == 1.0 and real["control_taken"]["mean"] == 0.0
    assert real["dodge_value"]["mean"] == 1.0 - real["death_opposite"]["mean"]
    for world in (dream, forced):
        assert set(world) == set(real)
        assert all(
            0.0 <= v["mean"] <= 1.0 for k, v in world.items() if k not in ("dodge_value", "hold_value")
        )
    assert (
        abs(dream["dodge_value"]["mean"] - (dream["death_taken"]["mean"] - dream["death_opposite"]["mean"]))
        < 1e-3
    )
    # holding one action for the branch: the real hold value takes each point's safer hold, so it is at least
    # what the safer hold on average gives; the hold the dream picks cannot beat each point's safer one
    assert (
        real["hold_value"]["mean"]
        >= 1.0 - min(real["death_hold_0"]["mean"], real["death_hold_1"]["mean"]) - 1e-9
    )
    assert -1.0 <= out["dream_hold_choice"]["real_value"]["mean"] <= real["hold_value"]["mean"] + 1e-9
    # the fireball colour key per branch step, for the real branches and the dream's, at the death points
    pix = out["fireball_pixels"]
    assert set(pix) == {"context", "real_taken", "real_opposite", "dream_taken", "dream_opposite"}
    for name in ("real_taken", "dream_taken", "dream_opposite"):
        assert len(pix[name]["total"]) == 3 and all(
            0 <= c <= t for c, t in zip(pix[name]["centre"], pix[name]["total"])
        )
    # ViZDoom returns the previous frame again at a death: the taken branches end on a repeated frame
    assert pix["real_taken"]["total"][-1] == pix["real_taken"]["total"][-2]
    # the dream predicts some risk of dying from untrained weights; a hazard scale of 0 removes every death
    assert dream["death_taken"]["mean"] > 0.0
    zero = _bench(tc_bundle, "--episodes", "1", "--hazard-scale", "0")
    assert all(v["mean"] == 0.0 for w in ("dream", "teacher_forced") for v in zero[w].values())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--context", "99"], "--context: got 99, expected 1.."),
        (["--decode", "maskgit"], "--decode maskgit: this bundle's prior has no MaskGIT stream"),
        (["--termination-source", "unroll"], "--termination-source unroll: the bundle has no hazard unroll"),
    ],
)
def test_bench_dodge_rejects_bad_arguments(tc_bundle, args, message):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dodge.py"), "--checkpoint", str(tc_bundle), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and message in res.stderr


def test_fireball_pixels_count_the_colour_key_above_the_hud():
    bench = load_benchmark("bench_dodge")
    frames = np.full((2, 32, 32, 3), (120, 80, 40), np.uint8)  # brown wall
    frames[0, 10:12, 2:4] = (255, 220, 120)  # a fireball dot at the left edge: 4 pixels
    frames[0, 14:17, 14:17] = (250, 200, 90)  # a closer one in the middle: 9 pixels
    frames[:, 30:] = (255, 0, 0)  # the health bar (the HUD's bottom 32 // 16 = 2 rows) is not a fireball
    frames[1, 29, :] = (
        255,
        255,
        255,
    )  # a white row just above the HUD is counted: 32 pixels, 12 of them central
    assert bench.fireball_pixels(frames).tolist() == [[13.0, 9.0], [32.0, 12.0]]
    steps = bench.per_step_pixels([np.array([[4.0, 1.0], [6.0, 3.0]]), np.array([[2.0, 1.0]])], 3)
    assert steps == {"total": [3.0, 6.0, None], "centre": [1.0, 3.0, None]}
