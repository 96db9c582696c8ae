"""Policy files without pickle: SB3 on-policy models (PPO, A2C) as one safetensors file.

A policy file holds the policy's tensors (and the optimizer's, so training can continue) and, in the
safetensors header's metadata, one JSON document with everything needed to rebuild the model: the
algorithm, the policy alias (``CnnPolicy``...), ``policy_kwargs`` (classes by name, from an
allowlist), the observation and action spaces, the algorithm's scalar hyperparameters and its
counters. Loading parses JSON and tensors only: nothing in the file is executed.

SB3's own ``.zip`` format stores ``cloudpickle`` objects, and loading one runs whatever code it
holds. :func:`open_policy` loads a zip only when the caller passes ``trust_pickle=True`` (the CLIs'
``--trust-pickle``), with one named algorithm class (``algo``), never trying class after class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule

from worldmodel.atomic import atomic_file

FORMAT = "worldmodel-sb3-policy"
VERSION = 1
SUFFIX = ".safetensors"

ALGORITHMS: dict[str, type[OnPolicyAlgorithm]] = {"PPO": PPO, "A2C": A2C}
"""Algorithms a policy file can hold."""

_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "PPO": (
        "learning_rate",
        "n_steps",
        "batch_size",
        "n_epochs",
        "gamma",
        "gae_lambda",
        "clip_range",
        "clip_range_vf",
        "normalize_advantage",
        "ent_coef",
        "vf_coef",
        "max_grad_norm",
        "use_sde",
        "sde_sample_freq",
        "target_kl",
        "seed",
    ),
    "A2C": (
        "learning_rate",
        "n_steps",
        "gamma",
        "gae_lambda",
        "ent_coef",
        "vf_coef",
        "max_grad_norm",
        "use_sde",
        "sde_sample_freq",
        "normalize_advantage",
        "seed",
    ),
}
_COUNTERS = ("num_timesteps", "_n_updates", "_episode_num", "n_envs")


def _allowed_classes() -> dict[str, type]:
    """Classes ``policy_kwargs`` may name (activation functions, feature extractors, optimizers)."""
    from stable_baselines3.common import torch_layers
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    out: dict[str, type] = {}
    for cls in (
        torch.nn.ReLU,
        torch.nn.Tanh,
        torch.nn.ELU,
        torch.nn.LeakyReLU,
        torch.nn.GELU,
        torch.nn.SiLU,
        torch.nn.Sigmoid,
        torch.nn.Identity,
        torch_layers.NatureCNN,
        torch_layers.FlattenExtractor,
        torch_layers.CombinedExtractor,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch.optim.SGD,
        RMSpropTFLike,
    ):
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")


class PolicyFileError(ValueError):
    """A policy file that is not one this module reads (names the file and what was expected)."""


# -- JSON encoding of spaces and policy kwargs -----------------------------------------------------
def _array_json(a: np.ndarray) -> Any:
    flat = a.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return flat[0].item()  # one value for the whole space (image spaces: 0 / 255)
    return a.tolist()


def space_to_json(space: spaces.Space, where: str = "space") -> dict[str, Any]:
    """A Box / Discrete / MultiDiscrete / MultiBinary space as JSON (ValueError for other spaces)."""
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": _array_json(space.low),
            "high": _array_json(space.high),
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    raise ValueError(
        f"{where}: {type(space).__name__} cannot be saved; expected Box, Discrete, MultiDiscrete or MultiBinary"
    )


def space_from_json(d: Any, where: str = "space") -> spaces.Space:
    """The space :func:`space_to_json` wrote (ValueError naming ``where`` for anything else)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"{where}: got {d!r}, expected a JSON object with a 'type'")
    try:
        kind = d["type"]
        if kind == "Box":
            if d["dtype"] not in _DTYPES:
                raise ValueError(f"dtype {d['dtype']!r} is not one of {list(_DTYPES)}")
            shape = tuple(int(s) for s in d["shape"])
            dtype = np.dtype(d["dtype"])
            low = np.broadcast_to(np.asarray(d["low"], dtype), shape)
            high = np.broadcast_to(np.asarray(d["high"], dtype), shape)
            return spaces.Box(low=low.copy(), high=high.copy(), shape=shape, dtype=dtype)
        if kind == "Discrete":
            return spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
        if kind == "MultiDiscrete":
            return spaces.MultiDiscrete([int(n) for n in d["nvec"]])
        if kind == "MultiBinary":
            return spaces.MultiBinary(d["n"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid {d.get('type')!r} space {d!r} ({e})") from e
    raise ValueError(f"{where}: space type {kind!r}; expected Box, Discrete, MultiDiscrete or MultiBinary")


def _kwargs_to_json(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_kwargs_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return {str(k): _kwargs_to_json(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, type):
        name = f"{obj.__module__}.{obj.__qualname__}"
        if name in _allowed_classes():
            return {"__class__": name}
    raise ValueError(
        f"{where}: {obj!r} cannot be saved without pickle; expected JSON values or one of the classes "
        f"{sorted(_allowed_classes())}"
    )


def _kwargs_from_json(obj: Any, where: str) -> Any:
    if isinstance(obj, list):
        return [_kwargs_from_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if set(obj) == {"__class__"}:
            allowed = _allowed_classes()
            if obj["__class__"] not in allowed:
                raise ValueError(f"{where}: class {obj['__class__']!r} is not one of {sorted(allowed)}")
            return allowed[obj["__class__"]]
        return {k: _kwargs_from_json(v, f"{where}.{k}") for k, v in obj.items()}
    return obj


def _scalar(value: Any, where: str) -> Any:
    """A hyperparameter as JSON: plain values, and constant schedules as their value."""
    if isinstance(value, FloatSchedule):
        value = value.value_schedule
    if isinstance(value, ConstantSchedule):
        value = value.val
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise ValueError(
        f"{where}: {value!r} cannot be saved; expected a number (schedules other than constant are not supported)"
    )


# -- tensors ---------------------------------------------------------------------------------------
def _dedup(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors with shared storage (SB3's shared feature extractor appears under three names) stored once."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in tensors.items():
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().cpu().contiguous().clone()
    return out, aliases


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{name}"] = _scalar(v, f"optimizer state {idx}.{name}")
    groups = [_kwargs_to_json(g, "optimizer.param_groups") for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        _, idx, name = k.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for k, v in meta.get("scalars", {}).items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _policy_alias(model: BaseAlgorithm) -> str:
    for alias, cls in type(model).policy_aliases.items():
        if cls is model.policy_class:
            return alias
    raise ValueError(
        f"model.policy_class: {model.policy_class.__name__} has no alias in "
        f"{type(model).__name__}.policy_aliases ({sorted(type(model).policy_aliases)}); only those can be saved"
    )


# -- save / load -----------------------------------------------------------------------------------
def save_policy_file(model: BaseAlgorithm, path: str | os.PathLike) -> Path:
    """Save an SB3 PPO/A2C model as a policy file (``.safetensors``) atomically; returns the path.

    Raises ``ValueError`` for other algorithms, a ``.zip`` path, or settings that JSON cannot hold.
    """
    path = Path(path)
    algo = type(model).__name__
    if algo not in ALGORITHMS or type(model) is not ALGORITHMS[algo]:
        raise ValueError(
            f"model: {algo} cannot be saved as a policy file; expected one of {sorted(ALGORITHMS)}"
        )
    if path.suffix != SUFFIX:
        raise ValueError(
            f"path: {str(path)!r}; a policy file is safetensors, expected a name ending in {SUFFIX!r}"
        )
    weights, aliases = _dedup(model.policy.state_dict())
    opt_tensors, opt_meta = _optimizer_to_tensors(model.policy.optimizer)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "algo": algo,
        "policy": _policy_alias(model),
        "policy_kwargs": _kwargs_to_json(model.policy_kwargs, "policy_kwargs"),
        "observation_space": space_to_json(model.observation_space, "observation_space"),
        "action_space": space_to_json(model.action_space, "action_space"),
        "hyperparameters": {k: _scalar(getattr(model, k), k) for k in _HYPERPARAMETERS[algo]},
        "counters": {k: int(getattr(model, k)) for k in _COUNTERS},
        "aliases": aliases,
        "optimizer": opt_meta,
    }
    tensors = {f"policy.{k}": v for k, v in weights.items()} | opt_tensors
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "policy": json.dumps(meta)})
    return path


def is_zip(path: str | os.PathLike) -> bool:
    """True if ``path`` starts like a zip archive (SB3's pickle-based format)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def read_policy_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document and the tensors of a policy file (``PolicyFileError`` naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy {path}: file not found (expected a {SUFFIX} policy file)")
    if is_zip(path):
        raise PolicyFileError(f"policy {path}: an SB3 zip (pickle), not a {FORMAT} file")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise PolicyFileError(
            f"policy {path}: not a readable safetensors file ({e}); expected a {FORMAT} file "
            f"written by envs.policy.save_policy"
        ) from e
    if header.get("format") != FORMAT or "policy" not in header:
        raise PolicyFileError(
            f"policy {path}: safetensors metadata 'format' is {header.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        meta = json.loads(header["policy"])
    except json.JSONDecodeError as e:
        raise PolicyFileError(f"policy {path}: metadata 'policy' is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise PolicyFileError(
            f"policy {path}: metadata version {meta.get('version') if isinstance(meta, dict) else meta!r}, "
            f"expected {VERSION}"
        )
    for key, typ in (
        ("algo", str),
        ("policy", str),
        ("policy_kwargs", dict),
        ("hyperparameters", dict),
        ("counters", dict),
        ("aliases", dict),
        ("optimizer", dict),
    ):
        if not isinstance(meta.get(key), typ):
            raise PolicyFileError(
                f"policy {path}: metadata field {key!r} is {meta.get(key)!r}, expected a {typ.__name__}"
            )
    if meta["algo"] not in ALGORITHMS:
        raise PolicyFileError(
            f"policy {path}: algorithm {meta['algo']!r}, expected one of {sorted(ALGORITHMS)}"
        )
    if meta["policy"] not in ALGORITHMS[meta["algo"]].policy_aliases:
        raise PolicyFileError(
            f"policy {path}: policy {meta['policy']!r}, expected one of "
            f"{sorted(ALGORITHMS[meta['algo']].policy_aliases)}"
        )
    return meta, tensors


def _policy_weights(
    path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    w = {k[len("policy.") :]: v for k, v in tensors.items() if k.startswith("policy.")}
    for alias, src in meta["aliases"].items():
        if src not in w:
            raise PolicyFileError(f"policy {path}: alias {alias!r} names a missing tensor {src!r}")
        w[alias] = w[src]
    return w


def _spaces(path: Path, meta: dict[str, Any]) -> tuple[spaces.Space, spaces.Space]:
    try:
        return (
            space_from_json(meta.get("observation_space"), "observation_space"),
            space_from_json(meta.get("action_space"), "action_space"),
        )
    except ValueError as e:
        raise PolicyFileError(f"policy {path}: {e}") from e


def _load_state(path: Path, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise PolicyFileError(
            f"policy {path}: tensors do not fit the policy its metadata describes ({e})"
        ) from e


def load_policy_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> BasePolicy:
    """The SB3 policy (for ``predict``) of a policy file; nothing in the file is executed."""
    path = Path(path)
    meta, tensors = read_policy_file(path)
    obs_space, act_space = _spaces(path, meta)
    cls = ALGORITHMS[meta["algo"]].policy_aliases[meta["policy"]]
    kwargs = _kwargs_from_json(meta["policy_kwargs"], "policy_kwargs")
    try:
        policy = cls(
            obs_space,
            act_space,
            ConstantSchedule(0.0),
            use_sde=bool(meta["hyperparameters"].get("use_sde")),
            **kwargs,
        )
    except (TypeError, ValueError, AssertionError) as e:
        raise PolicyFileError(f"policy {path}: cannot build {meta['policy']} from its metadata ({e})") from e
    _load_state(path, policy, _policy_weights(path, meta, tensors))
    policy.set_training_mode(False)
    return policy.to(device)


def load_algorithm(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", tensorboard_log: str | None = None
) -> OnPolicyAlgorithm:
    """The whole SB3 model of a policy file (policy, optimizer state, hyperparameters, counters), ready to
    ``set_env`` (with as many envs as it was saved with) and ``learn`` on; nothing in the file is executed."""
    path = Path(path)
    meta, tensors = read_policy_file(path)
    obs_space, act_space = _spaces(path, meta)
    cls = ALGORITHMS[meta["algo"]]
    hp = {k: v for k, v in meta["hyperparameters"].items() if k in _HYPERPARAMETERS[meta["algo"]]}
    try:
        model = cls(
            meta["policy"],
            env=None,
            device=device,
            tensorboard_log=tensorboard_log,
            _init_setup_model=False,
            policy_kwargs=_kwargs_from_json(meta["policy_kwargs"], "policy_kwargs"),
            **hp,
        )
        model.observation_space, model.action_space = obs_space, act_space
        for k in _COUNTERS:
            setattr(model, k, int(meta["counters"][k]))
        model._setup_model()
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise PolicyFileError(f"policy {path}: cannot build {meta['algo']} from its metadata ({e})") from e
    _load_state(path, model.policy, _policy_weights(path, meta, tensors))
    opt = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    try:
        model.policy.optimizer.load_state_dict(_optimizer_state(opt, meta["optimizer"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PolicyFileError(f"policy {path}: optimizer state does not fit the policy ({e})") from e
    return model


def load_sb3_zip(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    algo: str = "PPO",
    device: str | torch.device = "cpu",
) -> BaseAlgorithm:
    """Load an SB3 ``.zip`` with ``stable_baselines3.<algo>.load``: this unpickles the zip and RUNS ANY CODE IT
    HOLDS, so it refuses unless ``trust_pickle=True``. One class only (``algo``), never tried class after class."""
    import stable_baselines3 as sb3

    path = Path(path)
    if not trust_pickle:
        raise PolicyFileError(
            f"policy {path}: an SB3 zip, whose loading unpickles it and can execute arbitrary code; "
            f"refused. Load it only if you trust its origin: pass trust_pickle=True (CLI: --trust-pickle), "
            f"then save it again as a {SUFFIX} policy file"
        )
    names = ("PPO", "A2C", "DQN", "SAC", "TD3", "DDPG")
    if algo not in names:
        raise ValueError(f"algo: got {algo!r}, expected one of {list(names)}")
    return getattr(sb3, algo).load(path, device=device)


def open_policy(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    algo: str = "PPO",
    device: str | torch.device = "cpu",
) -> BasePolicy | BaseAlgorithm:
    """An object with SB3's ``predict(obs, deterministic=...)`` from a policy file, or (only with
    ``trust_pickle=True``) from an SB3 zip of algorithm ``algo``. The format is read from the file's
    first bytes, not its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy {path}: file not found (expected a {SUFFIX} policy file)")
    if is_zip(path):
        return load_sb3_zip(path, trust_pickle=trust_pickle, algo=algo, device=device)
    return load_policy_file(path, device=device)


def resolve_in_dir(root: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """``root / relative`` if ``relative`` is a relative path that stays inside ``root`` (symlinks resolved);
    ``ValueError`` naming ``what`` otherwise (run-state files must not point outside their run)."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what}: got {relative!r}, expected a non-empty path relative to {root}")
    rel = Path(relative)
    if rel.is_absolute():
        raise ValueError(f"{what}: got the absolute path {relative!r}, expected a path relative to {root}")
    base = Path(root).resolve()
    full = (base / rel).resolve()
    if not full.is_relative_to(base):
        raise ValueError(f"{what}: {relative!r} leads outside {root}; expected a path inside it")
    return full
