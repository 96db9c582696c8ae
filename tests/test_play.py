"""Interactive play: key -> action mapping for both ViZDoom action sets, and a scripted recorded session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av

from envs.vizdoom import action_names

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from play import action_for_keys  # noqa: E402


def test_keys_map_to_named_actions():
    hgs = tuple(action_names("vizdoom_hgs"))
    assert hgs[action_for_keys({"up"}, hgs)] == "forward"
    assert hgs[action_for_keys({"up", "left"}, hgs)] == "forward_left"
    assert hgs[action_for_keys({"right"}, hgs)] == "turn_right"
    assert (
        action_for_keys(set(), hgs) is None and action_for_keys({"space"}, hgs) is None
    )  # HGS cannot attack
    b2 = tuple(action_names("vizdoom_battle2"))
    assert b2[action_for_keys({"up", "right"}, b2)] == "run_forward_right"
    assert b2[action_for_keys({"space"}, b2)] == "attack"
    assert b2[action_for_keys({"space", "left"}, b2)] == "attack_turn_left"


def test_scripted_session_switches_envs_and_records(tiny_bundle, tmp_path):
    out = tmp_path / "session.mp4"
    script = "up,up,left,up+right,tab,up,up,left,tab,reset,up"
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "play.py"),
            "--checkpoint",
            str(tiny_bundle),
            "--keys",
            script,
            "--record",
            str(out),
            "--scale",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == len(script.split(",")) + 1 and frames[0].shape == (64, 64, 3)
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "play.py"),
            "--checkpoint",
            str(tiny_bundle),
            "--keys",
            "up,jump",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode != 0 and "unknown key names ['jump']" in res.stderr
