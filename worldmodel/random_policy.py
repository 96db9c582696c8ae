"""The sticky random behaviour policies: the collection policy of real-env stores (``envs.collect``; discrete
actions, or a Box for ``gym:`` envs) and the policy the evaluation's dream episodes run under
(``worldmodel.evaluation``)."""

from __future__ import annotations

import numpy as np


class StickyRandomPolicy:
    """Uniform random discrete actions for ``num_envs`` envs, each held for a geometric number of steps
    (mean ``mean_repeat``).

    Holding actions makes the data cover sustained turns and runs rather than jitter, which is what a
    learned policy does and what the world model must learn to follow.
    """

    def __init__(
        self, n_actions: int, num_envs: int, mean_repeat: float = 4.0, seed: int | None = None
    ) -> None:
        if mean_repeat < 1:
            raise ValueError(f"mean_repeat must be >= 1 step, got {mean_repeat}")
        self.n, self.p_switch = n_actions, 1.0 / mean_repeat
        self.rng = np.random.default_rng(seed)
        self.current = self.rng.integers(0, n_actions, num_envs)

    def __call__(self, obs: np.ndarray | None = None) -> np.ndarray:
        """Next actions, int64 ``(num_envs,)``; ``obs`` is ignored (the policy interface of ``envs.collect``)."""
        switch = self.rng.random(len(self.current)) < self.p_switch
        self.current = np.where(switch, self.rng.integers(0, self.n, len(self.current)), self.current)
        return self.current.copy()


class StickyRandomBoxPolicy:
    """Uniform random actions in ``[-1, 1]^dim`` for ``num_envs`` envs, each held for a geometric number of steps
    (mean ``mean_repeat``): the continuous counterpart of :class:`StickyRandomPolicy` (the exposed Box of a
    ``gym:`` env and of the dream are both ``[-1, 1]``)."""

    def __init__(self, dim: int, num_envs: int, mean_repeat: float = 4.0, seed: int | None = None) -> None:
        if mean_repeat < 1:
            raise ValueError(f"mean_repeat must be >= 1 step, got {mean_repeat}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.p_switch = dim, 1.0 / mean_repeat
        self.rng = np.random.default_rng(seed)
        self.current = self.rng.uniform(-1.0, 1.0, (num_envs, dim)).astype(np.float32)

    def __call__(self, obs: np.ndarray | None = None) -> np.ndarray:
        """Next actions, float32 ``(num_envs, dim)``; ``obs`` is ignored."""
        n = len(self.current)
        switch = self.rng.random(n) < self.p_switch
        fresh = self.rng.uniform(-1.0, 1.0, (n, self.dim)).astype(np.float32)
        self.current = np.where(switch[:, None], fresh, self.current)
        return self.current.copy()
