"""Collect real-env episodes into an episode store, in parallel and resumably.

Several env processes step in a Gymnasium ``AsyncVectorEnv``; each finished episode goes to a
:class:`~worldmodel.store.StoreWriter`, which writes shards atomically. Re-running the same command
after a kill counts the episodes already stored and collects only the rest, so the store ends with
exactly the requested number: episodes that were in flight or buffered at the kill are dropped
whole, never half-written or duplicated.

The acting policy is sticky random actions, a saved SB3 policy file, a frame-policy file (:mod:`envs.planner`,
greedy over each env's newest frames), a World Models controller directory
(:mod:`envs.controller`; read with the world-model bundle it was trained in), or any callable; with
``epsilon > 0`` each env takes a uniform random action instead of the policy's with that probability per
step (the exploration of "the policy collects" rounds, :mod:`envs.mbrl`). Every episode records the policy's
name, its kind and ``epsilon`` in its attrs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from envs.gym_source import is_gym_env
from envs.real import check_real_env, make_real_env_fn, recorded_settings, store_action_spec
from envs.vizdoom import action_names, exit_if_terminated
from worldmodel.random_policy import StickyRandomBoxPolicy, StickyRandomPolicy
from worldmodel.store import OBJECT_MASK, STORE_JSON, ActionSpec, EpisodeStore, StoreWriter

Policy = Callable[[np.ndarray], np.ndarray]
"""Maps a batch of observations uint8 ``(N, H, W, 3)`` to actions of the env's (exposed) action space: int64
``(N,)`` for discrete actions, float32 ``(N, dim)`` in [-1, 1] for a ``gym:`` env's Box. A policy with memory
(e.g. :class:`envs.controller.LinearController`) may also have ``reset(rows)``: :func:`collect` calls it with
``None`` before the first step and with the env rows (int array) whose observation starts a new episode; one that
follows the actions played (e.g. :class:`envs.latent.LatentPolicy`) may have ``taken(actions)``, which
:class:`EpsilonRandom` calls with the actions that the envs take in its place."""

POLICY_KINDS = ("random", "policy_file", "frame_policy", "controller", "callable")
"""``policy_kind`` attr of collected episodes: sticky random actions, an SB3 policy file, a frame-policy file
(``train_policy.py --algo distill``), a controller directory, or a callable given by the caller."""


class SB3Policy:
    """A saved Stable-Baselines3 policy used as a collection policy (stochastic actions).

    ``path`` is a policy file (``envs.policy.save_policy``: safetensors + JSON, nothing executed on load).
    An SB3 ``.zip`` is loaded only with ``trust_pickle=True``, as algorithm ``algo``: unpickling it runs
    any code it holds.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        deterministic: bool = False,
        *,
        trust_pickle: bool = False,
        algo: str = "PPO",
    ) -> None:
        from envs.policy_file import open_policy

        self.model = open_policy(Path(path), trust_pickle=trust_pickle, algo=algo)
        self.deterministic = deterministic

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        actions, _ = self.model.predict(obs, deterministic=self.deterministic)
        a = np.asarray(actions)
        if np.issubdtype(a.dtype, np.integer):
            return a.astype(np.int64).reshape(len(obs))
        return a.astype(np.float32).reshape(len(obs), -1)


class EpsilonRandom:
    """``policy``, except that each env row takes a uniform random action instead with probability ``epsilon``
    per step (drawn from its own generator seeded ``seed``: deterministic under the seed).

    The wrapped policy still sees every frame and chooses every step (a controller's remembered previous action
    is its own choice, not the random one that replaced it).
    """

    def __init__(self, policy: Policy, spec: ActionSpec, epsilon: float, seed: int) -> None:
        self.policy, self.spec, self.epsilon = policy, spec, epsilon
        self.rng = np.random.default_rng(seed)

    def reset(self, rows: np.ndarray | None = None) -> None:
        reset_policy(self.policy, rows)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        a = np.asarray(self.policy(obs))
        n = len(obs)
        flip = self.rng.random(n) < self.epsilon  # (N,)
        if self.spec.kind == "continuous":
            rand = self.rng.uniform(-1.0, 1.0, (n, self.spec.dim)).astype(np.float32)
            out = np.where(flip[:, None], rand, a.reshape(n, -1)).astype(np.float32)
        else:
            out = np.where(flip, self.rng.integers(0, self.spec.n, n), a.reshape(n)).astype(np.int64)
        taken = getattr(self.policy, "taken", None)
        if callable(taken):
            taken(out)
        return out


