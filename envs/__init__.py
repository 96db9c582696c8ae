"""Gymnasium side of the toolkit: real envs (ViZDoom, any Gymnasium id with pixels), collection, and the dream envs.

``import envs`` registers the dream ids with Gymnasium (string entry points, so nothing heavy is
imported until ``gym.make``)::

    import envs, gymnasium as gym
    env = gym.make("VideoGPTDream-VizdoomHGS-v0")                  # newest vizdoom_hgs bundle under runs/
    env = gym.make("VideoGPTDream-BAIR-v0", checkpoint="runs/bair-tiny", temperature=0.8)
    vec = gym.make_vec("VideoGPTDream-VizdoomHGS-v0", num_envs=16)  # one model call per step for all 16
    env = gym.make("VideoGPTDream-v0", checkpoint="runs/gym-ALE-Pong-v5-tiny")   # any bundle
    env = gym.make("VideoGPTDream-GymALEPongV5-v0")                # newest gym:ALE/Pong-v5 bundle under runs/

Three kinds of ids:

- fixed ids for the named presets (:data:`DREAM_IDS`);
- ``VideoGPTDream-v0`` for every action-conditioned bundle: ``checkpoint`` is required;
- ``VideoGPTDream-<EnvName>-v0`` for the ``gym:<ID>`` bundles found under the runs directories
  (``./runs`` and ``$WORLDMODEL_HOME/runs``) when ``envs`` is imported, newest bundle of that env by
  default. ``<EnvName>`` is :func:`dream_name`: ``Gym`` followed by the Gymnasium id's alphanumeric
  runs, each with its first letter upper-cased (``gym:ALE/Pong-v5`` -> ``GymALEPongV5``,
  ``gym:CarRacing-v3`` -> ``GymCarRacingV3``); the ``Gym`` prefix keeps them apart from the fixed
  names. Their time limit is the real env's (recorded in the store) when it has one. Call
  :func:`register_bundle_ids` to pick up bundles trained after the import.

``gym.make("envs:VideoGPTDream-VizdoomHGS-v0")`` works from a fresh interpreter too. Keyword
arguments: see :class:`envs.dream.DreamEnv`.
"""

import re
import warnings

import gymnasium as gym

# id name -> (preset, max_episode_steps). ViZDoom: the scenarios' 2100-tic timeout at frame skip 4 (Take Cover:
# World Models' 2100-tic cap);
# BAIR / RoboNet: the datasets' 30-frame trajectories.
DREAM_IDS: dict[str, tuple[str, int]] = {
    "VizdoomHGS": ("vizdoom_hgs", 525),
    "VizdoomBattle2": ("vizdoom_battle2", 525),
    "VizdoomTakeCover": ("vizdoom_take_cover", 525),
    "BAIR": ("bair", 30),
    "RoboNet": ("robonet", 30),
}
GENERIC_ID = "VideoGPTDream-v0"
"""The id that runs any bundle: ``gym.make("VideoGPTDream-v0", checkpoint=DIR)``."""
_GYM_PREFIX = "gym:"  # worldmodel.config.GYM_PREFIX (not imported: importing envs stays light)
_ENTRY, _VECTOR_ENTRY = "envs.dream:DreamEnv", "envs.dream:DreamVectorEnv"


def episode_limit(preset: str, store_meta: dict | None = None) -> int | None:
    """Time limit (steps) of a bundle's dream: the fixed id's for a named preset (``DREAM_IDS``), the real env's
    own for a ``gym:<ID>`` bundle (its store's ``extra.gym.episode_limit``: CarRacing-v3 250 steps at frame skip
    4), else None (no limit known)."""
    for p, steps in DREAM_IDS.values():
        if p == preset:
            return steps
    limit = (((store_meta or {}).get("extra") or {}).get("gym") or {}).get("episode_limit")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def dream_id(name: str) -> str:
    return f"VideoGPTDream-{name}-v0"


