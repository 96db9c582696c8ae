"""Episode store: a directory of HDF5 shards plus ``store.json`` (DESIGN §4).

Layout::

    store/
      store.json            schema version, source, observation shape, action spec, fps, index
      index.jsonl           only while a writer is open (or after one was killed): the index entries of
                            the shards written since store.json was, one line per shard
      shard-00000.h5        episodes/<id>/{frames, actions, rewards, terminated, extras/*} + attrs
      shard-00001.h5
      ...

Alignment inside an episode of ``T`` frames: ``frames[t]`` -> ``actions[t]`` -> ``frames[t+1]``,
``rewards[t]``, ``terminated[t]``; so ``actions``, ``rewards`` and ``terminated`` have ``T-1`` rows.
Action-free datasets (UCF-101, TGIF) store no ``actions``.

Shards are the source of truth: each is written under a temporary name and renamed into place
only when complete, so a crash never leaves a readable half shard. ``store.json`` carries the
schema and a convenience index, written (atomically) when a writer opens and closes the store; in
between, each shard's entries are appended to ``index.jsonl`` (one fsynced line per shard, so writing a
large store costs O(shards), not O(shards²)). The reader scans the shards and uses both lists only to
notice a listed shard that has gone missing; the next writer folds the journal back into ``store.json``.

The store knows nothing of models or Gymnasium.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import h5py
import numpy as np

from worldmodel.atomic import finish_file, fsync_dir, write_json

SCHEMA_VERSION = 1
STORE_JSON = "store.json"
INDEX_JOURNAL = "index.jsonl"
_SHARD_RE = re.compile(r"^shard-(\d{5})\.h5$")
SPLITS = ("train", "val", "test")
OBJECT_MASK = "object_mask"
"""Name of the optional per-frame extra uint8 ``(T, H, W)``: 1 on the pixels of small objects a policy reacts to
(collected from ViZDoom's labels buffer); read with the frames by ``read_clip``, weighted by the object losses."""
LOCK_FILE = ".writer.lock"
"""Lock file of a store directory: a :class:`StoreWriter` holds an exclusive POSIX lock on it (and writes its pid)."""


class StoreError(Exception):
    """A store, shard or episode is missing, corrupt, or not in the expected form."""


class StoreLockedError(StoreError):
    """Another :class:`StoreWriter` (another process, or another writer in this one) holds the store."""


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionSpec:
    """Description of an action space, independent of Gymnasium.

    ``kind='discrete'``: actions are int64 scalars in ``[0, n)``.
    ``kind='continuous'``: actions are float32 vectors of length ``dim`` (bounds optional).
    ``kind='none'``: the dataset has no actions.
    """

    kind: Literal["discrete", "continuous", "none"]
    n: int = 0
    dim: int = 0
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    names: tuple[str, ...] | None = None
    """Optional human-readable action names (discrete) or dimension names (continuous)."""

    def __post_init__(self) -> None:
        if self.kind not in ("discrete", "continuous", "none"):
            raise ValueError(f"ActionSpec.kind must be 'discrete', 'continuous' or 'none', got {self.kind!r}")
        if self.kind == "discrete" and self.n < 1:
            raise ValueError(f"discrete ActionSpec needs n >= 1, got n={self.n}")
        if self.kind == "continuous" and self.dim < 1:
            raise ValueError(f"continuous ActionSpec needs dim >= 1, got dim={self.dim}")

    @classmethod
    def discrete(cls, n: int, names: Sequence[str] | None = None) -> ActionSpec:
        return cls("discrete", n=int(n), names=tuple(names) if names is not None else None)

    @classmethod
    def continuous(
        cls,
        dim: int,
        low: Sequence[float] | None = None,
        high: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ) -> ActionSpec:
        return cls(
            "continuous",
            dim=int(dim),
            low=None if low is None else tuple(float(x) for x in low),
            high=None if high is None else tuple(float(x) for x in high),
            names=tuple(names) if names is not None else None,
        )

    @classmethod
    def none(cls) -> ActionSpec:
        return cls("none")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionSpec:
        d = dict(d)
        for k in ("low", "high", "names"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def validate(self, actions: np.ndarray | None, n_steps: int, where: str = "actions") -> np.ndarray | None:
        """Check ``actions`` for ``n_steps`` transitions and return them in the stored dtype."""
        if self.kind == "none":
            if actions is not None:
                raise StoreError(
                    f"{where}: this store has no actions (ActionSpec kind 'none') but actions were given"
                )
            return None
        if actions is None:
            raise StoreError(f"{where}: missing; expected {self.describe(n_steps)}")
        a = np.asarray(actions)
        if self.kind == "discrete":
            if a.shape != (n_steps,) or not np.issubdtype(a.dtype, np.integer):
                raise StoreError(f"{where}: got {a.dtype}{a.shape}, expected {self.describe(n_steps)}")
            if n_steps and (a.min() < 0 or a.max() >= self.n):
                raise StoreError(
                    f"{where}: values must lie in [0, {self.n}), got range [{a.min()}, {a.max()}]"
                )
            return a.astype(np.int64)
        if a.shape != (n_steps, self.dim) or not np.issubdtype(a.dtype, np.floating):
            raise StoreError(f"{where}: got {a.dtype}{a.shape}, expected {self.describe(n_steps)}")
        if not np.all(np.isfinite(a)):
            raise StoreError(f"{where}: contains NaN or inf")
        return a.astype(np.float32)

    def describe(self, n_steps: int | str = "T-1") -> str:
        if self.kind == "discrete":
            return f"int64 ({n_steps},) in [0, {self.n})"
        if self.kind == "continuous":
            return f"float32 ({n_steps}, {self.dim})"
        return "no actions"


@dataclass(frozen=True)
class StoreMeta:
    """Contents of ``store.json`` minus the index."""

    source: str
    obs_shape: tuple[int, int, int]
    action_spec: ActionSpec
    fps: float = 0.0
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form source metadata (e.g. env config, dataset version, class names)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "obs_shape": list(self.obs_shape),
            "action_spec": self.action_spec.to_dict(),
            "fps": self.fps,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = STORE_JSON) -> StoreMeta:
        try:
            version = int(d["schema_version"])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{where}: schema_version {version} is newer than this code supports ({SCHEMA_VERSION})"
                )
            shape = tuple(int(x) for x in d["obs_shape"])
            if len(shape) != 3 or shape[2] != 3:
                raise StoreError(f"{where}: obs_shape must be [H, W, 3], got {list(shape)}")
            return cls(
                source=str(d["source"]),
                obs_shape=shape,  # type: ignore[arg-type]
                action_spec=ActionSpec.from_dict(d["action_spec"]),
                fps=float(d.get("fps", 0.0)),
                schema_version=version,
                extra=dict(d.get("extra", {})),
            )
        except KeyError as e:
            raise StoreError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed: {e}") from None


