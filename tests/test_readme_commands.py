"""Every command of the README's Quickstart and "Pieces" sections runs, at micro scale, and writes what it says.

The commands are read from README.md itself: the Quickstart's and Pieces' code blocks (``bash`` lines and the
Quickstart's Python snippet) and the Pieces table's ``command`` column. Each one must have an entry in
``CASES`` (the flags appended to shrink it to seconds, and what to check afterwards), so a command added to
the README without one fails here. The ``pip install ... &&`` prefix is dropped (this environment is that
install) and ``python -m pytest`` is the suite itself. Commands run as written (script, flags, relative
paths) with the micro flags appended after them (a repeated flag's last value wins), in one scratch
directory, in dependency order: the main job first collects ``data/vizdoom_hgs`` and writes the bundle
``runs/vizdoom_hgs-tiny`` that the later commands find by themselves, as a user's would.

``sample.py --checkpoint runs/ucf101-tiny`` needs UCF-101, which cannot be downloaded here: its bundle is
built from a tiny store converted from real-format UCF-101 files (``tests/fixtures_formats.py``), with
the ``ucf101`` preset's geometry and conditioning (101 classes) and random weights.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPET = "<Quickstart python snippet>"
SECTIONS = ("Quickstart", "Pieces")


# ---------------------------------------------------------------------------------------------- README parsing


def _sections(text: str) -> dict[str, str]:
    """``## `` sections of the README by title (each with its ``###`` subsections)."""
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def _commands_of_line(line: str) -> list[str]:
    """The commands of one shell line: ``&&``-separated, comments dropped, ``pip`` and the test suite skipped."""
    tokens = shlex.split(line, comments=True)
    cmds, cur = [], []
    for tok in [*tokens, "&&"]:
        if tok != "&&":
            cur.append(tok)
            continue
        if cur and cur[0] != "pip" and cur[:3] != ["python", "-m", "pytest"]:
            cmds.append(" ".join(cur))
        cur = []
    return cmds


def _table_commands(body: str) -> list[str]:
    rows = [r for r in body.splitlines() if r.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col = header.index("command")
    cmds = []
    for row in rows[2:]:  # after the header and the |---| line
        cell = [c.strip() for c in row.strip("|").split("|")][col]
        code = re.findall(r"`([^`]+)`", cell)
        assert code, f"README Pieces table: no `command` in row {row!r}"
        cmds += _commands_of_line(code[0])
    return cmds


def readme_commands() -> tuple[list[str], str]:
    """The README's commands in order (duplicates dropped) and the Quickstart's Python snippet."""
    sections = _sections(README.read_text())
    cmds, snippets = [], []
    for name in SECTIONS:
        body = sections[name]
        for lang, code in re.findall(r"^```(\w*)\n(.*?)^```", body, flags=re.M | re.S):
            if lang == "python":
                snippets.append(code)
                cmds.append(SNIPPET)
            else:
                assert lang in ("bash", "sh", ""), (
                    f"README {name}: a ```{lang} block the test does not know how to run"
                )
                for line in code.splitlines():
                    cmds += _commands_of_line(line)
        if name == "Pieces":
            cmds += _table_commands(body)
    assert len(snippets) == 1, "expected one Python snippet in the Quickstart"
    return list(dict.fromkeys(cmds)), snippets[0]


# ---------------------------------------------------------------------------------------------- micro flags

TRAIN_MICRO = [
    "--device",
    "cpu",
    "--threads",
    "1",
    "--config.collect-episodes",
    "4",
    "--config.data.clip-len",
    "4",
    "--config.tokenizer.channels",
    "16",
    "--config.tokenizer.n-res-layers",
    "1",
    "--config.tokenizer.n-heads",
    "2",
    "--config.tokenizer.codebook-size",
    "32",
    "--config.tokenizer.embedding-dim",
    "8",
    "--config.tokenizer.max-frames",
    "4",
    "--config.prior.n-layer",
    "1",
    "--config.prior.n-head",
    "2",
    "--config.prior.n-embd",
    "32",
    "--config.prior.vocab-size",
    "32",
    "--config.prior.frames",
    "4",
]


def train_micro(steps: int) -> list[str]:
    """train.py at micro scale: a 4-episode store, a tiny tokenizer and prior, ``steps`` steps per stage."""
    out = list(TRAIN_MICRO)
    for section in ("tokenizer-train", "prior-train"):
        out += [
            f"--config.{section}.steps",
            str(steps),
            f"--config.{section}.batch-size",
            "2",
            f"--config.{section}.warmup-steps",
            "1",
            f"--config.{section}.log-every",
            "1",
            f"--config.{section}.eval-every",
            str(steps),
            f"--config.{section}.ckpt-every",
            str(steps),
        ]
    return out


POLICY_MICRO = [
    "--timesteps",
    "64",
    "--num-envs",
    "2",
    "--ppo.n-steps",
    "32",
    "--ppo.batch-size",
    "32",
    "--ppo.n-epochs",
    "1",
    "--eval-episodes",
    "1",
    "--max-episode-steps",
    "8",
    "--no-progress",
    "--device",
    "cpu",
    "--threads",
    "1",
]
ROLLOUT_MICRO = ["--steps", "4", "--upscale", "1", "--device", "cpu"]
PLAY_KEYS = "up,left,tab,up+right,tab,up"
PLAY_MICRO = ["--keys", PLAY_KEYS, "--record", "play.mp4", "--scale", "1", "--device", "cpu"]
COLLECT_MICRO = ["--episodes", "2", "--num-envs", "1"]
EVAL_MICRO = [
    "--n-episodes",
    "2",
    "--context",
    "2",
    "--horizon",
    "2",
    "--no-fvd",
    "--dream-episodes",
    "1",
    "--dream-max-steps",
    "4",
    "--threads",
    "1",
]
MBRL_MICRO = [
    "--no-progress",
    "--threads",
    "1",
    "--tokenizer-steps",
    "2",
    "--prior-steps",
    "2",
    "--real-max-episode-steps",
    "20",
    "--mbrl.iterations",
    "1",
    "--mbrl.episodes-per-iteration",
    "2",
    "--mbrl.ppo-steps-per-iteration",
    "32",
    "--mbrl.eval-episodes",
    "1",
    "--mbrl.num-envs",
    "2",
    "--mbrl.max-episode-steps",
    "8",
    "--mbrl.ppo.n-steps",
    "16",
    "--mbrl.ppo.batch-size",
    "32",
    "--mbrl.ppo.n-epochs",
    "1",
    "--mbrl.no-direct-ppo-baseline",
]
SAMPLE_MICRO = ["--n", "2", "--upscale", "1"]


@dataclass
class Result:
    cmd: str
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, float]  # files of the scratch directory (relative path -> mtime) before the command ran


