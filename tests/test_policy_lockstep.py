"""Policy lockstep (issue 18): the policy drives the real game, the dream follows, the report shows where they part.

Real ViZDoom engines, real SB3 policies saved and loaded as policy files, a real CMA-ES controller directory,
moviepy/PyAV for the videos and TensorBoard's own event reader: nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import av
import numpy as np
import pytest
import torch
from PIL import Image
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from envs.callbacks import LockstepVideoCallback
from envs.controller import ControllerConfig, LinearController, TokenFeatures, save_controller
from envs.dream import DreamEnv
from envs.follow import follow_trace, has_real_env, make_bundle_real_env
from envs.policy_file import save_policy_file
from envs.policy_probe import ControllerProbe, SB3Probe, open_probe
from tests.conftest import TINY_RES, make_bundle, tiny_experiment, write_continuous_store
from worldmodel.bundle import WorldModel
from worldmodel.metrics.image import psnr
from worldmodel.rollout_report import write_report
from worldmodel.rollout_summary import optimism_figure, summarize
from worldmodel.rollout_video import (
    BAR_FILL,
    BAR_PICK,
    DreamTrack,
    PolicyTrack,
    RolloutTrace,
    panel_lines,
    prob_bar_boxes,
    trace_frames,
)

ROOT = Path(__file__).resolve().parents[1]
PROBS = np.array([0.1, 0.2, 0.4, 0.25, 0.05])  # the known policy's distribution over the 5 HGS actions
VALUE = 3.5  # ... and its value estimate, on every frame


def known_policy(bundle: Path, path: Path) -> Path:
    """A PPO policy file whose action distribution is PROBS and whose value is VALUE on every frame: the last
    layers' weights are zero, their biases the log-probabilities and the value."""
    model = PPO("MlpPolicy", DreamEnv(checkpoint=bundle), n_steps=8, batch_size=8, seed=0, device="cpu")
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.copy_(torch.log(torch.as_tensor(PROBS, dtype=torch.float32)))
        model.policy.value_net.weight.zero_()
        model.policy.value_net.bias.fill_(VALUE)
    return save_policy_file(model, path)


@pytest.fixture(scope="module")
def known_file(tiny_bundle, tmp_path_factory) -> Path:
    return known_policy(tiny_bundle, tmp_path_factory.mktemp("known") / "known.safetensors")