@dataclass
class Episode:
    """One episode loaded into memory. Shapes for ``T`` frames of ``H×W``."""

    id: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray | None  # (T-1,) int64 | (T-1, A) float32 | None
    rewards: np.ndarray  # (T-1,) float32
    terminated: np.ndarray  # (T-1,) bool
    truncated: bool = False
    split: str = "train"
    attrs: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def split_for_id(episode_id: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of an episode by a hash of its id (stable across runs and machines)."""
    u = (zlib.crc32(episode_id.encode()) % 10_000) / 10_000.0
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def external_references(f: h5py.File) -> list[str]:
    """Every place where HDF5 file ``f`` would read outside itself: external links, datasets with external
    storage (raw bytes in another file) and virtual datasets (mapped from other files). Empty for a
    self-contained file. Links are inspected without being followed."""
    found: list[str] = []

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            path = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                found.append(f"{path} (external link to {link.filename}:{link.path})")
                continue
            if isinstance(link, h5py.SoftLink):
                continue  # points inside this file; its target is visited where it lives
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                walk(obj, path)
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    found.append(
                        f"{path} (virtual dataset from {sorted({m.file_name for m in obj.virtual_sources()})})"
                    )
                elif obj.external:
                    found.append(f"{path} (external storage in {sorted({str(e[0]) for e in obj.external})})")

    walk(f, "")
    return found


def refuse_external(f: h5py.File, path: str | os.PathLike, error: type[Exception] | None = None) -> None:
    """Raise (``error``, default :class:`StoreError`) naming ``path`` if ``f`` reads data from outside itself:
    an input could otherwise pull arbitrary local files into a store (see :func:`external_references`)."""
    refs = external_references(f)
    if refs:
        shown = "; ".join(refs[:5]) + (f"; ... ({len(refs)} in all)" if len(refs) > 5 else "")
        raise (error or StoreError)(
            f"{path}: refers to data outside the file ({shown}); only self-contained HDF5 "
            f"files are read (no external links, external storage or virtual datasets)"
        )


def journal_shards(root: Path) -> set[str]:
    """Shards listed in ``index.jsonl`` (written since ``store.json`` last held the whole index); a torn last
    line (a writer killed mid-append) is ignored: its shard is complete or absent, and the shards are scanned."""
    path = root / INDEX_JOURNAL
    if not path.exists():
        return set()
    shards = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            shards.add(json.loads(line)["shard"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return shards


def _list_shards(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if _SHARD_RE.match(p.name))


_HELD_LOCKS: dict[tuple[int, int], int] = {}
"""Store directories (device, inode) whose writer lock this process holds -> the holder's pid (a forked child
inherits this dict but not the lock, so an entry counts only in the process that made it)."""


def _acquire_writer_lock(root: Path) -> tuple[IO[str], tuple[int, int]]:
    """Take the store's exclusive writer lock (non-blocking) and write our pid into the lock file.

    A POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to this process alone, so the env worker
    processes a collection forks do not inherit it, and it is released the instant this process dies -- a
    writer killed with SIGKILL never leaves its store locked by an orphaned child. POSIX locks do not exclude
    a second lock of the same process (and closing any descriptor of the file would drop them), so writers of
    this process are tracked in :data:`_HELD_LOCKS` and a second one is refused before the file is opened."""
    path = root / LOCK_FILE
    st = root.stat()
    key = (st.st_dev, st.st_ino)
    if _HELD_LOCKS.get(key) == os.getpid():
        raise StoreLockedError(
            f"{root}: another writer of this process is appending to this store (pid "
            f"{os.getpid()}, lock file {path}); close it first, or write to another directory"
        )
    fh = open(path, "a+")  # noqa: SIM115 - held open for the writer's lifetime (the lock lives with the descriptor)
    try:
        fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            fh.close()
            raise
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise StoreLockedError(
            f"{root}: another writer is appending to this store (pid {holder}, lock file {path}); "
            f"wait for it to finish, or write to another directory"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD_LOCKS[key] = os.getpid()
    return fh, key


def _json_value(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples -> lists, numpy scalars are rejected by json here


def meta_differences(existing: StoreMeta, new: StoreMeta) -> dict[str, tuple[Any, Any]]:
    """``{key: (existing value, new value)}`` for ``source``, ``fps`` and every ``extra`` key (nested keys as
    ``extra.a.b``) that ``new`` sets to a value other than the existing store's. Keys only the existing
    store has are not differences (appending says nothing about them)."""
    out: dict[str, tuple[Any, Any]] = {}
    if existing.source != new.source:
        out["source"] = (existing.source, new.source)
    if float(existing.fps) != float(new.fps):
        out["fps"] = (existing.fps, new.fps)

    def walk(prefix: str, old: dict[str, Any], now: dict[str, Any]) -> None:
        for k, v in now.items():
            name = f"{prefix}.{k}"
            if k not in old:
                out[name] = ("<absent>", _json_value(v))
            elif isinstance(v, dict) and isinstance(old[k], dict):
                walk(name, old[k], v)
            elif _json_value(old[k]) != _json_value(v):
                out[name] = (old[k], _json_value(v))

    walk("extra", existing.extra, new.extra)
    return out


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class StoreWriter:
    """Append episodes to a store; shards are written atomically every ``episodes_per_shard``.

    Opening an existing store appends to it (the metadata must match). Episodes buffered but not
    yet flushed are lost on a crash — by design, so that a store never holds half an episode or a
    half shard; :meth:`close` (or leaving the ``with`` block) flushes them.

    Args:
        root: store directory (created if missing).
        source: dataset/env name, e.g. ``"vizdoom_hgs"`` or ``"bair"``.
        obs_shape: ``(H, W, 3)`` of every frame.
        action_spec: the action space of every episode.
        fps: frames per second of the stored frames (after frame skip).
        episodes_per_shard: episodes per shard file.
        val_fraction, test_fraction: share of episodes assigned to val/test by id hash when
            :meth:`add_episode` is not given an explicit split.
        extra: free-form metadata saved in ``store.json``.
        merge: appending to a store whose ``source``, ``fps`` or ``extra`` differ from these is a
            :class:`StoreError` naming the differing keys; with ``merge=True`` it is allowed, the store
            keeps its metadata and records the differing values in ``extra["appended_with"]``.
            (``obs_shape`` and ``action_spec`` must always match.)

    One writer per store at a time: the writer holds an exclusive lock on ``<root>/.writer.lock``
    (containing its pid) from construction to :meth:`close`; a second writer gets
    :class:`StoreLockedError` naming the holder. Shard names are claimed with an atomic no-replace
    link, so even without the lock two writers could never write the same shard.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        source: str,
        obs_shape: Sequence[int],
        action_spec: ActionSpec,
        fps: float = 0.0,
        episodes_per_shard: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        extra: dict[str, Any] | None = None,
        merge: bool = False,
    ) -> None:
        if episodes_per_shard < 1:
            raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction + test_fraction must lie in [0, 1), got {val_fraction} + {test_fraction}"
            )
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        shape = tuple(int(x) for x in obs_shape)
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"obs_shape must be (H, W, 3), got {shape}")
        self.meta = StoreMeta(
            source=source,
            obs_shape=shape,
            action_spec=action_spec,
            fps=float(fps),  # type: ignore[arg-type]
            extra=dict(extra or {}),
        )
        self.episodes_per_shard = episodes_per_shard
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._pending: list[Episode] = []
        self._index: dict[str, dict[str, Any]] = {}
        self._lock: IO[str] | None
        self._lock, self._lock_key = _acquire_writer_lock(self.root)
        try:
            self._open_existing(merge)
        except BaseException:
            self._release()
            raise

    def _open_existing(self, merge: bool) -> None:
        # Leftovers of an interrupted shard write are never readable shards; remove them (we hold the lock,
        # so no other writer is writing one now).
        for p in self.root.glob(".shard-*.tmp"):
            p.unlink(missing_ok=True)
        meta_path = self.root / STORE_JSON
        if meta_path.exists():
            existing = EpisodeStore(self.root)
            if (
                existing.meta.obs_shape != self.meta.obs_shape
                or existing.meta.action_spec != self.meta.action_spec
            ):
                raise StoreError(
                    f"{meta_path}: existing store has obs_shape={existing.meta.obs_shape}, "
                    f"action_spec={existing.meta.action_spec}; cannot append episodes with "
                    f"obs_shape={self.meta.obs_shape}, action_spec={self.meta.action_spec}"
                )
            diffs = meta_differences(existing.meta, self.meta)
            if diffs and not merge:
                listed = "; ".join(f"{k}: store has {a!r}, got {b!r}" for k, (a, b) in diffs.items())
                raise StoreError(
                    f"{meta_path}: cannot append, the metadata differs ({listed}); write to another "
                    f"store, or pass merge=True (CLI: --merge) to append anyway"
                )
            extra = dict(existing.meta.extra)
            if diffs:  # merge: the store keeps its metadata and records what the appended episodes came with
                extra["appended_with"] = [
                    *extra.get("appended_with", []),
                    {k: b for k, (_, b) in diffs.items()},
                ]
            self.meta = StoreMeta(
                source=existing.meta.source,
                obs_shape=self.meta.obs_shape,
                action_spec=self.meta.action_spec,
                fps=existing.meta.fps,
                extra=extra,
            )
            self._index = dict(existing.index)
        shards = _list_shards(self.root)
        self._next_shard = (int(_SHARD_RE.match(shards[-1].name).group(1)) + 1) if shards else 0  # type: ignore[union-attr]
        self._write_meta()

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.lockf(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
            if _HELD_LOCKS.get(self._lock_key) == os.getpid():
                del _HELD_LOCKS[self._lock_key]

    # -- public ---------------------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        """Episodes durably written (in complete shards)."""
        return len(self._index)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def add_episode(
        self,
        frames: np.ndarray,
        actions: np.ndarray | None = None,
        rewards: np.ndarray | None = None,
        terminated: np.ndarray | None = None,
        *,
        truncated: bool = False,
        split: str | None = None,
        episode_id: str | None = None,
        attrs: dict[str, Any] | None = None,
        extras: dict[str, np.ndarray] | None = None,
    ) -> str:
        """Validate and buffer one episode; returns its id. Flushes a shard when the buffer is full.

        Args:
            frames: uint8 ``(T, H, W, 3)``, ``T >= 1``.
            actions: see :class:`ActionSpec`; ``T-1`` rows (None for action-free stores).
            rewards: float ``(T-1,)``; zeros if None.
            terminated: bool ``(T-1,)``; all False if None.
            truncated: the episode was cut by a time limit rather than ending.
            split: ``'train' | 'val' | 'test'``; by default derived from the id hash.
            episode_id: unique id (letters, digits, ``-_.``); default ``ep-<running number>``.
            attrs: scalar/string metadata (e.g. ``label``); stored as HDF5 attributes.
            extras: per-episode arrays (e.g. BAIR ``endeffector_pos`` ``(T, 3)``).
        """
        if self._lock is None:
            raise StoreError(f"{self.root}: this writer is closed; open a new StoreWriter to append")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != self.meta.obs_shape:
            raise StoreError(
                f"frames: got {frames.dtype}{tuple(frames.shape)}, expected uint8 (T, {', '.join(map(str, self.meta.obs_shape))})"
            )
        T = frames.shape[0]
        if T < 1:
            raise StoreError("frames: an episode needs at least one frame")
        acts = self.meta.action_spec.validate(actions, T - 1)
        rew = np.zeros(T - 1, np.float32) if rewards is None else np.asarray(rewards)
        if rew.shape != (T - 1,) or not np.all(np.isfinite(rew)):
            raise StoreError(f"rewards: got {rew.dtype}{rew.shape}, expected finite float32 ({T - 1},)")
        term = np.zeros(T - 1, bool) if terminated is None else np.asarray(terminated)
        if term.shape != (T - 1,) or term.dtype != np.bool_:
            raise StoreError(f"terminated: got {term.dtype}{term.shape}, expected bool ({T - 1},)")
        if episode_id is None:
            episode_id = f"ep-{len(self._index) + len(self._pending):07d}"
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", episode_id):
            raise StoreError(f"episode_id {episode_id!r}: use only letters, digits and -_.")
        if episode_id in self._index or any(e.id == episode_id for e in self._pending):
            raise StoreError(f"episode_id {episode_id!r} already exists in {self.root}")
        if split is None:
            split = split_for_id(episode_id, self.val_fraction, self.test_fraction)
        if split not in SPLITS:
            raise StoreError(f"split: got {split!r}, expected one of {SPLITS}")
        self._pending.append(
            Episode(
                episode_id,
                frames,
                acts,
                rew.astype(np.float32),
                term,
                bool(truncated),
                split,
                dict(attrs or {}),
                {k: np.asarray(v) for k, v in (extras or {}).items()},
            )
        )
        if len(self._pending) >= self.episodes_per_shard:
            self.flush()
        return episode_id

    def flush(self) -> None:
        """Write buffered episodes as one shard (atomically) and update ``store.json``."""
        if not self._pending:
            return
        if self._lock is None:
            raise StoreError(f"{self.root}: this writer is closed; open a new StoreWriter to append")
        fd, tmp_name = tempfile.mkstemp(
            dir=self.root, prefix=".shard-", suffix=".h5.tmp"
        )  # unique per writer
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                grp = f.create_group("episodes")
                for ep in self._pending:
                    g = grp.create_group(ep.id)
                    H, W, _ = self.meta.obs_shape
                    # One chunk per frame: a clip read touches exactly its frames. lzf is h5py's
                    # built-in fast compressor (gzip costs ~5x more CPU to read for ~20% less disk).
                    # fletcher32: every chunk carries a checksum, so flipped bytes fail to read instead of
                    # loading silently (read errors name the shard and the episode)
                    g.create_dataset(
                        "frames", data=ep.frames, chunks=(1, H, W, 3), compression="lzf", fletcher32=True
                    )
                    if ep.actions is not None:
                        g.create_dataset("actions", data=ep.actions, fletcher32=True)
                    g.create_dataset("rewards", data=ep.rewards, fletcher32=True)
                    g.create_dataset("terminated", data=ep.terminated, fletcher32=True)
                    g.attrs["truncated"] = ep.truncated
                    g.attrs["split"] = ep.split
                    for k, v in ep.attrs.items():
                        g.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
                    if ep.extras:
                        eg = g.create_group("extras")
                        for k, v in ep.extras.items():
                            nd = np.asarray(
                                v
                            ).ndim  # per-frame images: object masks take 1/45 of their raw size
                            eg.create_dataset(
                                k, data=v, fletcher32=bool(nd), compression="lzf" if nd >= 2 else None
                            )
                f.flush()
            finish_file(tmp)  # fsync + the user's mode; the name is claimed by a link, never a replace
            name = self._claim_shard_name(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        ids = [ep.id for ep in self._pending]
        for ep in self._pending:
            self._index[ep.id] = {"shard": name, "length": len(ep), "split": ep.split}
        self._pending = []
        self._next_shard += 1
        self._append_journal(name, {ep_id: self._index[ep_id] for ep_id in ids})

    def _claim_shard_name(self, tmp: Path) -> str:
        """Give the finished temporary shard the next free ``shard-NNNNN.h5`` name without ever replacing a
        shard: ``os.link`` fails if the name exists, and then the next number is tried."""
        while True:
            name = f"shard-{self._next_shard:05d}.h5"
            try:
                os.link(tmp, self.root / name)
                return name
            except FileExistsError:
                self._next_shard += 1

    def close(self) -> None:
        """Flush buffered episodes and release the store's writer lock (idempotent)."""
        try:
            if self._lock is not None:
                self.flush()
                self._write_meta()
        finally:
            self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an exception the buffered episodes are still complete episodes: keep them.
        self.close()

    # -- internal -------------------------------------------------------------------------------
    def _write_meta(self) -> None:
        """Write ``store.json`` with the whole index (at open and close), which makes the journal redundant."""
        d = self.meta.to_dict()
        d["num_episodes"] = len(self._index)
        d["splits"] = {s: sorted(i for i, e in self._index.items() if e["split"] == s) for s in SPLITS}
        d["episodes"] = self._index
        write_json(self.root / STORE_JSON, d, indent=1)
        (self.root / INDEX_JOURNAL).unlink(missing_ok=True)

    def _append_journal(self, shard: str, entries: dict[str, dict[str, Any]]) -> None:
        """Append one shard's index entries to ``index.jsonl`` (one line, fsynced): O(shard), not O(store)."""
        path = self.root / INDEX_JOURNAL
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"shard": shard, "episodes": entries}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(self.root)


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


class EpisodeStore:
    """Read-only view of a store. Validates every shard on open.

    Args:
        root: store directory.
        skip_corrupt: if True, a missing/corrupt shard is skipped with a warning (its name is in
            :attr:`skipped`); otherwise it raises :class:`StoreError` naming the file and field.

    HDF5 handles are opened lazily per process, so the store can be shared with DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike, *, skip_corrupt: bool = False) -> None:
        self.root = Path(root)
        meta_path = self.root / STORE_JSON
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: store directory does not exist")
        if not meta_path.exists():
            raise StoreError(
                f"{meta_path}: missing; not an episode store (expected store.json and shard-NNNNN.h5 files)"
            )
        try:
            raw = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path}: not valid JSON ({e})") from None
        self.meta = StoreMeta.from_dict(raw, where=str(meta_path))
        self.skipped: list[str] = []
        self.index: dict[str, dict[str, Any]] = {}
        listed = {e["shard"] for e in raw.get("episodes", {}).values()} | journal_shards(self.root)
        present = {p.name for p in _list_shards(self.root)}
        for name in sorted(listed - present):
            self._fail(self.root / name, "file is missing (listed in store.json)", skip_corrupt)
        for name in sorted(present):
            try:
                self.index.update(self._scan_shard(self.root / name))
            except StoreError as e:
                self._fail(self.root / name, str(e), skip_corrupt)
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    def _fail(self, path: Path, why: str, skip: bool) -> None:
        msg = f"{path}: {why}"
        if not skip:
            raise StoreError(msg + " (pass skip_corrupt=True to load the remaining shards)")
        warnings.warn(f"skipping corrupt shard {msg}", stacklevel=3)
        self.skipped.append(path.name)

    def _scan_shard(self, path: Path) -> dict[str, dict[str, Any]]:
        spec, (H, W, C) = self.meta.action_spec, self.meta.obs_shape
        out: dict[str, dict[str, Any]] = {}
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise StoreError(f"cannot open as HDF5 ({e})") from None
        with f:
            refs = external_references(f)
            if refs:
                raise StoreError(
                    f"refers to data outside the file ({'; '.join(refs[:5])}); a shard must be self-contained"
                )
            if "episodes" not in f:
                raise StoreError("missing group 'episodes'")
            for eid, g in f["episodes"].items():
                where = f"episode {eid!r}"
                if "frames" not in g:
                    raise StoreError(f"{where}: missing dataset 'frames'")
                fr = g["frames"]
                if fr.dtype != np.uint8 or fr.ndim != 4 or fr.shape[1:] != (H, W, C):
                    raise StoreError(
                        f"{where}: field 'frames' is {fr.dtype}{fr.shape}, expected uint8 (T, {H}, {W}, {C})"
                    )
                T = fr.shape[0]
                for key, dtype in (("rewards", np.float32), ("terminated", np.bool_)):
                    if key not in g or g[key].shape != (T - 1,) or g[key].dtype != dtype:
                        got = f"{g[key].dtype}{g[key].shape}" if key in g else "missing"
                        raise StoreError(
                            f"{where}: field {key!r} is {got}, expected {np.dtype(dtype)} ({T - 1},)"
                        )
                if spec.kind != "none":
                    exp = (T - 1,) if spec.kind == "discrete" else (T - 1, spec.dim)
                    edt = np.int64 if spec.kind == "discrete" else np.float32
                    a = g.get("actions")
                    if a is None or a.shape != exp or a.dtype != edt:
                        got = "missing" if a is None else f"{a.dtype}{a.shape}"
                        raise StoreError(
                            f"{where}: field 'actions' is {got}, expected {spec.describe(T - 1)}"
                        )
                out[eid] = {"shard": path.name, "length": int(T), "split": str(g.attrs.get("split", "train"))}
        return out

    # -- queries --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def episode_ids(self, split: str | None = None) -> list[str]:
        """Episode ids, sorted; only those of ``split`` if given."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split: got {split!r}, expected one of {SPLITS} or None")
        return sorted(i for i, e in self.index.items() if split is None or e["split"] == split)

    def length(self, episode_id: str) -> int:
        return int(self._entry(episode_id)["length"])

    def _entry(self, episode_id: str) -> dict[str, Any]:
        try:
            return self.index[episode_id]
        except KeyError:
            raise KeyError(f"episode {episode_id!r} not in store {self.root}") from None

    def _group(self, episode_id: str) -> h5py.Group:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: never share HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        shard = self._entry(episode_id)["shard"]
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = h5py.File(self.root / shard, "r")
        return f["episodes"][episode_id]

    def _read_error(self, episode_id: str, what: str, e: BaseException) -> StoreError:
        shard = self.index.get(episode_id, {}).get("shard", "?")
        return StoreError(
            f"{self.root / shard}: episode {episode_id!r}: reading {what} failed ({type(e).__name__}: {e}); "
            f"the shard is damaged (checksum or structure); re-create it or open the store with "
            f"skip_corrupt=True after removing it"
        )

    def load(self, episode_id: str) -> Episode:
        """Load a whole episode into memory (``StoreError`` naming the shard and episode if it cannot be read)."""
        try:
            return self._load(episode_id)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            if isinstance(e, KeyError) and episode_id not in self.index:
                raise
            raise self._read_error(episode_id, "the episode", e) from None

    def _load(self, episode_id: str) -> Episode:
        g = self._group(episode_id)
        attrs = {k: v for k, v in g.attrs.items() if k not in ("truncated", "split")}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        extras = {k: d[()] for k, d in g["extras"].items()} if "extras" in g else {}
        return Episode(
            id=episode_id,
            frames=g["frames"][()],
            actions=g["actions"][()] if "actions" in g else None,
            rewards=g["rewards"][()],
            terminated=g["terminated"][()],
            truncated=bool(g.attrs["truncated"]),
            split=str(g.attrs.get("split", "train")),
            attrs=attrs,
            extras=extras,
        )

    def load_actions(self, episode_id: str) -> np.ndarray | None:
        """An episode's actions only (T-1, ...) without reading its frames; None for action-free stores."""
        try:
            g = self._group(episode_id)
            return g["actions"][()] if "actions" in g else None
        except (OSError, ValueError, RuntimeError) as e:
            raise self._read_error(episode_id, "actions", e) from None

    def read_clip(self, episode_id: str, start: int, length: int) -> dict[str, np.ndarray]:
        """Frames ``[start, start+length)`` and the ``length-1`` transitions between them (and the frames'
        ``object_mask`` uint8 (length, H, W) when the episode stores one)."""
        T = self.length(episode_id)
        if start < 0 or length < 1 or start + length > T:
            raise ValueError(
                f"clip [{start}, {start + length}) out of range for episode {episode_id!r} of {T} frames"
            )
        s, e = start, start + length
        try:
            g = self._group(episode_id)
            out = {
                "frames": g["frames"][s:e],
                "rewards": g["rewards"][s : e - 1],
                "terminated": g["terminated"][s : e - 1],
            }
            if "actions" in g:
                out["actions"] = g["actions"][s : e - 1]
            if "extras" in g and OBJECT_MASK in g["extras"]:
                out[OBJECT_MASK] = g["extras"][OBJECT_MASK][s:e]
        except (OSError, ValueError, RuntimeError) as err:
            raise self._read_error(episode_id, f"frames [{s}, {e})", err) from None
        return out

    def iter_episodes(self, split: str | None = None) -> Iterator[Episode]:
        for i in self.episode_ids(split):
            yield self.load(i)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_handles"] = {}
        return d


