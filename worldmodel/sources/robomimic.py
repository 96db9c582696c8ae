"""robomimic hdf5 datasets (image observations) -> episode store, read with h5py.

Source layout (robomimic's documented dataset structure, e.g. ``lift/ph/image.hdf5``)::

    data/                       attrs total (int), env_args (JSON string: env_name, type, env_kwargs)
    data/demo_<i>/              attr num_samples = N
        obs/<key>               (N, ...) e.g. agentview_image uint8 (N, 84, 84, 3)
        next_obs/<key>          (N, ...) observation after each action
        actions                 float (N, A)
        rewards                 float (N,)
        dones                   int/bool (N,)
        states                  float (N, S) simulator states (not converted)
    mask/<filter_key>           bytes (n_demos,) demo names, e.g. mask/train, mask/valid

Stored episode for a demo with ``next_obs``: ``N + 1`` frames ``obs/<camera>[0..N-1]`` followed by
``next_obs/<camera>[N-1]``, ``actions[t]``, ``rewards[t]`` and ``terminated[t] = dones[t] != 0`` for
t < N (so ``frames[t] -> actions[t] -> frames[t+1]`` holds exactly); attr ``truncated`` is True when the
last ``done`` is 0. Without ``next_obs`` the episode has ``N`` frames and the last action, reward and
done are dropped. Attrs: ``demo``, ``num_samples``, ``camera``, ``source_file``. Store meta extra:
``env_args`` (parsed), ``camera``, the filter keys used.

Splits: ``mask/<train_filter>`` -> train, ``mask/<val_filter>`` -> val, ``mask/<test_filter>`` -> test
(when a filter is None or the file has no ``mask`` group: every remaining demo goes to train, or to
val with probability ``val_fraction`` by id hash when ``val_filter`` is None). When a ``train_filter``
is given, demos in none of the given filters are left out (counted as ``filtered``).

robomimic itself is not needed (it is an optional extra; it pulls torchvision and a CUDA torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from worldmodel.sources._common import (
    ConvertReport,
    SourceError,
    attr_value,
    episode_id,
    existing_episode_ids,
    fail,
)
from worldmodel.sources._download import download_file
from worldmodel.sources._video import as_path, parse_size, resize
from worldmodel.store import ActionSpec, StoreWriter, refuse_external, split_for_id

URL_TEMPLATE = (
    "http://downloads.cs.stanford.edu/downloads/rt_benchmark/{task}/{dataset_type}/{hdf5_type}.hdf5"
)
"""robomimic v0.1 release links (``task``: lift, can, square, transport, tool_hang; ``dataset_type``:
ph, mh, mg; ``hdf5_type``: image, low_dim, raw=demo). Real-robot tasks (``lift_real`` ...) ship only
``demo.hdf5``, which already holds images."""


def _demo_sort_key(name: str) -> tuple[int, str]:
    tail = name.rsplit("_", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (1 << 62, name)


def read_masks(f: h5py.File) -> dict[str, list[str]]:
    """``{filter_key: [demo names]}`` from the ``mask`` group (empty if absent)."""
    if "mask" not in f:
        return {}
    return {
        k: [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(d[()]).ravel()]
        for k, d in f["mask"].items()
    }


def assign_splits(
    demos: list[str],
    masks: dict[str, list[str]],
    train_filter: str | None,
    val_filter: str | None,
    test_filter: str | None,
    val_fraction: float,
    where: str,
) -> dict[str, str | None]:
    """Map each demo to ``'train' | 'val' | 'test'`` or None (left out); see the module doc."""
    chosen = {"train": train_filter, "val": val_filter, "test": test_filter}
    if masks:
        missing = [k for k in chosen.values() if k is not None and k not in masks]
        if missing:
            raise SourceError(f"{where}: filter key(s) {missing} not in mask/ (available: {sorted(masks)})")
    member = {s: set(masks[k]) if (masks and k is not None) else None for s, k in chosen.items()}
    out: dict[str, str | None] = {}
    for d in demos:
        split: str | None = None
        for s in ("test", "val", "train"):
            if member[s] is not None and d in member[s]:  # type: ignore[operator]
                split = s
                break
        if split is None:
            if member["train"] is not None:
                split = None  # not in any requested filter
            elif member["val"] is None:
                split = split_for_id(d, val_fraction, 0.0)
            else:
                split = "train"
        out[d] = split
    return out


def read_demo(
    g: h5py.Group, camera: str, size: tuple[int, int] | None, use_next_obs: bool = True
) -> dict[str, Any]:
    """One demo group -> ``frames``, ``actions``, ``rewards``, ``terminated``, ``truncated``.

    Raises:
        ValueError: naming the missing key or inconsistent shape.
    """
    for key in ("obs", "actions"):
        if key not in g:
            raise ValueError(f"missing {key!r} (demo keys: {sorted(g)})")
    if camera not in g["obs"]:
        raise ValueError(f"missing obs/{camera} (obs keys: {sorted(g['obs'])})")
    obs = g["obs"][camera]
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[-1] != 3:
        raise ValueError(f"obs/{camera} is {obs.dtype}{obs.shape}, expected uint8 (N, H, W, 3)")
    N = obs.shape[0]
    actions = g["actions"][()]
    if actions.ndim != 2 or actions.shape[0] != N:
        raise ValueError(
            f"actions is {actions.dtype}{actions.shape}, expected ({N}, A) to match obs/{camera}"
        )
    rewards = g["rewards"][()].astype(np.float32).ravel() if "rewards" in g else np.zeros(N, np.float32)
    dones = g["dones"][()].ravel() if "dones" in g else np.zeros(N, bool)
    if rewards.shape != (N,) or dones.shape != (N,):
        raise ValueError(f"rewards {rewards.shape} / dones {dones.shape} must have {N} entries")
    frames = obs[()]
    nxt = g.get(f"next_obs/{camera}") if use_next_obs else None
    if nxt is not None:
        if nxt.shape != obs.shape or nxt.dtype != np.uint8:
            raise ValueError(f"next_obs/{camera} is {nxt.dtype}{nxt.shape}, expected {obs.dtype}{obs.shape}")
        frames = np.concatenate([frames, nxt[N - 1 : N]])
        n_steps = N
    else:
        n_steps = N - 1
    if size is not None:
        frames = np.stack([resize(fr, size) for fr in frames])
    terminated = dones[:n_steps] != 0
    return {
        "frames": frames,
        "actions": actions[:n_steps].astype(np.float32),
        "rewards": rewards[:n_steps],
        "terminated": terminated,
        "truncated": not bool(dones[-1]) if nxt is not None else True,
    }


def convert(
    src: str | os.PathLike,
    out_store: str | os.PathLike,
    *,
    camera: str = "agentview_image",
    resolution: int | tuple[int, int] | None = None,
    train_filter: str | None = "train",
    val_filter: str | None = "valid",
    test_filter: str | None = None,
    val_fraction: float = 0.05,
    use_next_obs: bool = True,
    max_demos: int | None = None,
    fps: float = 20.0,
    episodes_per_shard: int = 32,
    skip_corrupt: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert a robomimic hdf5 file into an episode store (resumable; id ``<file stem>-<demo>``).

    Args:
        src: the ``.hdf5`` file (e.g. ``lift/ph/image.hdf5``).
        out_store: store directory (created, or appended to).
        camera: image observation key, e.g. ``agentview_image`` or ``robot0_eye_in_hand_image``.
        resolution: output size (``64`` or ``(H, W)``); None keeps the file's (84×84 in the release).
        train_filter, val_filter, test_filter: ``mask/`` filter keys per split (None: unused).
        val_fraction: share of unfiltered demos sent to val when ``val_filter`` is None.
        use_next_obs: append the last ``next_obs`` frame (N+1 frames, N actions).
        max_demos: convert at most this many demos (None: all).
        fps: frame rate recorded in the store (robosuite's control rate is 20 Hz).
        episodes_per_shard: episodes per HDF5 shard.
        skip_corrupt: skip (and report) broken demos instead of raising.
        merge: append to a store whose metadata (source, fps, extra) differs (see ``StoreWriter``).
        progress: show a tqdm bar.

    Raises:
        SourceError: naming the file, the demo and the missing/corrupt key (unless ``skip_corrupt``).
    """
    path = as_path(src)
    if not path.is_file():
        raise SourceError(f"{path}: not a file (expected a robomimic .hdf5 dataset)")
    size = parse_size(resolution) if resolution is not None else None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SourceError(f"{path}: cannot open as HDF5 ({e})") from None
    out = as_path(out_store)
    report = ConvertReport(out, "robomimic")
    with f:
        refuse_external(f, path, SourceError)
        if "data" not in f:
            raise SourceError(f"{path}: missing group 'data' (not a robomimic dataset)")
        data = f["data"]
        try:
            env_args = json.loads(attr_value(data.attrs["env_args"])) if "env_args" in data.attrs else {}
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: data attr 'env_args' is not valid JSON ({e})") from None
        demos = sorted(data.keys(), key=_demo_sort_key)[:max_demos]
        if not demos:
            raise SourceError(f"{path}: no demos under data/")
        splits = assign_splits(
            demos, read_masks(f), train_filter, val_filter, test_filter, val_fraction, str(path)
        )
        first = data[demos[0]].get(f"obs/{camera}")
        if first is None:
            keys = sorted(data[demos[0]]["obs"]) if "obs" in data[demos[0]] else []
            raise SourceError(
                f"{path}: demo {demos[0]!r} has no obs/{camera} (obs keys: {keys}); pick one with camera="
            )
        hw = size if size is not None else tuple(first.shape[1:3])
        A = data[demos[0]]["actions"].shape[1]
        done = existing_episode_ids(out)
        extra = {
            "dataset": "robomimic",
            "source_file": path.name,
            "camera": camera,
            "env_args": env_args,
            "filters": {"train": train_filter, "val": val_filter, "test": test_filter},
        }
        with StoreWriter(
            out,
            source="robomimic",
            obs_shape=(*hw, 3),
            action_spec=ActionSpec.continuous(A),
            fps=fps,
            episodes_per_shard=episodes_per_shard,
            val_fraction=val_fraction,
            test_fraction=0.0,
            extra=extra,
            merge=merge,
        ) as writer:
            for demo in tqdm(demos, desc="robomimic", unit="demo", disable=not progress):
                split = splits[demo]
                if split is None:
                    report.filtered += 1
                    continue
                eid = episode_id(path.stem, demo)
                if eid in done:
                    report.already_present += 1
                    continue
                try:
                    ep = read_demo(data[demo], camera, size, use_next_obs)
                    if ep["frames"].shape[1:3] != hw or ep["actions"].shape[1] != A:
                        raise ValueError(
                            f"frames {ep['frames'].shape[1:3]} / action dim {ep['actions'].shape[1]} "
                            f"differ from the first demo's {hw} / {A}"
                        )
                except (ValueError, KeyError, OSError) as e:
                    fail(report, f"{path} demo {demo!r}", str(e), skip_corrupt)
                    continue
                writer.add_episode(
                    ep["frames"],
                    ep["actions"],
                    ep["rewards"],
                    ep["terminated"],
                    truncated=ep["truncated"],
                    split=split,
                    episode_id=eid,
                    attrs={
                        "demo": demo,
                        "num_samples": int(data[demo].attrs.get("num_samples", -1)),
                        "camera": camera,
                        "source_file": path.name,
                    },
                )
                report.add(split, len(ep["frames"]))
    return report


def download(
    dest: str | os.PathLike,
    *,
    task: str = "lift",
    dataset_type: str = "ph",
    hdf5_type: str = "image",
    dry_run: bool = False,
    progress: bool = True,
) -> list[tuple[str, Path]]:
    """Fetch one robomimic v0.1 dataset file to ``dest/<task>/<dataset_type>/<hdf5_type>.hdf5`` (resumable)."""
    url = URL_TEMPLATE.format(task=task, dataset_type=dataset_type, hdf5_type=hdf5_type)
    target = as_path(dest) / task / dataset_type / f"{hdf5_type}.hdf5"
    if not dry_run:
        download_file(url, target, progress=progress)
    return [(url, target)]
