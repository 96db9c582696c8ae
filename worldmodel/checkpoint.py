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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldmodel import __version__
from worldmodel.config import ExperimentConfig
from worldmodel.store import default_file_mode

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE_DIR = "trainer_state"


class BundleError(ValueError):
    """A run directory's file (config, weights, trainer state) is unreadable or not what it should be;
    the message names the file and what was expected."""


def _tmp_near(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, default_file_mode())  # bundles are meant to be shared: the user's umask, not 0600
    os.close(fd)
    return Path(tmp)


def atomic_replace(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, give it the user's default mode (writers may recreate it 0600) and rename it to ``final``."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, final)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_near(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        atomic_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_text(path, json.dumps(obj, indent=2))


def write_run_config(run_dir: str | os.PathLike, config: dict[str, Any], store_meta: dict[str, Any] | None) -> None:
    """Write ``config.json``: the resolved experiment config plus what the bundle needs at load time."""
    write_json(Path(run_dir) / CONFIG_JSON, {"format": "videogpt-worldmodel", "version": __version__,
                                             "experiment": config, "store": store_meta})


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a run directory as a dict; ``BundleError`` naming the file unless it is a JSON
    object with ``format`` 'videogpt-worldmodel', an ``experiment`` object and a ``store`` object (or null)."""
    path = Path(run_dir) / CONFIG_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {run_dir} is not a run directory / bundle "
                                f"(train one with: python experiments/train.py --env <preset>)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not readable as JSON ({e}); expected the config.json train.py writes") from None
    if not isinstance(d, dict):
        raise BundleError(f"{path}: holds a JSON {type(d).__name__}, expected an object with 'format', 'experiment' "
                          f"and 'store'")
    if d.get("format") != "videogpt-worldmodel":
        raise BundleError(f"{path}: not a videogpt-worldmodel config (field 'format' is {d.get('format')!r})")
    if not isinstance(d.get("experiment"), dict):
        raise BundleError(f"{path}: field 'experiment' is {type(d.get('experiment')).__name__}, expected an object "
                          f"(the ExperimentConfig)")
    if d.get("store") is not None and not isinstance(d["store"], dict):
        raise BundleError(f"{path}: field 'store' is {type(d['store']).__name__}, expected an object or null")
    return d


def read_experiment_config(run_dir: str | os.PathLike) -> ExperimentConfig:
    """The :class:`ExperimentConfig` in a run directory's ``config.json``, every field type-checked;
    ``BundleError`` naming the file and the field otherwise."""
    d = read_run_config(run_dir)
    try:
        return ExperimentConfig.from_dict(d["experiment"])
    except ValueError as e:
        raise BundleError(f"{Path(run_dir) / CONFIG_JSON}: field 'experiment' is not a valid config: {e}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e}); expected the weights train.py writes "
                          f"(re-run the stage to write them again)") from None


def save_weights(run_dir: str | os.PathLike, prefix: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the ``prefix.*`` tensors of ``model.safetensors``, keeping the other components."""
    path = Path(run_dir) / WEIGHTS
    tensors = {k: v for k, v in _load_safetensors(path).items() if not k.startswith(prefix + ".")} if path.exists() else {}
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
    out = {k[n:]: v for k, v in _load_safetensors(path).items() if k.startswith(prefix + ".")}
    if not out:
        raise KeyError(f"{path} holds no '{prefix}' weights; train that stage first "
                       f"(python experiments/train.py --env <preset> --stage {prefix})")
    return out


def has_weights(run_dir: str | os.PathLike, prefix: str) -> bool:
    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(k.startswith(prefix + ".") for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e}); expected the weights train.py writes") from None


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError ... for a bad file
        raise BundleError(f"{path}: unreadable trainer state ({type(e).__name__}: {str(e)[:200]}); expected the "
                          f"{stage} stage's checkpoint (delete it to train the stage again from scratch)") from None
    if not isinstance(state, dict):
        raise BundleError(f"{path}: holds a {type(state).__name__}, expected the {stage} stage's trainer state (a dict)")
    return state