HELDOUT_FALLBACK = ("test", "val", "train")
"""The order in which :func:`heldout_episode_ids` tries splits after the one asked for."""


def heldout_episode_ids(store: Any, split: str = "test", min_length: int = 1) -> tuple[list[str], str]:
    """Ids of ``split``'s episodes with at least ``min_length`` frames, and the split they come from.

    Falls back to the other held-out split and then to ``train`` (in :data:`HELDOUT_FALLBACK` order)
    when ``split`` has no such episode; falling back to ``train`` warns ("no held-out episodes": what is
    scored or dreamed from then was trained on), the other held-out split does not (callers that report
    a split report the one returned). ValueError when no episode of the store has ``min_length`` frames. ``store``: an
    :class:`EpisodeStore` or anything with its ``episode_ids(split)``, ``length(id)`` and ``root``
    (a :class:`~worldmodel.token_cache.TokenCache`). The one held-out rule of validation, evaluation
    and the dream env's reset contexts.
    """
    for s in (split, *(s for s in HELDOUT_FALLBACK if s != split)):
        ids = [i for i in store.episode_ids(s) if store.length(i) >= min_length]
        if ids:
            if s == "train" != split:
                warnings.warn(
                    f"{store.root}: no held-out episodes with {min_length} frames ('{split}' asked for); "
                    f"using 'train' episodes",
                    stacklevel=2,
                )
            return ids, s
    raise ValueError(f"no episode of {store.root} has {min_length} frames")
