"""The sticky random behaviour policy: the collection policy of the ViZDoom stores (``envs.collect``)
and the policy the evaluation's dream episodes run under (``worldmodel.evaluation``)."""

from __future__ import annotations

import numpy as np


class StickyRandomPolicy:
    """Uniform random discrete actions for ``num_envs`` envs, each held for a geometric number of steps
    (mean ``mean_repeat``).

    Holding actions makes the data cover sustained turns and runs rather than jitter, which is what a
    learned policy does and what the world model must learn to follow.
    """

    def __init__(self, n_actions: int, num_envs: int, mean_repeat: float = 4.0, seed: int | None = None) -> None:
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