def reset_policy(policy: Any, rows: np.ndarray | None) -> None:
    """Tell a policy with memory (one with ``reset(rows)``) that ``rows`` start an episode (all rows when None)."""
    reset = getattr(policy, "reset", None)
    if callable(reset):
        reset(rows)


def load_collect_policy(
    policy: str | Policy,
    *,
    checkpoint: str | os.PathLike | None = None,
    trust_pickle: bool = False,
) -> tuple[Policy | None, str, str]:
    """Load the policy named by ``policy`` (before any engine starts: a bad one fails with nothing to clean up).

    Returns ``(loaded policy or None for "random", name, kind)``; kind is one of :data:`POLICY_KINDS`. A
    controller directory (``envs.controller.save_controller``) is read with the world-model bundle
    ``checkpoint`` (required for one, refused for any other policy).
    """
    if not isinstance(policy, str):
        if checkpoint is not None:
            raise ValueError("checkpoint: only a controller directory given as policy reads the bundle")
        return policy, "callable", "callable"
    if policy == "random":
        if checkpoint is not None:
            raise ValueError("checkpoint: only a controller directory given as policy reads the bundle")
        return None, "random", "random"
    from envs.controller import is_controller  # the policy layer: loaded only for a policy that needs it

    if is_controller(policy):
        if checkpoint is None:
            raise ValueError(
                f"checkpoint: policy {policy!r} is a controller directory; loading it needs the world-model "
                "bundle it was trained in (checkpoint=<bundle dir>, collect.py --checkpoint); got none"
            )
        from envs.controller import load_controller
        from envs.latent import LatentPolicy
        from worldmodel.bundle import WorldModel

        wm = WorldModel.from_pretrained(checkpoint)
        ctrl = load_controller(policy, wm)
        # a latent controller reads the world model's state: the bundle follows the real frames for it
        return (LatentPolicy(ctrl, wm) if ctrl.cfg.features == "latent" else ctrl), policy, "controller"
    if Path(policy).is_dir():
        raise ValueError(
            f"policy: {policy!r} is a directory without a controller.json; expected 'random', a policy file "
            "(envs.policy.save_policy, .safetensors) or a controller directory (envs.controller.save_controller)"
        )
    if checkpoint is not None:
        raise ValueError(
            f"checkpoint: policy {policy!r} is a policy file, which does not read a bundle; "
            "give checkpoint only with a controller directory"
        )
    from envs.planner import FrameStackActor, is_frame_policy, load_frame_policy

    if is_frame_policy(policy):  # greedy over each env row's newest frames (reset per row by the collector)
        return FrameStackActor(load_frame_policy(policy)[0]), policy, "frame_policy"
    return SB3Policy(policy, trust_pickle=trust_pickle), policy, "policy_file"


@dataclass
class CollectReport:
    store: Path
    requested: int
    already_present: int
    collected: int
    env_steps: int
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def _probe_gym_env(
    env: str, env_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], Callable, ActionSpec]:
    """What a ``gym:`` env's store records (settings, description), its action conversion and action spec, read
    from one probe instance."""
    probe = make_real_env_fn(env, **env_kwargs)()
    try:
        recorded, described = recorded_settings(probe, env, env_kwargs)
        return recorded, described, probe.store_actions, store_action_spec(probe, env)  # type: ignore[attr-defined]
    finally:
        probe.close()


