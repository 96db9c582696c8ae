"""The hazard unroll (worldmodel/hazard.py): roots and targets, causality, learning an action-dependent end,
the bundle round trip, and the dream env's ``termination_source="unroll"``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.dream import DreamVectorEnv
from tests.conftest import TINY_RES, make_bundle, tiny_experiment, write_rule_store
from worldmodel.bundle import WorldModel
from worldmodel.hazard import (
    HazardConfig,
    HazardUnroll,
    hazard_loss,
    sample_roots,
    save_hazard,
    step_hazards,
    train_hazard,
)
from worldmodel.store import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5  # from this transition on, action 1 ends the episode


@pytest.fixture(scope="module")
def rule_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hazard")
    store = write_rule_store(root / "store", lambda i, t, a: a == 1 and t >= WARMUP)
    return make_bundle(tiny_experiment(store, name="vizdoom_take_cover", clip_len=4), root / "bundle")


def test_roots_targets_masks_and_weights(rule_bundle):
    store = EpisodeStore(WorldModel.from_pretrained(rule_bundle).store_path)
    cfg = HazardConfig(horizon=3, context=2, roots_per_episode=2)
    ids = store.episode_ids()
    r = sample_roots(store, ids, cfg, np.random.default_rng(0), 0)
    # every root's weight counts the roots it stands for: per episode they sum to its T - C + 1 roots
    total = sum(store.length(i) - 1 - cfg.context + 1 for i in ids if store.length(i) - 1 >= cfg.context)
    assert r["weights"].sum() == pytest.approx(total)
    # each target is the one step that ended its episode, inside the mask, and nothing is past the end
    for u, y, m in zip(r["actions"], r["targets"], r["mask"]):
        if y.any():
            k = int(np.flatnonzero(y)[0])
            assert y.sum() == 1 and m[k] == 1 and m[k + 1 :].sum() == 0
            assert u[k] == 1  # the rule: the ending step took action 1
        else:
            assert m.all()


def test_loss_is_ended_by_step_k():
    torch.manual_seed(0)
    u = HazardUnroll(1, 16, "discrete", 2, horizon=4, hidden=8)
    frames = torch.randint(0, 256, (3, 1, 16, 16, 3), dtype=torch.uint8)
    actions = torch.randint(0, 2, (3, 4))
    # row 0 ends at step 2; row 1 reaches a time limit after step 3; row 2 lives through all four
    targets = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    w = torch.tensor([1.0, 2.0, 1.0])
    lg = u(frames, actions)
    y = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)  # ended by step k
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(lg, y, reduction="none")
    want = ((bce * keep).sum(1) * w).sum() / w.sum()
    assert torch.allclose(hazard_loss(u, frames, actions, targets, mask, w), want)
    # per-step hazards from "ended by": 1 - (1 - P_k) / (1 - P_{k-1})
    P = torch.tensor([[0.1, 0.28, 0.28]])
    assert torch.allclose(step_hazards(P), torch.tensor([[0.1, 0.2, 0.0]]), atol=1e-6)


def test_unroll_is_causal():
    torch.manual_seed(0)
    u = HazardUnroll(2, 16, "discrete", 3, horizon=5, hidden=8)
    z = torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8)
    a = torch.randint(0, 3, (4, 5))
    b = a.clone()
    b[:, 3:] = (b[:, 3:] + 1) % 3  # change only the actions of steps 4 and 5
    la, lb = u(z, a), u(z, b)
    assert torch.equal(la[:, :3], lb[:, :3])
    assert not torch.allclose(la[:, 3:], lb[:, 3:])


def test_learns_an_action_dependent_end_and_round_trips(rule_bundle, tmp_path):
    wm = WorldModel.from_pretrained(rule_bundle)
    cfg = HazardConfig(horizon=3, context=2, hidden=32, roots_per_episode=8, steps=600, batch=64, lr=1e-3)
    unroll, metrics = train_hazard(wm, EpisodeStore(wm.store_path), cfg, progress=False)
    assert metrics["val_roots"] > 0 and 0 <= metrics["val_auc_within_horizon"] <= 1
    # after the warm-up, action 1 ends the episode and action 0 never does: the unroll must tell them apart
    z = torch.full((16, 2, TINY_RES, TINY_RES, 3), 128, dtype=torch.uint8)
    with torch.no_grad():
        p1 = torch.sigmoid(unroll(z, torch.ones(16, 3, dtype=torch.long)))[:, 0]
        p0 = torch.sigmoid(unroll(z, torch.zeros(16, 3, dtype=torch.long)))[:, 0]
    assert (p1 - p0).mean() > 0.15
    # written into a copy of the bundle, it loads with it
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(rule_bundle, dst)
    save_hazard(dst, unroll, cfg, metrics)
    wm2 = WorldModel.from_pretrained(dst)
    assert wm2.hazard is not None and wm2.hazard_cfg.horizon == 3
    for k, v in unroll.state_dict().items():
        assert torch.equal(wm2.hazard.state_dict()[k], v)
    assert json.loads((dst / "hazard.json").read_text())["metrics"]["val_roots"] == metrics["val_roots"]


def test_dream_env_unroll_termination(rule_bundle, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(rule_bundle, dst)
    wm = WorldModel.from_pretrained(dst)
    with pytest.raises(ValueError, match="train_hazard.py"):
        DreamVectorEnv(2, world_model=wm, termination_source="unroll")
    with pytest.raises(ValueError, match="termination_source: got 'frames'"):
        DreamVectorEnv(2, world_model=wm, termination_source="frames")
    torch.manual_seed(0)
    cfg = HazardConfig(horizon=2, context=2, hidden=8)
    save_hazard(dst, HazardUnroll(2, TINY_RES, "discrete", 2, horizon=2, hidden=8), cfg, {})
    wm = WorldModel.from_pretrained(dst)
    u = wm.hazard
    env = DreamVectorEnv(2, world_model=wm, termination_source="unroll", termination="never")
    obs, _ = env.reset(seed=0)
    hist = [obs, obs]  # a one-frame context: the root repeats its frame
    root, since = 0, []
    for t, a in enumerate([[1, 0], [0, 0], [1, 1]]):
        if t - root == cfg.horizon:  # after K steps the unroll re-roots at the newest two frames
            root, since = t, []
        since.append(a)
        frames = torch.from_numpy(np.stack(hist[len(hist) - 2 - (t - root) : len(hist) - (t - root)], 1))
        acts = torch.tensor(since + [[0, 0]] * (cfg.horizon - len(since))).T  # (2, K), the rest masked
        with torch.no_grad():
            e, f = u.embed(frames), u.action_features(acts)
            now = torch.sigmoid(u.logits_at(e, f, torch.full((2,), t - root)))
            before = torch.sigmoid(u.logits_at(e, f, torch.full((2,), t - root - 1))) if t > root else 0 * now
            want = (1 - (1 - now) / (1 - before)).clamp(0, 1).numpy()  # P(this step ends it | alive)
        obs, _, _, _, info = env.step(np.array(a))
        hist.append(obs)
        np.testing.assert_allclose(info["terminated_prob"], want, rtol=1e-5, atol=1e-6)


def test_cli_writes_the_unroll(rule_bundle, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(rule_bundle, dst)
    out = subprocess.run(
        [
            sys.executable,
            "experiments/train_hazard.py",
            "--checkpoint",
            str(dst),
            "--hazard.steps",
            "5",
            "--hazard.context",
            "2",
            "--hazard.roots-per-episode",
            "2",
            "--threads",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["train_roots"] > 0 and (dst / "hazard.json").exists()
    assert WorldModel.from_pretrained(dst).hazard is not None
