"""Model-based RL loop: collect real data with the current policy -> update the world model ->
train a policy in the batched dream (PPO, World Models' CMA-ES controller, or a frame policy distilled from the
planner over a hazard unroll) -> score it in the real env; repeat.

One iteration ``k`` (0-based) of :func:`run_mbrl`:

1. collect ``episodes_per_iteration`` real episodes into the store (iteration 0: sticky random
   actions; later: the current policy -- PPO's, stochastic; or the previous round's controller or distilled
   policy, with ``collect_epsilon`` uniform random actions);
2. continue the world model on the grown store: the tokenizer is trained once (its preset budget)
   and optionally continued for ``tokenizer_steps_per_iteration`` more steps per later iteration;
   the token cache is re-encoded (it is keyed to the tokenizer's weights and the store's size); the
   prior resumes from its checkpoint for ``prior_steps_per_iteration`` more steps. The training
   step counter continues, so iteration k trains up to ``preset steps + k * per-iteration steps``;
3. the learner (``algo``), in the batched dream of the updated model sampled at ``temperature``:
   ``"ppo"`` continues the same PPO model for ``ppo_steps_per_iteration`` steps (reward-normalisation
   statistics carried over); ``"cmaes"`` evolves a fresh :class:`~envs.controller.LinearController` with
   CMA-ES (``cmaes``; seed ``seed + k``; :func:`envs.controller.train_cmaes_in_dream`); ``"distill"`` fits a
   fresh hazard unroll on the grown store (``hazard``; written into the bundle) and distils the planner over it
   into a fresh :class:`~envs.planner.FramePolicy` (``distill``; seed ``distill.seed + k``), whose dream scores use
   the unroll as the dream's termination;
4. score the policy in the real env and in the dream (``eval_episodes`` each).

At the end the loop's policy is compared with a uniform random policy and with PPO trained
directly in the real env for as many real steps as the loop consumed (the sample-efficiency
question a world model has to answer; with ``algo="cmaes"`` too: a CMA-ES controller evolved in the real
env is not offered, as its population needs ``popsize × episodes`` engines at once). "Real env steps" are
the transitions the loop added to the store -- what the world model learnt from; evaluation episodes are
the measurement (every method is scored on the same episodes) and are not counted.

Files in the run directory: ``mbrl.csv`` (one row per iteration, rewritten atomically; ``ppo_timesteps`` is
the learner's agent steps in the dream: PPO's cumulative timesteps, or for cmaes the steps the round's
controller was evolved with), TensorBoard scalars under ``tb_mbrl/`` (PPO's own curves under ``tb_mbrl/PPO_0``),
the policy after each iteration: ``policies/mbrl-iterNNN.safetensors`` (PPO; policy files of
:mod:`envs.policy_file`: safetensors + JSON, no pickle; final copy ``policies/ppo_mbrl.safetensors``) or
``policies/controller-iterNNN/`` (cmaes; :func:`envs.controller.save_controller`, with the generation log) or
``policies/distill-iterNNN.safetensors`` (distill; :func:`envs.planner.save_frame_policy`, with both metrics),
``mbrl_state.json`` (what a killed run resumes from) and ``mbrl_report.json`` (the final report).
Re-running with the same run directory and budgets resumes after the last finished iteration;
raising ``iterations`` continues a finished run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecNormalize
from tqdm.auto import tqdm

from envs.callbacks import DreamExploitWarning
from envs.collect import collect
from envs.controller import (
    CMAESConfig,
    LinearController,
    cmaes_agent_steps,
    is_controller,
    save_controller,
    train_cmaes_in_dream,
)
from envs.planner import (
    DistillConfig,
    FramePolicy,
    FrameStackActor,
    distill_planner,
    is_frame_policy,
    save_frame_policy,
)
from envs.policy import PPOConfig, Score, real_vec_env, return_ratio, save_policy, score_dream, score_real
from envs.policy_file import is_zip, load_algorithm, load_sb3_zip, resolve_in_dir
from envs.real import is_real_env
from envs.sb3_vec import DreamVecEnv, VecLatentObservation
from worldmodel.atomic import write_json, write_text
from worldmodel.bundle import WorldModel
from worldmodel.config import ExperimentConfig
from worldmodel.hazard import HazardConfig, fit_hazard
from worldmodel.stages import encode_tokens, train_prior, train_tokenizer
from worldmodel.store import EpisodeStore

STATE_FILE = "mbrl_state.json"
CSV_FILE = "mbrl.csv"
REPORT_FILE = "mbrl_report.json"
STATE_SCHEMA = 1

CSV_FIELDS = (
    "iteration",
    "episodes",
    "real_env_steps",
    "new_real_steps",
    "collect_return",
    "tokenizer_steps",
    "prior_steps",
    "ppo_timesteps",
    "real_return",
    "real_return_std",
    "real_length",
    "dream_return",
    "dream_return_std",
    "dream_length",
    "gap",
    "eval_episodes",
    "minutes",
)
"""Columns of ``mbrl.csv``: real/dream returns are means over ``eval_episodes`` episodes; ``gap`` is
dream minus real; ``real_env_steps`` the store's transitions after collection (cumulative);
``collect_return`` the mean return of the episodes collected this iteration (the behaviour policy;
empty when a resumed iteration found them already collected); ``ppo_timesteps`` the learner's agent steps in
the dream (PPO: cumulative timesteps of the continued model; cmaes: the steps the round's fresh controller was
evolved with, :func:`envs.controller.cmaes_agent_steps`)."""


@dataclass
class MBRLConfig:
    """Budgets of the loop (every one a CLI flag in experiments/mbrl.py)."""

    iterations: int = 3
    """Collect -> update -> learner in the dream -> evaluate rounds (raise it to continue a finished run)."""
    episodes_per_iteration: int = 100
    """Real episodes collected per round (round 0 with sticky random actions)."""
    tokenizer_steps_per_iteration: int = 0
    """Extra tokenizer steps per round after the first (0 = the tokenizer is trained once, in round 0)."""
    prior_steps_per_iteration: int = 1000
    """Extra prior optimizer steps per round after the first (round 0 trains the preset's budget)."""
    ppo_steps_per_iteration: int = 10_000
    """Dream env steps of PPO per round (the same PPO model continues across rounds; algo ppo)."""
    eval_episodes: int = 10
    """Real (and dream) episodes per evaluation."""
    num_envs: int = 16
    """Dream envs stepped together by PPO, and by the dream scores of either learner."""
    max_episode_steps: int = 525
    """Dream episode time limit, in env steps (525 = HGS's real 2100-tic timeout at frame skip 4)."""
    direct_ppo_baseline: bool = True
    """Also train PPO directly in the real env for the loop's number of real steps, for comparison."""
    direct_ppo_envs: int = 2
    """Real envs the direct-PPO baseline steps together."""
    exploit_factor: float = 2.0
    """Warn when the dream return exceeds this many times the real return (the policy may exploit the model)."""
    seed: int = 0
    """Seed of collection, PPO and evaluation episodes."""
    algo: Literal["ppo", "cmaes", "distill"] = "ppo"
    """Learner in the dream: PPO (continued across rounds), a CMA-ES linear controller (a fresh one each round;
    World Models' recipe) or the planner over a hazard unroll distilled into a frame policy (both fresh each round;
    discrete actions). experiments/mbrl.py defaults to distill for vizdoom_take_cover (ENV_DEFAULTS)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO hyperparameters (used in the dream and by the direct baseline)."""
    cmaes: CMAESConfig = field(default_factory=CMAESConfig)
    """CMA-ES hyperparameters (algo cmaes); its max_episode_steps caps dream episodes during evolution."""
    hazard: HazardConfig = field(default_factory=HazardConfig)
    """The hazard unroll fitted each round (algo distill)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distillation each round (algo distill; round k seeds it ``distill.seed + k``)."""
    collect_epsilon: float = 0.2
    """algo cmaes / distill: probability per step of a uniform random action while the controller or the
    distilled policy collects (rounds >= 1; PPO's own policy is stochastic and collects without it)."""
    temperature: float = 1.0
    """Sampling temperature of the dream's frame tokens, for the learner and the dream scores (World Models
    used 1.15 for Take Cover: a harder dream whose policy transfers better)."""
    hazard_scale: float = 1.0
    """The dream's hazard scale k for the learner and the dream scores: each predicted termination probability p
    becomes 1 - (1 - p)^k (envs/dream.py; k > 1: a pessimistic dream)."""

    @classmethod
    def for_env(cls, env: str, **overrides: Any) -> MBRLConfig:
        """The defaults for real env ``env`` (:data:`ENV_DEFAULTS`), then ``overrides``."""
        return cls(**{**ENV_DEFAULTS.get(env, {}), **overrides})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first budget out of range."""
        if self.algo not in ("ppo", "cmaes", "distill"):
            raise ValueError(f"mbrl.algo: got {self.algo!r}, expected 'ppo', 'cmaes' or 'distill'")
        self.hazard.check()
        self.distill.check()
        if not 0.0 <= self.collect_epsilon <= 1.0:
            raise ValueError(
                f"mbrl.collect_epsilon: got {self.collect_epsilon}, expected a probability in [0, 1]"
            )
        if not self.temperature > 0:
            raise ValueError(f"mbrl.temperature: got {self.temperature}, expected > 0")
        if not self.hazard_scale >= 0:
            raise ValueError(f"mbrl.hazard_scale: got {self.hazard_scale}, expected a number >= 0")
        for name, lo in (("generations", 1), ("popsize", 2), ("episodes", 1), ("max_episode_steps", 1)):
            if getattr(self.cmaes, name) < lo:
                raise ValueError(
                    f"mbrl.cmaes.{name}: got {getattr(self.cmaes, name)}, expected an integer >= {lo}"
                )
        for name, lo in (
            ("iterations", 1),
            ("episodes_per_iteration", 1),
            ("tokenizer_steps_per_iteration", 0),
            ("prior_steps_per_iteration", 0),
            ("ppo_steps_per_iteration", 1),
            ("eval_episodes", 1),
            ("num_envs", 1),
            ("max_episode_steps", 1),
            ("direct_ppo_envs", 1),
        ):
            if getattr(self, name) < lo:
                raise ValueError(f"mbrl.{name}: got {getattr(self, name)}, expected an integer >= {lo}")
        if self.exploit_factor <= 0:
            raise ValueError(f"mbrl.exploit_factor: got {self.exploit_factor}, expected > 0")


ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    # the distilled planner is the learner measured best on Take Cover (README, Take Cover: 767 real tics against
    # CMA-ES's 305; train_policy.py --algo auto and the main job pick it too), at World Models' temperature for
    # its dream scores; it needs thousands of deaths, so a round collects 1000 episodes
    "vizdoom_take_cover": {"algo": "distill", "temperature": 1.15, "episodes_per_iteration": 1000},
}
"""Per real env, the :class:`MBRLConfig` fields whose default differs (:meth:`MBRLConfig.for_env`)."""

# The budgets that fix what each iteration trains to; a resumed run must keep them (the learner's own ones
# only for its algo).
_FIXED_BUDGETS = (
    "episodes_per_iteration",
    "tokenizer_steps_per_iteration",
    "prior_steps_per_iteration",
    "num_envs",
    "max_episode_steps",
    "seed",
    "algo",
    "temperature",
    "hazard_scale",
)
_LEARNER_BUDGETS = {
    "ppo": ("ppo_steps_per_iteration", "ppo"),
    "cmaes": ("cmaes", "collect_epsilon"),
    "distill": ("hazard", "distill", "collect_epsilon"),
}
# what a state written before a budget existed ran with
_BUDGETS_BEFORE = {"algo": "ppo", "temperature": 1.0, "hazard_scale": 1.0}


def store_transitions(store: str | os.PathLike) -> int:
    """Real env steps held by a store (transitions = frames - 1 per episode); 0 if there is no store."""
    if not Path(store, "store.json").exists():
        return 0
    st = EpisodeStore(store)
    return sum(st.length(e) - 1 for e in st.episode_ids())


def _store_episodes(store: str | os.PathLike) -> int:
    return len(EpisodeStore(store)) if Path(store, "store.json").exists() else 0


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` (dicts with :data:`CSV_FIELDS`) as a CSV atomically: a kill never leaves a half line."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS))
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


class _TqdmProgress(BaseCallback):
    """PPO progress bar with plain tqdm (SB3's own bar needs ``rich``, which is not a dependency here)."""

    def __init__(self, total: int, desc: str) -> None:
        super().__init__()
        self.total, self.desc = total, desc
        self.bar: Any = None

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def _load_state(run: Path, cfg: ExperimentConfig, m: MBRLConfig) -> dict[str, Any] | None:
    path = run / STATE_FILE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("schema") != STATE_SCHEMA:
        raise ValueError(
            f"{path}: schema {state.get('schema')!r}, expected {STATE_SCHEMA}; use a new run directory"
        )
    now = _budgets(cfg, m)
    for k, v in now.items():
        was = state["budgets"].get(k, _BUDGETS_BEFORE.get(k))
        if was != v:
            raise ValueError(
                f"run directory {run} holds an MBRL run with {k}={was!r}, but got "
                f"{k}={v!r}; resume with the same budgets (only iterations, eval_episodes, "
                f"direct_ppo_baseline, direct_ppo_envs and exploit_factor may change) or use a new run directory"
            )
    return state


def _budgets(cfg: ExperimentConfig, m: MBRLConfig) -> dict[str, Any]:
    out = {k: asdict(m)[k] for k in (*_FIXED_BUDGETS, *_LEARNER_BUDGETS[m.algo])}
    out.update(
        env=cfg.env,
        store=str(Path(cfg.data.store).resolve()),
        tokenizer_steps=cfg.tokenizer_train.steps,
        prior_steps=cfg.prior_train.steps,
    )
    return out


def _save_state(run: Path, state: dict[str, Any]) -> None:
    write_json(run / STATE_FILE, state)


def _score_from_row(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {
        "mean": row[f"{prefix}_return"],
        "std": row[f"{prefix}_return_std"],
        "mean_length": row[f"{prefix}_length"],
        "episodes": row["eval_episodes"],
    }


def _dream_vec_env(wm: WorldModel, m: MBRLConfig) -> DreamVecEnv:
    """``m.num_envs`` dream envs of ``wm`` at ``m.temperature``, episodes capped at ``m.max_episode_steps``: PPO's
    training env and every learner's dream score."""
    return DreamVecEnv(
        m.num_envs,
        world_model=wm,
        max_episode_steps=m.max_episode_steps,
        temperature=m.temperature,
        hazard_scale=m.hazard_scale,
        # the distilled policy's dream ends episodes with the unroll it was distilled from
        termination_source="unroll" if m.algo == "distill" else "head",
    )


def _dream_cmaes(
    wm: WorldModel, m: MBRLConfig, it: int, progress: bool
) -> tuple[LinearController, list[dict]]:
    """A fresh controller evolved in the dream of ``wm`` (seed ``m.seed + it``); returns it and its generation log."""

    def log(row: dict[str, float]) -> None:
        if progress:
            print(
                f"round {it} generation {row['generation']:3d}: mean {row['mean_return']:7.1f}  "
                f"best {row['best_return']:7.1f}  sigma {row['sigma']:.3f}  ({row['seconds']:.1f} s)"
            )

    return train_cmaes_in_dream(
        wm, m.cmaes, seed=m.seed + it, log=log, temperature=m.temperature, hazard_scale=m.hazard_scale
    )


def _dream_ppo(
    model: PPO | None,
    wm: WorldModel,
    m: MBRLConfig,
    it: int,
    tb_dir: Path,
    ret_rms: dict[str, float] | None,
    progress: bool,
) -> tuple[PPO, DreamVecEnv, VecNormalize]:
    """Create (round 0) or continue the PPO model for ``m.ppo_steps_per_iteration`` steps in the dream of ``wm``."""
    venv = _dream_vec_env(wm, m)
    venv.seed(m.seed + it)
    # Rewards normalised by a running std of the discounted return, as in envs.policy.train_ppo (HGS
    # returns are in the hundreds); the statistics continue across rounds like the policy does.
    norm = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=m.ppo.gamma)
    if ret_rms is not None:
        norm.ret_rms.mean, norm.ret_rms.var = np.float64(ret_rms["mean"]), np.float64(ret_rms["var"])
        norm.ret_rms.count = float(ret_rms["count"])
    if model is None:
        model = PPO(
            "CnnPolicy",
            norm,
            seed=m.seed,
            device="cpu",
            verbose=0,
            tensorboard_log=str(tb_dir),
            **asdict(m.ppo),
        )
    else:
        model.set_env(norm)
    cb = [_TqdmProgress(m.ppo_steps_per_iteration, f"PPO in the dream (round {it})")] if progress else []
    model.learn(m.ppo_steps_per_iteration, reset_num_timesteps=False, callback=cb, tb_log_name="PPO")
    return model, venv, norm


def _load_loop_policy(run: Path, rel: str, trust_pickle: bool) -> PPO:
    """The loop's PPO model named by the run state: a path inside ``run``; an SB3 zip (runs from before
    policy files) only with ``trust_pickle``."""
    path = resolve_in_dir(run, rel, f"{run / STATE_FILE}: 'policy'")
    if not path.is_file():
        raise FileNotFoundError(f"{run / STATE_FILE}: 'policy' names {rel!r}, which is not a file in {run}")
    if is_zip(path):
        model = load_sb3_zip(path, trust_pickle=trust_pickle, algo="PPO", device="cpu")
        model.tensorboard_log = str(run / "tb_mbrl")
    else:
        model = load_algorithm(path, device="cpu", tensorboard_log=str(run / "tb_mbrl"))
    if not isinstance(model, PPO):
        raise ValueError(f"{path}: holds {type(model).__name__}, expected the loop's PPO")
    return model


def _loop_policy_path(run: Path, rel: str, algo: str) -> Path:
    """The round policy named by the run state: a path inside ``run`` holding a controller directory (cmaes) or a
    frame-policy file (distill)."""
    path = resolve_in_dir(run, rel, f"{run / STATE_FILE}: 'policy'")
    ok, what = (
        (is_controller, "controller directory") if algo == "cmaes" else (is_frame_policy, "frame-policy file")
    )
    if not ok(path):
        raise FileNotFoundError(f"{run / STATE_FILE}: 'policy' names {rel!r}, which is not a {what} in {run}")
    return path


def _dream_distill(
    wm: WorldModel, store: str | os.PathLike, run: Path, m: MBRLConfig, it: int, progress: bool
) -> tuple[FramePolicy, dict[str, Any], WorldModel]:
    """A fresh hazard unroll fitted on ``store`` (written into the bundle ``run``) and a fresh frame policy distilled
    from the planner over it (seed ``m.distill.seed + it``); returns the policy, both metrics and the bundle with
    the new unroll."""
    hazard_metrics = fit_hazard(wm, EpisodeStore(store), m.hazard, progress=progress)
    wm = WorldModel.from_pretrained(run)
    dcfg = replace(m.distill, seed=m.distill.seed + it)
    policy, metrics = distill_planner(wm, EpisodeStore(store), dcfg, progress=progress)
    return policy, {"hazard": hazard_metrics, "distill": metrics}, wm


@dataclass
class _Learned:
    """One round's learner: what the real and dream scores call, and how its policy file is written."""

    policy: Any  # SB3's predict(): the PPO model, a controller or a FrameStackActor
    venv: DreamVecEnv  # the dream it is scored in
    agent_steps: int  # the learner's agent steps in the dream (the CSV's ppo_timesteps)
    wm: WorldModel  # the bundle as the round left it (distill: with the round's unroll)
    save: Callable[[], Path]  # writes the round's policy (and, for PPO, its return statistics into the state)
    model: PPO | None = None  # PPO: the model the next round continues


def _learn(
    model: PPO | None,
    wm: WorldModel,
    store: str,
    run: Path,
    m: MBRLConfig,
    it: int,
    state: dict[str, Any],
    progress: bool,
) -> _Learned:
    """Round ``it``'s learner in the dream of ``wm`` (step 3 of the module docstring)."""
    policies = run / "policies"
    if m.algo == "ppo":
        model, venv, norm = _dream_ppo(model, wm, m, it, run / "tb_mbrl", state["ret_rms"], progress)

        def save_ppo() -> Path:
            r = norm.ret_rms
            state["ret_rms"] = {"mean": float(r.mean), "var": float(r.var), "count": float(r.count)}
            return save_policy(model, policies / f"mbrl-iter{it:03d}.safetensors")

        return _Learned(model, venv, int(model.num_timesteps), wm, save_ppo, model)
    if m.algo == "distill":
        fp, metrics, wm = _dream_distill(wm, store, run, m, it, progress)  # wm: with the round's unroll
        path = policies / f"distill-iter{it:03d}.safetensors"
        return _Learned(
            FrameStackActor(fp),
            _dream_vec_env(wm, m),
            int(metrics["distill"]["imagined_steps"]),
            wm,
            lambda: save_frame_policy(path, fp, {"round": it, **metrics}),
        )
    ctrl, history = _dream_cmaes(wm, m, it, progress)
    return _Learned(
        ctrl,
        _dream_vec_env(wm, m),
        cmaes_agent_steps(history, m.cmaes),
        wm,
        lambda: save_controller(
            ctrl, policies / f"controller-iter{it:03d}", {"round": it, "history": history}
        ),
    )


def _collect_args(run: Path, state: dict[str, Any], m: MBRLConfig, model: PPO | None) -> dict[str, Any]:
    """collect()'s policy arguments for this round: random in round 0, then the loop's current policy."""
    if m.algo in ("cmaes", "distill"):
        if not state["policy"]:
            return {"policy": "random"}
        path = _loop_policy_path(run, state["policy"], m.algo)
        # a controller reads frames through the bundle; a frame policy reads them itself
        bundle = {"checkpoint": run} if m.algo == "cmaes" else {}
        return {"policy": str(path), **bundle, "epsilon": m.collect_epsilon}
    if model is None:
        return {"policy": "random"}
    return {"policy": lambda obs, mdl=model: mdl.predict(obs, deterministic=False)[0]}


def run_mbrl(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    m: MBRLConfig,
    *,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the loop for the real-env preset ``cfg`` in ``run_dir``; returns the final report.

    Args:
        cfg: a preset whose ``env`` is a real env (``vizdoom_*`` or ``gym:<ID>``, :mod:`envs.real`); its
            ``data.store`` is the store the loop collects into (created if missing, grown otherwise: a
            store that already holds episodes counts them as real data used) and its training
            budgets are round 0's.
        run_dir: the world-model bundle and all loop outputs (see the module docstring).
        m: the loop's budgets.
        env_kwargs: real-env options for collection, evaluation and the direct baseline (ViZDoom:
            ``health_bar``, ``frame_skip``, ``battle2_path``, ``max_episode_steps``; ``gym:`` envs: ``module``,
            ``make_kwargs``, ``pixels``, ``frame_skip``, ``sticky_actions``, ``max_episode_steps``); the
            resolution is ``cfg.data.resolution``.
        trust_pickle: resume a run whose state names an SB3 ``.zip`` policy (written before policy files);
            loading one unpickles it and runs any code it holds.

    Returns:
        ``{"env", "algo", "iterations": [CSV rows], "real_env_steps", "mbrl": score, "random": score,
        "direct_ppo": score + "real_env_steps" (if enabled), "mbrl_vs_random", "mbrl_vs_direct_ppo",
        "minutes" (wall time of this call)}`` where a score is ``{"mean", "std", "mean_length", "episodes"}`` of real returns.
    """
    from torch.utils.tensorboard import SummaryWriter

    if not is_real_env(cfg.env):
        raise ValueError(
            f"cfg.env: got {cfg.env!r}; the loop needs a real env: a ViZDoom preset (vizdoom_hgs, "
            f"vizdoom_battle2, vizdoom_take_cover) or 'gym:<Gymnasium id>'"
        )
    m.validate()
    env_kwargs = dict(env_kwargs or {})
    if "resolution" in env_kwargs:
        raise ValueError("env_kwargs: 'resolution' is set by cfg.data.resolution; remove it from env_kwargs")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    store, H = cfg.data.store, cfg.data.resolution
    t_start = time.monotonic()

    state = _load_state(run, cfg, m)
    if state is None:
        state = {
            "schema": STATE_SCHEMA,
            "budgets": _budgets(cfg, m),
            "base_episodes": _store_episodes(store),
            "rows": [],
            "policy": None,
            "ret_rms": None,
            "baselines": None,
        }
    rows: list[dict[str, Any]] = state["rows"]
    model: PPO | None = (
        _load_loop_policy(run, state["policy"], trust_pickle) if state["policy"] and m.algo == "ppo" else None
    )
    writer = SummaryWriter(str(run / "tb_mbrl"))
    try:
        for it in range(len(rows), m.iterations):
            t0 = time.monotonic()
            # 1. real data from the current policy (round 0: sticky random actions); collect() tops the
            # store up to a total count, so a killed round resumes without duplicating episodes
            before = store_transitions(store)
            rep = collect(
                cfg.env,
                store,
                state["base_episodes"] + m.episodes_per_iteration * (it + 1),
                **_collect_args(run, state, m, model),
                seed=m.seed + 1000 * it,
                env_kwargs={"resolution": H, **env_kwargs},
                progress=progress,
                asynchronous=False,
                num_envs=1,
            )  # one env: no in-flight episode is dropped uncounted
            real_steps = store_transitions(store)
            # 2. world model, continued: the step counters persist, so each round raises the targets
            tok_steps = cfg.tokenizer_train.steps + it * m.tokenizer_steps_per_iteration
            prior_steps = cfg.prior_train.steps + it * m.prior_steps_per_iteration
            cfg_it = replace(
                cfg,
                tokenizer_train=replace(cfg.tokenizer_train, steps=tok_steps),
                prior_train=replace(cfg.prior_train, steps=prior_steps),
            )
            if it == 0 or m.tokenizer_steps_per_iteration:
                train_tokenizer(cfg_it, run, progress=progress)
            encode_tokens(
                cfg_it, run, progress=progress
            )  # re-encodes: the store grew (or the tokenizer changed)
            train_prior(cfg_it, run, progress=progress)
            wm = WorldModel.from_pretrained(run)
            # 3. the learner in the dream of the updated model (PPO continues; CMA-ES and distill start afresh)
            learned = _learn(model, wm, store, run, m, it, state, progress)
            model, policy, venv, agent_steps = (
                learned.model,
                learned.policy,
                learned.venv,
                learned.agent_steps,
            )
            wm = learned.wm
            # 4. evaluate in reality and in the dream (the same seeds every round: comparable rows); a latent
            # controller reads the world model's state, tracked on the real frames and the dream's own
            latent = isinstance(policy, LinearController) and policy.cfg.features == "latent"
            wrap = partial(VecLatentObservation, wm=wm) if latent else None
            real = score_real(policy, cfg.env, H, m.eval_episodes, seed=m.seed, wrap=wrap, **env_kwargs)
            dream = score_dream(policy, wrap(venv) if wrap else venv, m.eval_episodes, seed=m.seed)
            venv.close()
            if dream.mean > m.exploit_factor * real.mean:
                warnings.warn(
                    f"round {it}: dream return {dream.mean:.1f} > {m.exploit_factor} x real return "
                    f"{real.mean:.1f}: the policy may be exploiting errors of the world model",
                    DreamExploitWarning,
                    stacklevel=2,
                )
            row = {
                "iteration": it,
                "episodes": _store_episodes(store),
                "real_env_steps": real_steps,
                "new_real_steps": real_steps - before,
                # None when a resumed round found its episodes already collected
                "collect_return": float(np.mean(rep.returns)) if rep.returns else None,
                "tokenizer_steps": tok_steps,
                "prior_steps": prior_steps,
                "ppo_timesteps": agent_steps,
                "real_return": real.mean,
                "real_return_std": real.std,
                "real_length": real.mean_length,
                "dream_return": dream.mean,
                "dream_return_std": dream.std,
                "dream_length": dream.mean_length,
                "gap": dream.mean - real.mean,
                "eval_episodes": real.episodes,
                "minutes": round((time.monotonic() - t0) / 60, 3),
            }
            # the policy file first, then the state naming it: a kill in between repeats this round's learner
            # from the previous policy instead of training it twice
            saved = learned.save()
            state["policy"] = str(saved.relative_to(run))
            rows.append(row)
            _save_state(run, state)
            write_csv(run / CSV_FILE, rows)
            for k in ("real_return", "dream_return", "gap", "real_env_steps", "collect_return"):
                if row[k] is not None:
                    writer.add_scalar(f"mbrl/{k}", row[k], it)
            writer.add_scalar("mbrl_by_real_steps/real_return", row["real_return"], real_steps)
            writer.flush()
            if progress:
                print(
                    f"round {it}: {real_steps} real steps, real return {real.mean:.1f}, dream {dream.mean:.1f}, "
                    f"gap {dream.mean - real.mean:+.1f} ({row['minutes']:.1f} min)"
                )
        if m.algo == "ppo":
            assert model is not None  # iterations >= 1
            save_policy(model, run / "policies" / "ppo_mbrl.safetensors")
        report = _report(cfg, run, m, state, env_kwargs, progress)
        for k in ("random", "direct_ppo"):
            if k in report:
                writer.add_scalar(f"mbrl/{k}_return", report[k]["mean"], len(rows) - 1)
    finally:
        writer.close()
    report["minutes"] = round((time.monotonic() - t_start) / 60, 2)
    write_json(run / REPORT_FILE, report)
    return report


def _report(
    cfg: ExperimentConfig,
    run: Path,
    m: MBRLConfig,
    state: dict[str, Any],
    env_kwargs: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """The loop's last real score against random and direct-PPO baselines (cached in the state per budget)."""
    rows, H = state["rows"], cfg.data.resolution
    steps = int(rows[-1]["real_env_steps"])
    key = {
        "real_env_steps": steps,
        "eval_episodes": m.eval_episodes,
        "direct_ppo": m.direct_ppo_baseline,
        "direct_ppo_envs": m.direct_ppo_envs,
    }
    cached = state.get("baselines") or {}
    if cached.get("key") != key:
        cached = {
            "key": key,
            "random": asdict(score_real(None, cfg.env, H, m.eval_episodes, seed=m.seed, **env_kwargs)),
        }
        if m.direct_ppo_baseline:
            direct, used = direct_ppo(cfg.env, H, steps, m, env_kwargs, progress=progress)
            cached["direct_ppo"] = {**asdict(direct), "real_env_steps": used}
        state["baselines"] = cached
        _save_state(run, state)
    report: dict[str, Any] = {
        "env": cfg.env,
        "algo": m.algo,
        "iterations": rows,
        "real_env_steps": steps,
        "mbrl": _score_from_row(rows[-1], "real"),
        "random": cached["random"],
    }
    if "direct_ppo" in cached:
        report["direct_ppo"] = cached["direct_ppo"]
    report["mbrl_vs_random"] = return_ratio(report["mbrl"]["mean"], report["random"]["mean"])
    if "direct_ppo" in report:
        report["mbrl_vs_direct_ppo"] = return_ratio(report["mbrl"]["mean"], report["direct_ppo"]["mean"])
    return report


def direct_ppo(
    env: str,
    resolution: int,
    steps: int,
    m: MBRLConfig,
    env_kwargs: dict[str, Any] | None = None,
    *,
    progress: bool = False,
) -> tuple[Score, int]:
    """SB3 PPO (``CnnPolicy``, the loop's hyperparameters) trained in the real env for ``steps`` env steps, then
    scored there for ``m.eval_episodes`` episodes.

    SB3 trains on whole rollouts of ``n_steps × direct_ppo_envs`` steps, so the budget is rounded up to
    the next rollout (the baseline gets at most one rollout more real data than the loop). Returns the
    score and the real env steps actually taken.
    """
    if steps < 1:
        raise ValueError(f"steps: got {steps}, expected >= 1 real env steps")
    env_kwargs = dict(env_kwargs or {})
    n = m.direct_ppo_envs
    venv = real_vec_env(env, resolution, num_envs=n, **env_kwargs)
    # a short budget still gets several updates: at most a quarter of it per rollout (>= 8 steps per env)
    n_steps = min(m.ppo.n_steps, max(8, steps // (4 * n)))
    ppo = replace(m.ppo, n_steps=n_steps, batch_size=min(m.ppo.batch_size, n_steps * n))
    try:  # the engines are closed on every exit path
        model = PPO(
            "CnnPolicy",
            VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=ppo.gamma),
            seed=m.seed,
            device="cpu",
            verbose=0,
            **asdict(ppo),
        )
        cb = [_TqdmProgress(steps, "PPO in the real env (baseline)")] if progress else []
        model.learn(total_timesteps=steps, callback=cb)
    finally:
        venv.close()
    return score_real(model, env, resolution, m.eval_episodes, seed=m.seed, **env_kwargs), int(
        model.num_timesteps
    )