def _acting_policy(
    loaded: Policy | None,
    spec: ActionSpec,
    num_envs: int,
    mean_repeat: float,
    seed: int,
    epsilon: float,
) -> Policy:
    """The collection policy: sticky random actions (discrete or Box) when ``loaded`` is None, else ``loaded``
    (a policy file, a controller or the callable given); with ``epsilon > 0`` wrapped in :class:`EpsilonRandom`."""
    if loaded is None and spec.kind == "continuous":
        act: Policy = StickyRandomBoxPolicy(spec.dim, num_envs, mean_repeat, seed=seed)
    elif loaded is None:
        act = StickyRandomPolicy(spec.n, num_envs, mean_repeat, seed=seed)
    else:
        act = loaded
    # its own stream: the sticky random policy's draws stay as they were without epsilon
    return EpsilonRandom(act, spec, epsilon, seed=seed + 7919) if epsilon > 0 else act


def _check_counts(episodes: int, num_envs: int, epsilon: float) -> None:
    """``ValueError`` naming the first of collect's counts (or epsilon) out of range."""
    if episodes < 1 or num_envs < 1:
        raise ValueError(f"episodes and num_envs must be >= 1, got episodes={episodes}, num_envs={num_envs}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon: got {epsilon}, expected a probability in [0, 1]")


def _episode_buffer(obs: np.ndarray, info: dict[str, Any], i: int, masks: bool) -> dict[str, list]:
    """A new episode's buffer for env row ``i`` of a vector env's ``obs`` / ``info``: its first frame (and its
    object mask when ``masks``)."""
    return {
        "frames": [obs[i]],
        "actions": [],
        "rewards": [],
        "terminated": [],
        OBJECT_MASK: [info[OBJECT_MASK][i]] if masks else [],
    }


