"""BAIR robot pushing (``softmotion30_44k``) TFRecords -> episode store.

Source layout (the public tar, ``bair_robot_pushing_dataset_v0.tar``, ~30 GB)::

    softmotion30_44k/train/traj_<a>_to_<b>.tfrecords     256 trajectories per file, 43,264 in all
    softmotion30_44k/test/traj_0_to_255.tfrecords        256 test trajectories

Each record is a ``tf.train.Example`` with, for t = 0..29:

- ``{t}/image_aux1/encoded``, ``{t}/image_main/encoded``: one bytes value, the raw 64·64·3 uint8
  RGB pixels in row-major order (not PNG);
- ``{t}/action``: 4 floats; ``{t}/endeffector_pos``: 3 floats.

Stored episode (30 frames): ``frames`` from the chosen camera (default ``image_aux1``, the one
SAVP/VideoGPT use), ``actions[t] = {t}/action`` for t = 0..28 — the action taken at frame t, which
leads to frame t+1; the 30th action follows the last frame and is dropped — and
``extras/endeffector_pos`` float32 ``(30, 3)``. Rewards are zero and nothing terminates (the
dataset has neither). Attrs: ``source_file`` (path relative to ``softmotion30_44k``),
``record_index``, ``camera``. Splits: the ``test/`` files are ``test``; train trajectories go to
``val`` with probability ``val_fraction`` (by a hash of the episode id), else ``train``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from worldmodel.sources._common import ConvertReport, SourceError, episode_id, existing_episode_ids, fail
from worldmodel.sources._download import download_file, extract_once
from worldmodel.sources._video import as_path
from worldmodel.sources.tfrecord import TFRecordError, iter_records, parse_example
from worldmodel.store import ActionSpec, StoreWriter, split_for_id

URL = "http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar"
"""The public tar (softmotion30_44k/{train,test}/*.tfrecords). Plain http: the only address the dataset is
published at (every reference, TensorFlow Datasets included, uses it); the pinned :data:`SHA256` is what
makes the transfer trustworthy."""
SHA256 = "c6f8d164ab2be07174ef597e3e070d7466f3142caddc467b6af119b9458cd9cd"
"""SHA-256 of :data:`URL` (32,274,964,480 bytes) as published by TensorFlow Datasets
(``tensorflow_datasets/url_checksums/bair_robot_pushing_small.txt`` and ``bair_robot_pushing.txt``); the
authors publish none. A download that does not match is deleted and refused."""
CAMERAS = ("image_aux1", "image_main")
FRAME_SHAPE = (64, 64, 3)
ACTION_DIM, EEF_DIM = 4, 3


def find_tfrecords(src: str | os.PathLike) -> dict[str, list[Path]]:
    """``{"train": [...], "test": [...]}`` sorted TFRecord files under ``src``.

    ``src`` may be the directory holding ``softmotion30_44k/``, that directory itself, or any
    directory with ``train/`` and/or ``test/`` subdirectories of ``*.tfrecords``.
    """
    root = as_path(src)
    if (root / "softmotion30_44k").is_dir():
        root = root / "softmotion30_44k"
    files = {s: sorted((root / s).glob("*.tfrecords")) for s in ("train", "test")}
    if not any(files.values()):
        raise SourceError(
            f"{root}: no *.tfrecords under train/ or test/ (expected the softmotion30_44k directory of {URL})"
        )
    return files


def decode_example(data: bytes, camera: str = "image_aux1") -> dict[str, np.ndarray]:
    """One BAIR trajectory from a serialized Example.

    Returns:
        ``frames`` uint8 ``(T, 64, 64, 3)``, ``actions`` float32 ``(T, 4)``, ``endeffector_pos``
        float32 ``(T, 3)``, with T the number of consecutive steps ``t`` that have a ``{t}/action``.

    Raises:
        ValueError: naming the missing key or the feature with the wrong size/type.
    """
    feats = parse_example(data)
    T = 0
    while f"{T}/action" in feats:
        T += 1
    if T < 2:
        raise ValueError(
            f"expected features '0/action', '1/action', ... (30 steps); found {T} steps among "
            f"keys {sorted(feats)[:6]}"
        )
    n_pix = int(np.prod(FRAME_SHAPE))
    frames = np.empty((T, *FRAME_SHAPE), np.uint8)
    actions = np.empty((T, ACTION_DIM), np.float32)
    eef = np.empty((T, EEF_DIM), np.float32)
    for t in range(T):
        key = f"{t}/{camera}/encoded"
        img = feats.get(key)
        if img is None:
            raise ValueError(f"missing feature {key!r}")
        if not isinstance(img, list) or len(img) != 1 or len(img[0]) != n_pix:
            got = f"{len(img)} bytes values" if isinstance(img, list) else f"a {img.dtype} list"
            if isinstance(img, list) and len(img) == 1:
                got = f"{len(img[0])} bytes"
            raise ValueError(
                f"feature {key!r}: expected one bytes value of {n_pix} raw uint8 pixels (64x64x3), got {got}"
            )
        frames[t] = np.frombuffer(img[0], np.uint8).reshape(FRAME_SHAPE)
        for key, dim, out in ((f"{t}/action", ACTION_DIM, actions), (f"{t}/endeffector_pos", EEF_DIM, eef)):
            v = feats.get(key)
            if v is None:
                raise ValueError(f"missing feature {key!r}")
            if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.shape != (dim,):
                got = f"{v.dtype}{v.shape}" if isinstance(v, np.ndarray) else "bytes"
                raise ValueError(f"feature {key!r}: expected {dim} floats, got {got}")
            out[t] = v
    return {"frames": frames, "actions": actions, "endeffector_pos": eef}


def convert(
    src: str | os.PathLike,
    out_store: str | os.PathLike,
    *,
    camera: str = "image_aux1",
    val_fraction: float = 0.05,
    splits: tuple[str, ...] = ("train", "test"),
    max_files: int | None = None,
    max_episodes: int | None = None,
    fps: float = 0.0,
    episodes_per_shard: int = 64,
    skip_corrupt: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert BAIR TFRecords into an episode store (resumable: ids are ``<split>-<file stem>-<record>``).

    Args:
        src: see :func:`find_tfrecords`.
        out_store: store directory (created, or appended to).
        camera: ``"image_aux1"`` (VideoGPT/SAVP) or ``"image_main"``.
        val_fraction: share of train-file trajectories assigned to ``val`` (by id hash).
        splits: which source directories to convert (``"train"``, ``"test"``).
        max_files: convert at most this many files per split (None: all).
        max_episodes: stop after this many episodes in total (None: all).
        fps: frame rate recorded in the store; the dataset does not record one (0.0 = unknown).
        episodes_per_shard: episodes per HDF5 shard.
        skip_corrupt: skip corrupt records (a data-CRC failure skips one record; a broken length
            field or truncation skips the rest of that file) instead of raising.
        merge: append to a store whose metadata (source, fps, extra) differs (see ``StoreWriter``).
        progress: show a tqdm bar over files.

    Raises:
        SourceError: naming the file and record index of a corrupt record (unless ``skip_corrupt``).
    """
    if camera not in CAMERAS:
        raise ValueError(f"camera: expected one of {CAMERAS}, got {camera!r}")
    bad = set(splits) - {"train", "test"}
    if bad or not splits:
        raise ValueError(f"splits: expected a non-empty subset of ('train', 'test'), got {splits!r}")
    files = find_tfrecords(src)
    todo = [(s, p) for s in splits for p in files[s][:max_files]]
    out = as_path(out_store)
    done = existing_episode_ids(out)
    report = ConvertReport(out, "bair")
    spec = ActionSpec.continuous(ACTION_DIM, names=("a0", "a1", "a2", "a3"))
    extra = {
        "dataset": "bair_robot_pushing_dataset_v0",
        "url": URL,
        "camera": camera,
        "action_alignment": "actions[t] = '{t}/action' for t < T-1; the last action is dropped",
    }
    with StoreWriter(
        out,
        source="bair",
        obs_shape=FRAME_SHAPE,
        action_spec=spec,
        fps=fps,
        episodes_per_shard=episodes_per_shard,
        val_fraction=val_fraction,
        test_fraction=0.0,
        extra=extra,
        merge=merge,
    ) as writer:
        bar = tqdm(todo, desc="bair", unit="file", disable=not progress)
        for split, path in bar:
            rel = f"{split}/{path.name}"
            try:
                for rec in iter_records(path, skip_corrupt=skip_corrupt):
                    if max_episodes is not None and report.converted >= max_episodes:
                        return report
                    if rec.error is not None:
                        fail(report, f"{path} record {rec.index}", rec.error.why, skip_corrupt=True)
                        continue
                    eid = episode_id(split, path.stem, f"{rec.index:04d}")
                    if eid in done:
                        report.already_present += 1
                        continue
                    try:
                        ep = decode_example(rec.data, camera)  # type: ignore[arg-type]
                    except ValueError as e:
                        fail(report, f"{path} record {rec.index}", str(e), skip_corrupt)
                        continue
                    ep_split = "test" if split == "test" else split_for_id(eid, val_fraction, 0.0)
                    writer.add_episode(
                        ep["frames"],
                        ep["actions"][:-1],
                        split=ep_split,
                        episode_id=eid,
                        attrs={"source_file": rel, "record_index": rec.index, "camera": camera},
                        extras={"endeffector_pos": ep["endeffector_pos"]},
                    )
                    report.add(ep_split, len(ep["frames"]))
                    bar.set_postfix(episodes=report.converted)
            except TFRecordError as e:
                raise SourceError(f"{e} (pass skip_corrupt=True to convert the rest)") from None
    return report


def download(
    dest: str | os.PathLike, *, dry_run: bool = False, progress: bool = True
) -> list[tuple[str, Path]]:
    """Fetch the BAIR tar into ``dest`` and unpack it (``dest/softmotion30_44k``); resumable.

    With ``dry_run`` only returns what would be fetched: ``[(url, local path)]``.
    """
    dest = as_path(dest)
    tar = dest / URL.rsplit("/", 1)[1]
    plan = [(URL, tar)]
    if dry_run:
        return plan
    if not (dest / f".{tar.name}.extracted").exists():  # a marker written after a complete extraction
        download_file(URL, tar, progress=progress, sha256=SHA256)
        extract_once(tar, dest)
    return plan
