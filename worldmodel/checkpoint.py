"""Run-directory files: config, weights and trainer state, all written atomically (DESIGN §7).

A run directory is also the world-model bundle::

    run/
      config.json              ExperimentConfig + store metadata + package version
      model.safetensors        weights, keys prefixed by component ("tokenizer.", "prior.")
      trainer_state/<stage>.pt optimizer, step, RNG and the manifest of its weights (resume only; loaded with
                               weights_only=True); <stage>.next.pt only between the steps of a checkpoint commit

Configs are JSON and weights are safetensors: nothing pickled is ever executed on load.

A training checkpoint is a *pair*: the stage's tensors in ``model.safetensors`` and its trainer state.
They are two files, so they cannot be replaced by one rename; :func:`save_checkpoint` commits them with
this protocol instead, so that a kill at any instant leaves a pair that resumes exactly:

1. the new trainer state, which names the weights it belongs to (``state["weights"]``: file, prefix,
   SHA-256 of the stage's tensors, their byte count), is written as ``trainer_state/<stage>.next.pt``;
2. ``model.safetensors`` is replaced (one rename): this is the commit point;
3. ``<stage>.next.pt`` is renamed to ``<stage>.pt``.

:func:`load_checkpoint` takes the state (``.next.pt`` first, then ``.pt``) whose manifest matches the
stage's tensors in ``model.safetensors`` -- before step 2 that is the previous ``.pt``, after it the new
one -- and finishes step 3 if a kill interrupted it. Weights that match no state (e.g. weights written by
something else over a run) are a :class:`BundleError` naming the files, never a silent mix of one step's
weights with another step's optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldmodel import __version__
from worldmodel.atomic import atomic_file, durable_rename, fsync_dir, write_json
from worldmodel.config import ExperimentConfig

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE_DIR = "trainer_state"


class BundleError(ValueError):
    """A run directory's file (config, weights, trainer state) is unreadable or not what it should be;
    the message names the file and what was expected."""


def write_run_config(
    run_dir: str | os.PathLike, config: dict[str, Any], store_meta: dict[str, Any] | None
) -> None:
    """Write ``config.json``: the resolved experiment config plus what the bundle needs at load time."""
    write_json(
        Path(run_dir) / CONFIG_JSON,
        {"format": "videogpt-worldmodel", "version": __version__, "experiment": config, "store": store_meta},
    )


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a run directory as a dict; ``BundleError`` naming the file unless it is a JSON
    object with ``format`` 'videogpt-worldmodel', an ``experiment`` object and a ``store`` object (or null)."""
    path = Path(run_dir) / CONFIG_JSON
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing; {run_dir} is not a run directory / bundle "
            f"(train one with: python experiments/train.py --env <preset>)"
        )
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(
            f"{path}: not readable as JSON ({e}); expected the config.json train.py writes"
        ) from None
    if not isinstance(d, dict):
        raise BundleError(
            f"{path}: holds a JSON {type(d).__name__}, expected an object with 'format', 'experiment' "
            f"and 'store'"
        )
    if d.get("format") != "videogpt-worldmodel":
        raise BundleError(f"{path}: not a videogpt-worldmodel config (field 'format' is {d.get('format')!r})")
    if not isinstance(d.get("experiment"), dict):
        raise BundleError(
            f"{path}: field 'experiment' is {type(d.get('experiment')).__name__}, expected an object "
            f"(the ExperimentConfig)"
        )
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
        raise BundleError(
            f"{Path(run_dir) / CONFIG_JSON}: field 'experiment' is not a valid config: {e}"
        ) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise BundleError(
            f"{path}: not a readable safetensors file ({e}); expected the weights train.py writes "
            f"(re-run the stage to write them again)"
        ) from None


def save_weights(run_dir: str | os.PathLike, prefix: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the ``prefix.*`` tensors of ``model.safetensors``, keeping the other components."""
    path = Path(run_dir) / WEIGHTS
    tensors = (
        {k: v for k, v in _load_safetensors(path).items() if not k.startswith(prefix + ".")}
        if path.exists()
        else {}
    )
    for k, v in state_dict.items():
        tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "version": __version__})


def load_weights(run_dir: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix.*`` tensors of ``model.safetensors`` with the prefix stripped."""
    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing; train the {prefix} stage first "
            f"(python experiments/train.py --env <preset> --stage {prefix})"
        )
    n = len(prefix) + 1
    out = {k[n:]: v for k, v in _load_safetensors(path).items() if k.startswith(prefix + ".")}
    if not out:
        raise KeyError(
            f"{path} holds no '{prefix}' weights; train that stage first "
            f"(python experiments/train.py --env <preset> --stage {prefix})"
        )
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
        raise BundleError(
            f"{path}: not a readable safetensors file ({e}); expected the weights train.py writes"
        ) from None


def trainer_state_path(run_dir: str | os.PathLike, stage: str) -> Path:
    """The committed trainer state of ``stage`` (see the module doc for the pending ``.next.pt``)."""
    return Path(run_dir) / TRAINER_STATE_DIR / f"{stage}.pt"


