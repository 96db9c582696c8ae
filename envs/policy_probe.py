"""What a policy sees and wants on one frame: its action, its action probabilities and its value estimate.

A :class:`PolicyProbe` wraps one of the policies this project trains so that a debugging rollout can ask,
for any frame (real or dreamt), the same questions of each:

* :class:`SB3Probe` — an SB3 actor-critic policy (PPO/A2C, from a policy file, a trusted zip or a model being
  trained): the probabilities of its categorical action distribution and its critic's value estimate;
* :class:`ControllerProbe` — a CMA-ES :class:`~envs.controller.LinearController`: deterministic, so its
  "probabilities" are the one-hot of its choice; its linear outputs are kept as ``scores``; no value estimate;
* :class:`FramePolicyProbe` — a :class:`~envs.planner.FramePolicy` distilled from the hazard planner
  (``train_policy.py --algo distill``): the softmax of its logits over its window of the newest frames; it acts
  greedily, as it was trained and scored; no value estimate;
* :class:`RandomProbe` — uniform random actions (a baseline).

A probe may carry per-episode state (the controller's previous frame, the frame policy's window):
:meth:`PolicyProbe.fork` gives a twin with a copy of that state, so a second stream of frames (the dream's) is read
as if the policy lived there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy

from envs.controller import LinearController, is_controller, load_controller
from envs.planner import FramePolicy, FrameStackActor, is_frame_policy, load_frame_policy
from envs.policy_file import open_policy
from worldmodel.bundle import WorldModel


@dataclass(frozen=True)
class PolicyReading:
    """The policy on one frame.

    ``action`` is what it does (a sample of ``probs`` unless deterministic), ``choice`` its most likely action
    (the deterministic choice, what is compared between the real and the dream frame). Discrete actions only
    carry ``probs``; ``value`` is None for policies without a critic, ``scores`` None for policies without
    linear outputs."""

    action: int
    choice: int
    probs: np.ndarray | None  # (n_actions,) float32, sums to 1
    value: (
        float | None
    )  # the critic's estimate of the discounted return from this frame, in the reward units it
    #                      trained on (train_ppo normalises rewards by a running std of the return)
    scores: np.ndarray | None = None  # (n_outputs,) float32: a linear controller's outputs


class PolicyProbe(Protocol):
    """A policy that can be read frame by frame (see the module docstring)."""

    name: str
    n_actions: int

    def read(self, obs: np.ndarray, rng: np.random.Generator) -> PolicyReading:
        """The policy on frame ``obs`` uint8 (H, W, 3); ``rng`` draws a stochastic policy's action."""
        ...

    def reset(self) -> None:
        """Forget per-episode state: the next frame starts an episode."""
        ...

    def fork(self) -> PolicyProbe:
        """A twin with the same weights and a copy of the per-episode state."""
        ...


