"""Does the dream know what an action is worth near danger? Counterfactual branches at real deaths. One JSON line.

A policy learns to dodge in a dream only if the dream's termination depends on what the policy does before a hit.
This benchmark measures that dependence in the real game and in the dream, at the same states:

1. ``--episodes`` real episodes of ``--env`` are played with a uniform random policy (episode i seeded
   ``--seed + i``). Each one that ends by termination (a death) after at least ``--context + --horizon`` steps
   gives a *death branch point* b = T - H (T transitions, H = ``--horizon``: the death is the H-th transition
   after b) and a *control branch point* drawn uniformly among the steps at least 2H before the death.
2. Real game: the episode is replayed from its seed with its recorded actions up to the branch point (the
   replayed frame must equal the recorded one; ``replay_exact`` is the share that did), then continued for H
   steps with the actions taken (which, at a death point, must end it again) or with the opposite actions
   (``--opposite``: for two actions 1 - a, else another action drawn uniformly); a branch "dies" when the game
   terminates within those H steps.
3. Dream: the bundle starts from the same real context (``--context`` frames ending at the branch point, and
   the actions between them) and dreams H steps with the same two action sequences, ``--samples`` times each
   at ``--temperature``; a branch's probability of dying is 1 - prod_t (1 - p_t) over the predicted
   termination probabilities p_t (scaled as the dream env does with ``--hazard-scale`` k: p -> 1 - (1 - p)^k).

4. Teacher forced: the same world model reads the *real* branches' frames (each encoded alone, appended with the
   action that reached it, nothing sampled) and gives its termination probabilities for them. This separates
   the two ways a dream can miss a death: its termination head cannot tell a lethal approach even on real frames
   (teacher forced ~ dream), or its generated frames do not show the approach (teacher forced >> dream).

Also reported, at the death points: ``fireball_pixels``, Take Cover's fireball colour key counted per branch step
(:func:`fireball_pixels`: the whole frame and its middle third) in the real branches and the dream's, and in the
context's last frame. A real fireball grows as it comes; a dream that lets it fade or fills the frame with fire
cannot make the hit depend on the action.

Each branch point is also played with every action held for the H steps (``hold_<a>``). Random actions stay
about where they are; a policy that reacts to a fireball moves one way. In the real game holding either
direction avoids most deaths that the actions taken met, so this is the comparison a dodging policy lives on.

Reported (mean and standard error over branch points): P(death within H) in each world (``real``, ``dream``,
``teacher_forced``) for the taken, opposite and held actions at the death and control points; the *dodge value*
P(taken) - P(opposite) and the *hold value* P(taken) - min_a P(hold_a) at the death points, each world by its
own numbers; and ``dream_hold_choice``: the hold the dream deems safer, played in the real game (its real
value, and how often it is the safer one where the real holds differ). With ``--termination-source unroll``
the dream's probabilities come from the bundle's hazard unroll (:mod:`worldmodel.hazard`); teacher forced is
always the termination head's. A dream that a dodging policy can learn in has a dodge value near
the real game's; a dream whose value is near 0 rewards no reaction to danger, however good its frames look.

Usage:
    python benchmarks/bench_dodge.py --env vizdoom_take_cover --checkpoint runs/vizdoom_take_cover-tiny \\
        --episodes 48 --horizon 6 --temperature 1.15 --hazard-scale 1.5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from cli_args import add_decode_arguments, decode_kwargs

from envs.dream import load_world_model, scale_hazard
from envs.policy import real_env_kwargs
from envs.real import check_real_env, make_real_env
from worldmodel.bundle import WorldModel
from worldmodel.hazard import UnrollState


def within(p: np.ndarray, hazard_scale: float = 1.0) -> np.ndarray:
    """P(termination within the horizon) from per-step termination probabilities ``p`` (..., H), each scaled as
    the dream env scales it (:func:`envs.dream.scale_hazard`): ``1 - prod_t (1 - p'_t)``."""
    q = 1.0 - scale_hazard(np.clip(p, 0.0, 1.0), hazard_scale).astype(np.float64)
    return 1.0 - np.prod(q, axis=-1)


def opposite(actions: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Other actions than ``actions`` (int, any shape) among ``n``: ``1 - a`` for two actions, else one
    drawn uniformly from the n - 1 others."""
    a = np.asarray(actions, np.int64)
    if n < 2:
        raise ValueError(f"n: got {n} actions, expected at least 2")
    if n == 2:
        return 1 - a
    return (a + 1 + rng.integers(0, n - 1, a.shape)) % n


def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"mean": round(float(x.mean()), 4), "se": round(se, 4), "n": int(len(x))}


def play_random(env, seed: int, n_actions: int, max_steps: int) -> dict[str, np.ndarray | bool]:
    """One real episode of a uniform random policy: frames (T+1, H, W, 3), actions (T,), terminated (bool)."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames, actions, terminated = [obs], [], False
    for _ in range(max_steps):
        a = int(rng.integers(0, n_actions))
        obs, _, term, trunc, _ = env.step(a)
        frames.append(obs)
        actions.append(a)
        if term or trunc:
            terminated = bool(term)
            break
    return {"frames": np.stack(frames), "actions": np.asarray(actions, np.int64), "terminated": terminated}


def real_branch(
    env, seed: int, prefix: np.ndarray, expected: np.ndarray, branch: np.ndarray
) -> tuple[bool, bool, np.ndarray]:
    """Replay ``prefix`` actions from ``seed``, then play ``branch``. Returns (the replayed frame equals
    ``expected`` and nothing ended early, the branch terminated, the branch's frames (k, H, W, 3), k <= len(branch):
    the frames of the steps played until it ended)."""
    obs, _ = env.reset(seed=seed)
    for a in prefix:
        obs, _, term, trunc, _ = env.step(int(a))
        if term or trunc:
            return False, False, obs[None, :0]
    exact = bool(np.array_equal(obs, expected))
    frames = []
    for a in branch:
        obs, _, term, trunc, _ = env.step(int(a))
        frames.append(obs)
        if term or trunc:
            return exact, bool(term), np.stack(frames)
    return exact, False, np.stack(frames)


@torch.inference_mode()
def dream_branches(
    wm: WorldModel,
    frames: np.ndarray,
    ctx_actions: np.ndarray,
    branch: np.ndarray,
    *,
    samples: int,
    temperature: float,
    seed: int,
    batch: int = 128,
    termination_source: str = "head",
    **decode_kw: object,
) -> tuple[np.ndarray, np.ndarray]:
    """Dream branches: from context ``frames`` uint8 (N, C, H, W, 3) and ``ctx_actions`` (N, C-1), ``samples``
    dreams per row stepped with ``branch`` (N, Hz); ``decode_kw`` go to :meth:`DreamRollout.step` (e.g.
    ``decode="maskgit"``). ``termination_source="unroll"`` takes the termination probabilities from the bundle's
    hazard unroll (:mod:`worldmodel.hazard`) rooted at the real context, re-rooted every K steps at the dreamed
    frames as the dream env does, instead of the termination head on each dreamed frame. Returns the predicted termination
    probabilities (N, samples, Hz) and the :func:`fireball_pixels` of every dreamed frame (N, samples, Hz, 2)."""
    n, hz = branch.shape
    f = np.repeat(frames, samples, 0)
    a = np.repeat(ctx_actions, samples, 0)
    u = np.repeat(branch, samples, 0)
    out = np.empty((len(f), hz), np.float32)
    pix = np.empty((len(f), hz, 2), np.float32)
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(f), batch):
        j = min(len(f), i + batch)
        r = wm.rollout(j - i)
        r.reset(f[i:j], a[i:j])
        unroll = None
        if termination_source == "unroll":  # rooted at the real context, as the dream env does
            unroll = UnrollState(wm.hazard, j - i, wm.device)
            unroll.root(np.arange(j - i), f[i:j])
        for t in range(hz):
            step = r.step(u[i:j, t], temperature=temperature, generator=gen, **decode_kw)
            out[i:j, t] = step.terminated_prob if unroll is None else unroll.step(u[i:j, t], step.frames)
            pix[i:j, t] = fireball_pixels(step.frames)
    return out.reshape(n, samples, hz), pix.reshape(n, samples, hz, 2)


def fireball_key(frames: np.ndarray) -> np.ndarray:
    """Take Cover's fireball colour key, uint8 (..., H, W, 3) -> bool (..., H, W): red > 180 and green > 140
    (yellow-white; the walls are brown and the health bar pure red)."""
    f = frames.astype(np.int16)
    return (f[..., 0] > 180) & (f[..., 1] > 140)


def fireball_pixels(frames: np.ndarray) -> np.ndarray:
    """:func:`fireball_key` counted above the HUD's bottom ``W // 16`` rows. uint8 (..., H, W, 3) -> float32
    (..., 2): the count in the whole frame and in the middle third of the columns, where a fireball that hits is
    drawn. The real game's fireballs grow as they come, so these counts say whether a dream brings them closer."""
    h, w = frames.shape[-3:-1]
    key = fireball_key(frames[..., : h - max(1, w // 16), :, :])  # (..., h', W)
    centre = key[..., w // 3 : w - w // 3]
    return np.stack([key.sum((-1, -2)), centre.sum((-1, -2))], -1).astype(np.float32)


def per_step_pixels(pix: list[np.ndarray], hz: int) -> dict[str, list[float]]:
    """Mean fireball pixels per branch step over branches (each (k, 2), k <= hz: a real branch stops at its end):
    {"total": hz values, "centre": hz values}; a step no branch reached is null."""
    sums, counts = np.zeros((hz, 2)), np.zeros(hz)
    for p in pix:
        sums[: len(p)] += p
        counts[: len(p)] += 1
    means = [None if c == 0 else sums[t] / c for t, c in enumerate(counts)]
    return {
        name: [None if m is None else round(float(m[k]), 1) for m in means]
        for k, name in enumerate(("total", "centre"))
    }


@torch.inference_mode()
def teacher_forced(
    wm: WorldModel,
    frames: np.ndarray,
    ctx_actions: np.ndarray,
    branch: np.ndarray,
    branch_frames: list[np.ndarray],
    batch: int = 128,
) -> np.ndarray:
    """The termination probabilities the same world model gives to *real* branches, read teacher-forced: from
    the context as in :func:`dream_branches`, each real branch frame (encoded alone) is appended with the action
    that reached it (``Rollout.observe``: nothing sampled). Steps after a branch ended get p = 0. Returns (N, Hz)."""
    n, hz = branch.shape
    out = np.zeros((n, hz), np.float32)
    for i in range(0, n, batch):
        j = min(n, i + batch)
        r = wm.rollout(j - i)
        r.reset(frames[i:j], ctx_actions[i:j])
        lens = np.array([len(f) for f in branch_frames[i:j]])
        for t in range(int(lens.max(initial=0))):
            # rows whose branch ended repeat their last frame (ViZDoom's own frame at a death); their p is dropped
            # (a branch whose replay failed has no frame: its context's last frame stands in, p dropped as well)
            fr = np.stack(
                [f[min(t, len(f) - 1)] if len(f) else c[-1] for f, c in zip(branch_frames[i:j], frames[i:j])]
            )
            tok = wm.tokenizer.encode(torch.from_numpy(fr)[:, None].to(wm.device))[:, 0]  # (k, h, w)
            p = r.sampler.observe(tok, torch.as_tensor(branch[i:j, t]).to(wm.device)).terminated_prob
            out[i:j, t] = np.where(t < lens, p.float().cpu().numpy(), 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--env", default="vizdoom_take_cover", help="preset with a real env whose episodes end by termination"
    )
    p.add_argument("--checkpoint", help="bundle (default: the newest bundle of --env under runs/)")
    p.add_argument("--episodes", type=int, default=48, help="real random-policy episodes played")
    p.add_argument("--horizon", type=int, default=6, help="steps from a branch point to the death (H)")
    p.add_argument(
        "--context", type=int, default=4, help="real frames the dream starts from (<= the prior's window - 1)"
    )
    p.add_argument("--samples", type=int, default=4, help="dreams per branch and action sequence")
    p.add_argument("--temperature", type=float, default=1.0, help="dream sampling temperature")
    p.add_argument(
        "--hazard-scale", type=float, default=1.0, help="k: each predicted p becomes 1 - (1 - p)^k"
    )
    p.add_argument(
        "--max-steps", type=int, default=525, help="real episode cap (525 = 2100 tics at frame skip 4)"
    )
    add_decode_arguments(p)
    p.add_argument(
        "--termination-source",
        default="head",
        choices=["head", "unroll"],
        help="dream termination: the prior's head on each dreamed frame, or the bundle's hazard unroll from the "
        "real context and the actions since (experiments/train_hazard.py)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first real episode and of the dream")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    for name in ("episodes", "horizon", "samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: got {getattr(args, name)}, expected >= 1")
    if args.hazard_scale < 0 or args.temperature < 0:
        p.error(
            f"--hazard-scale / --temperature: got {args.hazard_scale} / {args.temperature}, expected >= 0"
        )
    torch.set_num_threads(args.threads)
    try:
        check_real_env(args.env, "--env")
    except ValueError as e:
        p.error(str(e))
    wm = load_world_model(args.checkpoint, args.env, "cpu")
    if wm.action_spec.kind != "discrete":
        p.error(
            f"--env {args.env}: the bundle's actions are {wm.action_spec.kind}; expected discrete actions"
        )
    if args.decode == "maskgit" and not wm.prior.maskgit:
        p.error(
            "--decode maskgit: this bundle's prior has no MaskGIT stream (train with --config.prior.maskgit-weight 1.0)"
        )
    if args.decode == "maskgit" and not 1 <= args.maskgit_steps <= wm.prior.hw:
        p.error(f"--maskgit-steps: got {args.maskgit_steps}, expected 1..{wm.prior.hw} (tokens per frame)")
    if args.termination_source == "unroll" and wm.hazard is None:
        p.error(
            "--termination-source unroll: the bundle has no hazard unroll; train one with "
            "python experiments/train_hazard.py --checkpoint <bundle>"
        )
    window = wm.cfg.prior.frames
    if not 1 <= args.context < window:
        p.error(
            f"--context: got {args.context}, expected 1..{window - 1} (the prior's window is {window} frames)"
        )
    n_act, H, C = wm.action_spec.n, args.horizon, args.context
    env = make_real_env(args.env, resolution=wm.obs_shape[0], **real_env_kwargs(wm))
    rng = np.random.default_rng(args.seed)
    t0 = time.process_time()
    points: list[tuple[str, int, int, dict]] = []  # (kind, episode seed, branch point, episode)
    lengths = []
    for i in range(args.episodes):
        ep = play_random(env, args.seed + i, n_act, args.max_steps)
        T = len(ep["actions"])
        lengths.append(T)
        if not ep["terminated"] or T < C - 1 + H:
            continue
        points.append(("death", args.seed + i, T - H, ep))
        if T - 2 * H >= C - 1:
            points.append(("control", args.seed + i, int(rng.integers(C - 1, T - 2 * H + 1)), ep))
    if not any(k == "death" for k, *_ in points):
        p.error(
            f"no episode of {args.episodes} ended by termination after >= {C - 1 + H} steps; play more --episodes "
            "or lower --horizon / --context"
        )
    taken = np.stack([ep["actions"][b : b + H] for _, _, b, ep in points])  # (P, H)
    other = opposite(taken, n_act, rng)
    # each action held for the whole branch: what a policy that reacts does, where random actions stay put
    branches = {
        "taken": taken,
        "opposite": other,
        **{f"hold_{k}": np.full_like(taken, k) for k in range(n_act)},
    }
    holds = [f"hold_{k}" for k in range(n_act)]
    real: dict[str, list] = {name: [] for name in branches}
    real_frames: dict[str, list] = {name: [] for name in branches}
    exact = []
    for j, (_, seed, b, ep) in enumerate(points):
        for name, seqs in branches.items():
            ok, died, fr = real_branch(env, seed, ep["actions"][:b], ep["frames"][b], seqs[j])
            exact.append(ok)
            real[name].append(died)
            real_frames[name].append(fr)
    env.close()
    real_min = (time.process_time() - t0) / 60
    t0 = time.process_time()
    ctx_f = np.stack([ep["frames"][b - C + 1 : b + 1] for _, _, b, ep in points])  # (P, C, H, W, 3)
    ctx_a = np.stack([ep["actions"][b - C + 1 : b] for _, _, b, ep in points]).reshape(len(points), C - 1)
    kw = {
        "samples": args.samples,
        "temperature": args.temperature,
        "seed": args.seed,
        "termination_source": args.termination_source,
        **decode_kwargs(args),
    }
    dream, dream_pix = {}, {}
    for name, branch in branches.items():
        probs, pix = dream_branches(wm, ctx_f, ctx_a, branch, **kw)
        dream[name] = within(probs, args.hazard_scale).mean(1)  # (P,)
        dream_pix[name] = pix.mean(1)  # (P, H, 2): mean over the samples
    forced = {
        name: within(teacher_forced(wm, ctx_f, ctx_a, branch, real_frames[name]), args.hazard_scale)
        for name, branch in branches.items()
    }
    dream_min = (time.process_time() - t0) / 60
    death = np.array([k == "death" for k, *_ in points])
    out: dict = {
        "bench": "dodge",
        "env": args.env,
        "checkpoint": str(wm.path),
        "horizon": H,
        "context": C,
        "samples": args.samples,
        "temperature": args.temperature,
        "decode": args.decode,
        "termination_source": args.termination_source,
        "hazard_scale": args.hazard_scale,
        "episodes": args.episodes,
        "mean_episode_steps": round(float(np.mean(lengths)), 1),
        "death_points": int(death.sum()),
        "control_points": int((~death).sum()),
        "replay_exact": round(float(np.mean(exact)), 3),
    }
    real_np = {k: np.asarray(v, np.float64) for k, v in real.items()}
    worlds = (("real", real_np), ("dream", dream), ("teacher_forced", forced))
    for world, res in worlds:
        out[world] = {
            f"{kind}_{name}": _stats(res[name][mask])
            for kind, mask in (("death", death), ("control", ~death))
            if mask.any()
            for name in branches
        }
        out[world]["dodge_value"] = _stats(res["taken"][death] - res["opposite"][death])
        # what holding the safer action is worth, by this world's own numbers
        safest = np.min(np.stack([res[h] for h in holds]), 0)
        out[world]["hold_value"] = _stats(res["taken"][death] - safest[death])
    # the hold the dream deems safer, played in the real game: what a policy trained in this dream would gain
    real_holds = np.stack([real_np[h] for h in holds])  # (n_act, P)
    pick = np.argmin(np.stack([dream[h] for h in holds]), 0)  # (P,)
    real_pick = real_holds[pick, np.arange(len(pick))]
    differ = death & (np.ptp(real_holds, 0) > 0)
    out["dream_hold_choice"] = {
        "real_value": _stats(real_np["taken"][death] - real_pick[death]),
        "accuracy_where_holds_differ": _stats((real_pick == real_holds.min(0))[differ].astype(np.float64))
        if differ.sum() > 1
        else None,
    }
    # where the fireballs go between a death point and the death: real frames against the dream's
    dp = np.flatnonzero(death)
    out["fireball_pixels"] = {
        "context": {
            name: [round(float(v), 1)]
            for name, v in zip(("total", "centre"), fireball_pixels(ctx_f[dp, -1]).mean(0))
        },
        **{
            f"{world}_{name}": per_step_pixels([pix[i] for i in dp], H)
            for world, source in (
                ("real", {k: [fireball_pixels(f) for f in v] for k, v in real_frames.items()}),
                ("dream", dream_pix),
            )
            for name, pix in source.items()
            if name in ("taken", "opposite")
        },
    }
    out["cpu_minutes"] = {"real": round(real_min, 2), "dream": round(dream_min, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
