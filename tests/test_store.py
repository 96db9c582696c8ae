"""Episode store: round trips, atomicity, corruption handling, clip windows, sampler."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
import warnings

import h5py
import numpy as np
import pytest
import torch

from worldmodel.store import (
    ActionSpec,
    EpisodeStore,
    StoreError,
    StoreLockedError,
    StoreWriter,
    heldout_episode_ids,
)
from worldmodel.training_data import ClipDataset, SeededSampler

OBS = (8, 8, 3)


def _episode(rng: np.random.Generator, T: int, spec: ActionSpec) -> dict:
    d = {
        "frames": rng.integers(0, 256, (T, *OBS), dtype=np.uint8),
        "rewards": rng.normal(size=T - 1).astype(np.float32),
        "terminated": np.zeros(T - 1, bool),
    }
    if T > 1:
        d["terminated"][-1] = True
    if spec.kind == "discrete":
        d["actions"] = rng.integers(0, spec.n, T - 1)
    elif spec.kind == "continuous":
        d["actions"] = rng.normal(size=(T - 1, spec.dim)).astype(np.float32)
    return d


SPECS = {
    "discrete": ActionSpec.discrete(5),
    "continuous": ActionSpec.continuous(4, low=[-1] * 4, high=[1] * 4),
    "none": ActionSpec.none(),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_round_trip(tmp_path, kind):
    spec = SPECS[kind]
    rng = np.random.default_rng(0)
    eps = [_episode(rng, T, spec) for T in (5, 9, 1, 12)]
    with StoreWriter(
        tmp_path, source="test", obs_shape=OBS, action_spec=spec, fps=8.75, episodes_per_shard=3
    ) as w:
        ids = [
            w.add_episode(
                **e, attrs={"label": i, "name": f"e{i}"}, extras={"pos": np.arange(len(e["frames"]))}
            )
            for i, e in enumerate(eps)
        ]
    assert sorted(p.name for p in tmp_path.glob("shard-*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    store = EpisodeStore(tmp_path)
    assert store.meta.action_spec == spec and store.meta.obs_shape == OBS and store.meta.fps == 8.75
    assert store.episode_ids() == sorted(ids)
    for i, (eid, e) in enumerate(zip(ids, eps)):
        got = store.load(eid)
        np.testing.assert_array_equal(got.frames, e["frames"])
        np.testing.assert_array_equal(got.rewards, e["rewards"])
        np.testing.assert_array_equal(got.terminated, e["terminated"])
        np.testing.assert_array_equal(got.extras["pos"], np.arange(len(e["frames"])))
        assert got.attrs["label"] == i and got.attrs["name"] == f"e{i}"
        if kind == "none":
            assert got.actions is None
        else:
            np.testing.assert_array_equal(got.actions, e["actions"])
            assert got.actions.dtype == (np.int64 if kind == "discrete" else np.float32)
    meta = json.loads((tmp_path / "store.json").read_text())
    assert meta["num_episodes"] == 4 and sum(len(v) for v in meta["splits"].values()) == 4


def test_append_reopens_and_rejects_mismatch(tmp_path):
    spec = SPECS["discrete"]
    rng = np.random.default_rng(1)
    with StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=spec, episodes_per_shard=2) as w:
        for _ in range(3):
            w.add_episode(**_episode(rng, 4, spec))
    with StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=spec, episodes_per_shard=2) as w:
        assert w.num_episodes == 3
        new_id = w.add_episode(**_episode(rng, 4, spec))
    assert new_id == "ep-0000003" and len(EpisodeStore(tmp_path)) == 4
    with pytest.raises(StoreError, match="action_spec"):
        StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(7))


def test_bad_episode_inputs_raise_and_writer_stays_usable(tmp_path):
    spec = SPECS["continuous"]
    rng = np.random.default_rng(2)
    w = StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=spec)
    good = _episode(rng, 6, spec)
    with pytest.raises(StoreError, match=r"frames: got float64"):
        w.add_episode(**{**good, "frames": good["frames"].astype(float)})
    with pytest.raises(StoreError, match=r"actions: got .*expected float32 \(5, 4\)"):
        w.add_episode(**{**good, "actions": good["actions"][:, :3]})
    with pytest.raises(StoreError, match="NaN"):
        w.add_episode(**{**good, "actions": np.full((5, 4), np.nan, np.float32)})
    with pytest.raises(StoreError, match="rewards"):
        w.add_episode(**{**good, "rewards": np.zeros(6, np.float32)})
    wd = StoreWriter(tmp_path / "d", source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3))
    with pytest.raises(StoreError, match=r"values must lie in \[0, 3\)"):
        wd.add_episode(frames=good["frames"], actions=np.array([0, 1, 2, 3, 0]))
    w.add_episode(**good)
    w.close()
    assert len(EpisodeStore(tmp_path)) == 1


def _write_forever(root: str, ready) -> None:  # runs in a child process that gets SIGKILLed
    spec = ActionSpec.discrete(5)
    rng = np.random.default_rng(0)
    w = StoreWriter(root, source="t", obs_shape=(64, 64, 3), action_spec=spec, episodes_per_shard=1)
    big = {
        "frames": rng.integers(0, 256, (400, 64, 64, 3), dtype=np.uint8),
        "actions": np.zeros(399, np.int64),
    }
    w.add_episode(**big)  # one complete shard
    ready.set()
    while True:
        w.add_episode(**big)


def test_crash_mid_shard_leaves_no_readable_half_shard(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_write_forever, args=(str(tmp_path), ready))
    p.start()
    assert ready.wait(60)
    # Kill while a shard is being written (its temporary file exists).
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".shard-*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.0005)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert list(tmp_path.glob(".shard-*.tmp")), "the writer was not caught mid-shard"
    store = EpisodeStore(tmp_path)  # must open cleanly: no half shard is ever named shard-*.h5
    assert len(store) >= 1
    for eid in store.episode_ids():
        assert store.load(eid).frames.shape == (400, 64, 64, 3)
    # Reopening for append cleans the leftover temporary file and continues numbering.
    w = StoreWriter(tmp_path, source="t", obs_shape=(64, 64, 3), action_spec=ActionSpec.discrete(5))
    assert not list(tmp_path.glob(".shard-*.tmp"))
    assert w.num_episodes == len(store)


def _hold_writer(root: str, ready, release) -> None:  # child process: holds the store's writer lock
    w = StoreWriter(root, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3))
    ready.set()
    release.wait(60)
    w.close()


def _writer_with_a_forked_worker(
    root: str, ready, worker_pid
) -> None:  # SIGKILLed with its worker still alive
    w = StoreWriter(root, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3))
    worker = mp.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
    worker.start()  # as collect's AsyncVectorEnv workers: forked while the writer is open
    worker_pid.value = worker.pid
    ready.set()
    time.sleep(60)
    w.close()


def test_a_killed_writer_releases_the_store_even_while_its_forked_workers_live(tmp_path):
    ctx = mp.get_context("fork")
    ready, worker_pid = ctx.Event(), ctx.Value("i", 0)
    p = ctx.Process(target=_writer_with_a_forked_worker, args=(str(tmp_path), ready, worker_pid))
    p.start()
    try:
        assert ready.wait(60)
        os.kill(p.pid, signal.SIGKILL)
        while p.exitcode is None:  # (not join(): the worker inherited the pipe join waits on)
            time.sleep(0.01)
        os.kill(
            worker_pid.value, 0
        )  # the orphaned worker is still alive (it inherited the writer's descriptors)
        # ... and yet the store is free at once: a resumed run is not refused in the name of a dead writer
        StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3)).close()
    finally:
        if worker_pid.value:
            os.kill(worker_pid.value, signal.SIGKILL)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_writer, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StoreLockedError, match=rf"pid {p.pid}\b.*\.writer\.lock"):
            StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3))
    finally:
        release.set()
        p.join(60)
    # the holder is gone: writing works again, and in this process one writer still excludes a second
    w = StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3))
    with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}\b"):
        StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3))
    w.close()
    w.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        w.add_episode(np.zeros((2, *OBS), np.uint8), np.zeros(1, np.int64))
    StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=ActionSpec.discrete(3)).close()


def test_a_shard_name_taken_meanwhile_is_never_overwritten(tmp_path):
    """Shard names are claimed with a no-replace link: a shard that appeared after the writer opened
    (a writer that ignored the lock) keeps its bytes, and the new shard takes the next free name."""
    spec = ActionSpec.discrete(3)
    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=spec, episodes_per_shard=1)
    other = tmp_path / "other"
    with StoreWriter(other, source="t", obs_shape=OBS, action_spec=spec, episodes_per_shard=1) as o:
        theirs = o.add_episode(**_episode(rng, 5, spec), episode_id="theirs")
    os.link(other / "shard-00000.h5", tmp_path / "shard-00000.h5")
    before = (tmp_path / "shard-00000.h5").read_bytes()
    mine = w.add_episode(**_episode(rng, 5, spec), episode_id="mine")
    w.close()
    assert (tmp_path / "shard-00000.h5").read_bytes() == before
    store = EpisodeStore(tmp_path)
    assert store.index[mine]["shard"] == "shard-00001.h5" and store.index[theirs]["shard"] == "shard-00000.h5"
    assert not list(tmp_path.glob(".shard-*"))


def test_append_with_other_metadata_names_the_keys_unless_merged(tmp_path):
    spec = ActionSpec.none()
    rng = np.random.default_rng(0)
    ucf = {"dataset": "UCF-101", "fold": 1, "class_names": ["A", "B"], "env_kwargs": {"frame_skip": "4"}}
    with StoreWriter(tmp_path, source="ucf101", obs_shape=OBS, action_spec=spec, fps=25.0, extra=ucf) as w:
        w.add_episode(**_episode(rng, 4, spec))
    before = (tmp_path / "store.json").read_text()
    cases = [
        ({"source": "tgif"}, ["source"]),
        ({"fps": 10.0}, ["fps"]),
        ({"extra": {**ucf, "fold": 2}}, ["extra.fold"]),
        ({"extra": {**ucf, "class_names": ["A", "C"]}}, ["extra.class_names"]),
        ({"extra": {**ucf, "env_kwargs": {"frame_skip": "2"}}}, ["extra.env_kwargs.frame_skip"]),
        ({"extra": {**ucf, "resolution": 64}}, ["extra.resolution"]),
    ]
    for change, keys in cases:
        kw = {"source": "ucf101", "fps": 25.0, "extra": ucf, **change}
        with pytest.raises(StoreError, match="merge") as e:
            StoreWriter(tmp_path, obs_shape=OBS, action_spec=spec, **kw)
        for k in keys:
            assert f"{k}: store has" in str(e.value)
        assert (tmp_path / "store.json").read_text() == before  # nothing rewritten
    # the same settings (tuples vs JSON lists, keys the store has and the caller omits) append fine
    with StoreWriter(
        tmp_path,
        source="ucf101",
        obs_shape=OBS,
        action_spec=spec,
        fps=25.0,
        extra={"fold": 1, "class_names": ("A", "B")},
    ) as w:
        w.add_episode(**_episode(rng, 4, spec))
    with StoreWriter(
        tmp_path,
        source="tgif",
        obs_shape=OBS,
        action_spec=spec,
        fps=10.0,
        extra={"dataset": "TGIF-v1.0"},
        merge=True,
    ) as w:
        w.add_episode(**_episode(rng, 4, spec))
    store = EpisodeStore(tmp_path)
    assert len(store) == 3 and store.meta.source == "ucf101" and store.meta.fps == 25.0
    assert store.meta.extra["fold"] == 1 and store.meta.extra["dataset"] == "UCF-101"
    assert store.meta.extra["appended_with"] == [
        {"source": "tgif", "fps": 10.0, "extra.dataset": "TGIF-v1.0"}
    ]


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _make_store(tmp_path / "s", n_eps=2, per_shard=1)
    finally:
        os.umask(old)
    for p in [tmp_path / "s" / "store.json", *(tmp_path / "s").glob("shard-*.h5")]:
        assert p.stat().st_mode & 0o777 == 0o644, p


def _make_store(root, n_eps=4, T=10, per_shard=2, spec=SPECS["discrete"]) -> list[str]:
    rng = np.random.default_rng(3)
    with StoreWriter(
        root,
        source="t",
        obs_shape=OBS,
        action_spec=spec,
        episodes_per_shard=per_shard,
        val_fraction=0,
        test_fraction=0,
    ) as w:
        return [w.add_episode(**_episode(rng, T, spec)) for _ in range(n_eps)]


def test_corrupt_and_missing_shard(tmp_path):
    _make_store(tmp_path, n_eps=4, per_shard=2)
    (tmp_path / "shard-00001.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(StoreError, match="shard-00001.h5"):
        EpisodeStore(tmp_path)
    with pytest.warns(UserWarning, match="shard-00001.h5"):
        store = EpisodeStore(tmp_path, skip_corrupt=True)
    assert len(store) == 2 and store.skipped == ["shard-00001.h5"]
    (tmp_path / "shard-00001.h5").unlink()
    with pytest.raises(StoreError, match="shard-00001.h5: file is missing"):
        EpisodeStore(tmp_path)


def test_wrong_field_dtype_is_named(tmp_path):
    ids = _make_store(tmp_path, n_eps=1, per_shard=1)
    with h5py.File(tmp_path / "shard-00000.h5", "a") as f:
        del f[f"episodes/{ids[0]}/actions"]
        f[f"episodes/{ids[0]}/actions"] = np.zeros(9, np.float32)
    with pytest.raises(StoreError, match=r"shard-00000.h5: episode 'ep-0000000': field 'actions' is float32"):
        EpisodeStore(tmp_path)
    (tmp_path / "store.json").unlink()
    with pytest.raises(StoreError, match="store.json: missing"):
        EpisodeStore(tmp_path)


def test_clip_windows_respect_episode_boundaries(tmp_path):
    rng = np.random.default_rng(4)
    spec = SPECS["discrete"]
    lengths = [3, 7, 12, 5]
    with StoreWriter(
        tmp_path, source="t", obs_shape=OBS, action_spec=spec, val_fraction=0, test_fraction=0
    ) as w:
        for i, T in enumerate(lengths):
            e = _episode(rng, T, spec)
            e["frames"][:] = i  # every frame of episode i has value i: a crossing clip would mix values
            e["actions"][:] = i % spec.n
            w.add_episode(**e)
    ds = ClipDataset(tmp_path, split="train", clip_len=5)
    assert ds.num_skipped == 1  # the 3-frame episode
    assert len(ds) == (7 - 4) + (12 - 4) + (5 - 4)
    for k in range(len(ds)):
        item = ds[k]
        assert item["frames"].shape == (5, *OBS) and item["frames"].dtype == torch.uint8
        assert (
            item["actions"].shape == (4,)
            and item["rewards"].shape == (4,)
            and item["terminated"].dtype == torch.bool
        )
        vals = item["frames"].unique()
        assert len(vals) == 1 and (item["actions"] == int(vals) % spec.n).all()
    # Window content equals the stored episode slice.
    eid, start = ds.locate(5)
    ep = ds.store.load(eid)
    np.testing.assert_array_equal(ds[5]["rewards"].numpy(), ep.rewards[start : start + 4])
    with pytest.raises(ValueError, match="clip_len=13 is longer than every episode"):
        ClipDataset(tmp_path, clip_len=13)
    assert len(ClipDataset(tmp_path, clip_len=5, stride=5)) == 1 + 2 + 1


def test_action_free_clips_and_splits(tmp_path):
    rng = np.random.default_rng(5)
    spec = SPECS["none"]
    with StoreWriter(tmp_path, source="ucf", obs_shape=OBS, action_spec=spec) as w:
        w.add_episode(**_episode(rng, 6, spec), split="test")
        for _ in range(3):
            w.add_episode(**_episode(rng, 6, spec), split="train")
    ds = ClipDataset(tmp_path, split="test", clip_len=4)
    assert "actions" not in ds[0] and len(ds) == 3
    store = EpisodeStore(tmp_path)
    assert len(store.episode_ids("train")) == 3 and len(store.episode_ids("test")) == 1


def test_hash_split_is_deterministic_and_roughly_proportional(tmp_path):
    spec = SPECS["none"]
    frames = np.zeros((1, *OBS), np.uint8)
    with StoreWriter(
        tmp_path,
        source="t",
        obs_shape=OBS,
        action_spec=spec,
        episodes_per_shard=1000,
        val_fraction=0.1,
        test_fraction=0.1,
    ) as w:
        for _ in range(1000):
            w.add_episode(frames)
    store = EpisodeStore(tmp_path)
    n_val, n_test = len(store.episode_ids("val")), len(store.episode_ids("test"))
    assert 60 < n_val < 140 and 60 < n_test < 140


def test_seeded_sampler_resume_and_ranks():
    def take(s, k):
        it = iter(s)
        return [next(it) for _ in range(k)]

    full = take(SeededSampler(10, seed=3), 35)
    assert sorted(full[:10]) == list(range(10)) and full[:10] != full[10:20]
    assert take(SeededSampler(10, seed=3, start=17), 18) == full[17:35]
    assert take(SeededSampler(10, seed=4), 10) != full[:10]
    r0 = take(SeededSampler(10, seed=3, rank=0, world_size=2), 10)
    r1 = take(SeededSampler(10, seed=3, rank=1, world_size=2), 10)
    assert r0 == full[0:20:2] and r1 == full[1:20:2]
    r1_resumed = take(SeededSampler(10, seed=3, start=4, rank=1, world_size=2), 6)
    assert r1_resumed == r1[4:]


def test_flipped_bytes_in_a_frame_chunk_fail_naming_shard_and_episode(tmp_path):
    spec = SPECS["discrete"]
    rng = np.random.default_rng(5)
    with StoreWriter(
        tmp_path,
        source="t",
        obs_shape=OBS,
        action_spec=spec,
        episodes_per_shard=2,
        val_fraction=0,
        test_fraction=0,
    ) as w:
        ids = [w.add_episode(**_episode(rng, 6, spec)) for _ in range(2)]
    shard = tmp_path / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        d = f["episodes"][ids[1]]["frames"]
        assert d.fletcher32
        info = d.id.get_chunk_info(3)
    data = bytearray(shard.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = EpisodeStore(tmp_path)
    assert store.load(ids[0]).frames.shape == (6, *OBS)  # the other episode still reads
    for read in (lambda: store.load(ids[1]), lambda: store.read_clip(ids[1], 2, 3)):
        with pytest.raises(StoreError, match=rf"shard-00000\.h5: episode '{ids[1]}': reading .* failed"):
            read()
    assert store.read_clip(ids[1], 0, 2)["frames"].shape == (2, *OBS)  # undamaged chunks still read


def test_heldout_episode_ids_fall_back_to_the_other_heldout_split_then_warn_on_train(tmp_path):
    spec = SPECS["discrete"]
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path, source="test", obs_shape=OBS, action_spec=spec) as w:
        for T, split in ((3, "test"), (6, "val"), (9, "train")):
            w.add_episode(**_episode(rng, T, spec), split=split, episode_id=f"{split}-ep")
    store = EpisodeStore(tmp_path)
    assert heldout_episode_ids(store, "test", 3) == (["test-ep"], "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another held-out split: no warning
        assert heldout_episode_ids(store, "test", 5) == (["val-ep"], "val")
        assert heldout_episode_ids(store, "val", 2) == (["val-ep"], "val")
    with pytest.warns(UserWarning, match="no held-out episodes"):
        assert heldout_episode_ids(store, "test", 7) == (["train-ep"], "train")
    with pytest.raises(ValueError, match="has 10 frames"):
        heldout_episode_ids(store, "test", 10)


def test_index_is_appended_per_shard_and_folded_into_store_json_at_close_or_next_open(tmp_path):
    spec = SPECS["discrete"]
    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=spec, episodes_per_shard=1)
    opened = (tmp_path / "store.json").read_text()
    ids = [w.add_episode(**_episode(rng, 5, spec)) for _ in range(3)]
    assert (tmp_path / "store.json").read_text() == opened, "store.json is not rewritten per shard"
    lines = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [(d["shard"], list(d["episodes"])) for d in lines] == [
        (f"shard-0000{i}.h5", [e]) for i, e in enumerate(ids)
    ]
    # a writer killed now (no close): a torn last line is ignored, a journaled shard that vanishes is noticed
    with open(tmp_path / "index.jsonl", "a") as fh:
        fh.write('{"shard": "shard-000')
    assert sorted(EpisodeStore(tmp_path).episode_ids()) == sorted(ids)
    w._release()  # as a SIGKILL would: the lock goes, nothing else is written
    (tmp_path / "shard-00002.h5").rename(tmp_path / "elsewhere.h5")
    with pytest.raises(StoreError, match="shard-00002.h5: file is missing"):
        EpisodeStore(tmp_path)
    (tmp_path / "elsewhere.h5").rename(tmp_path / "shard-00002.h5")
    # the next writer folds the journal into store.json
    StoreWriter(tmp_path, source="t", obs_shape=OBS, action_spec=spec).close()
    assert not (tmp_path / "index.jsonl").exists()
    meta = json.loads((tmp_path / "store.json").read_text())
    assert meta["num_episodes"] == 3 and sorted(meta["episodes"]) == sorted(ids)