@dataclass
class Case:
    micro: list[str]
    check: Callable[[Path, Result], None]
    prepare: Callable[[Path], None] | None = None


# ---------------------------------------------------------------------------------------------- checks


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _new(root: Path, r: Result, pattern: str) -> list[Path]:
    """Files matching ``pattern`` under ``root`` written (created or changed) by the command."""
    return sorted(
        p
        for p in root.glob(pattern)
        if str(p.relative_to(root)) not in r.before or p.stat().st_mtime > r.before[str(p.relative_to(root))]
    )


def _store(path: Path, episodes: int, n_actions: int) -> None:
    from worldmodel.store import EpisodeStore

    assert (path / "store.json").is_file() and list(path.glob("shard-*.h5"))
    store = EpisodeStore(path)
    assert len(store) == episodes and store.meta.action_spec.n == n_actions
    assert all(store.length(e) > 1 for e in store.episode_ids())


def _trained(run: Path, stage: str) -> dict:
    from worldmodel.checkpoint import load_trainer_state

    return load_trainer_state(run, stage)


def _last_json(r: Result) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


HGS = Path("runs/vizdoom_hgs-tiny")


def check_main_job(root: Path, r: Result) -> None:
    _store(root / "data/vizdoom_hgs", 4, 5)
    run = root / HGS
    for f in ("config.json", "model.safetensors", "tokens.h5", "recon.png"):
        assert (run / f).stat().st_size > 100, f
    assert any((run / "tb").rglob("events.*"))
    assert _trained(run, "tokenizer")["step"] == 2 and _trained(run, "prior")["step"] == 2
    summary = r.stdout.split("== summary ==")[1]
    assert "tokenizer: 2 steps" in summary and "prior: 2 steps" in summary
    assert "VideoGPTDream-VizdoomHGS-v0" in summary and str(run.resolve()) in summary
    assert f"tensorboard --logdir {(run / 'tb').resolve()}" in summary
    videos = _new(root, r, f"{HGS}/rollouts/*.mp4")  # lockstep real · dream · |diff| and a random policy
    assert len(videos) == 2 and all(len(_decode(v)) >= 2 for v in videos)
    assert all(str(v.relative_to(root)) in summary for v in videos)  # the summary names them


