"""RoboNet hdf5 trajectories -> episode store.

Source layout (``robonet_v3.tar.gz`` unpacks to ``hdf5/*.hdf5`` plus a ``meta_data.pkl``). Each file,
as written by RoboNet's saver and read by its ``hdf5_loader.py``/``metadata_helper.py``::

    file_version                     string dataset, e.g. '0.1.0'
    env/                             attrs n_cams (int), cam_encoding ('mp4' | 'jpeg')
    env/cam{i}_video/frames          mp4:  uint8 (n_bytes,) = the bytes of an mp4 file;
                                           attrs shape (H, W, 3), T (frames), image_format ('RGB'|'BGR')
    env/cam{i}_video/frame{t}        jpeg: uint8 (n_bytes,) = a JPEG file per frame (cv2.imencode);
                                           attrs shape, image_format
    env/state                        float (T_state, sdim)
    env/low_bound, env/high_bound    optional, float (T, sdim): action/state bounds per step
    policy/actions                   float (T_action, adim), T_action = T_state - 1 normally
    misc/                            per-file extras (ignored)
    metadata                         group whose attrs describe the file: robot, gripper,
                                     primitives ('autograsp' | ...), action_space, object_classes,
                                     camera_configuration, low_bound, high_bound, ...

``meta_data.pkl`` is a gzip-pickled pandas frame that RoboNet regenerates from these attributes; it is
**not read** here (loading a pickle executes code, DESIGN §11) — the same metadata comes from each
file's own attributes, as RoboNet's ``load_metadata_dict`` computes it.

Conversion of one file (one episode):

- usable length ``n = min(T_state, T_img, T_action + 1)`` (RoboNet's loader), with ``T_img`` the
  ``T`` attribute (mp4) or the number of ``frame{t}`` datasets (jpeg); the mp4 must decode to at
  least ``n`` frames, else the file is corrupt (truncated);
- frames: camera ``camera``; channel order as RoboNet's loader: the decoded array is used as is
  when ``image_format == 'RGB'`` and flipped when ``'BGR'`` (for JPEG the decoded array is the one
  given to ``cv2.imencode``, i.e. Pillow's RGB flipped); resized to ``resolution`` (no crop:
  RoboNet/VideoGPT squash 4:3 frames to a square);
- actions normalised to ``action_dim`` (default 5: x, y, z, wrist rotation, gripper) in this order:
  1. ``adim == action_dim``: unchanged;
  2. ``adim == action_dim - 1`` and ``primitives == 'autograsp'``: the gripper column is imputed as
     RoboNet's loader does: ``high_bound[-1]`` where the *next* state's last entry (gripper) is above
     ``(high_bound[-1] + low_bound[-1]) / 2``, else ``low_bound[-1]`` (bounds from the ``metadata``
     attrs, else row 0 of ``env/{low,high}_bound``; missing bounds -> corrupt file);
  3. ``adim < action_dim``: zero-padded on the right;
  4. ``adim > action_dim``: truncated to the first ``action_dim`` columns;
  then cut to ``n - 1`` rows. Attr ``action_normalisation`` records which rule applied.
- extras ``state`` float32 ``(n, sdim)``; attrs ``robot``, ``primitives``, ``action_space``,
  ``gripper``, ``camera``, ``n_cams``, ``adim``, ``sdim``, ``source_file``, ``action_normalisation``
  and every other ``metadata`` attribute (lists as JSON).
- split by a hash of the episode id (``val_fraction``/``test_fraction``; RoboNet has no official
  split; VideoGPT used 90/5/5 at random).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from worldmodel.sources._common import (
    ConvertReport,
    SourceError,
    attr_value,
    episode_id,
    existing_episode_ids,
    fail,
    json_safe,
)
from worldmodel.sources._video import VideoDecodeError, as_path, iter_frames, parse_size, resize
from worldmodel.store import ActionSpec, StoreWriter, external_references, split_for_id

GDRIVE_FULL = "1BkqHzfRkfzgzCfc73NbNnPMK_rg3i1n9"
"""Google Drive id of ``robonet_v3.tar.gz`` (36 GB), from the RoboNet wiki."""
GDRIVE_SAMPLE = "1YX2TgT8IKSn9V4wGCwdzbRnS53yicV2P"
"""Google Drive id of ``robonet_sampler.tar.gz`` (~100 MB)."""
ACTION_NAMES = ("x", "y", "z", "theta", "gripper")


class _Corrupt(Exception):
    pass


def find_files(src: str | os.PathLike) -> list[Path]:
    """Sorted ``*.hdf5`` files in ``src`` or ``src/hdf5``."""
    root = as_path(src)
    if (root / "hdf5").is_dir():
        root = root / "hdf5"
    files = sorted(root.glob("*.hdf5"))
    if not files:
        raise SourceError(f"{root}: no *.hdf5 files (expected RoboNet's hdf5/ directory)")
    return files


def file_metadata(f: h5py.File) -> dict[str, Any]:
    """Metadata of an open RoboNet file, computed as RoboNet's ``load_metadata_dict`` does."""
    try:
        env, pol = f["env"], f["policy"]
        meta: dict[str, Any] = {
            "sdim": env["state"].shape[1],
            "state_T": env["state"].shape[0],
            "adim": pol["actions"].shape[1],
            "action_T": pol["actions"].shape[0],
        }
    except KeyError as e:
        raise _Corrupt(
            f"missing {e.args[0] if e.args else 'env/state or policy/actions'} "
            "(expected datasets env/state and policy/actions)"
        ) from None
    except IndexError:
        raise _Corrupt(
            f"env/state {f['env']['state'].shape} and policy/actions {f['policy']['actions'].shape} "
            "must be 2-D (T, dim)"
        ) from None
    meta["file_version"] = attr_value(f["file_version"][()]) if "file_version" in f else None
    meta["ncam"] = int(env.attrs.get("n_cams", 0))
    if meta["ncam"]:
        cam0 = env.get("cam0_video")
        if cam0 is None:
            raise _Corrupt("env attr n_cams > 0 but group env/cam0_video is missing")
        encoding = attr_value(env.attrs.get("cam_encoding", "mp4"))
        if encoding == "mp4":
            if "frames" not in cam0:
                raise _Corrupt("env/cam0_video/frames is missing (cam_encoding is 'mp4')")
            a = cam0["frames"].attrs
            meta.update(
                img_encoding="mp4",
                img_T=int(a.get("T", 0)),
                frame_dim=tuple(attr_value(a.get("shape", [0, 0]))[:2]),
                image_format=attr_value(a.get("image_format", "RGB")),
            )
        else:
            if "frame0" not in cam0:
                raise _Corrupt("env/cam0_video/frame0 is missing (cam_encoding is not 'mp4')")
            a = cam0["frame0"].attrs
            meta.update(
                img_encoding="jpg",
                img_T=sum(1 for k in cam0 if k.startswith("frame")),
                frame_dim=tuple(attr_value(a.get("shape", [0, 0]))[:2]),
                image_format=attr_value(a.get("image_format", "RGB")),
            )
    if "metadata" in f:
        for k, v in f["metadata"].attrs.items():
            meta.setdefault(k, attr_value(v))
    for b in ("low_bound", "high_bound"):
        if b not in meta and b in env:
            meta[b] = attr_value(env[b][0])
    return meta


