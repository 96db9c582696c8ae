"""Toy pixel envs registered with Gymnasium for the tests of the ``gym:<ID>`` source (``envs/gym_source.py``).

Importing this module registers the ids below (``--env-module tests.toy_envs`` on the CLIs, like a user's own
package). A square moves over a 24×40 (non-square) canvas; reward +1 while it is in the right half; each step
ends the episode with probability 0.15 (``terminated``, reward -5), and a TimeLimit of 12 steps truncates the
rest, so random play gives both kinds of endings.

===========================  ======================================  ==========================================
id                           observation                             actions
===========================  ======================================  ==========================================
WorldmodelToy-v0             Dict(screen: image, position: vector)   Discrete(3): left, stay, right
WorldmodelToyBox-v0          Dict(screen: image, position: vector)   Box([-2, 0], [2, 1]): dx, brightness
WorldmodelToyImage-v0        image (24, 40, 3)                       MultiBinary(2): left, right
WorldmodelToyMD-v0           grey image (24, 40)                     MultiDiscrete([2, 3])
WorldmodelToyRender-v0       vector (2,), render_mode rgb_array      Discrete(3)
WorldmodelToyNoPixels-v0     vector (2,), no render modes            Discrete(3)
WorldmodelToyBigMB-v0        image                                   MultiBinary(12) (refused: 4096 combinations)
WorldmodelToyFree-v0         image                                   Box(-inf, inf, (2,)) (refused: unbounded)
===========================  ======================================  ==========================================
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

H, W = 24, 40
MAX_STEPS = 12
P_END = 0.15
TERMINAL_REWARD = -5.0


class ToyPixelEnv(gym.Env):
    """See the module docstring. ``obs``: ``dict`` | ``image`` | ``grey`` | ``vector``; ``action``: ``discrete`` |
    ``box`` | ``multibinary`` | ``multidiscrete`` | ``bigmb`` | ``free``; ``renders``: offer ``rgb_array``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        obs: str = "dict",
        action: str = "discrete",
        renders: bool = True,
        render_mode: str | None = None,
    ) -> None:
        self.obs_kind, self.action_kind = obs, action
        self.metadata = {**self.metadata, "render_modes": ["rgb_array"] if renders else []}
        self.render_mode = render_mode
        image = spaces.Box(0, 255, (H, W, 3), np.uint8)
        vector = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.observation_space = {
            "dict": spaces.Dict({"screen": image, "position": vector}),
            "image": image,
            "grey": spaces.Box(0, 255, (H, W), np.uint8),
            "vector": vector,
        }[obs]
        self.action_space = {
            "discrete": spaces.Discrete(3),
            "box": spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32)),
            "multibinary": spaces.MultiBinary(2),
            "multidiscrete": spaces.MultiDiscrete([2, 3]),
            "bigmb": spaces.MultiBinary(12),
            "free": spaces.Box(-np.inf, np.inf, (2,), np.float32),
        }[action]
        self.x, self.brightness = 0.0, 1.0
        self.last_action: Any = None

    def _image(self) -> np.ndarray:
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 2] = 60
        x = int(np.clip(round(self.x), 0, W - 6))
        img[9:15, x : x + 6] = int(255 * self.brightness)
        return img

    def _obs(self) -> Any:
        img = self._image()
        pos = np.array([self.x, self.brightness], np.float32)
        return {
            "dict": {"screen": img, "position": pos},
            "image": img,
            "grey": img[..., 0].copy(),
            "vector": pos,
        }[self.obs_kind]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.x, self.brightness = float(self.np_random.integers(0, W - 6)), 1.0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        assert self.action_space.contains(action), action
        self.last_action = action
        k = self.action_kind
        if k == "discrete":
            dx = 3.0 * (int(action) - 1)
        elif k in ("box", "free"):
            dx = 3.0 * float(action[0])
            self.brightness = float(np.clip(action[1], 0.2, 1.0))
        elif k in ("multibinary", "bigmb"):
            dx = 3.0 * (int(action[1]) - int(action[0]))
        else:
            dx = 3.0 * (int(action[1]) - 1) * (1 + int(action[0]))
        self.x = float(np.clip(self.x + dx, 0, W - 6))
        terminated = bool(self.np_random.random() < P_END)
        reward = TERMINAL_REWARD if terminated else float(self.x > W / 2)
        return self._obs(), reward, terminated, False, {"x": self.x}

    def render(self) -> np.ndarray | None:
        return self._image() if self.render_mode == "rgb_array" else None


IDS: dict[str, dict[str, Any]] = {
    "WorldmodelToy-v0": {"obs": "dict", "action": "discrete"},
    "WorldmodelToyBox-v0": {"obs": "dict", "action": "box"},
    "WorldmodelToyImage-v0": {"obs": "image", "action": "multibinary"},
    "WorldmodelToyMD-v0": {"obs": "grey", "action": "multidiscrete"},
    "WorldmodelToyRender-v0": {"obs": "vector", "action": "discrete"},
    "WorldmodelToyNoPixels-v0": {"obs": "vector", "action": "discrete", "renders": False},
    "WorldmodelToyBigMB-v0": {"obs": "image", "action": "bigmb"},
    "WorldmodelToyFree-v0": {"obs": "image", "action": "free"},
}

for _id, _kw in IDS.items():
    if _id not in gym.registry:
        gym.register(
            id=_id, entry_point="tests.toy_envs:ToyPixelEnv", max_episode_steps=MAX_STEPS, kwargs=_kw
        )
