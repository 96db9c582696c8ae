"""Fault injection: writers killed with SIGKILL at random points lose nothing that was stored and resume exactly.

Twenty kills in all: 7 of ``experiments/collect.py`` (real ViZDoom HGS), 7 of ``experiments/convert.py`` (a
robomimic-format hdf5 file written with h5py) and 6 of ``experiments/train.py --stage all`` (tokenizer, token cache,
prior at micro scale). Each run is the CLI script itself, executed with its command line in a process forked from
this one (``runpy``, as ``python script.py ...`` would, minus the interpreter start-up the 20+ runs cannot afford on
2 cores); ``os.kill(pid, SIGKILL)`` ends it. Where it dies is drawn from a seeded RNG: during start-up (a random
delay), or after a random number of units of progress (new shards; checkpoints) plus a random delay that spans one
unit, so kills land in episode collection, shard writes, metadata writes, training steps and checkpoint commits.

After every kill: every stored episode loads in full (frames, actions, rewards, terminations), none of the episodes
seen before is lost or changed, none is stored twice; for training, each stage's weights and trainer state form a
consistent checkpoint (``load_checkpoint`` accepts them) whose step never goes back. The same command run again
then ends with exactly the requested number of episodes (converted episodes equal to their source), and the
killed-and-resumed training ends on weights bit-identical to an uninterrupted run's (exact resume).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.fixtures_formats import write_robomimic
from tests.test_engine_cleanup import session_processes

ROOT = Path(__file__).resolve().parents[1]
KILLS = {"collect": 7, "convert": 7, "train": 6}  # 20 in all
assert sum(KILLS.values()) == 20


def _tqdm_classes() -> list[type]:
    """The tqdm classes the scripts draw bars with: ``tqdm.auto``'s is a subclass that keeps its own lock and
    monitor thread once it has drawn a bar, so settings made on the base class alone do not reach it."""
    import tqdm.auto
    import tqdm.std

    return [tqdm.std.tqdm, tqdm.auto.tqdm]


def _private_tqdm_locks() -> None:
    """Give every tqdm class a lock of this process alone. tqdm's default lock includes a process-shared semaphore
    (``multiprocessing.RLock``) inherited through fork: a run SIGKILLed while it drew a bar would leave it held for
    every later run and for this test process, which then hangs at its next progress bar (even a disabled one)."""
    for cls in _tqdm_classes():
        cls.set_lock(threading.RLock())


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import, once, what the scripts import (the forked runs then start in milliseconds); keep tqdm's monitor
    threads from running in this process (the runs are forked from it: only its main thread should exist) and its
    locks private to each process."""
    saved = []
    for cls in _tqdm_classes():
        saved.append((cls, cls.monitor_interval, cls.__dict__.get("_lock")))
        cls.monitor_interval = 0
        monitor = cls.__dict__.get("monitor")
        if monitor is not None:
            monitor.exit()
            cls.monitor = None
    _private_tqdm_locks()
    import tyro  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import envs  # noqa: F401
    import envs.collect  # noqa: F401
    import worldmodel.bundle  # noqa: F401
    import worldmodel.dynamics_eval  # noqa: F401
    import worldmodel.prior  # noqa: F401
    import worldmodel.sources  # noqa: F401
    import worldmodel.stages  # noqa: F401
    import worldmodel.tokenizer  # noqa: F401

    torch.optim.AdamW(
        [torch.nn.Parameter(torch.zeros(1))]
    )  # the first optimizer imports torch._dynamo (~1.5 s)
    yield
    for cls, interval, lock in reversed(saved):
        cls.monitor_interval = interval
        if lock is None:
            del cls._lock
        else:
            cls._lock = lock


def _run_script(script: str, argv: list[str], cwd: str, log: str) -> None:  # in the forked child
    os.setsid()  # its own session: what it starts (env workers, engines) is found and reaped after the kill
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout, sys.stderr = (
        open(1, "w", buffering=1, closefd=False),
        open(2, "w", buffering=1, closefd=False),
    )  # noqa: SIM115
    os.chdir(cwd)
    torch.set_num_threads(1)
    _private_tqdm_locks()  # fresh ones: a lock another thread of the parent held at the fork is never released here
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


