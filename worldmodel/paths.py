"""Where runs (bundles) live and how to find the newest bundle of a preset.

Runs go to ``$WORLDMODEL_HOME/runs/<preset>-<scale>`` when ``WORLDMODEL_HOME`` is set, else to
``./runs/<preset>-<scale>``. Bundle discovery looks in both places.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from worldmodel.checkpoint import CONFIG_JSON, WEIGHTS, has_weights


def runs_dir() -> Path:
    """``$WORLDMODEL_HOME/runs`` if ``WORLDMODEL_HOME`` is set, else ``./runs``."""
    home = os.environ.get("WORLDMODEL_HOME")
    return Path(home) / "runs" if home else Path("runs")


def default_run_dir(preset: str, scale: str) -> Path:
    """The run directory ``train.py`` uses for ``--env preset --scale scale`` without ``--run-dir``."""
    return runs_dir() / f"{preset}-{scale}"


def _search_roots() -> list[Path]:
    roots = [runs_dir(), Path("runs")]
    return [r for i, r in enumerate(roots) if r.is_dir() and r.resolve() not in {x.resolve() for x in roots[:i]}]


def bundle_preset(path: str | os.PathLike) -> str | None:
    """The preset name recorded in a bundle's ``config.json`` (None if it is not a complete bundle)."""
    path = Path(path)
    try:
        d = json.loads((path / CONFIG_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not has_weights(path, "prior"):  # the prior is trained last: a bundle has both components
        return None
    return d.get("experiment", {}).get("name")


def find_bundles(preset: str) -> list[Path]:
    """Bundles of ``preset`` under the runs directories, newest (by weights' mtime) first."""
    found = [d for root in _search_roots() for d in root.iterdir() if d.is_dir() and bundle_preset(d) == preset]
    return sorted(found, key=lambda d: (d / WEIGHTS).stat().st_mtime, reverse=True)