def _keep_object_masks(existing: EpisodeStore | None, env: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``env_kwargs`` with ``object_mask=True`` added when the ``existing`` store was collected with object masks and
    they do not say: a store whose episodes carry masks keeps getting them (mbrl.py and train.py top a store up
    without the flag), so that every episode has them."""
    if existing is None or is_gym_env(env) or "object_mask" in env_kwargs:
        return env_kwargs
    if existing.meta.extra.get("env_kwargs", {}).get("object_mask") == "True":
        return {**env_kwargs, "object_mask": True}
    return env_kwargs


def collect(
    env: str,
    out: str | os.PathLike,
    episodes: int,
    *,
    policy: str | Policy = "random",
    num_envs: int = 2,
    seed: int = 0,
    mean_repeat: float = 4.0,
    episodes_per_shard: int = 8,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    asynchronous: bool = True,
    trust_pickle: bool = False,
    merge: bool = False,
    epsilon: float = 0.0,
    checkpoint: str | os.PathLike | None = None,
) -> CollectReport:
    """Collect ``episodes`` episodes of the real env ``env`` into the store at ``out``.

    Args:
        env: a real env (:func:`envs.real.check_real_env`): ``"vizdoom_hgs"``, ``"vizdoom_battle2"``,
            ``"vizdoom_take_cover"`` or ``"gym:<Gymnasium id>"``.
        out: store directory; if it already holds episodes, only the missing ones are collected.
        episodes: total number of episodes the store should hold at the end.
        policy: ``"random"`` (sticky random actions), the path of a policy file (``envs.policy.save_policy``),
            a controller directory (``envs.controller.save_controller``; needs ``checkpoint``), or a callable
            ``obs (N,H,W,3) -> actions (N,)`` (:data:`Policy`; one with ``reset(rows)`` is told of episode starts).
        num_envs: env processes stepping in parallel.
        seed: base seed; a resumed run offsets it by the number of stored episodes.
        mean_repeat: mean number of steps a random action is held.
        episodes_per_shard: episodes per shard file (the most a kill can lose).
        env_kwargs: passed to :func:`envs.real.make_real_env` (ViZDoom: ``resolution``, ``frame_skip``,
            ``battle2_path``, ...; ``gym:`` envs: ``resolution``, ``module``, ``make_kwargs``, ``pixels``,
            ``frame_skip``, ``sticky_actions``, ``max_episode_steps``). The store records the effective settings
            (``extra.env_kwargs``; for ``gym:`` envs also ``extra.gym``: spaces, spec kwargs, action mapping,
            resize), so that evaluation rebuilds the same env. ``gym:`` Box actions are stored in the env's units
            (the policy acts in [-1, 1], as in the dream).
        asynchronous: one process per env (``AsyncVectorEnv``); False steps them in this process.
        trust_pickle: also accept an SB3 PPO ``.zip`` as ``policy`` -- loading one unpickles it and runs any
            code it holds; only for zips of trusted origin.
        merge: append to a store collected with other settings (``env``, ``env_kwargs``); without it that
            is a :class:`~worldmodel.store.StoreError` naming the differing keys. A ViZDoom store collected with
            ``object_mask`` keeps collecting masks when ``env_kwargs`` does not mention it.
        epsilon: probability in [0, 1], per env and step, of a uniform random action instead of the policy's
            (:class:`EpsilonRandom`; deterministic under ``seed``). Episodes record it (attr ``epsilon``).
        checkpoint: the world-model bundle a controller directory given as ``policy`` reads frames with
            (its tokenizer, for token features); only with a controller.

    Each episode's attrs record ``policy`` (``"random"``, the path given, or ``"callable"``), ``policy_kind``
    (one of :data:`POLICY_KINDS`) and ``epsilon``.
    """
    check_real_env(env)
    _check_counts(episodes, num_envs, epsilon)
    env_kwargs = dict(env_kwargs or {})
    out = Path(out)
    # load a policy file or controller before any engine starts: a bad one fails here, with no process to clean up
    loaded, policy_name, policy_kind = load_collect_policy(
        policy, checkpoint=checkpoint, trust_pickle=trust_pickle
    )
    to_store = None
    if is_gym_env(env):  # a gym env runs in-process anyway: its effective settings come from a probe
        recorded, described, to_store, spec = _probe_gym_env(env, env_kwargs)
        env_kwargs = dict(recorded)  # the workers make exactly the recorded env (pixels, frame skip resolved)
    # Sizes the vector env only (the writer below recounts under its lock).
    existing = EpisodeStore(out) if (out / STORE_JSON).exists() else None
    stored = len(existing) if existing is not None else 0
    env_kwargs = _keep_object_masks(existing, env, env_kwargs)
    fns = [
        make_real_env_fn(env, engines_in_workers=asynchronous, **env_kwargs)
        for _ in range(max(1, min(num_envs, episodes - stored)))
    ]
    report = CollectReport(store=out, requested=episodes, already_present=0, collected=0, env_steps=0)
    venv: gym.vector.VectorEnv | None = None
    writer: StoreWriter | None = None
    bar: Any = None
    finished = 0
    clean = True  # False once an exception (an error, SIGTERM, Ctrl-C) is on its way out
    # every exit path (an error, Ctrl-C, SIGTERM under the CLI) closes the writer (keeping complete
    # buffered episodes) and every engine process. ViZDoom engines start in the env workers only (the vector env
    # reads the spaces from a RealEnvSpaces here), before the store is opened: a SIGKILL of this process, which
    # runs no cleanup, orphans no engine (a worker closes its engine when its pipe to this process breaks), and
    # no worker holds a copy of the writer's descriptors.
    try:
        venv = gym.vector.AsyncVectorEnv(fns) if asynchronous else gym.vector.SyncVectorEnv(fns)
        num_envs = venv.num_envs
        fps = float(venv.get_attr("metadata")[0].get("render_fps", 0.0))
        obs_shape = venv.single_observation_space.shape
        if not is_gym_env(env):
            # record the effective settings, defaults included, so evaluation can rebuild this env
            recorded = {
                k: str(v)
                for k, v in {
                    **env_kwargs,
                    **{k: venv.get_attr(k)[0] for k in ("resolution", "frame_skip", "health_bar")},
                }.items()
            }
            described = {}
            spec = ActionSpec.discrete(int(venv.single_action_space.n), names=action_names(env))  # type: ignore[attr-defined]
        writer = StoreWriter(
            out,
            source=env,
            obs_shape=obs_shape,
            action_spec=spec,
            fps=fps,
            episodes_per_shard=episodes_per_shard,
            extra={"env": env, "env_kwargs": recorded, **described},
            merge=merge,
        )
        # per episode: a store may grow under several policies
        attrs = {"policy": policy_name, "policy_kind": policy_kind, "epsilon": float(epsilon)}
        present = report.already_present = writer.num_episodes
        if present >= episodes:
            return report
        todo = episodes - present
        run_seed = seed + 100_003 * present  # a resumed run must not replay the episodes it already stored
        act = _acting_policy(loaded, spec, num_envs, mean_repeat, run_seed, epsilon)
        bar = tqdm(total=episodes, initial=present, desc=f"collect {env}", unit="ep", disable=not progress)
        obs, info = venv.reset(seed=run_seed)
        reset_policy(act, None)
        masks = OBJECT_MASK in info  # ViZDoom's env kwarg object_mask: stored with the frames as extras
        buf = [_episode_buffer(obs, info, i, masks) for i in range(num_envs)]
        fresh = np.zeros(num_envs, bool)  # NEXT_STEP autoreset: this step's obs starts a new episode
        while finished < todo:
            exit_if_terminated()  # a SIGTERM whose SystemExit was dropped (it hit a finalizer) still ends the run
            actions = act(obs)
            obs, rew, term, trunc, info = venv.step(actions)
            stored = (
                to_store(actions) if to_store is not None else np.asarray(actions, np.int64).reshape(num_envs)
            )
            report.env_steps += int((~fresh).sum())
            for i in range(num_envs):
                if fresh[i]:  # the vector env ignored our action and reset this env
                    buf[i] = _episode_buffer(obs, info, i, masks)
                    continue
                b = buf[i]
                b["frames"].append(obs[i])
                b[OBJECT_MASK].extend(info[OBJECT_MASK][i : i + 1] if masks else [])
                b["actions"].append(stored[i])
                b["rewards"].append(float(rew[i]))
                b["terminated"].append(bool(term[i]))
                if (term[i] or trunc[i]) and finished < todo:
                    n_act = len(b["actions"])
                    writer.add_episode(
                        np.stack(b["frames"]),
                        np.asarray(b["actions"], stored.dtype).reshape((n_act, *stored.shape[1:])),
                        np.array(b["rewards"], np.float32),
                        np.array(b["terminated"], bool),
                        truncated=bool(trunc[i]) and not bool(term[i]),
                        attrs=attrs,
                        extras={OBJECT_MASK: np.stack(b[OBJECT_MASK])} if masks else None,
                    )
                    report.returns.append(float(np.sum(b["rewards"])))
                    report.lengths.append(len(b["frames"]))
                    finished += 1
                    bar.update(1)
            if fresh.any():  # these rows' observations start episodes: a policy with memory forgets the last
                reset_policy(act, np.flatnonzero(fresh))
            fresh = term | trunc
    except BaseException:
        clean = False
        raise
    finally:
        try:
            if writer is not None:
                writer.close()  # buffered episodes are complete: keep them (a SIGKILL loses at most one shard)
        finally:
            if bar is not None:
                bar.close()
            if venv is not None:
                # After an interruption (SIGTERM/Ctrl-C inside venv.step) the pipes may hold half a message, and
                # a polite "close" then waits forever: terminate the workers instead (SIGTERM; each closes its engine).
                if isinstance(venv, gym.vector.AsyncVectorEnv):
                    venv.close(terminate=not clean)
                else:
                    venv.close()
    report.collected = finished
    return report


def open_collected(out: str | os.PathLike) -> EpisodeStore:
    """Open a collected store (convenience for scripts)."""
    return EpisodeStore(out)