def check_snippet(root: Path, r: Result) -> None:
    rep = _last_json(r)
    assert rep["checkpoint"] == str((root / HGS).resolve())  # found the main job's bundle under ./runs
    assert (
        rep["obs"] == [64, 64, 3] and np.isfinite(rep["reward"]) and {"step", "entropy"} <= set(rep["info"])
    )
    assert rep["num_envs"] == 16 and rep["vec_obs"] == [16, 64, 64, 3]


def check_train_policy(root: Path, r: Result) -> None:
    from envs.policy_file import read_policy_file

    policy = root / HGS / "policies/ppo_dream.safetensors"
    assert policy in _new(root, r, f"{HGS}/policies/*.safetensors")
    meta, tensors = read_policy_file(policy)  # a policy file (no pickle) holding PPO's weights
    assert meta["algo"] == "PPO" and tensors
    report = _last_json(r)  # --eval-real: the policy and a random one in the dream and in the real env
    assert report["real_random"] > 0 and {"real_ppo", "dream_ppo", "real_return_vs_random"} <= set(report)


def check_rollout_policy(root: Path, r: Result) -> None:
    (mp4,) = _new(root, r, f"{HGS}/rollouts/ppo_dream-*.mp4")
    frames = _decode(mp4)
    assert 2 <= len(frames) <= 5 and frames[0].shape == (64, 64, 3)  # the dream panel alone, upscale 1
    assert mp4.with_suffix(".gif").is_file() and mp4.with_suffix(".png").stat().st_size > 1000


def check_rollout_episode(root: Path, r: Result) -> None:
    (mp4,) = _new(root, r, f"{HGS}/rollouts/lockstep-*-0.mp4")
    frames = _decode(mp4)
    assert len(frames) == 5 and frames[0].shape[1] > 3 * 64  # real · dream · |diff| side by side
    assert "mean_psnr_db" in _last_json(r)


def check_rollout_follow(root: Path, r: Result) -> None:
    (html,) = _new(root, r, f"{HGS}/rollouts/follow-ppo_dream-*.html")
    for f in (
        html.with_suffix(".mp4"),
        html.with_suffix(".gif"),
        html.with_suffix(".png"),
        html.with_suffix(".json"),
        html.with_name(f"{html.stem}-optimism.png"),
    ):
        assert f.is_file() and f.stat().st_size > 100, f
    frames = _decode(html.with_suffix(".mp4"))
    assert 2 <= len(frames) <= 5 and frames[0].shape == (
        2 * 64 + 6,
        3 * 64 + 8,
        3,
    )  # 2 rows × 3 panels, upscale 1
    out = _last_json(r)
    assert out["mode"] == "follow" and (root / out["html"]).resolve() == html.resolve()
    assert f"report: {out['html']}" in r.stdout and "dream optimism" in r.stdout


def check_play(root: Path, r: Result) -> None:
    frames = _decode(root / "play.mp4")
    assert len(frames) == len(PLAY_KEYS.split(",")) + 1 and frames[0].shape == (64, 64, 3)


def check_collect_hgs(root: Path, r: Result) -> None:
    _store(root / "data/vizdoom_hgs", 6, 5)  # resumes the main job's 4-episode store up to 6


def check_collect_battle2(root: Path, r: Result) -> None:
    _store(root / "data/battle2", 2, 8)


def check_stage(stage: str, steps: int, world_size: int = 1) -> Callable[[Path, Result], None]:
    def check(root: Path, r: Result) -> None:
        state = _trained(root / HGS, stage)
        assert state["step"] == steps and state.get("world_size", 1) == world_size
        assert _new(root, r, f"{HGS}/model.safetensors")
        if world_size == 1:
            assert f"{stage}: {steps} steps" in r.stdout

    return check


def check_encode(root: Path, r: Result) -> None:
    from worldmodel.token_cache import TokenCache

    assert _new(root, r, f"{HGS}/tokens.h5") and "token cache:" in r.stdout
    from worldmodel.store import EpisodeStore

    cache = TokenCache(root / HGS / "tokens.h5")
    # every episode of the store, including those the Pieces collect row added after the main job
    assert sorted(cache.episode_ids()) == sorted(EpisodeStore(root / "data/vizdoom_hgs").episode_ids())


