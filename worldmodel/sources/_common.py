"""Plumbing shared by the dataset converters: the error type, the report, resumable writing.

Every converter follows one pattern:

1. list the source items (files, records, demos, videos) in a deterministic order;
2. give each a stable episode id derived from its source name, so that re-running the same
   command after a kill skips the episodes already in the store (conversion is resumable: the
   :class:`~worldmodel.store.StoreWriter` never leaves half shards, and buffered episodes are
   flushed when the ``with`` block exits, even on an exception);
3. decode it; a corrupt item raises :class:`SourceError` naming the file (and record) unless
   ``skip_corrupt=True``, in which case it is recorded in :attr:`ConvertReport.skipped`, a warning
   is issued, and conversion goes on with the next item.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.store import STORE_JSON, EpisodeStore, StoreError


class SourceError(StoreError):
    """A source dataset file is missing, corrupt, or not in the documented format."""


@dataclass
class ConvertReport:
    """What a ``convert()`` call did.

    Attributes:
        store: the episode store written to.
        source: dataset name (``"bair"``, ``"robonet"``, ...).
        converted: episodes written by this call.
        already_present: episodes skipped because their id was already in the store (resume).
        frames: frames written by this call.
        filtered: source items left out on purpose (robot/class filter, missing file, no split).
        skipped: corrupt items left out because ``skip_corrupt=True``: ``"<file>[ <where>]: <why>"``.
        splits: episodes written by this call per split.
    """

    store: Path
    source: str
    converted: int = 0
    already_present: int = 0
    frames: int = 0
    filtered: int = 0
    skipped: list[str] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0, "test": 0})

    def add(self, split: str, n_frames: int) -> None:
        self.converted += 1
        self.frames += n_frames
        self.splits[split] = self.splits.get(split, 0) + 1

    def __str__(self) -> str:
        parts = [
            f"{self.store}: converted {self.converted} {self.source} episodes ({self.frames} frames; "
            + ", ".join(f"{k} {v}" for k, v in self.splits.items())
            + ")"
        ]
        if self.already_present:
            parts.append(f"{self.already_present} already present")
        if self.filtered:
            parts.append(f"{self.filtered} filtered out")
        if self.skipped:
            parts.append(f"{len(self.skipped)} corrupt skipped")
        return "; ".join(parts)


def existing_episode_ids(root: str | Path) -> set[str]:
    """Ids of the episodes already durably stored under ``root`` (empty if there is no store yet)."""
    root = Path(root)
    if not (root / STORE_JSON).exists():
        return set()
    return set(EpisodeStore(root).episode_ids())


def fail(report: ConvertReport, where: str, why: str, skip_corrupt: bool) -> None:
    """Raise :class:`SourceError` for a corrupt item, or record and warn when ``skip_corrupt``."""
    msg = f"{where}: {why}"
    if not skip_corrupt:
        raise SourceError(msg + " (pass skip_corrupt=True to convert the rest)")
    warnings.warn(f"skipping corrupt item {msg}", stacklevel=3)
    report.skipped.append(msg)


_ID_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


def episode_id(*parts: str | int) -> str:
    """A store-legal episode id (letters, digits, ``-_.``) joined from ``parts`` with ``-``."""
    return "-".join(_ID_BAD.sub("_", str(p)) for p in parts)


def attr_value(v: Any) -> Any:
    """An HDF5 attribute value (numpy scalar/array, bytes) as a plain JSON-able Python value."""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray):
        return [attr_value(x) for x in v.tolist()] if v.ndim else attr_value(v.item())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [attr_value(x) for x in v]
    return v


def json_safe(v: Any) -> Any:
    """``v`` if it survives ``json.dumps``; else its ``str``."""
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)
