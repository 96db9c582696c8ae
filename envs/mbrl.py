"""Model-based RL loop: collect real data with the current policy -> update the world model ->
train PPO in the batched dream -> score it in the real env; repeat.

At the end the loop's policy is compared with a uniform random policy and with PPO trained
directly in the real env for as many real steps as the loop consumed (the sample-efficiency
question a world model has to answer). Per-iteration numbers go to TensorBoard
(``<run>/tb_mbrl``) and to ``<run>/mbrl.csv``; the final report to ``<run>/mbrl_report.json``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecNormalize

from envs.collect import collect
from envs.policy import PPOConfig, Score, real_vec_env, score_dream, score_real, train_ppo
from envs.sb3_vec import DreamVecEnv
from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import atomic_replace, write_json
from worldmodel.config import ExperimentConfig
from worldmodel.stages import encode_tokens, train_prior, train_tokenizer
from worldmodel.store import EpisodeStore


@dataclass
class MBRLConfig:
    """Budgets of the loop (every one a CLI flag in experiments/mbrl.py)."""

    iterations: int = 3
    """Collect -> update -> PPO -> evaluate rounds."""
    episodes_per_iteration: int = 100
    """Real episodes collected per round (round 0 with the random policy)."""
    prior_steps_per_iteration: int = 1000
    """Extra prior optimizer steps per round after the first (round 0 trains the preset's budget)."""
    ppo_steps_per_iteration: int = 10_000
    """Dream env steps of PPO per round (the same PPO model continues across rounds)."""
    eval_episodes: int = 10
    """Real (and dream) episodes per evaluation."""
    num_envs: int = 16
    """Dream envs stepped together."""
    max_episode_steps: int = 525
    """Dream episode time limit."""
    direct_ppo_baseline: bool = True
    """Also train PPO in the real env for the loop's number of real steps, for comparison."""
    seed: int = 0
    ppo: PPOConfig = field(default_factory=PPOConfig)


def store_transitions(store: str | os.PathLike) -> int:
    """Real env steps held by a store (transitions = frames - 1 per episode)."""
    if not Path(store, "store.json").exists():
        return 0
    st = EpisodeStore(store)
    return sum(st.length(e) - 1 for e in st.episode_ids())


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` by rewriting the whole CSV atomically (a kill never leaves a half line)."""
    old = path.read_text() if path.exists() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(row))
    if not old:
        w.writeheader()
    w.writerow(row)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(old + buf.getvalue())
    atomic_replace(tmp, path)


def run_mbrl(cfg: ExperimentConfig, run_dir: str | os.PathLike, m: MBRLConfig, *,
             env_kwargs: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the loop for the real-env preset ``cfg`` in ``run_dir``; returns the final report."""
    from torch.utils.tensorboard import SummaryWriter

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    env_kwargs = dict(env_kwargs or {})
    store = cfg.data.store
    writer = SummaryWriter(str(run / "tb_mbrl"))
    if m.iterations < 1:
        raise ValueError(f"iterations: got {m.iterations}, expected >= 1")
    model: PPO | None = None
    rows = []
    for it in range(m.iterations):
        # 1. real data from the current policy (round 0: sticky random actions)
        before = store_transitions(store)
        policy: Any = "random" if model is None else (lambda obs, mdl=model: mdl.predict(obs, deterministic=False)[0])
        collect(cfg.env, store, m.episodes_per_iteration * (it + 1), policy=policy, seed=m.seed + 1000 * it,
                env_kwargs={"resolution": cfg.data.resolution, **env_kwargs}, progress=progress, asynchronous=False,
                num_envs=1)
        real_steps = store_transitions(store)
        # 2. world model: tokenizer once (round 0), prior continued with a raised step budget
        if it == 0:
            train_tokenizer(cfg, run, progress=progress)
        encode_tokens(cfg, run, progress=progress)
        steps = cfg.prior_train.steps + it * m.prior_steps_per_iteration
        train_prior(replace(cfg, prior_train=replace(cfg.prior_train, steps=steps)), run, progress=progress)
        wm = WorldModel.from_pretrained(run)
        # 3. PPO in the dream of the updated model (the same policy continues)
        if model is None:
            model, venv = train_ppo(wm, m.ppo_steps_per_iteration, num_envs=m.num_envs, ppo=m.ppo, seed=m.seed,
                                    max_episode_steps=m.max_episode_steps, progress_bar=progress)
        else:
            venv = DreamVecEnv(m.num_envs, world_model=wm, max_episode_steps=m.max_episode_steps)
            venv.seed(m.seed + it)
            model.set_env(VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=m.ppo.gamma))
            model.learn(m.ppo_steps_per_iteration, reset_num_timesteps=False, progress_bar=progress)
        # 4. evaluate in the dream and in reality
        H = wm.obs_shape[0]
        real = score_real(model, cfg.env, H, m.eval_episodes, seed=m.seed, **env_kwargs)
        dream = score_dream(model, venv, m.eval_episodes, seed=m.seed)
        row = {"iteration": it, "real_env_steps": real_steps, "new_real_steps": real_steps - before,
               "prior_steps": steps, "ppo_timesteps": int(model.num_timesteps), "real_return": real.mean,
               "dream_return": dream.mean, "gap": dream.mean - real.mean}
        rows.append(row)
        _append_csv(run / "mbrl.csv", row)
        for k in ("real_return", "dream_return", "gap", "real_env_steps"):
            writer.add_scalar(f"mbrl/{k}", row[k], it)
        writer.flush()
    model.save(run / "policies" / "ppo_mbrl.zip")
    H = cfg.data.resolution
    random_score = score_real(None, cfg.env, H, m.eval_episodes, seed=m.seed, **env_kwargs)
    report: dict[str, Any] = {"iterations": rows, "real_env_steps": rows[-1]["real_env_steps"],
                              "mbrl": asdict(real), "random": asdict(random_score)}
    if m.direct_ppo_baseline:
        direct, used = _direct_ppo(cfg.env, H, rows[-1]["real_env_steps"], m, env_kwargs)
        report["direct_ppo"] = {**asdict(direct), "real_env_steps": used}
    report["mbrl_vs_random"] = report["mbrl"]["mean"] / max(report["random"]["mean"], 1e-9)
    write_json(run / "mbrl_report.json", report)
    writer.close()
    return report


def _direct_ppo(env: str, resolution: int, steps: int, m: MBRLConfig, env_kwargs: dict[str, Any]) -> tuple[Score, int]:
    """PPO trained in the real env for ``steps`` steps (the loop's real-data budget, rounded up to whole
    rollouts by SB3), then scored there; returns the score and the training steps actually taken."""
    venv = real_vec_env(env, resolution, num_envs=2, **env_kwargs)
    ppo = replace(m.ppo, n_steps=min(m.ppo.n_steps, max(8, steps // 2)), batch_size=min(m.ppo.batch_size, max(8, steps)))
    model = PPO("CnnPolicy", VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=ppo.gamma), seed=m.seed,
                device="cpu", verbose=0, **asdict(ppo))
    model.learn(total_timesteps=steps)
    venv.close()
    return score_real(model, env, resolution, m.eval_episodes, seed=m.seed, **env_kwargs), int(model.num_timesteps)
