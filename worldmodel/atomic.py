"""Atomic file writes: the one way every file of the project is written (temporary file + rename).

A reader (or a resumed run after a kill) sees either the old file or the complete new one, never a
half-written file. One policy for every file, whatever its size:

1. the data is written to a hidden, uniquely named temporary file beside the target (same directory,
   hence same filesystem: the rename cannot degrade to a copy);
2. the temporary file is fsynced and given the user's default mode (``mkstemp`` creates 0600; runs,
   stores and videos are meant to be shared);
3. it is renamed onto the target (``os.replace``: atomic on POSIX) and the directory is fsynced, so
   a power loss after the call returns cannot undo the rename.

:func:`atomic_file` is the general form (any writer that takes a path: h5py, safetensors,
``torch.save``, matplotlib, moviepy); :func:`write_text` / :func:`write_json` are shorthands;
:func:`atomic_replace` commits a temporary file the caller made itself (a resumable download's
``.part``); :func:`durable_rename` is step 3 alone (a checkpoint's pending trainer state becoming
the committed one); :func:`finish_file` is step 2 alone, for writers that claim their name another
way (the store's shards are hard-linked so that no shard is ever replaced).

This module imports nothing from the project: every layer (sources, store, checkpoint, envs) uses it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give a new file (``mkstemp`` gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside directory ``path`` durable (a power loss after it returns cannot undo the rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_file(tmp: str | os.PathLike) -> None:
    """fsync a written temporary file and give it the user's default mode (before it takes its final name)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, default_file_mode())


def durable_rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a finished file ``src`` onto ``dst`` (atomic, replacing it) and fsync the directory."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def atomic_replace(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Commit the written temporary file ``tmp`` as ``final``: fsync, default mode, rename, fsync the directory."""
    finish_file(tmp)
    durable_rename(tmp, final)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it becomes ``path`` when the block ends.

    The temporary file ``.<name>.<random><suffix>`` exists (empty) in ``path``'s directory, which is
    created if needed; give ``suffix`` when the writer infers the format from the name (``".tmp.mp4"``).
    If the block raises, the temporary file is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent))
