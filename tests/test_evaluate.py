"""experiments/evaluate.py and worldmodel.evaluation on the tiny random-weight HGS bundle.

The bundle's prior has zero-initialised token logits, so its held-out NLL is exactly ln(codebook size):
that pins the bits/dim pipeline. Reward and termination heads are set to constants to check that the
teacher-forced predictions are aligned with the store's transitions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.bundle import WorldModel
from worldmodel.dynamics_eval import (
    encode_windows,
    open_loop,
    reconstruct,
    sample_clips,
    teacher_forced_episodes,
    window_starts,
)
from worldmodel.evaluation import EvalSettings, binary_scores, choose_threshold, fvd_section, heads_sections
from worldmodel.metrics import default_i3d_weights_path, psnr, ssim
from worldmodel.prior_heads import symlog
from worldmodel.store import EpisodeStore

REPO = Path(__file__).resolve().parents[1]


def run_evaluate_cli(checkpoint: Path, out: Path, *flags: str) -> tuple[dict, dict]:
    """Run experiments/evaluate.py on ``checkpoint`` into ``out`` (one thread, plus ``flags``); check that it
    succeeds, that its summary line names ``out/eval.json`` and that every plot the report lists is a PNG.
    Returns (summary line, eval.json)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments/evaluate.py"),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            *flags,
            "--threads",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval_json"] == str(out / "eval.json")
    rep = json.loads((out / "eval.json").read_text())
    for name in rep["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary, rep


@pytest.fixture(scope="module")
def dying_store(tmp_path_factory) -> Path:
    """Two whole HGS episodes of a random policy at 32x32 (random agents die: the last transition terminates)."""
    from envs.collect import collect

    root = tmp_path_factory.mktemp("dying_store")
    collect(
        "vizdoom_hgs",
        root,
        2,
        num_envs=1,
        asynchronous=False,
        progress=False,
        seed=3,
        env_kwargs={"resolution": 32},
    )
    return root


def test_evaluate_cli_writes_report_with_direct_baselines(tiny_bundle, hgs_store, tmp_path):
    out = tmp_path / "ev"
    horizon, context, n = 16, 4, 2
    _, rep = run_evaluate_cli(
        tiny_bundle, out, "--n-episodes", str(n), "--horizon", str(horizon), "--context", str(context)
    )
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries

    # copy-last baseline and reconstruction ceiling, recomputed directly from the store's frames
    store = EpisodeStore(hgs_store)
    assert rep["store"] == str(hgs_store) and rep["n_clips"] == n and len(rep["clips"]) == n
    frames = np.stack([store.read_clip(e, s, context + horizon)["frames"] for e, s in rep["clips"]])
    real = frames[:, context:]
    copy = np.repeat(frames[:, context - 1 : context], horizon, 1)
    ol = rep["open_loop"]
    assert ol["steps"] == list(range(1, horizon + 1))
    np.testing.assert_allclose(ol["psnr"]["copy_last"], psnr(copy, real).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ol["ssim"]["copy_last"], ssim(copy, real).mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        ol["psnr_gain_over_copy_last"],
        np.array(ol["psnr"]["model"]) - np.array(ol["psnr"]["copy_last"]),
        atol=1e-9,
    )
    assert ol["at_horizon"]["psnr_copy_last"] == ol["psnr"]["copy_last"][-1]
    wm = WorldModel.from_pretrained(tiny_bundle)
    recon = reconstruct(wm, frames)
    assert rep["reconstruction"]["psnr"] == pytest.approx(psnr(recon, frames).mean(), rel=1e-9)
    np.testing.assert_allclose(ol["psnr"]["ceiling"], psnr(recon[:, context:], real).mean(0), rtol=1e-9)
    for key in ("model", "shuffled_actions"):
        assert len(ol["psnr"][key]) == horizon and all(np.isfinite(ol["psnr"][key]))

    # zero-initialised logits: held-out NLL is exactly ln(32) nats = 5 bits per token of a 4x4 grid of a 32x32x3 frame
    bits = rep["bits"]
    assert bits["nats_per_token"] == pytest.approx(math.log(32), abs=1e-5)
    assert bits["bits_per_dim"] == pytest.approx(5.0 * 16 / (32 * 32 * 3), rel=1e-5)
    assert bits["n_windows"] > 0

    term = rep["termination"]
    assert term["n_transitions"] == sum(store.length(e) - 1 for e in term["episode_ids"])
    tuned = term["tuned"]  # a threshold chosen on 'val' episodes, or the reason there is none
    assert (tuned["threshold"] is None) == ("reason" in tuned)
    if tuned["threshold"] is not None:
        assert 0 < tuned["threshold"] < 1 and tuned["n_transitions"] == term["n_transitions"]
    assert rep["sampling"]["frames_per_s"] > 0 and rep["sampling"]["batch_size"] == n
    if default_i3d_weights_path().is_file():  # FVD with the real Kinetics-400 I3D
        assert rep["fvd_info"]["reason"] is None and rep["fvd_info"]["n_clips"] == n
        assert all(isinstance(rep[k], float) and rep[k] > -1e-3 for k in ("fvd", "fvd_star", "fvd_recon"))
    else:
        assert rep["fvd"] is None and "fetch_weights.py i3d" in rep["fvd_info"]["reason"]


def test_fvd_is_null_with_a_reason_instead_of_failing(tmp_path):
    v = np.zeros((3, 16, 32, 32, 3), np.uint8)
    with pytest.warns(UserWarning, match="FVD skipped"):
        out = fvd_section(v, v, v, weights=str(tmp_path / "missing.ckpt"))
    assert out["fvd"] is None and out["fvd_star"] is None
    assert "missing.ckpt" in out["fvd_info"]["reason"] and "fetch_weights.py i3d" in out["fvd_info"]["reason"]
    short = fvd_section(v[:, :8], v[:, :8], v[:, :8], weights=None)
    assert short["fvd"] is None and "16" in short["fvd_info"]["reason"]
    assert fvd_section(v[:1], v[:1], v[:1], weights=None)["fvd_info"]["reason"].startswith(
        "FVD needs at least 2"
    )


def test_window_starts_cover_every_transition_once_with_overlap():
    for frames in (2, 4, 16):
        for T in range(2, 60):
            starts = window_starts(T, frames)
            L = min(T, frames)
            covered = np.zeros(T - 1, int)
            for s in starts:
                assert 0 <= s and s + L <= T
                covered[s : s + L - 1] += 1
            assert covered.min() >= 1, (T, frames)  # every transition t -> t+1 lies inside some window
            assert covered.max() <= 2


def test_binary_scores_by_hand():
    pred = np.array([1, 1, 0, 0, 1], bool)
    true = np.array([1, 0, 1, 0, 0], bool)
    s = binary_scores(pred, true)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    none = binary_scores(np.zeros(3, bool), np.zeros(3, bool))
    assert none["precision"] is None and none["recall"] is None and none["f1"] is None
    with pytest.raises(ValueError, match="same shape"):
        binary_scores(np.zeros(3, bool), np.zeros(4, bool))


def _set_heads(wm: WorldModel, reward: float, term_logit: float) -> None:
    """Make the reward head output exactly ``reward`` and the termination head ``term_logit``."""
    with torch.no_grad():
        for head, value in (
            (wm.prior.reward_head, float(symlog(torch.tensor(reward)))),
            (wm.prior.term_head, term_logit),
        ):
            head[-1].weight.zero_()
            head[-1].bias.fill_(value)


def test_teacher_forced_heads_are_aligned_with_the_store(tiny_bundle, dying_store, one_thread):
    wm = WorldModel.from_pretrained(tiny_bundle)
    store = EpisodeStore(dying_store)
    ids = store.episode_ids()
    eps = [store.load(e) for e in ids]
    assert all(ep.terminated[-1] and not ep.terminated[:-1].any() for ep in eps)  # random HGS agents die
    rewards = np.concatenate([ep.rewards for ep in eps])
    n_trans = len(rewards)

    tf = teacher_forced_episodes(wm, store, ids)
    assert [len(p) for p in tf.term_prob] == [len(ep) - 1 for ep in eps]
    assert all(np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all() for p in tf.term_prob)
    # transition t -> t+1 is read at block t+1 of a window holding frames <= t+1: check the first window directly
    F = wm.cfg.prior.frames
    tokens = encode_windows(wm, eps[0].frames[None, :F])
    with torch.inference_mode():
        direct = wm.prior(tokens, torch.as_tensor(eps[0].actions[None, : F - 1]))
    np.testing.assert_allclose(
        tf.term_prob[0][: F - 1], torch.sigmoid(direct.term_logit[0, 1:]).numpy(), rtol=1e-5
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the two episodes may all be in the train split (fallback warns)
        _set_heads(wm, reward=3.0, term_logit=20.0)  # always predicts "terminated", reward 3
        reward, term, _ = heads_sections(wm, store, "test", n=5)
        assert term["recall"] == 1.0 and term["precision"] == pytest.approx(len(eps) / n_trans)
        assert term["n_positive"] == len(eps) and term["n_terminating_episodes"] == len(eps)
        assert reward["mae_teacher_forced"] == pytest.approx(np.abs(rewards - 3.0).mean(), rel=1e-5)
        assert reward["mae_constant_baseline"] == pytest.approx(np.abs(rewards - np.median(rewards)).mean())

        _set_heads(wm, reward=-100.0, term_logit=-20.0)  # never predicts "terminated"
        reward, term, _ = heads_sections(
            wm, store, "test", n=1
        )  # one episode: the terminating one comes first
        assert term["recall"] == 0.0 and term["precision"] is None and term["n_episodes"] == 1
        assert reward["mae_teacher_forced"] == pytest.approx(np.abs(tf.rewards[0] + 100.0).mean(), rel=1e-5)


def test_reward_scores_read_the_output_of_the_real_outcome(tiny_bundle, dying_store, one_thread):
    """With a reward per outcome (``reward_given_termination``), the teacher-forced MAEs score the output
    matching the real termination and the ``*_expected`` ones the p(terminated)-weighted mix."""
    base = WorldModel.from_pretrained(tiny_bundle)
    wm = WorldModel(
        replace(base.cfg, prior=replace(base.cfg.prior, reward_given_termination=True)), base.store_meta
    )
    wm.tokenizer.load_state_dict(base.tokenizer.state_dict())
    wm.eval()
    p = 0.1
    with torch.no_grad():
        for head, bias in (
            (wm.prior.reward_head[-1], symlog(torch.tensor([4.0, -100.0]))),
            (wm.prior.term_head[-1], torch.tensor([math.log(p / (1 - p))])),
        ):
            head.weight.zero_()
            head.bias.copy_(bias)
    store = EpisodeStore(dying_store)
    eps = [store.load(e) for e in store.episode_ids()]
    r = np.concatenate([ep.rewards for ep in eps])
    d = np.concatenate([ep.terminated for ep in eps]).astype(bool)
    assert d.sum() == len(eps) and r[d].max() < -90  # HGS deaths: about -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the two episodes may all be in the train split (fallback warns)
        reward, _, _ = heads_sections(wm, store, "test", n=5)
    expected = p * -100.0 + (1 - p) * 4.0
    assert reward["reward_given_termination"] is True
    assert reward["mae_teacher_forced"] == pytest.approx(
        np.abs(np.where(d, -100.0, 4.0) - r).mean(), rel=1e-4
    )
    assert reward["mae_on_terminal"] == pytest.approx(np.abs(-100.0 - r[d]).mean(), rel=1e-4)
    assert reward["mae_on_terminal"] < 10  # the one-output head's measured ~96-100 on HGS
    assert reward["mae_teacher_forced_expected"] == pytest.approx(np.abs(expected - r).mean(), rel=1e-4)
    assert reward["mae_on_terminal_expected"] == pytest.approx(np.abs(expected - r[d]).mean(), rel=1e-4)
    # open loop: both outputs, picked by the real termination or mixed by p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clips = sample_clips(store, n=2, length=4, seed=0)
    ro = open_loop(wm, clips.frames, clips.actions, context=1, horizon=3)
    np.testing.assert_allclose(
        ro.rewards_given(clips.terminated), np.where(clips.terminated, -100.0, 4.0), rtol=1e-5
    )
    np.testing.assert_allclose(ro.expected_rewards, np.full((2, 3), expected), rtol=1e-5)


def test_open_loop_replays_actions_and_rejects_short_input(tiny_bundle, hgs_store, one_thread):
    wm = WorldModel.from_pretrained(tiny_bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clips = sample_clips(EpisodeStore(hgs_store), n=2, length=8, seed=1)
    a = open_loop(wm, clips.frames, clips.actions, context=3, horizon=5)
    b = open_loop(wm, clips.frames, clips.actions, context=3, horizon=5)
    assert a.frames.shape == (2, 5, 32, 32, 3) and a.rewards.shape == a.entropy.shape == (2, 5)
    np.testing.assert_array_equal(a.frames, b.frames)  # greedy decoding is deterministic
    with pytest.raises(ValueError, match="frames/actions"):
        open_loop(wm, clips.frames, clips.actions[:, :4], context=3, horizon=5)
    with pytest.raises(ValueError, match="n_episodes"):
        EvalSettings(n_episodes=0).validate()


def test_choose_threshold_maximises_f1_between_scores():
    prob = np.array([0.05, 0.1, 0.3, 0.35, 0.4])
    true = np.array([False, False, True, False, True])
    # accepting >= 0.4: F1 2/3; >= 0.3: 2 of 3 predicted, F1 0.8 -> midway between 0.3 and 0.1
    assert choose_threshold(prob, true) == pytest.approx(0.2)
    assert binary_scores(prob > choose_threshold(prob, true), true)["recall"] == 1.0
    assert choose_threshold(prob, np.zeros(5, bool)) is None


# ------------------------------------------------ whole-clip action-conditioned bundles (the paper's protocol)
@pytest.fixture(scope="module")
def clip_bundle(tmp_path_factory, hgs_store) -> Path:
    """A tiny whole-clip action-conditioned vizdoom_hgs bundle, the paper-protocol geometry shrunk: 16-frame clips
    at temporal stride 2 (8 latent frames of 4x4 tokens, decoded as one clip) and the clip's 15 actions as one
    condition vector. Both stages train 2 steps (token cache with pixel-rate actions included); then the token head
    and the conditional LayerNorms are perturbed (both start at zero) so that the sampled clips depend on the
    actions."""
    from tests.conftest import tiny_experiment
    from worldmodel.stages import train_prior, train_tokenizer

    cfg = tiny_experiment(hgs_store, clip_len=16, steps=2)
    cfg = replace(
        cfg,
        tokenizer=replace(cfg.tokenizer, stride=(2, 8, 8)),
        prior=replace(cfg.prior, frames=8, action_cond="clip", clip_actions=15),
    )
    run = tmp_path_factory.mktemp("clip_bundle") / "vizdoom_hgs-clip"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_tokenizer(cfg, run, progress=False)
        assert train_prior(cfg, run, progress=False).step == 2
    finally:
        torch.set_num_threads(n)
    wm = WorldModel.from_pretrained(run)
    torch.manual_seed(1)
    with torch.no_grad():
        torch.nn.init.normal_(wm.prior.head.weight, std=0.5)
        for m in wm.prior.modules():
            if getattr(m, "to_gain_bias", None) is not None:
                torch.nn.init.normal_(m.to_gain_bias.weight, std=1.0)
    wm.save_pretrained(run)
    return run


def test_evaluate_cli_clip_report_for_a_whole_clip_conditioned_bundle(
    clip_bundle, hgs_store, tmp_path, one_thread
):
    """experiments/evaluate.py on a bundle that cannot be stepped: reconstruction and FVD/FVD*/FVD(recon) on real
    16-frame clips and clips sampled under their real actions; the per-step sections are absent, each with its
    reason."""
    from worldmodel.video_sampling import sample_videos

    out, n = tmp_path / "ev", 2
    summary, rep = run_evaluate_cli(clip_bundle, out, "--n-episodes", str(n))
    assert summary["fvd"] == rep["fvd"]
    assert rep["protocol"] == "clip" and rep["preset"] == "vizdoom_hgs"
    assert rep["n_clips"] == n and len(rep["clips"]) == n and rep["clip_frames"] == 16

    # no open loop, heads, dream episodes or bits: absent, each with the reason
    absent = ("open_loop", "reward", "termination", "dream_episodes", "bits")
    assert not set(absent) & set(rep)
    assert set(rep["not_evaluated"]) == set(absent)
    assert all("action_cond='clip'" in why and "stepped" in why for why in rep["not_evaluated"].values())

    # reconstruction of the real clips (temporal stride 2: whole 16-frame windows), recomputed from the store
    store = EpisodeStore(hgs_store)
    frames = np.stack([store.read_clip(e, s, 16)["frames"] for e, s in rep["clips"]])
    actions = np.stack([store.read_clip(e, s, 16)["actions"] for e, s in rep["clips"]])
    wm = WorldModel.from_pretrained(clip_bundle)
    recon = reconstruct(wm, frames)
    assert recon.shape == frames.shape == (n, 16, 32, 32, 3)
    rec = rep["reconstruction"]
    assert rec["psnr"] == pytest.approx(psnr(recon, frames).mean(), rel=1e-9)
    assert rec["ssim"] == pytest.approx(ssim(recon, frames).mean(), rel=1e-9)
    assert rec["n_frames"] == n * 16 and np.isfinite(rec["psnr"])

    # clips sampled from nothing under the clip's 15 real actions, one frame per real frame
    smp = rep["sampling"]
    assert smp["clip_shape"] == [n, 16, 32, 32, 3] and smp["actions_shape"] == [n, 15]
    assert smp["batch_size"] == n and smp["frames_per_s"] > 0 and smp["temperature"] == 0.0
    v = sample_videos(wm, n, actions=actions, temperature=0.0, seed=0)
    assert v.shape == frames.shape
    np.testing.assert_array_equal(v, sample_videos(wm, n, actions=actions, temperature=0.0, seed=0))
    other = (actions + 1) % wm.cfg.prior.n_actions  # the whole clip's actions condition every frame
    assert not np.array_equal(v, sample_videos(wm, n, actions=other, temperature=0.0, seed=0))
    with pytest.raises(ValueError, match="action_cond='clip'"):
        sample_videos(wm, n, actions=actions[:, :8])

    if default_i3d_weights_path().is_file():  # FVD with the real Kinetics-400 I3D on the 16-frame clips
        assert rep["fvd_info"]["reason"] is None and rep["fvd_info"]["n_clips"] == n
        assert all(isinstance(rep[k], float) and rep[k] > -1e-3 for k in ("fvd", "fvd_star", "fvd_recon"))
    else:
        assert rep["fvd"] is None and "fetch_weights.py i3d" in rep["fvd_info"]["reason"]