class Runner:
    """Runs one CLI command again and again in forked processes, killing it at seeded random points."""

    def __init__(
        self, script: str, argv: list[str], workdir: Path, progress: Callable[[], int], seed: int
    ) -> None:
        self.script, self.argv, self.workdir, self.progress = str(ROOT / script), argv, workdir, progress
        self.rng = random.Random(seed)
        self.log = workdir / f"{Path(script).stem}.log"
        self.kills: list[str] = []
        self.leftovers: list[str] = []  # processes a run left running after it ended or was killed

    def _start(self) -> mp.process.BaseProcess:
        p = mp.get_context("fork").Process(
            target=_run_script, args=(self.script, self.argv, str(self.workdir), str(self.log))
        )
        p.start()
        return p

    def _reap(self, p: mp.process.BaseProcess) -> None:
        """Wait for what the run started to end (a killed collection's env workers exit, closing their engines,
        when their pipe to it breaks); kill and record whatever is left (checked by the caller)."""
        deadline = time.monotonic() + 10
        while session_processes(p.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid, name in session_processes(p.pid):
            os.kill(pid, signal.SIGKILL)
            self.leftovers.append(name)

    def run_to_end(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        p = self._start()
        p.join(timeout)
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
            p.join()
        self._reap(p)
        assert p.exitcode == 0, f"{self.script} exited with {p.exitcode}:\n{self.log.read_text()[-3000:]}"
        return time.monotonic() - t0

    def run_and_kill(self, units: int | None, unit_window: float, startup_window: float) -> bool:
        """Start the command and SIGKILL it: during start-up, after a random delay in ``[0, startup_window)``
        (``units`` None), or once it made ``units`` units of progress, plus a random delay of up to one unit's
        duration (the shortest one measured, else ``unit_window`` seconds): the kill lands anywhere in the next unit's
        work, whatever the machine's speed. True if it was killed (it had not finished)."""
        p = self._start()
        if units is None:
            delay = self.rng.uniform(0, startup_window)
        else:
            base = last = self.progress()
            stamps: list[float] = []
            deadline = time.monotonic() + 60
            while last < base + units and p.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.002)
                now = self.progress()
                if now != last:
                    stamps.append(time.monotonic())
                    last = now
            # The shortest unit seen bounds the delay: one slow unit (an fsync, a stall of the machine) must not
            # stretch it over several fast ones, or the kill lands after the last unit and there is nothing to resume.
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            delay = self.rng.uniform(0, min(gaps) if gaps else unit_window)
        time.sleep(delay)
        alive = p.exitcode is None
        if alive:
            os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        self._reap(p)
        killed = alive and p.exitcode == -signal.SIGKILL
        if killed:
            self.kills.append(
                f"start-up + {delay * 1000:.0f} ms"
                if units is None
                else f"{units} units + {delay * 1000:.0f} ms"
            )
        else:
            assert p.exitcode == 0, (
                f"{self.script} failed on its own ({p.exitcode}):\n{self.log.read_text()[-3000:]}"
            )
        return killed

    def kill_repeatedly(
        self,
        n: int,
        done: Callable[[], int],
        total: int,
        check: Callable[[], None],
        unit_window: float,
        startup_window: float,
    ) -> None:
        """``n`` killed runs: one during start-up, the others once the work ``done()`` (units, out of ``total``)
        reaches targets drawn at random over the whole run (sorted, so each run moves the work on), each run
        followed by ``check()``."""
        targets: list[int | None] = sorted(self.rng.sample(range(1, total - 4), n - 1))  # type: ignore[arg-type]
        targets.insert(self.rng.randrange(n), None)
        for target in targets:
            units = None if target is None else max(1, target - done())
            assert self.run_and_kill(units, unit_window, startup_window), (
                f"a run finished before its kill ({self.kills})"
            )
            check()
        assert not self.leftovers, f"processes left running after a kill: {self.leftovers}"


def _hold_the_bar_lock(ready: int) -> None:
    """In the forked child: take the lock a bar draws under, say so, and wait to be killed."""
    from tqdm.auto import tqdm

    tqdm.get_lock().acquire()
    os.write(ready, b"x")
    time.sleep(60)


def test_a_run_killed_while_drawing_a_bar_leaves_no_lock_held():
    """The state of a run killed mid-bar: this process (and every later run) can still draw progress bars."""
    from tqdm.auto import tqdm

    tqdm(total=1, disable=True).close()  # the class has made its lock, as after any earlier test's bar
    r, w = os.pipe()
    p = mp.get_context("fork").Process(target=_hold_the_bar_lock, args=(w,))
    p.start()
    try:
        assert os.read(r, 1) == b"x"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        os.close(r)
        os.close(w)
    bar = threading.Thread(target=lambda: tqdm(range(3), disable=True).close(), daemon=True)
    bar.start()
    bar.join(10)
    assert not bar.is_alive(), "a progress bar waits for the lock the killed run held"


# ---------------------------------------------------------------------------------------------- stores


def n_shards(store: Path) -> int:
    return len(list(store.glob("shard-*.h5"))) if store.is_dir() else 0


def _digest(ep) -> str:
    h = hashlib.sha256()
    for a in (ep.frames, ep.actions, ep.rewards, ep.terminated):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_store(store: Path, seen: dict[str, str], obs_shape: tuple[int, int, int]) -> dict[str, str]:
    """Every stored episode loads in full; every one in ``seen`` is still there, unchanged; none is stored twice.
    Returns ``{episode id: content digest}``."""
    from worldmodel.store import EpisodeStore

    if not (store / "store.json").exists():  # killed before the writer first wrote the store's metadata
        assert not seen and n_shards(store) == 0
        return {}
    st = EpisodeStore(store)  # opens only complete shards, checksummed: raises on any half or corrupt one
    per_shard = 0
    for shard in store.glob("shard-*.h5"):
        with h5py.File(shard, "r") as f:
            per_shard += len(f["episodes"])
    assert per_shard == len(st), (
        f"{per_shard} episodes in the shards, {len(st)} distinct ids: one stored twice"
    )
    now = {}
    for eid in st.episode_ids():
        ep = st.load(eid)
        T = len(ep.frames)
        assert T >= 2 and ep.frames.shape == (T, *obs_shape) and ep.frames.dtype == np.uint8
        assert len(ep.actions) == len(ep.rewards) == len(ep.terminated) == T - 1
        now[eid] = _digest(ep)
    lost = {e for e in seen if now.get(e) != seen[e]}
    assert not lost, f"episodes lost or changed by a kill: {sorted(lost)}"
    return now


def test_collect_killed_at_random_points(tmp_path):
    episodes = 24
    store = tmp_path / "store"
    argv = [
        "--env",
        "vizdoom_hgs",
        "--episodes",
        str(episodes),
        "--num-envs",
        "2",
        "--resolution",
        "32",
        "--episodes-per-shard",
        "1",
        "--out",
        str(store),
    ]
    runner = Runner("experiments/collect.py", argv, tmp_path, lambda: n_shards(store), seed=16)
    seen: dict[str, str] = {}

    def check() -> None:
        nonlocal seen
        seen = check_store(store, seen, (32, 32, 3))
        assert len(seen) < episodes, "the kills must leave collecting to the resumed run"

    runner.kill_repeatedly(
        KILLS["collect"], lambda: n_shards(store), episodes, check, unit_window=0.15, startup_window=0.6
    )
    runner.run_to_end()  # the same command, once more
    final = check_store(store, seen, (32, 32, 3))
    assert len(final) == episodes  # exactly the requested count: nothing lost, nothing duplicated
    assert sorted(final) == [f"ep-{i:07d}" for i in range(episodes)]


def test_convert_killed_at_random_points(tmp_path):
    from worldmodel.store import EpisodeStore

    n = 48
    rng = np.random.default_rng(16)
    src = tmp_path / "lift_image.hdf5"
    # 64x64 demos of 24-40 steps: each shard's write must take well over the 2 ms progress poll, or on a fast machine
    # the whole conversion ends between two polls and a kill lands after the last shard
    truth = write_robomimic(
        src,
        lengths=tuple(int(x) for x in rng.integers(24, 41, n)),
        H=64,
        W=64,
        masks={"train": list(range(n - 4)), "valid": list(range(n - 4, n))},
    )
    store = tmp_path / "store"
    argv = ["robomimic", str(src), "--out", str(store), "--episodes-per-shard", "2"]
    runner = Runner("experiments/convert.py", argv, tmp_path, lambda: n_shards(store), seed=1616)
    seen: dict[str, str] = {}

    def same_as_source(ids) -> None:
        st = EpisodeStore(store)
        for eid in ids:  # each stored episode is its demo, whole
            d, ep = truth[eid.removeprefix("lift_image-")], st.load(eid)
            assert np.array_equal(ep.frames, np.concatenate([d["obs"], d["next_obs"][-1:]]))
            assert np.array_equal(ep.actions, d["actions"].astype(np.float32))
            assert np.array_equal(ep.rewards, d["rewards"].astype(np.float32))
            assert np.array_equal(ep.terminated, d["dones"] != 0)

    def check() -> None:
        nonlocal seen
        seen = check_store(store, seen, (64, 64, 3))
        assert len(seen) < n, "the kills must leave converting to the resumed run"
        if seen:
            same_as_source(seen)

    runner.kill_repeatedly(
        KILLS["convert"], lambda: n_shards(store), n // 2, check, unit_window=0.03, startup_window=0.15
    )
    runner.run_to_end()
    final = check_store(store, seen, (64, 64, 3))
    assert sorted(final) == sorted(f"lift_image-demo_{i}" for i in range(n))  # every demo, once
    same_as_source(final)


# ---------------------------------------------------------------------------------------------- training


STEPS = 20
TRAIN_MICRO = [
    "--env",
    "vizdoom_hgs",
    "--stage",
    "all",
    "--no-rollout-videos",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--config.data.clip-len",
    "4",
    "--config.tokenizer.channels",
    "16",
    "--config.tokenizer.n-res-layers",
    "1",
    "--config.tokenizer.n-heads",
    "2",
    "--config.tokenizer.codebook-size",
    "32",
    "--config.tokenizer.embedding-dim",
    "8",
    "--config.tokenizer.max-frames",
    "4",
    "--config.prior.n-layer",
    "1",
    "--config.prior.n-head",
    "2",
    "--config.prior.n-embd",
    "32",
    "--config.prior.frames",
    "4",
]
for _section in ("tokenizer-train", "prior-train"):
    TRAIN_MICRO += [
        f"--config.{_section}.steps",
        str(STEPS),
        f"--config.{_section}.batch-size",
        "2",
        f"--config.{_section}.warmup-steps",
        "1",
        f"--config.{_section}.log-every",
        "1",
        f"--config.{_section}.eval-every",
        "10",
        f"--config.{_section}.ckpt-every",
        "1",
        # fixed numerics: the preset's bf16 "auto" probe may choose differently in the reference and the killed run
        f"--config.{_section}.bf16",
        "False",
    ]


class Checkpoints:
    """Progress of a training run: how many times ``model.safetensors`` was replaced (one per checkpoint)."""

    def __init__(self, run: Path) -> None:
        self.path, self.last, self.count = run / "model.safetensors", None, 0

    def __call__(self) -> int:
        try:
            st = self.path.stat()
            sig = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            sig = None
        if sig != self.last:
            self.last, self.count = sig, self.count + (sig is not None)
        return self.count


def test_train_killed_at_random_points_resumes_exactly(tmp_path, hgs_store):
    from safetensors.torch import load_file

    from worldmodel.checkpoint import load_checkpoint, pending_state_path

    ref = tmp_path / "ref"
    Runner(
        "experiments/train.py",
        [*TRAIN_MICRO, "--config.data.store", str(hgs_store), "--run-dir", str(ref)],
        tmp_path,
        lambda: 0,
        seed=0,
    ).run_to_end()
    run = tmp_path / "run"
    runner = Runner(
        "experiments/train.py",
        [*TRAIN_MICRO, "--config.data.store", str(hgs_store), "--run-dir", str(run)],
        tmp_path,
        Checkpoints(run),
        seed=161616,
    )
    steps = {"tokenizer": 0, "prior": 0}

    def check() -> None:
        total = 0
        for stage in steps:
            found = load_checkpoint(
                run, stage
            )  # weights and trainer state consistent (raises naming the files if not)
            step = 0 if found is None else int(found[0]["step"])
            assert step >= steps[stage], f"{stage}: committed step went back from {steps[stage]} to {step}"
            steps[stage] = step
            total += step
        assert total < 2 * STEPS, "the kills must leave training to the resumed run"

    runner.kill_repeatedly(
        KILLS["train"], lambda: sum(steps.values()), 2 * STEPS, check, unit_window=0.1, startup_window=0.5
    )
    runner.run_to_end()
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert sorted(a) == sorted(b) and any(k.startswith("prior.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    for stage in steps:
        state, _ = load_checkpoint(run, stage)
        assert state["step"] == STEPS and not pending_state_path(run, stage).exists()
