"""Run-directory files: config, weights and trainer state, all written atomically (DESIGN §7).

A run directory is also the world-model bundle::

    run/
      config.json              ExperimentConfig + store metadata + package version
      model.safetensors        weights, keys prefixed by component ("tokenizer.", "prior.")
      trainer_state/<stage>.pt optimizer, step, RNG (resume only; loaded with weights_only=True)

Configs are JSON and weights are safetensors: nothing pickled is ever executed on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worldmodel import __version__

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE_DIR = "trainer_state"


def _tmp_near(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_near(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_config(run_dir: str | os.PathLike, config: dict[str, Any], store_meta: dict[str, Any] | None) -> None:
    """Write ``config.json``: the resolved experiment config plus what the bundle needs at load time."""
    write_json(Path(run_dir) / CONFIG_JSON, {"format": "videogpt-worldmodel", "version": __version__,
                                             "experiment": config, "store": store_meta})


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {run_dir} is not a run directory / bundle "
                                f"(train one with: python experiments/train.py --env <preset>)")
    d = json.loads(path.read_text())
    if d.get("format") != "videogpt-worldmodel":
        raise ValueError(f"{path}: not a videogpt-worldmodel config (field 'format' is {d.get('format')!r})")
    return d


def save_weights(run_dir: str | os.PathLike, prefix: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the ``prefix.*`` tensors of ``model.safetensors``, keeping the other components."""
    path = Path(run_dir) / WEIGHTS
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(prefix + ".")} if path.exists() else {}
    for k, v in state_dict.items():
        tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    tmp = _tmp_near(path)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "version": __version__})
        atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(run_dir: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix.*`` tensors of ``model.safetensors`` with the prefix stripped."""
    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; train the {prefix} stage first "
                                f"(python experiments/train.py --env <preset> --stage {prefix})")
    n = len(prefix) + 1
    out = {k[n:]: v for k, v in load_file(path).items() if k.startswith(prefix + ".")}
    if not out:
        raise KeyError(f"{path} holds no '{prefix}' weights; train that stage first "
                       f"(python experiments/train.py --env <preset> --stage {prefix})")
    return out


def has_weights(run_dir: str | os.PathLike, prefix: str) -> bool:
    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith(prefix + ".") for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def trainer_state_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / TRAINER_STATE_DIR / f"{stage}.pt"


def save_trainer_state(run_dir: str | os.PathLike, stage: str, state: dict[str, Any]) -> None:
    path = trainer_state_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_near(path)
    try:
        torch.save(state, tmp)
        atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_trainer_state(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    path = trainer_state_path(run_dir, stage)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
