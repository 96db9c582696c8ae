"""Gymnasium side of the toolkit: real ViZDoom envs, collection, and the dream envs.

``import envs`` registers the dream ids with Gymnasium (string entry points, so nothing heavy is
imported until ``gym.make``)::

    import envs, gymnasium as gym
    env = gym.make("VideoGPTDream-VizdoomHGS-v0")                  # newest vizdoom_hgs bundle under runs/
    env = gym.make("VideoGPTDream-BAIR-v0", checkpoint="runs/bair-tiny", temperature=0.8)
    vec = gym.make_vec("VideoGPTDream-VizdoomHGS-v0", num_envs=16)  # one model call per step for all 16

``gym.make("envs:VideoGPTDream-VizdoomHGS-v0")`` works from a fresh interpreter too. Keyword
arguments: see :class:`envs.dream.DreamEnv`.
"""

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


def dream_id(name: str) -> str:
    return f"VideoGPTDream-{name}-v0"


for _name, (_preset, _max_steps) in DREAM_IDS.items():
    if dream_id(_name) not in gym.registry:
        gym.register(id=dream_id(_name), entry_point="envs.dream:DreamEnv", vector_entry_point="envs.dream:DreamVectorEnv",
                     max_episode_steps=_max_steps, kwargs={"preset": _preset})


def id_for_preset(preset: str) -> str:
    """The dream env id of a preset name (e.g. ``"vizdoom_hgs"`` -> ``"VideoGPTDream-VizdoomHGS-v0"``)."""
    for name, (p, _) in DREAM_IDS.items():
        if p == preset:
            return dream_id(name)
    raise ValueError(f"preset {preset!r} has no dream env id; expected one of {[p for p, _ in DREAM_IDS.values()]}")