def check_evaluate(root: Path, r: Result) -> None:
    rep = json.loads((root / HGS / "eval.json").read_text())
    assert {"open_loop", "bits", "termination", "reconstruction", "plots"} <= set(rep) and rep["n_clips"] == 2
    assert rep["fvd"] is None  # --no-fvd
    assert rep["open_loop"]["steps"] == [1, 2] and all(np.isfinite(rep["open_loop"]["psnr"]["model"]))
    for name in rep["plots"]:
        assert (root / HGS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_mbrl(root: Path, r: Result) -> None:
    run = root / "runs/vizdoom_hgs-tiny-mbrl"
    rows = (run / "mbrl.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + one iteration
    report = json.loads((run / "mbrl_report.json").read_text())
    assert report["real_env_steps"] > 0 and report["random"]["mean"] > 0
    assert (run / "policies/ppo_mbrl.safetensors").is_file() and (run / "model.safetensors").is_file()
    _store(run / "data", 2, 5)


def build_ucf101_bundle(root: Path) -> None:
    """``runs/ucf101-tiny``: the ucf101 preset (101 classes, action-free, 16 frames) over a converted real-format store."""
    from tests.conftest import make_bundle
    from tests.fixtures_formats import write_ucf
    from worldmodel.config import get_preset
    from worldmodel.sources import ucf101

    write_ucf(root / "ucf_raw", T=16, H=40, W=48)
    ucf101.convert(root / "ucf_raw", root / "data/ucf101", resolution=32, val_fraction=0.25, progress=False)
    cfg = get_preset("ucf101", "tiny")
    cfg = replace(
        cfg,
        data=replace(cfg.data, store=str(root / "data/ucf101")),
        tokenizer=replace(cfg.tokenizer, channels=16, n_res_layers=1, codebook_size=32, embedding_dim=8),
        prior=replace(cfg.prior, n_layer=1, n_head=2, n_embd=32, vocab_size=32),
    )
    make_bundle(cfg, root / "runs/ucf101-tiny")


def check_sample(root: Path, r: Result) -> None:
    out = _last_json(r)
    assert out["class_ids"] == "3 3" and out["frames"] == "16"
    mp4 = root / "runs/ucf101-tiny/samples/sample-0.mp4"
    assert (root / out["mp4"]).resolve() == mp4.resolve()  # the bundle's samples/ (relative to the cwd)
    frames = _decode(mp4)
    assert len(frames) == 16 and frames[0].shape == (32 + 4, 2 * 32 + 6, 3)  # one row of 2 samples, padded
    for i in range(2):
        gif = _decode(root / f"runs/ucf101-tiny/samples/sample-0-{i}.gif")
        assert len(gif) == 16 and gif[0].shape == (32, 32, 3)


# Keyed by the README command exactly as written (flags in order, comments dropped), in dependency order.
CASES: dict[str, Case] = {
    "python experiments/train.py --env vizdoom_hgs": Case(train_micro(2), check_main_job),
    SNIPPET: Case([], check_snippet),
    "python experiments/train_policy.py --env vizdoom_hgs --timesteps 50000 --eval-real": Case(
        POLICY_MICRO, check_train_policy
    ),
    "python experiments/rollout.py --env vizdoom_hgs --policy runs/vizdoom_hgs-tiny/policies/ppo_dream.safetensors": Case(
        ROLLOUT_MICRO, check_rollout_policy
    ),
    "python experiments/rollout.py --env vizdoom_hgs --policy episode": Case(
        ROLLOUT_MICRO, check_rollout_episode
    ),
    "python experiments/rollout.py --env vizdoom_hgs --policy runs/vizdoom_hgs-tiny/policies/ppo_dream.safetensors "
    "--mode follow": Case(ROLLOUT_MICRO, check_rollout_follow),
    "python experiments/play.py --env vizdoom_hgs": Case(PLAY_MICRO, check_play),
    "python experiments/collect.py --env vizdoom_hgs --episodes 20 --out data/vizdoom_hgs": Case(
        ["--episodes", "6", "--num-envs", "1"], check_collect_hgs
    ),
    # the stages continue the main job's bundle (resume), one step further each
    "python experiments/train.py --env vizdoom_hgs --stage tokenizer --scale tiny": Case(
        train_micro(3), check_stage("tokenizer", 3)
    ),
    "python experiments/train.py --env vizdoom_hgs --stage encode": Case(train_micro(3), check_encode),
    "python experiments/train.py --env vizdoom_hgs --stage prior --scale tiny": Case(
        train_micro(3), check_stage("prior", 3)
    ),
    "python experiments/train_policy.py --env vizdoom_hgs --eval-real": Case(
        POLICY_MICRO, check_train_policy
    ),
    "python experiments/evaluate.py --checkpoint runs/vizdoom_hgs-tiny": Case(EVAL_MICRO, check_evaluate),
    "python experiments/mbrl.py --env vizdoom_hgs": Case(MBRL_MICRO, check_mbrl),
    "python experiments/sample.py --checkpoint runs/ucf101-tiny --class-id 3": Case(
        SAMPLE_MICRO, check_sample, prepare=build_ucf101_bundle
    ),
    "torchrun --nproc_per_node 2 experiments/train.py --env vizdoom_hgs --stage tokenizer": Case(
        train_micro(4), check_stage("tokenizer", 4, world_size=2)
    ),
    "python experiments/collect.py --env vizdoom_battle2 --episodes 20 --out data/battle2": Case(
        COLLECT_MICRO, check_collect_battle2
    ),
}

# ---------------------------------------------------------------------------------------------- running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv_for(cmd: str, root: Path, snippet: str) -> list[str]:
    """The command's argv with the repository's scripts by absolute path and its micro flags appended."""
    if cmd == SNIPPET:
        script = root / "quickstart_snippet.py"
        script.write_text(
            snippet + "\n\n# appended by the test: what the snippet made\nimport json as _json\n"
            "print(_json.dumps({'checkpoint': str(env.unwrapped.world_model.path.resolve()),\n"
            "    'obs': list(obs.shape), 'reward': float(reward), 'info': sorted(info),\n"
            "    'num_envs': vec.num_envs, 'vec_obs': list(vec.reset(seed=0)[0].shape)}))\n"
            "vec.close()\n"
        )
        return [sys.executable, str(script)]
    argv = shlex.split(cmd)
    if argv[0] == "torchrun":  # the same interpreter, on a free port
        argv = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(_free_port()), *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    else:
        raise AssertionError(
            f"README command {cmd!r}: the test runs `python ...` and `torchrun ...` commands only"
        )
    scripts = [i for i, a in enumerate(argv) if a.startswith("experiments/")]
    assert len(scripts) == 1, f"README command {cmd!r}: expected one experiments/ script"
    script = ROOT / argv[scripts[0]]
    assert script.is_file(), f"README command {cmd!r}: {script} does not exist"
    argv[scripts[0]] = str(script)
    return argv + CASES[cmd].micro


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLDMODEL_HOME", "VIZDOOM_BATTLE2_PATH")}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        SDL_VIDEODRIVER="dummy",
        SDL_AUDIODRIVER="dummy",
        MPLBACKEND="Agg",
        HOME=str(root / "home"),
    )
    return env


class Chain:
    """Runs the README's commands in ``CASES`` order in one scratch directory, each at most once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands, self.snippet = readme_commands()
        self.results: dict[str, Result] = {}

    def result(self, cmd: str) -> Result:
        order = [c for c in CASES if c in self.commands]
        for c in order[: order.index(cmd) + 1]:
            if c not in self.results:
                self.results[c] = self._run(c)
        return self.results[cmd]

    def _run(self, cmd: str) -> Result:
        case = CASES[cmd]
        if case.prepare is not None:
            case.prepare(self.root)
        argv = argv_for(cmd, self.root, self.snippet)
        before = {
            str(p.relative_to(self.root)): p.stat().st_mtime for p in self.root.rglob("*") if p.is_file()
        }
        res = subprocess.run(
            argv, cwd=self.root, env=_env(self.root), capture_output=True, text=True, timeout=600
        )
        return Result(cmd, argv, res.returncode, res.stdout, res.stderr, before)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    root = tmp_path_factory.mktemp("readme")
    (root / "home").mkdir()
    return Chain(root)


def test_every_readme_command_has_a_micro_scale_case():
    cmds, snippet = readme_commands()
    assert (
        "python experiments/train.py --env vizdoom_hgs" in cmds and "gym.make(" in snippet
    )  # the parser works
    missing = [c for c in cmds if c not in CASES]
    assert not missing, (
        f"README commands without a micro-scale entry in CASES of {Path(__file__).name}: {missing}"
    )
    stale = [c for c in CASES if c not in cmds]
    assert not stale, f"CASES entries no longer in the README's Quickstart/Pieces (update them): {stale}"


def _in_run_order() -> list[str]:
    cmds = readme_commands()[0]
    return [c for c in CASES if c in cmds] + [c for c in cmds if c not in CASES]


@pytest.mark.parametrize("cmd", _in_run_order())
def test_readme_command_runs_and_writes_its_outputs(cmd, chain):
    assert cmd in CASES, f"README command {cmd!r} has no micro-scale entry in CASES"
    r = chain.result(cmd)
    failed = [c for c, x in chain.results.items() if x.returncode != 0 and c != cmd]
    assert r.returncode == 0, (
        f"{cmd!r} failed (ran as {shlex.join(r.argv)}; earlier failures: {failed})\n"
        f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    )
    CASES[cmd].check(chain.root, r)