def _sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    p = probs.astype(np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


class SB3Probe:
    """An SB3 actor-critic policy (``ActorCriticPolicy``: PPO, A2C) with a discrete action space.

    Args:
        policy: the policy (``model.policy`` of a PPO/A2C model, or :func:`envs.policy_file.load_policy_file`'s).
        deterministic: act with the most likely action instead of a sample of the distribution.
        name: shown in reports.
    """

    def __init__(self, policy: BasePolicy, *, deterministic: bool = False, name: str = "sb3") -> None:
        if not isinstance(policy, ActorCriticPolicy):
            raise ValueError(
                f"policy: got {type(policy).__name__}, expected an SB3 actor-critic policy (PPO, A2C): "
                "its action distribution and value estimate are what the report shows"
            )
        if not isinstance(policy.action_space, spaces.Discrete):
            raise ValueError(
                f"policy: its action space is {policy.action_space}, expected Discrete (the ViZDoom "
                "dreams whose real env runs here)"
            )
        self.policy, self.deterministic, self.name = policy, deterministic, name
        self.n_actions = int(policy.action_space.n)

    @torch.no_grad()
    def read(self, obs: np.ndarray, rng: np.random.Generator) -> PolicyReading:
        x, _ = self.policy.obs_to_tensor(np.asarray(obs))  # (1, ...) as the policy expects (channels first)
        dist = self.policy.get_distribution(x)
        probs = dist.distribution.probs[0].float().cpu().numpy()  # (n_actions,)
        value = float(self.policy.predict_values(x)[0, 0])
        choice = int(probs.argmax())
        action = choice if self.deterministic else _sample(probs, rng)
        return PolicyReading(action=action, choice=choice, probs=probs.astype(np.float32), value=value)

    def reset(self) -> None:  # feed-forward: no per-episode state
        pass

    def fork(self) -> SB3Probe:
        return self


class ControllerProbe:
    """A :class:`~envs.controller.LinearController` (one policy): deterministic, no value estimate."""

    def __init__(self, controller: LinearController, *, name: str = "controller") -> None:
        self.controller, self.name = controller, name
        self.n_actions = controller.cfg.n_actions

    def read(self, obs: np.ndarray, rng: np.random.Generator) -> PolicyReading:
        y = self.controller.scores(np.asarray(obs)[None])  # (1, n_out)
        choice = int(self.controller.choose(y)[0])
        return PolicyReading(
            action=choice,
            choice=choice,
            probs=np.eye(self.n_actions, dtype=np.float32)[choice],
            value=None,
            scores=y[0],
        )

    def reset(self) -> None:
        self.controller.reset()

    def fork(self) -> ControllerProbe:
        return ControllerProbe(self.controller.copy(), name=self.name)


class FramePolicyProbe:
    """A :class:`~envs.planner.FramePolicy` over its window of the newest ``n_frames`` frames (the first frame of
    an episode fills the window). Greedy: ``action`` is always ``choice``, its most likely action."""

    def __init__(self, policy: FramePolicy, *, name: str = "frame-policy") -> None:
        self.policy, self.name = policy, name
        self.n_actions = policy.n_actions
        self.actor = FrameStackActor(policy)  # one row: this probe's episode

    @torch.no_grad()
    def read(self, obs: np.ndarray, rng: np.random.Generator) -> PolicyReading:
        window = self.actor.push(np.asarray(obs)[None])  # (1, C, H, W, 3)
        dev = next(self.policy.parameters()).device
        logits = self.policy(torch.as_tensor(window, device=dev))[0]  # (n_actions,)
        probs = torch.softmax(logits.float(), 0).cpu().numpy().astype(np.float32)
        choice = int(probs.argmax())
        return PolicyReading(action=choice, choice=choice, probs=probs, value=None)

    def reset(self) -> None:
        self.actor.reset()

    def fork(self) -> FramePolicyProbe:
        twin = FramePolicyProbe(self.policy, name=self.name)
        twin.actor = self.actor.copy()
        return twin


class RandomProbe:
    """Uniform random actions over ``n_actions``."""

    def __init__(self, n_actions: int, *, name: str = "random") -> None:
        if n_actions < 1:
            raise ValueError(f"n_actions: got {n_actions}, expected >= 1")
        self.n_actions, self.name = n_actions, name

    def read(self, obs: np.ndarray, rng: np.random.Generator) -> PolicyReading:
        probs = np.full(self.n_actions, 1.0 / self.n_actions, np.float32)
        # the choice is the argmax of a uniform distribution (action 0) on every frame: a policy that ignores
        # the frame never chooses differently in the dream
        return PolicyReading(action=int(rng.integers(self.n_actions)), choice=0, probs=probs, value=None)

    def reset(self) -> None:
        pass

    def fork(self) -> RandomProbe:
        return self


def open_probe(
    spec: str | os.PathLike, wm: WorldModel, *, deterministic: bool = False, trust_pickle: bool = False
) -> PolicyProbe:
    """A probe for ``spec``: ``"random"``, a controller directory (:func:`envs.controller.save_controller`), a
    frame-policy file (:func:`envs.planner.save_frame_policy`), or an SB3 policy file (``.safetensors``; a PPO
    ``.zip`` only with ``trust_pickle=True``, as loading it runs any code it holds). Its actions (and a frame
    policy's frame size) must be the bundle's: ``ValueError`` otherwise."""
    spec_s = str(spec)
    spec_n = wm.action_spec
    if spec_n.kind != "discrete":
        raise ValueError(
            f"the bundle's actions are {spec_n.kind}; policy probes read discrete-action policies "
            "(the ViZDoom bundles)"
        )
    if spec_s == "random":
        return RandomProbe(spec_n.n)
    path = Path(spec_s)
    if is_controller(path):
        probe: PolicyProbe = ControllerProbe(load_controller(path, wm), name=path.name)
    elif is_frame_policy(path):
        frame_policy = load_frame_policy(path, device=wm.device)[0]
        if frame_policy.resolution != wm.obs_shape[0]:
            raise ValueError(
                f"policy {path}: reads {frame_policy.resolution}x{frame_policy.resolution} frames, the bundle "
                f"{wm.path} has {wm.obs_shape[0]}x{wm.obs_shape[1]}"
            )
        probe = FramePolicyProbe(frame_policy, name=path.stem)
    else:
        pol = open_policy(path, trust_pickle=trust_pickle, device=wm.device)
        probe = SB3Probe(
            pol.policy if isinstance(pol, BaseAlgorithm) else pol, deterministic=deterministic, name=path.stem
        )
    if probe.n_actions != spec_n.n:
        raise ValueError(
            f"policy {path}: acts with {probe.n_actions} actions, the bundle {wm.path} with {spec_n.n}"
        )
    return probe
