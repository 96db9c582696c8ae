"""Where runs (bundles) live and how to find the newest bundle of a preset.

Runs go to ``$WORLDMODEL_HOME/runs/<preset>-<scale>`` (``gym:<ID>`` presets with ``:`` and ``/`` as ``-``) when ``WORLDMODEL_HOME`` is set, else to
``./runs/<preset>-<scale>``. Bundle discovery looks in both places.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from worldmodel.config import safe_name

# worldmodel.checkpoint (torch) is imported inside the functions that read bundles: `import envs` lists the runs
# directories through runs_dir/search_roots and stays free of torch.


def runs_dir() -> Path:
    """``$WORLDMODEL_HOME/runs`` if ``WORLDMODEL_HOME`` is set, else ``./runs``."""
    home = os.environ.get("WORLDMODEL_HOME")
    return Path(home) / "runs" if home else Path("runs")


def default_run_dir(preset: str, scale: str) -> Path:
    """The run directory ``train.py`` uses for ``--env preset --scale scale`` without ``--run-dir``:
    ``<runs>/<preset>-<scale>``, with the preset made one path component (``gym:ALE/Pong-v5`` ->
    ``gym-ALE-Pong-v5``, :func:`worldmodel.config.safe_name`)."""
    return runs_dir() / f"{safe_name(preset)}-{scale}"


def search_roots() -> list[Path]:
    """The existing runs directories bundles are discovered in: ``runs_dir()`` and ``./runs`` (once each)."""
    roots = [runs_dir(), Path("runs")]
    return [
        r for i, r in enumerate(roots) if r.is_dir() and r.resolve() not in {x.resolve() for x in roots[:i]}
    ]


def bundle_preset(path: str | os.PathLike) -> str | None:
    """The preset name recorded in a bundle's ``config.json``; None if the directory is not a complete
    bundle (no config, no weights, or no trained prior yet). A bundle that is there but broken (config
    not valid JSON or of the wrong types, unreadable weights) raises :class:`BundleError` naming the file."""
    from worldmodel.checkpoint import CONFIG_JSON, WEIGHTS, has_weights, read_experiment_config

    path = Path(path)
    if not (path / CONFIG_JSON).exists() or not (path / WEIGHTS).exists():
        return None
    cfg = read_experiment_config(path)
    if not has_weights(path, "prior"):  # the prior is trained last: a bundle has both components
        return None
    return cfg.name


def find_bundles(preset: str) -> list[Path]:
    """Bundles of ``preset`` under the runs directories, newest (by weights' mtime) first. A directory whose
    bundle cannot be read is skipped with a warning naming its path (one broken bundle never hides the others)."""
    from worldmodel.checkpoint import WEIGHTS, BundleError

    found = []
    for root in search_roots():
        for d in sorted(root.iterdir()):
            if not d.is_dir():
                continue
            try:
                if bundle_preset(d) == preset:
                    found.append(d)
            except (BundleError, OSError) as e:
                warnings.warn(f"skipping bundle {d}: {e}", BundleSkippedWarning, stacklevel=2)
    return sorted(found, key=lambda d: (d / WEIGHTS).stat().st_mtime, reverse=True)


class BundleSkippedWarning(UserWarning):
    """Discovery skipped a run directory whose bundle cannot be read."""
