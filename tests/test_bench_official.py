"""bench_official.py refuses what it cannot measure before any work: a path that is not a VideoGPT checkout, bad counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "has no videogpt/attention.py; expected a checkout of https://github.com/wilson1yan/VideoGPT"),
        (["--repeats", "0"], "--repeats: got 0, expected >= 1"),
        (["--maskgit-steps", "0"], "--maskgit-steps: got [0], expected integers >= 1"),
    ],
)
def test_bench_official_rejects_bad_arguments(tmp_path, args, message):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_official.py"), "--official", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