def _bar_fills(panel: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Filled pixels of each probability bar (middle row of its box) and the bars drawn in the highlight colour."""
    fills, picked = [], []
    for i, (x0, y0, x1, y1) in enumerate(prob_bar_boxes(panel.shape[0], n)):
        row = panel[(y0 + y1) // 2, x0:x1]
        fill = np.all(row == BAR_FILL, -1) | np.all(row == BAR_PICK, -1)
        fills.append(int(fill.sum()))
        if np.all(row == BAR_PICK, -1).any():
            picked.append(i)
    return fills, picked


def test_overlays_carry_the_policys_real_probabilities(tiny_bundle, known_file, one_thread):
    wm = WorldModel.from_pretrained(tiny_bundle)
    probe = open_probe(known_file, wm)  # loaded from the safetensors policy file, as rollout.py does
    assert isinstance(probe, SB3Probe)
    env = make_bundle_real_env(wm)
    try:
        tr = follow_trace(wm, env, probe, steps=6, resync_every=2, seed=3)
    finally:
        env.close()
    T = tr.steps
    assert 1 <= T <= 6 and tr.real.shape == tr.dream.shape == tr.resync.frames.shape == (
        T + 1,
        TINY_RES,
        TINY_RES,
        3,
    )
    for track in (tr.policy_real, tr.policy_dream):  # read on every real and every dream frame
        assert np.allclose(track.probs, PROBS[None].repeat(T + 1, 0), atol=1e-6)
        assert np.allclose(track.value, VALUE) and track.scores is None
        assert np.all(track.choice == PROBS.argmax())
    rng = np.random.default_rng(3)  # the actions taken are draws of exactly that distribution, seeded
    assert tr.actions.tolist() == [int(rng.choice(5, p=PROBS / PROBS.sum())) for _ in range(T)]
    assert np.array_equal(tr.dream[0], tr.real[0]) and np.array_equal(tr.resync.frames[0], tr.real[0])
    assert tr.disagreements().tolist() == []  # the policy ignores the frame: it never chooses differently

    scale, pad = 8, 2  # 256-pixel panels: bars labelled
    S = TINY_RES * scale
    frames = trace_frames(tr, scale)
    assert len(frames) == T + 1 and frames[0].shape == (
        2 * S + 3 * pad,
        3 * S + 4 * pad,
        3,
    )  # 2 rows × 3 panels
    width = prob_bar_boxes(S, 5)[0][2] - prob_bar_boxes(S, 5)[0][0]
    expected = [int(round(float(np.float32(p)) * width)) for p in PROBS]  # bar length = p × width, in pixels
    for t, f in enumerate(frames):
        real_panel, dream_panel = (
            f[pad : pad + S, pad : pad + S],
            f[pad : pad + S, 2 * pad + S : 2 * pad + 2 * S],
        )
        fills, picked = _bar_fills(real_panel, 5)
        assert fills == expected
        assert picked == (
            [int(tr.actions[t])] if t < T else []
        )  # the action taken next; none after the last step
        fills, picked = _bar_fills(dream_panel, 5)
        assert fills == expected and picked == [int(PROBS.argmax())]  # on the dream: its choice there
        lines = panel_lines(tr, t)
        assert f"V={VALUE:.2f}" in lines["real"] and f"V={VALUE:.2f}" in lines["dream"]
        if t:
            assert f"r={tr.reward_real[t - 1]:+.2f}" in " ".join(lines["real"])
            assert f"psnr={float(psnr(tr.dream[t], tr.real[t])):.1f}" in lines["diff"]
            assert f"p(end)={tr.term_prob[t - 1]:.2f}" in " ".join(lines["dream"])
            assert f"H={tr.entropy[t - 1]:.2f}" in lines["dream"]


def test_controller_probabilities_are_its_one_hot_choice(tiny_bundle, tmp_path, one_thread):
    wm = WorldModel.from_pretrained(tiny_bundle)
    feats = TokenFeatures(wm)
    cfg = ControllerConfig(n_features=feats.dim, n_actions=5, n_components=feats.n_components)
    w = np.zeros((cfg.n_outputs, cfg.n_inputs), np.float32)
    w[3, -1] = 1.0  # the bias input votes for action 3 on every frame
    path = save_controller(LinearController(cfg, feats, w.reshape(-1)), tmp_path / "ctrl")
    probe = open_probe(path, wm)
    assert isinstance(probe, ControllerProbe)
    env = make_bundle_real_env(wm)
    try:
        tr = follow_trace(wm, env, probe, steps=4, resync_every=0, seed=0)
    finally:
        env.close()
    assert tr.resync is None and tr.actions.tolist() == [3] * tr.steps
    for track in (tr.policy_real, tr.policy_dream):
        assert np.array_equal(track.probs, np.eye(5, dtype=np.float32)[[3] * (tr.steps + 1)])
        assert track.value is None and np.allclose(track.scores, w[:, -1][None])
    lines = panel_lines(tr, 1)
    assert "V n/a" in lines["real"] and "s=+0.00,+0.00,+0.00,+1.00,+0.00" in lines["real"]
    frames = trace_frames(tr, 8)
    assert frames[0].shape[0] == TINY_RES * 8 + 4  # one row: no re-synced dream
    summary = summarize(tr)
    assert summary.mean_value_real is None and summary.disagreement_steps == ()
    assert summary.resync_every is None


def _constructed_trace() -> RolloutTrace:
    """4 steps with known rewards, frame errors and policy choices."""
    real = np.zeros((5, 8, 8, 3), np.uint8)
    dream = real.copy()
    for t, d in enumerate([0, 5, 5, 40, 5]):  # constant error d -> PSNR 20 log10(255 / d)
        dream[t] += np.uint8(d)
    probs = np.full((5, 2), 0.5, np.float32)
    return RolloutTrace(
        dream=dream,
        actions=np.array([0, 1, 1, 0]),
        reward_pred=np.array([1.0, 2.0, 3.0, 4.5], np.float32),
        term_prob=np.array([0.0, 0.1, 0.2, 0.9], np.float32),
        entropy=np.ones(4, np.float32),
        real=real,
        reward_real=np.array([1.0, 1.0, 1.0, -10.0], np.float32),
        terminated_real=np.array([0, 0, 0, 1], bool),
        action_names=("left", "right"),
        resync=DreamTrack(
            real.copy(),
            np.array([1.0, 1.0, 1.0, -9.0], np.float32),
            np.zeros(4, np.float32),
            np.ones(4, np.float32),
            1,
        ),
        policy_real=PolicyTrack(np.array([0, 1, 1, 0, 1]), probs, np.array([1, 2, 3, 4, 5], np.float32)),
        policy_dream=PolicyTrack(np.array([0, 0, 1, 1, 1]), probs, np.array([1, 1, 1, 1, 1], np.float32)),
        policy_name="known",
    )


def test_optimism_figure_equals_the_sums_it_claims():
    tr = _constructed_trace()
    fig = optimism_figure(tr)
    top, gap = fig.axes
    lines = {ln.get_label().split(":")[0]: np.asarray(ln.get_ydata()) for ln in top.get_lines()}
    assert np.allclose(lines["real"], [0, 1, 2, 3, -7])
    assert np.allclose(lines["dream, open loop"], [0, 1, 3, 6, 10.5])
    assert np.allclose(lines["dream, re-synced every 1"], [0, 1, 2, 3, -6])
    gaps = {
        ln.get_label(): np.asarray(ln.get_ydata())
        for ln in gap.get_lines()
        if not ln.get_label().startswith("_")
    }
    assert np.allclose(gaps["open loop"], [0, 0, 1, 3, 17.5]) and np.allclose(
        gaps["re-synced every 1"], [0, 0, 0, 0, 1]
    )
    title = top.get_title()
    assert "+17.50" in title and "predicted 10.50" in title and "real -7.00" in title and "4 steps" in title
    assert "real: -7.00" in [t.get_text() for t in top.get_legend().get_texts()]
    import matplotlib.pyplot as plt

    plt.close(fig)

    s = summarize(tr, psnr_threshold=20.0)
    assert (s.real_return, s.predicted_return, s.optimism) == (-7.0, 10.5, 17.5)
    assert s.predicted_return_resync == -6.0 and s.optimism_resync == 1.0
    assert s.first_divergence_step == 3  # 16.1 dB at step 3; 34.2 dB before
    assert s.first_divergence_step_resync is None and s.real_terminated_step == 4
    assert s.disagreement_steps == (1, 3) and s.disagreement_rate == 0.5  # choices 0 1 1 0 1 vs 0 0 1 1 1
    assert s.mean_tv_distance == 0.0 and s.mean_value_real == 3.0 and s.mean_value_dream == 1.0
    assert s.mean_psnr_db == pytest.approx(np.mean(psnr(tr.dream[1:], tr.real[1:])))
    assert "choice 0 != real 1" in panel_lines(tr, 1)["dream"] and not any(
        "!=" in x for x in panel_lines(tr, 2)["dream"]
    )
    info = panel_lines(tr, 4)["info"]  # the running sums of the bottom-left panel
    assert "sum r real   -7.0" in info and "sum r^ open  +10.5" in info and "  optimism   +17.5" in info


class _Refs(HTMLParser):
    """Every URL an HTML page references (src, href, poster, data) and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href", "poster", "data") and v is not None]


def test_report_html_references_only_files_that_exist(tmp_path):
    files, summary = write_report(
        _constructed_trace(), tmp_path / "out" / "my rollout", scale=2, fps=4.0, meta={"policy": "known"}
    )
    html_path = files["html"]
    assert html_path == tmp_path / "out" / "my rollout.html"
    parser = _Refs()
    parser.feed(html_path.read_text(encoding="utf-8"))
    parser.close()
    assert {"video", "img", "table"} <= parser.tags
    assert parser.refs
    for ref in parser.refs:
        url = urlparse(ref)
        assert not url.scheme and not url.netloc and "/" not in url.path, ref  # a file beside the page
        assert (html_path.parent / unquote(url.path)).is_file(), ref
    names = {unquote(r) for r in parser.refs}
    assert {
        "my rollout.mp4",
        "my rollout.gif",
        "my rollout.png",
        "my rollout-optimism.png",
        "my rollout.json",
    } <= names
    with av.open(str(files["mp4"])) as c:
        assert len(list(c.decode(video=0))) == 5
    doc = json.loads(files["json"].read_text())
    assert doc["summary"]["optimism"] == 17.5 and doc["summary"]["disagreement_steps"] == [1, 3]
    assert summary.first_divergence_step == 3


def test_callback_writes_the_lockstep_video_to_tensorboard(tiny_bundle, tmp_path, one_thread):
    wm = WorldModel.from_pretrained(tiny_bundle)
    model = PPO(
        "MlpPolicy",
        DreamEnv(checkpoint=tiny_bundle),
        n_steps=8,
        batch_size=8,
        n_epochs=1,
        seed=0,
        device="cpu",
    )
    model.set_logger(configure(str(tmp_path / "tb"), ["tensorboard"]))
    made = []

    def real_env():
        made.append(make_bundle_real_env(wm))
        return made[-1]

    cb = LockstepVideoCallback(wm, real_env, every=8, steps=4, resync_every=1, seed=0)
    model.learn(total_timesteps=16, callback=cb)  # 2 rollouts of 8 steps -> videos at 8 and 16 timesteps
    model.logger.close()
    assert [h["timesteps"] for h in cb.history] == [8, 16] and len(made) == 1
    assert made[0].game is None  # the env the callback made was closed at the end of training

    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    ea = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    videos = ea.Images("lockstep/video")
    assert [v.step for v in videos] == [8, 16]
    for v, h in zip(videos, cb.history):
        assert v.encoded_image_string[:6] == b"GIF89a"
        import io

        gif = Image.open(io.BytesIO(v.encoded_image_string))
        assert gif.n_frames == h["steps"] + 1 and (gif.height, gif.width) == (v.height, v.width)
    assert [e.encoded_image_string[:4] for e in ea.Images("lockstep/optimism")] == [b"\x89PNG"] * 2
    opt = [s.value for s in ea.Scalars("lockstep/optimism")]
    assert opt == pytest.approx([h["optimism"] for h in cb.history], rel=1e-5)


@pytest.fixture(scope="module")
def vizdoom_bundles(tmp_path_factory, tiny_bundle):
    """Tiny bundles (random weights) of the three ViZDoom presets over a few real episodes each."""
    from envs.collect import collect

    root = tmp_path_factory.mktemp("vizdoom_bundles")
    out = {"vizdoom_hgs": tiny_bundle}
    for preset in ("vizdoom_battle2", "vizdoom_take_cover"):
        collect(
            preset,
            root / f"{preset}_store",
            2,
            num_envs=1,
            asynchronous=False,
            progress=False,
            env_kwargs={"resolution": TINY_RES, "max_episode_steps": 8},
        )
        out[preset] = make_bundle(tiny_experiment(root / f"{preset}_store", name=preset), root / preset)
    return out


@pytest.mark.parametrize("preset", ["vizdoom_hgs", "vizdoom_battle2", "vizdoom_take_cover"])
def test_follow_runs_for_every_vizdoom_id(vizdoom_bundles, preset, one_thread):
    wm = WorldModel.from_pretrained(vizdoom_bundles[preset])
    assert has_real_env(wm)
    env = make_bundle_real_env(wm)
    try:
        tr = follow_trace(wm, env, open_probe("random", wm), steps=3, context=2, seed=1)
    finally:
        env.close()
    assert (
        tr.steps == 3
        and tr.actions.max() < wm.action_spec.n
        and tr.policy_real.probs.shape == (4, wm.action_spec.n)
    )
    assert tr.action_names == tuple(wm.action_spec.names)
    again = make_bundle_real_env(wm)
    try:
        tr2 = follow_trace(wm, again, open_probe("random", wm), steps=3, context=2, seed=1)
    finally:
        again.close()
    assert np.array_equal(tr.real, tr2.real) and np.array_equal(tr.dream, tr2.dream)  # seeded
    assert np.array_equal(tr.actions, tr2.actions)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_rollout_cli_follow_writes_report_and_dataset_ids_fall_back(tiny_bundle, known_file, tmp_path):
    out = tmp_path / "rollouts" / "follow"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "rollout.py"),
            "--checkpoint",
            str(tiny_bundle),
            "--policy",
            str(known_file),
            "--mode",
            "follow",
            "--steps",
            "5",
            "--resync-every",
            "2",
            "--upscale",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["mode"] == "follow" and isinstance(last["dream_optimism"], float)
    for key in ("mp4", "gif", "png", "optimism", "json", "html"):
        assert Path(last[key]).is_file(), key
    assert f"report: {out.with_suffix('.html')}" in res.stdout
    assert (
        "dream optimism" in res.stdout
        and "chooses differently" in res.stdout
        and "first step below" in res.stdout
    )

    store = write_continuous_store(tmp_path / "bair_store", source="bair", dim=4)
    bair = make_bundle(tiny_experiment(store, name="bair"), tmp_path / "bair-tiny")
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "rollout.py"),
            "--checkpoint",
            str(bair),
            "--env",
            "bair",
            "--policy",
            "random",
            "--mode",
            "follow",
            "--steps",
            "3",
            "--upscale",
            "1",
            "--out",
            str(tmp_path / "bair"),
            "--no-gif",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "falling back to the recorded-episode lockstep" in res.stderr and "'bair'" in res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["mode"] == "episode" and Path(last["html"]).is_file() and "gif" not in last


def test_train_policy_lockstep_option_writes_videos_to_tensorboard(tiny_bundle64, tmp_path):
    import shutil

    run = tmp_path / "vizdoom_hgs-tiny"
    shutil.copytree(tiny_bundle64, run)
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "train_policy.py"),
        "--checkpoint",
        str(run),
        "--timesteps",
        "64",
        "--num-envs",
        "2",
        "--ppo.n-steps",
        "16",
        "--ppo.batch-size",
        "32",
        "--ppo.n-epochs",
        "1",
        "--max-episode-steps",
        "8",
        "--no-progress",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--lockstep-every",
        "32",
        "--lockstep-steps",
        "3",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    (events,) = (run / "tb_policy").rglob("events.out.tfevents.*")
    ea = EventAccumulator(str(events), size_guidance={"images": 0})
    ea.Reload()
    assert [v.step for v in ea.Images("lockstep/video")] == [32, 64]
    assert len(ea.Images("lockstep/optimism")) == 2 and "lockstep/mean_psnr_db" in ea.Tags()["scalars"]

    res = subprocess.run([*cmd, "--algo", "cmaes"], capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode != 0 and "--lockstep-every is an SB3 callback of --algo ppo" in res.stderr
