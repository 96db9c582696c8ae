"""Policy lockstep: the policy drives the REAL game, the dream follows with the same actions.

The question a user debugging a dream-trained policy asks is: *along the trajectory my policy takes, where does
the dream stop agreeing with reality, and does my policy live off that disagreement?* :func:`follow_trace`
answers it for one episode:

1. the real env is reset (seeded); the policy acts on the real frames — with ``context`` > 1 it first plays
   ``context - 1`` real steps, the dream's starting context;
2. two dreams start from the same real context and receive every action the policy takes in the real game:
   the **open-loop** dream never sees a real frame again; the **re-synced** dream restarts from the real
   history (the last ``frames - 1`` real frames that fit the prior's window) every ``resync_every`` steps,
   so with K = 1 its frames are one-step-ahead predictions. Both are rows of one batched dream (one model
   call per token for both);
3. the policy is also read on each open-loop dream frame (a fork of it, so a stateful policy such as the
   linear controller keeps its own previous frame there): its action probabilities, value estimate and
   choice there vs on the real frame at the same step.

The result is a :class:`~worldmodel.rollout_video.RolloutTrace` that :mod:`worldmodel.rollout_report` turns
into the video, plots, summary and HTML report. Only envs that run here can be driven (the ViZDoom presets,
:func:`has_real_env`); dataset-only bundles (BAIR, RoboNet) have recorded episodes only
(:func:`worldmodel.rollout_video.lockstep_trace`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from envs.policy import real_env_kwargs
from envs.policy_probe import PolicyProbe, PolicyReading
from envs.real import is_real_env, make_real_env
from worldmodel.bundle import WorldModel
from worldmodel.rollout_video import DreamTrack, PolicyTrack, RolloutTrace


def has_real_env(wm: WorldModel) -> bool:
    """Whether the bundle's data comes from an env that runs here (a ViZDoom preset or ``gym:<ID>``), so a policy
    can drive it."""
    return is_real_env(wm.cfg.env)


def make_bundle_real_env(
    wm: WorldModel, *, max_episode_steps: int | None = None, battle2_path: str | None = None
) -> gym.Env:
    """The real env the bundle's data was collected in (the settings its store records, :func:`envs.policy.real_env_kwargs`;
    the bundle's resolution); ``max_episode_steps`` overrides a recorded episode cap. ``ValueError`` for a
    dataset-only bundle."""
    if not has_real_env(wm):
        raise ValueError(
            f"the bundle {wm.path} models {wm.cfg.env!r}, which has no real env here (real envs: "
            f"ViZDoom presets and gym:<ID>); replay a recorded episode instead (rollout.py --mode episode)"
        )
    kw: dict[str, Any] = real_env_kwargs(wm)
    if battle2_path is not None:
        kw["battle2_path"] = battle2_path
    if max_episode_steps is not None or "max_episode_steps" not in kw:
        kw["max_episode_steps"] = max_episode_steps
    return make_real_env(wm.cfg.env, resolution=wm.obs_shape[0], **kw)


def _track(readings: list[PolicyReading]) -> PolicyTrack:
    r0 = readings[0]
    return PolicyTrack(
        choice=np.array([r.choice for r in readings], np.int64),
        probs=None if r0.probs is None else np.stack([r.probs for r in readings]).astype(np.float32),
        value=None if r0.value is None else np.array([r.value for r in readings], np.float32),
        scores=None if r0.scores is None else np.stack([r.scores for r in readings]).astype(np.float32),
    )


@torch.inference_mode()
def follow_trace(
    wm: WorldModel,
    real_env: gym.Env,
    probe: PolicyProbe,
    *,
    steps: int = 64,
    context: int = 1,
    resync_every: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> RolloutTrace:
    """Let ``probe``'s policy play one episode of ``real_env`` for up to ``steps`` steps (fewer if the episode
    ends) with the dream following (see the module docstring); ``resync_every`` = 0 drops the re-synced dream.

    ``seed`` seeds the real env's reset, the policy's action sampling and the dreams' token sampling, so the
    same arguments give the same trace. The real env's observations must be the bundle's frames and its
    actions the bundle's (same count, same meaning): ``ValueError`` otherwise.
    """
    if steps < 1:
        raise ValueError(f"steps: got {steps}, expected >= 1")
    if not 1 <= context < wm.cfg.prior.frames:
        raise ValueError(
            f"context: got {context}, expected 1..{wm.cfg.prior.frames - 1} (the prior's window is "
            f"{wm.cfg.prior.frames} frames)"
        )
    if resync_every < 0:
        raise ValueError(
            f"resync_every: got {resync_every}, expected >= 1 (steps between re-syncs) or 0 (no re-synced dream)"
        )
    spec = wm.action_spec
    if (
        spec.kind != "discrete"
        or not isinstance(real_env.action_space, gym.spaces.Discrete)
        or int(real_env.action_space.n) != spec.n
    ):
        raise ValueError(
            f"real_env: its actions are {real_env.action_space}, the bundle's {spec.describe(1)}; "
            "expected the env the bundle was trained on"
        )
    if tuple(real_env.observation_space.shape) != tuple(wm.obs_shape):
        raise ValueError(
            f"real_env: observations of shape {real_env.observation_space.shape}, the bundle's are "
            f"{wm.obs_shape}; make the real env at the bundle's resolution"
        )
    rng = np.random.default_rng(seed)  # the policy's actions on the real frames
    rng_dream = np.random.default_rng(seed + 1)  # (a stochastic probe's draw on the dream frames is not used)
    obs, _ = real_env.reset(seed=seed)
    probe.reset()
    real, acts = [obs], []
    for _ in range(context - 1):  # the dream's real context: the policy plays its first steps in the game
        a = probe.read(obs, rng).action
        obs, _, term, trunc, _ = real_env.step(a)
        if term or trunc:
            raise ValueError(f"context: the real episode ended within the {context} context frames")
        real.append(obs)
        acts.append(a)
    dream_probe = probe.fork()  # reads the dream's frames from here on, with the same per-episode state
    rows = 2 if resync_every else 1
    ro = wm.rollout(rows)
    ctx = np.stack(real)[None]  # (1, Tc, H, W, 3)
    ctx_acts = np.asarray(acts, np.int64)[None] if context > 1 else None
    ro.reset(np.repeat(ctx, rows, 0), None if ctx_acts is None else np.repeat(ctx_acts, rows, 0))
    gens = [torch.Generator(device=wm.device).manual_seed(seed + i) for i in range(rows)]
    window = wm.cfg.prior.frames - 1  # real frames a re-sync restarts from
    history, history_acts = list(real), list(acts)  # every real frame and action so far (for re-syncs)
    real, acts = [obs], []  # the trace starts at the last context frame
    dream, resync = [obs], [obs]
    read_real, read_dream = [], []
    rew_real, terminated = [], []
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("rew", "term", "ent", "rew_rs", "term_rs", "ent_rs")}
    for t in range(steps):
        r = probe.read(real[-1], rng)
        read_real.append(r)
        read_dream.append(dream_probe.read(dream[-1], rng_dream))
        a = r.action
        obs, rew, term, trunc, _ = real_env.step(a)
        o = ro.step(np.full(rows, a, np.int64), temperature=temperature, top_k=top_k, generator=gens)
        real.append(obs)
        acts.append(a)
        rew_real.append(float(rew))
        terminated.append(bool(term))
        dream.append(o.frames[0])
        exp = o.expected_rewards  # p(term)-weighted: the real game, not a draw, decides when the episode ends
        out["rew"].append(exp[0])
        out["term"].append(o.terminated_prob[0])
        out["ent"].append(o.entropy[0])
        if rows == 2:
            resync.append(o.frames[1])
            out["rew_rs"].append(exp[1])
            out["term_rs"].append(o.terminated_prob[1])
            out["ent_rs"].append(o.entropy[1])
        history.append(obs)
        history_acts.append(a)
        if term or trunc:
            break
        if rows == 2 and (t + 1) % resync_every == 0:  # the re-synced dream restarts from the real history
            k = min(window, len(history))
            prev_acts = (
                np.asarray(history_acts[len(history_acts) - (k - 1) :], np.int64)[None] if k > 1 else None
            )
            ro.reset(np.stack(history[-k:])[None], prev_acts, rows=[1])
    read_real.append(probe.read(real[-1], rng))  # the policy on the last frames (what it would do next)
    read_dream.append(dream_probe.read(dream[-1], rng_dream))

    def f32(key: str) -> np.ndarray:
        return np.asarray(out[key], np.float32)

    names = spec.names
    return RolloutTrace(
        dream=np.stack(dream),
        actions=np.asarray(acts, np.int64),
        reward_pred=f32("rew"),
        term_prob=f32("term"),
        entropy=f32("ent"),
        real=np.stack(real),
        reward_real=np.asarray(rew_real, np.float32),
        terminated_real=np.asarray(terminated, bool),
        action_names=tuple(names) if names else None,
        resync=DreamTrack(np.stack(resync), f32("rew_rs"), f32("term_rs"), f32("ent_rs"), resync_every)
        if rows == 2
        else None,
        policy_real=_track(read_real),
        policy_dream=_track(read_dream),
        policy_name=probe.name,
    )