def pending_state_path(run_dir: str | os.PathLike, stage: str) -> Path:
    """The trainer state written before its weights (step 1 of the commit protocol in the module doc)."""
    return Path(run_dir) / TRAINER_STATE_DIR / f"{stage}.next.pt"


def weights_digest(tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
    """``(SHA-256, byte count)`` of a state dict: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    n = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(raw)
        n += len(raw)
    return h.hexdigest(), n


def _stage_tensors(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    """The ``stage.*`` tensors of ``model.safetensors`` (empty when the file or the stage is absent)."""
    path = run_dir / WEIGHTS
    if not path.exists():
        return {}
    n = len(stage) + 1
    return {k[n:]: v for k, v in _load_safetensors(path).items() if k.startswith(stage + ".")}


def save_trainer_state(
    run_dir: str | os.PathLike, stage: str, state: dict[str, Any], *, pending: bool = False
) -> None:
    """Write a trainer state atomically (``pending``: as ``<stage>.next.pt``). Training commits weights and
    state together with :func:`save_checkpoint`; this alone is for states that go with no weights."""
    path = (pending_state_path if pending else trainer_state_path)(run_dir, stage)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def save_checkpoint(
    run_dir: str | os.PathLike, stage: str, weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Commit the ``stage`` weights (into ``model.safetensors``) and its trainer ``state`` as one checkpoint:
    state with a manifest of the weights first (pending), weights second (the commit), then the pending
    state becomes the committed one. A kill at any point leaves a pair :func:`load_checkpoint` resumes."""
    run_dir = Path(run_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    sha, nbytes = weights_digest(weights)
    state = {**state, "weights": {"file": WEIGHTS, "prefix": stage, "sha256": sha, "bytes": nbytes}}
    save_trainer_state(run_dir, stage, state, pending=True)
    save_weights(run_dir, stage, weights)
    durable_rename(pending_state_path(run_dir, stage), trainer_state_path(run_dir, stage))


def _read_state(path: Path, stage: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError ... for a bad file
        raise BundleError(
            f"{path}: unreadable trainer state ({type(e).__name__}: {str(e)[:200]}); expected the "
            f"{stage} stage's checkpoint (delete it to train the stage again from scratch)"
        ) from None
    if not isinstance(state, dict):
        raise BundleError(
            f"{path}: holds a {type(state).__name__}, expected the {stage} stage's trainer state (a dict)"
        )
    manifest = state.get("weights")
    if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("sha256"), str)):
        raise BundleError(
            f"{path}: field 'weights' is {manifest!r}, expected the manifest of the {stage} weights "
            f"(file, prefix, sha256, bytes)"
        )
    return state


def load_checkpoint(
    run_dir: str | os.PathLike, stage: str, *, repair: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The consistent ``(trainer state, stage weights)`` pair of ``stage`` to resume from, or None when the
    stage has no committed checkpoint.

    Of the pending (``<stage>.next.pt``) and committed (``<stage>.pt``) states, the one whose manifest
    matches the stage's tensors in ``model.safetensors`` wins. With ``repair`` (the training process, about
    to write the next checkpoint; never a mere reader) a matching pending state is promoted to committed
    (the kill fell between the weights' rename and the state's) and a pending state that lost (the kill fell
    before the weights' rename) is deleted. A state written before this
    protocol (no manifest) is taken as it is. Raises :class:`BundleError` naming the files when states exist
    but none matches the weights."""
    run_dir = Path(run_dir)
    pending, committed = pending_state_path(run_dir, stage), trainer_state_path(run_dir, stage)
    states = {p: _read_state(p, stage) for p in (pending, committed) if p.exists()}
    if not states:
        return None
    tensors = _stage_tensors(run_dir, stage)
    sha, _ = weights_digest(tensors)
    for path, state in states.items():
        if state.get("weights") is not None and state["weights"]["sha256"] == sha and tensors:
            if repair:
                if path == pending:
                    os.replace(pending, committed)
                else:
                    pending.unlink(missing_ok=True)
                fsync_dir(committed.parent)
            return state, tensors
    if committed in states and states[committed].get("weights") is None:  # a state from before the manifest
        if not tensors:
            raise FileNotFoundError(
                f"{run_dir / WEIGHTS}: no '{stage}' weights for the trainer state {committed}; "
                f"delete {committed} (or pass --no-resume) to train the stage from scratch"
            )
        return states[committed], tensors
    if committed not in states:
        return None  # only a pending state: the stage's first checkpoint never reached its commit point
    found = "; ".join(
        f"{p} (step {s.get('step')}, weights sha256 "
        f"{(s.get('weights') or {}).get('sha256', 'not recorded')[:16]})"
        for p, s in states.items()
    )
    have = f"sha256 {sha[:16]}" if tensors else "absent"
    raise BundleError(
        f"{run_dir / WEIGHTS}: the '{stage}' weights ({have}) belong to none of the trainer states "
        f"({found}); they were written by something other than this stage's training, so resuming "
        f"would pair them with another step's optimizer. Pass --no-resume (resume=False) to train the "
        f"stage from these files' config from scratch, or restore the matching files"
    )


def load_trainer_state(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The trainer state of ``stage``'s consistent checkpoint (:func:`load_checkpoint`), or None."""
    found = load_checkpoint(run_dir, stage)
    return None if found is None else found[0]
