"""Every ViZDoom engine a run starts is closed on every exit path: an error before or during collection,
SIGTERM and Ctrl-C. Each case runs in its own session, whose processes are listed from /proc afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live process in session ``sid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if rest[0] != "Z" and int(rest[3]) == sid:
            out.append((int(d), name))
    return out


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # A shell without job control starts background jobs (`cmd &`, as CI scripts do) with SIGINT ignored, and the
    # child inherits that: Python then installs no KeyboardInterrupt handler and Ctrl-C would do nothing. The
    # run gets SIGINT's default back, as in the user's terminal.
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    """Wait for the run and for its pipes to close (an engine left running holds them open), then check that
    no process of its session is left; kills (and fails on) any leftover."""
    try:
        _, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        err = b"(output never closed)"
    deadline = time.monotonic() + 10
    while session_processes(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_processes(p.pid)
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running: {left}; stderr: {err.decode()[-2000:]}"
    return p.returncode, err.decode()


def _wait_for_engines(p: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + 60
    while sum(name == "vizdoom" for _, name in session_processes(p.pid)) < n:
        assert p.poll() is None and time.monotonic() < deadline, "the collection never started its engines"
        time.sleep(0.05)
    time.sleep(0.5)  # let the workers' envs reset and collection begin


COLLECT = [
    sys.executable,
    str(ROOT / "experiments" / "collect.py"),
    "--episodes",
    "50",
    "--num-envs",
    "2",
    "--resolution",
    "32",
]


def test_bad_policy_file_leaves_no_engine(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_text("not a policy")
    rc, err = _finish(_start([*COLLECT, "--policy", str(bad), "--out", str(tmp_path / "s")], tmp_path))
    assert rc != 0 and "bad.zip" in err


def test_error_during_collection_leaves_no_engine(tmp_path):
    code = (
        "import numpy as np\n"
        "from envs.collect import collect\n"
        "calls = []\n"
        "def policy(obs):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 20:\n"
        "        raise RuntimeError('policy failed')\n"
        "    return np.zeros(len(obs), np.int64)\n"
        f"collect('vizdoom_hgs', {str(tmp_path / 's')!r}, 50, policy=policy, num_envs=2, progress=False,\n"
        "        env_kwargs={'resolution': 32})\n"
    )
    rc, err = _finish(_start([sys.executable, "-c", code], tmp_path))
    assert rc != 0 and "policy failed" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_collection_leaves_no_engine(sig, tmp_path):
    p = _start([*COLLECT, "--out", str(tmp_path / "s")], tmp_path)
    _wait_for_engines(p, 2)
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)  # Ctrl-C in a terminal: the whole foreground process group
    else:
        os.kill(p.pid, sig)  # a job scheduler / `kill`: the main process only
    rc, _ = _finish(p)
    assert rc != 0