def dream_name(preset: str) -> str:
    """The ``<Name>`` of ``VideoGPTDream-<Name>-v0`` for ``preset``: the fixed name of a named preset, or for
    ``gym:<ID>`` ``"Gym"`` + the id's alphanumeric runs with their first letter upper-cased
    (``gym:ALE/Pong-v5`` -> ``GymALEPongV5``). ``ValueError`` for presets without a dream id."""
    for name, (p, _) in DREAM_IDS.items():
        if p == preset:
            return name
    if preset.startswith(_GYM_PREFIX) and re.search(r"[A-Za-z0-9]", preset[len(_GYM_PREFIX) :]):
        parts = re.findall(r"[A-Za-z0-9]+", preset[len(_GYM_PREFIX) :])
        return "Gym" + "".join(p[0].upper() + p[1:] for p in parts)
    raise ValueError(
        f"preset {preset!r} has no dream env id; expected one of {[p for p, _ in DREAM_IDS.values()]} "
        f"or gym:<Gymnasium id> (any bundle: gym.make({GENERIC_ID!r}, checkpoint=DIR))"
    )


def id_for_preset(preset: str) -> str:
    """The dream env id of a preset name (``"vizdoom_hgs"`` -> ``"VideoGPTDream-VizdoomHGS-v0"``,
    ``"gym:ALE/Pong-v5"`` -> ``"VideoGPTDream-GymALEPongV5-v0"``)."""
    return dream_id(dream_name(preset))


for _name, (_preset, _max_steps) in DREAM_IDS.items():
    if dream_id(_name) not in gym.registry:
        gym.register(
            id=dream_id(_name),
            entry_point=_ENTRY,
            vector_entry_point=_VECTOR_ENTRY,
            max_episode_steps=_max_steps,
            kwargs={"preset": _preset},
        )
if GENERIC_ID not in gym.registry:  # preset=None: checkpoint is required (DreamEnv says so)
    gym.register(id=GENERIC_ID, entry_point=_ENTRY, vector_entry_point=_VECTOR_ENTRY, kwargs={"preset": None})


def register_bundle_ids() -> dict[str, str]:
    """Register ``VideoGPTDream-<EnvName>-v0`` for every ``gym:<ID>`` env with an action-conditioned bundle under
    the runs directories (see the module docstring); returns ``{id: preset}`` of the ids it registered now or
    before. A bundle that cannot be read is skipped with a warning; two envs whose names collide keep the first
    in sorted order (the other warns). Never raises on account of what it finds."""
    import json

    from worldmodel.paths import search_roots  # the directories find_bundles looks in (no torch import)

    found: dict[str, tuple[str, int | None]] = {}
    for root in search_roots():
        for d in sorted(root.iterdir()):
            try:
                if not d.is_dir() or not (d / "config.json").is_file():
                    continue
                run = json.loads((d / "config.json").read_text())  # read only: gym.make loads it validated
                exp, store = run.get("experiment") or {}, run.get("store") or {}
                preset = exp.get("name")
                if not (isinstance(preset, str) and preset.startswith(_GYM_PREFIX)):
                    continue
                if (exp.get("prior") or {}).get("action_kind", "none") == "none":
                    continue
                found.setdefault(preset, (preset, episode_limit(preset, store)))
            except Exception as e:  # noqa: BLE001 - discovery must never break `import envs`
                warnings.warn(f"skipping bundle {d}: {e}", stacklevel=2)
    out: dict[str, str] = {}
    for preset in sorted(found):
        env_id = id_for_preset(preset)
        spec = gym.registry.get(env_id)
        if spec is not None:
            if spec.kwargs.get("preset") != preset:
                warnings.warn(
                    f"{env_id}: already registered for {spec.kwargs.get('preset')!r}; the bundles of {preset!r} "
                    f"are reachable with gym.make({GENERIC_ID!r}, checkpoint=DIR)",
                    stacklevel=2,
                )
                continue
        else:
            gym.register(
                id=env_id,
                entry_point=_ENTRY,
                vector_entry_point=_VECTOR_ENTRY,
                max_episode_steps=found[preset][1],
                kwargs={"preset": preset},
            )
        out[env_id] = preset
    return out


try:
    register_bundle_ids()
except Exception as _e:  # noqa: BLE001 - an unreadable runs directory must not break `import envs`
    warnings.warn(f"envs: dream ids of the bundles under runs/ not registered: {_e}", stacklevel=2)