def _load_frames(f: h5py.File, meta: dict[str, Any], cam: int, n: int, size: tuple[int, int]) -> np.ndarray:
    group = f["env"].get(f"cam{cam}_video")
    if group is None:
        raise _Corrupt(f"camera {cam} not present (env/cam{cam}_video missing; n_cams={meta['ncam']})")
    transform = lambda img: resize(img, size)  # noqa: E731
    if meta["img_encoding"] == "mp4":
        if "frames" not in group:
            raise _Corrupt(f"env/cam{cam}_video/frames is missing")
        blob = group["frames"][()]
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise _Corrupt(
                f"env/cam{cam}_video/frames is {blob.dtype}{blob.shape}, expected uint8 (n_bytes,) mp4 bytes"
            )
        fmt = attr_value(group["frames"].attrs.get("image_format", meta["image_format"]))
        try:
            frames = list(iter_frames(blob.tobytes(), max_frames=n, transform=transform))
        except VideoDecodeError as e:
            raise _Corrupt(f"env/cam{cam}_video/frames: {e}") from None
        if len(frames) < n:
            raise _Corrupt(
                f"env/cam{cam}_video/frames: mp4 decodes to {len(frames)} frames, but {n} are needed "
                f"(attr T={meta['img_T']}); truncated video"
            )
    else:
        frames, fmt = [], meta["image_format"]
        for t in range(n):
            d = group.get(f"frame{t}")
            if d is None:
                raise _Corrupt(f"env/cam{cam}_video/frame{t} is missing")
            fmt = attr_value(d.attrs.get("image_format", meta["image_format"]))
            try:
                rgb = np.asarray(Image.open(io.BytesIO(d[()].tobytes())).convert("RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise _Corrupt(f"env/cam{cam}_video/frame{t}: not a decodable JPEG ({e})") from None
            frames.append(transform(rgb[:, :, ::-1]))  # the array cv2.imdecode returns (BGR of the pixels)
    if fmt not in ("RGB", "BGR"):
        raise _Corrupt(f"camera {cam}: image_format {fmt!r}, expected 'RGB' or 'BGR'")
    arr = np.stack(frames)
    return np.ascontiguousarray(arr[..., ::-1]) if fmt == "BGR" else arr


def normalise_actions(
    actions: np.ndarray, states: np.ndarray, meta: dict[str, Any], action_dim: int = 5
) -> tuple[np.ndarray, str]:
    """Bring RoboNet actions ``(T_action, adim)`` to ``(T_action, action_dim)``; see the module doc.

    Returns:
        the float32 actions and the rule applied: ``identity``, ``autograsp_imputed``,
        ``zero_padded`` or ``truncated``.
    """
    adim = actions.shape[1]
    actions = actions.astype(np.float32)
    if adim == action_dim:
        return actions, "identity"
    if adim == action_dim - 1 and meta.get("primitives") == "autograsp":
        low, high = meta.get("low_bound"), meta.get("high_bound")
        if low is None or high is None:
            raise _Corrupt(
                "autograsp actions need low_bound/high_bound (metadata attrs or env datasets) to impute "
                "the gripper action; none found"
            )
        low_v, high_v = float(np.ravel(low)[-1]), float(np.ravel(high)[-1])
        next_gripper = states[1 : actions.shape[0] + 1, -1]
        if len(next_gripper) < actions.shape[0]:
            raise _Corrupt(
                f"env/state has {states.shape[0]} rows; autograsp imputation needs T_action + 1 = "
                f"{actions.shape[0] + 1}"
            )
        grip = np.where(next_gripper > (high_v + low_v) / 2.0, high_v, low_v).astype(np.float32)
        return np.concatenate([actions, grip[:, None]], axis=1), "autograsp_imputed"
    if adim < action_dim:
        return np.pad(actions, ((0, 0), (0, action_dim - adim))), "zero_padded"
    return actions[:, :action_dim], "truncated"


def read_file(
    path: str | os.PathLike, *, camera: int = 0, resolution: int | tuple[int, int] = 64, action_dim: int = 5
) -> dict[str, Any]:
    """Decode one RoboNet file into ``frames`` ``(n, H, W, 3)``, ``actions`` ``(n-1, action_dim)``,
    ``state`` ``(n, sdim)``, ``meta`` (dict) and ``rule`` (action normalisation).

    Raises:
        SourceError: naming the file and the broken field.
    """
    path = Path(path)
    size = parse_size(resolution)
    try:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise _Corrupt(f"cannot open as HDF5 ({e})") from None
        with f:
            refs = external_references(f)
            if refs:
                raise _Corrupt(
                    f"refers to data outside the file ({'; '.join(refs[:5])}); only self-contained HDF5 "
                    f"files are read (no external links, external storage or virtual datasets)"
                )
            meta = file_metadata(f)
            if not meta["ncam"]:
                raise _Corrupt("no cameras (env attr n_cams is 0 or missing)")
            if not 0 <= camera < meta["ncam"]:
                raise _Corrupt(f"camera {camera} out of range: the file has n_cams={meta['ncam']}")
            n = min(meta["state_T"], meta["img_T"], meta["action_T"] + 1)
            if n < 2:
                raise _Corrupt(
                    f"usable length min(T_state={meta['state_T']}, T_img={meta['img_T']}, "
                    f"T_action+1={meta['action_T'] + 1}) = {n} < 2"
                )
            states = f["env"]["state"][()].astype(np.float32)
            actions, rule = normalise_actions(f["policy"]["actions"][()], states, meta, action_dim)
            if not np.all(np.isfinite(actions)):
                raise _Corrupt("policy/actions contains NaN or inf")
            frames = _load_frames(f, meta, camera, n, size)
    except _Corrupt as e:
        raise SourceError(f"{path}: {e}") from None
    return {"frames": frames, "actions": actions[: n - 1], "state": states[:n], "meta": meta, "rule": rule}


def convert(
    src: str | os.PathLike,
    out_store: str | os.PathLike,
    *,
    camera: int = 0,
    robots: tuple[str, ...] | None = None,
    resolution: int | tuple[int, int] = 64,
    action_dim: int = 5,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_files: int | None = None,
    fps: float = 0.0,
    episodes_per_shard: int = 32,
    skip_corrupt: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert RoboNet hdf5 files into an episode store (resumable; episode id = file stem).

    Args:
        src: directory of ``*.hdf5`` (or its parent holding ``hdf5/``).
        out_store: store directory (created, or appended to).
        camera: camera index ``i`` of ``env/cam{i}_video``.
        robots: keep only files whose ``metadata`` attr ``robot`` is one of these (e.g.
            ``("sawyer", "widowx")``); None keeps all. Others count as ``filtered``.
        resolution: output size, ``64`` or ``(height, width)``.
        action_dim: width of the stored actions (see :func:`normalise_actions`).
        val_fraction, test_fraction: split shares, by a hash of the episode id.
        max_files: convert at most this many files (None: all).
        fps: frame rate recorded in the store; RoboNet's varies by robot (0.0 = unknown).
        episodes_per_shard: episodes per HDF5 shard.
        skip_corrupt: skip (and report) corrupt files instead of raising.
        merge: append to a store whose metadata (source, fps, extra) differs (see ``StoreWriter``).
        progress: show a tqdm bar.

    Raises:
        SourceError: naming the file and the missing/corrupt field (unless ``skip_corrupt``).
    """
    if action_dim < 1:
        raise ValueError(f"action_dim must be >= 1, got {action_dim}")
    size = parse_size(resolution)
    files = find_files(src)[:max_files]
    out = as_path(out_store)
    done = existing_episode_ids(out)
    report = ConvertReport(out, "robonet")
    names = ACTION_NAMES if action_dim == len(ACTION_NAMES) else None
    spec = ActionSpec.continuous(action_dim, names=names)
    extra = {
        "dataset": "robonet_v3",
        "camera": camera,
        "robots": list(robots) if robots else None,
        "action_dim": action_dim,
    }
    with StoreWriter(
        out,
        source="robonet",
        obs_shape=(*size, 3),
        action_spec=spec,
        fps=fps,
        episodes_per_shard=episodes_per_shard,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        extra=extra,
        merge=merge,
    ) as writer:
        bar = tqdm(files, desc="robonet", unit="file", disable=not progress)
        for path in bar:
            eid = episode_id(path.stem)
            if eid in done:
                report.already_present += 1
                continue
            if robots is not None:
                try:
                    with h5py.File(path, "r") as f:
                        robot = attr_value(f["metadata"].attrs.get("robot")) if "metadata" in f else None
                except OSError as e:
                    fail(report, str(path), f"cannot open as HDF5 ({e})", skip_corrupt)
                    continue
                if robot not in robots:
                    report.filtered += 1
                    continue
            try:
                ep = read_file(path, camera=camera, resolution=size, action_dim=action_dim)
            except SourceError as e:
                fail(report, str(path), str(e).removeprefix(f"{path}: "), skip_corrupt)
                continue
            meta = ep["meta"]
            attrs = {k: json_safe(v) for k, v in meta.items() if v is not None and k not in ("sha256",)}
            attrs.update(camera=camera, source_file=path.name, action_normalisation=ep["rule"])
            split = split_for_id(eid, val_fraction, test_fraction)
            writer.add_episode(
                ep["frames"],
                ep["actions"],
                split=split,
                episode_id=eid,
                attrs=attrs,
                extras={"state": ep["state"]},
            )
            report.add(split, len(ep["frames"]))
            bar.set_postfix(episodes=report.converted)
    return report


def download(
    dest: str | os.PathLike, *, sample: bool = False, dry_run: bool = False
) -> list[tuple[str, Path]]:
    """Fetch RoboNet from Google Drive with ``gdown`` (not a dependency: ``pip install gdown``).

    Google Drive needs a confirmation round-trip for large files that only ``gdown`` handles well, so
    this function only delegates to it. ``sample=True`` fetches the ~100 MB sampler instead of the
    36 GB release. With ``dry_run`` only returns ``[(url, local path)]``.
    """
    dest = as_path(dest)
    gid, name = (GDRIVE_SAMPLE, "robonet_sampler.tar.gz") if sample else (GDRIVE_FULL, "robonet_v3.tar.gz")
    url = f"https://drive.google.com/uc?id={gid}&export=download"
    plan = [(url, dest / name)]
    if dry_run:
        return plan
    try:
        import gdown  # type: ignore[import-not-found]
    except ImportError:
        raise SourceError(
            f"RoboNet is on Google Drive; install gdown (pip install gdown) or fetch {url} "
            f"by hand into {dest} and unpack it with tar -xzf"
        ) from None
    from worldmodel.sources._download import extract

    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / name).exists():
        gdown.download(id=gid, output=str(dest / name), quiet=False)
    extract(dest / name, dest)
    return plan
