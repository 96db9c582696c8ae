"""Generic trainer: checkpoints, exact resume after a simulated kill, config round trip."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from worldmodel.checkpoint import has_weights, load_weights, read_run_config, write_run_config
from worldmodel.config import ExperimentConfig, TrainConfig, get_preset, preset_names
from worldmodel.store import ActionSpec, StoreWriter
from worldmodel.training import STEP_OVERHEAD, evaluate, fit, lr_at, plan_steps, probe_bf16
from worldmodel.training_data import ClipDataset


class ToyModel(nn.Module):
    """Predicts the mean of a clip's last frame from its first frame, with dropout (RNG-dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 3, 32), nn.Dropout(0.3), nn.Linear(32, 1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.losses: list[float] = []

    def compute_loss(self, batch):
        x = batch["frames"][:, 0].float() / 255
        y = batch["frames"][:, -1].float().mean(dim=(1, 2, 3)) / 255
        loss = ((self.net(x).squeeze(-1) - y) ** 2).mean()
        if self.training:
            self.calls += 1
            self.losses.append(loss.item())
        return loss, {"mse": loss.item()}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    with StoreWriter(root, source="t", obs_shape=(4, 4, 3), action_spec=ActionSpec.discrete(3)) as w:
        for _ in range(6):
            w.add_episode(rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, 11))
    return ClipDataset(root, split=None, clip_len=4)


class Kill(Exception):
    pass


def test_resume_after_kill_gives_identical_losses(tmp_path, clips):
    cfg = TrainConfig(
        steps=12, batch_size=4, lr=1e-2, warmup_steps=2, ckpt_every=5, eval_every=100, log_every=1
    )
    torch.manual_seed(0)
    ref = ToyModel()
    fit(ref, stage="toy", run_dir=tmp_path / "a", train_set=clips, val_set=None, cfg=cfg, progress=False)
    assert len(ref.losses) == 12

    def kill_at_10(model, step):
        if step == 10:
            raise Kill

    torch.manual_seed(0)
    first = ToyModel()
    with pytest.raises(Kill):
        fit(
            first,
            stage="toy",
            run_dir=tmp_path / "b",
            train_set=clips,
            val_set=None,
            cfg=cfg,
            progress=False,
            on_checkpoint=kill_at_10,
        )
    assert first.losses == ref.losses[:10]
    torch.manual_seed(123)  # a fresh process: different init and RNG, all restored from the checkpoint
    resumed = ToyModel()
    res = fit(
        resumed, stage="toy", run_dir=tmp_path / "b", train_set=clips, val_set=clips, cfg=cfg, progress=False
    )
    assert res.step == 12 and "loss" in res.val_metrics
    assert resumed.losses == pytest.approx(ref.losses[10:], rel=0, abs=0)
    assert int(resumed.calls) == 12  # buffers come back with the weights
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert has_weights(tmp_path / "b", "toy") and not has_weights(tmp_path / "b", "prior")
    assert (tmp_path / "b" / "tb" / "toy").is_dir()


def _checkpoint_files(run):
    from worldmodel.checkpoint import WEIGHTS, pending_state_path, trainer_state_path

    return {
        "weights": run / WEIGHTS,
        "committed": trainer_state_path(run, "toy"),
        "pending": pending_state_path(run, "toy"),
    }


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, clips):
    """An uninterrupted reference run to step 12 and the files of two committed checkpoints of the same run
    (steps 5 and 10), from which the on-disk states a kill can leave inside the commit protocol are put together."""
    import shutil

    root = tmp_path_factory.mktemp("ckpts")
    cfg = TrainConfig(
        steps=12, batch_size=4, lr=1e-2, warmup_steps=2, ckpt_every=5, eval_every=100, log_every=1
    )
    torch.manual_seed(0)
    ref = ToyModel()
    fit(ref, stage="toy", run_dir=root / "ref", train_set=clips, val_set=None, cfg=cfg, progress=False)

    def kill_at(n):
        def hook(model, step):
            if step == n:
                raise Kill

        return hook

    torch.manual_seed(0)
    with pytest.raises(Kill):
        fit(
            ToyModel(),
            stage="toy",
            run_dir=root / "s5",
            train_set=clips,
            val_set=None,
            cfg=cfg,
            progress=False,
            on_checkpoint=kill_at(5),
        )
    shutil.copytree(root / "s5", root / "s10")
    with pytest.raises(Kill):
        fit(
            ToyModel(),
            stage="toy",
            run_dir=root / "s10",
            train_set=clips,
            val_set=None,
            cfg=cfg,
            progress=False,
            on_checkpoint=kill_at(10),
        )
    return cfg, ref, root


def _assemble(root, dest, weights_from: str, committed_from: str, pending_from: str | None):
    """A run directory holding the weights of one checkpoint and the trainer states of others."""
    import shutil

    dest.mkdir()
    f = _checkpoint_files(dest)
    f["committed"].parent.mkdir()
    shutil.copy(_checkpoint_files(root / weights_from)["weights"], f["weights"])
    shutil.copy(_checkpoint_files(root / committed_from)["committed"], f["committed"])
    if pending_from is not None:
        shutil.copy(_checkpoint_files(root / pending_from)["committed"], f["pending"])
    return f


@pytest.mark.parametrize("kill", ["before the weights' rename", "after the weights' rename"])
def test_a_kill_inside_the_checkpoint_commit_resumes_exactly(kill, tmp_path, clips, two_checkpoints):
    # save_checkpoint writes the step-10 state as <stage>.next.pt, renames the weights (the commit), then renames
    # the state to <stage>.pt. Killed before the commit: step-5 weights and state, a pending step-10 state; after
    # it: step-10 weights, the step-5 state, the pending step-10 state (two renames with no manifest resumed
    # step-10 weights with step-5 Adam moments and step count, and ended on other weights than an uninterrupted run).
    cfg, ref, root = two_checkpoints
    committed_step = 5 if kill.startswith("before") else 10
    f = _assemble(root, tmp_path / "run", "s5" if committed_step == 5 else "s10", "s5", "s10")
    torch.manual_seed(123)
    resumed = ToyModel()
    res = fit(
        resumed, stage="toy", run_dir=tmp_path / "run", train_set=clips, val_set=None, cfg=cfg, progress=False
    )
    assert res.step == 12
    assert resumed.losses == pytest.approx(ref.losses[committed_step:], rel=0, abs=0)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert not f["pending"].exists()
    assert torch.load(f["committed"], weights_only=True)["step"] == 12


def test_weights_that_match_no_trainer_state_are_refused_naming_the_files(tmp_path, clips, two_checkpoints):
    from worldmodel.checkpoint import BundleError, load_trainer_state

    cfg, _, root = two_checkpoints
    f = _assemble(root, tmp_path / "run", "s10", "s5", None)
    before = {k: p.read_bytes() for k, p in f.items() if p.exists()}
    with pytest.raises(
        BundleError,
        match=rf"(?s){f['weights']}: the 'toy' weights .* belong to none of the trainer "
        rf"states .*{f['committed']} \(step 5.*--no-resume",
    ):
        fit(
            ToyModel(),
            stage="toy",
            run_dir=tmp_path / "run",
            train_set=clips,
            val_set=None,
            cfg=cfg,
            progress=False,
        )
    with pytest.raises(BundleError, match="belong to none"):
        load_trainer_state(tmp_path / "run", "toy")
    assert {k: p.read_bytes() for k, p in f.items() if p.exists()} == before  # nothing was changed
    res = fit(
        ToyModel(),
        stage="toy",
        run_dir=tmp_path / "run",
        train_set=clips,
        val_set=None,
        cfg=cfg,
        progress=False,
        resume=False,
    )
    assert res.step == 12 and load_trainer_state(tmp_path / "run", "toy")["step"] == 12


def test_first_checkpoint_killed_before_its_commit_starts_over(tmp_path, clips, two_checkpoints):
    cfg, ref, root = two_checkpoints
    run = tmp_path / "run"
    (run / "trainer_state").mkdir(parents=True)
    import shutil

    shutil.copy(
        _checkpoint_files(root / "s5")["committed"], _checkpoint_files(run)["pending"]
    )  # no weights yet
    torch.manual_seed(0)
    again = ToyModel()
    assert (
        fit(again, stage="toy", run_dir=run, train_set=clips, val_set=None, cfg=cfg, progress=False).step
        == 12
    )
    assert again.losses == ref.losses


def test_checkpoint_manifest_names_the_weights(tmp_path):
    from worldmodel.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint, weights_digest

    w = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor(True),
        "c": torch.zeros(0),
    }
    save_checkpoint(tmp_path, "toy", w, {"step": 7})
    state, tensors = load_checkpoint(tmp_path, "toy")
    sha, n = weights_digest(w)
    assert state["step"] == 7 and state["weights"] == {
        "file": WEIGHTS,
        "prefix": "toy",
        "sha256": sha,
        "bytes": 25,
    }
    assert n == 25 and all(torch.equal(tensors[k], v) for k, v in w.items())
    assert weights_digest({**w, "a": w["a"] + 1})[0] != sha and weights_digest({"x": w["a"]})[0] != sha
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.next.pt"))


def test_resuming_a_checkpoint_of_another_architecture_names_the_config_change(tmp_path, clips):
    cfg = TrainConfig(
        steps=4, batch_size=4, lr=1e-2, warmup_steps=1, ckpt_every=2, eval_every=100, log_every=1
    )
    fit(
        ToyModel(),
        stage="toy",
        run_dir=tmp_path,
        train_set=clips,
        val_set=None,
        cfg=replace(cfg, steps=2),
        progress=False,
    )
    wider = ToyModel()
    wider.net[1], wider.net[3] = nn.Linear(4 * 4 * 3, 64), nn.Linear(64, 1)  # a config change: another width
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"(?s)'toy' checkpoint does not fit the configured model.*--no-resume.*net\.1\.weight",
    ):
        fit(wider, stage="toy", run_dir=tmp_path, train_set=clips, val_set=None, cfg=cfg, progress=False)
    # nothing of the old checkpoint was copied in (not even the tensors whose shapes match)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())
    res = fit(
        wider,
        stage="toy",
        run_dir=tmp_path,
        train_set=clips,
        val_set=None,
        cfg=cfg,
        progress=False,
        resume=False,
    )
    assert res.step == 4


def test_weights_of_other_components_are_kept(tmp_path):
    from worldmodel.checkpoint import save_weights

    save_weights(tmp_path, "tokenizer", {"w": torch.ones(2)})
    save_weights(tmp_path, "prior", {"w": torch.zeros(3)})
    save_weights(tmp_path, "tokenizer", {"w": torch.full((2,), 2.0)})
    assert torch.equal(load_weights(tmp_path, "tokenizer")["w"], torch.full((2,), 2.0))
    assert torch.equal(load_weights(tmp_path, "prior")["w"], torch.zeros(3))
    with pytest.raises(KeyError, match="--stage reward"):
        load_weights(tmp_path, "reward")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("scale", ["tiny", "small", "paper"])
def test_presets_round_trip_through_json(tmp_path, name, scale):
    cfg = get_preset(name, scale)
    write_run_config(tmp_path, cfg.to_dict(), None)
    back = ExperimentConfig.from_dict(read_run_config(tmp_path)["experiment"])
    assert back == cfg
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "videogpt-worldmodel"


def test_reward_split_is_on_in_the_vizdoom_and_gym_presets_and_off_by_default():
    for name in preset_names():
        for scale in ("tiny", "small", "paper"):  # BAIR/RoboNet/video have neither rewards nor deaths
            # rewards and deaths: ViZDoom and the user's own gym:<ID> envs (registered by other tests in this process)
            expected = name.startswith(("vizdoom", "gym:"))
            assert get_preset(name, scale).prior.reward_given_termination is expected, (name, scale)
    assert (
        get_preset("gym:ALE/Pong-v5").prior.reward_given_termination is True
    )  # the generic preset, unregistered
    d = get_preset("vizdoom_hgs").to_dict()
    del d["prior"]["reward_given_termination"]  # a config.json from before the field
    assert ExperimentConfig.from_dict(d).prior.reward_given_termination is False


def test_tiny_and_small_step_presets_probe_bf16_and_the_paper_scale_keeps_fp32():
    """The main job's presets decide bf16 per device (``"auto"``); the paper scale follows the paper (fp32)."""
    for name in ("vizdoom_hgs", "vizdoom_take_cover", "vizdoom_battle2", "bair", "robonet"):
        for scale, expected in (("tiny", "auto"), ("small", "auto"), ("paper", False)):
            cfg = get_preset(name, scale)
            assert (cfg.tokenizer_train.bf16, cfg.prior_train.bf16) == (expected, expected), (name, scale)
            assert (
                ExperimentConfig.from_dict(cfg.to_dict()).prior_train.bf16 == expected
            )  # survives config.json


def test_validation_averages_a_metric_over_the_batches_that_report_it(clips):
    class Sparse(nn.Module):  # reports "rare" on every other batch only, as the prior's reward_mae_terminal
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.n = 0

        def compute_loss(self, batch):
            self.n += 1
            return self.w + 1.0, {
                "every": float(self.n),
                **({"rare": 10.0 * self.n} if self.n % 2 == 0 else {}),
            }

    m = evaluate(Sparse(), clips, batch_size=2, batches=4, device=torch.device("cpu"))
    assert m == {"loss": 1.0, "every": 2.5, "rare": 30.0}  # rare: (20 + 40) / 2, not / 4


def test_bad_preset_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        get_preset("vizdoom_hgs", "huge")
    with pytest.raises(ValueError, match="unknown config fields"):
        ExperimentConfig.from_dict({"bogus": 1})
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        read_run_config(tmp_path)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(55, cfg) < lr_at(20, cfg)


def test_bf16_probe_leaves_model_and_rng_untouched(clips):
    torch.manual_seed(0)
    m = ToyModel()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    batch = {"frames": torch.stack([clips[i]["frames"] for i in range(4)])}
    found = probe_bf16(m, batch, TrainConfig(lr=1e-2), torch.device("cpu"), steps=1)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and m.losses == []
    assert torch.equal(rng, torch.get_rng_state())
    assert found.fp32_s > 0 and found.bf16_s > 0 and np.isfinite(found.fp32_loss)
    assert "bf16 probe" in found.describe() and isinstance(found.use_bf16, bool)


@pytest.mark.parametrize("choice", [False, True])
def test_bf16_auto_trains_as_the_probe_chose_and_a_resumed_run_keeps_it(tmp_path, clips, monkeypatch, choice):
    import worldmodel.training as training

    calls = []

    def fake_probe(model, batch, cfg, device, **kw):
        calls.append(len(batch["frames"]))
        return training.Bf16Probe(1.0, 0.5, 1.0, 1.0, choice)

    monkeypatch.setattr(training, "probe_bf16", fake_probe)
    base = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, ckpt_every=3, eval_every=100)
    runs = {}
    for name, bf16 in (("auto", "auto"), ("fixed", choice)):
        torch.manual_seed(0)
        runs[name] = ToyModel()
        cfg = replace(base, bf16=bf16)
        fit(
            runs[name],
            stage="toy",
            run_dir=tmp_path / name,
            train_set=clips,
            val_set=None,
            cfg=cfg,
            progress=False,
        )
    assert calls == [4], "probed once, on one batch of the training set"
    assert runs["auto"].losses == runs["fixed"].losses  # the probe moved neither the weights nor the RNG
    state = torch.load(tmp_path / "auto" / "trainer_state" / "toy.pt", weights_only=False)
    assert state["bf16"] is choice
    more = replace(base, steps=9, bf16="auto")
    fit(
        ToyModel(),
        stage="toy",
        run_dir=tmp_path / "auto",
        train_set=clips,
        val_set=None,
        cfg=more,
        progress=False,
    )
    assert calls == [4], "a resumed run keeps the recorded choice without probing again"


def test_bf16_config_accepts_auto_and_names_bad_values():
    d = get_preset("vizdoom_hgs", "tiny").to_dict()
    d["prior_train"]["bf16"] = "auto"
    assert ExperimentConfig.from_dict(d).prior_train.bf16 == "auto"
    d["prior_train"]["bf16"] = "yes"
    with pytest.raises(ValueError, match="prior_train.bf16: got 'yes'.*true or false or one of \\['auto'\\]"):
        ExperimentConfig.from_dict(d)
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="on")


def test_fit_minutes_replaces_the_step_count_by_a_timed_plan_and_a_resumed_run_keeps_it(tmp_path, clips):
    # the config asks for 100000 steps; 0.01 minutes at the toy's ~1 ms steps is a few hundred
    cfg = TrainConfig(steps=100_000, batch_size=4, lr=1e-2, warmup_steps=2, ckpt_every=50, fit_minutes=0.01)
    torch.manual_seed(0)
    m = ToyModel()
    res = fit(m, stage="toy", run_dir=tmp_path, train_set=clips, val_set=None, cfg=cfg, progress=False)
    state = torch.load(tmp_path / "trainer_state" / "toy.pt", weights_only=False)
    planned = state["planned_steps"]
    assert 1 <= planned < 100_000 and res.step == planned == state["step"] == len(m.losses)
    # resumed with another budget: the recorded plan stands (nothing left to train), no new timing changes it
    more = replace(cfg, fit_minutes=5.0)
    m2 = ToyModel()
    res2 = fit(m2, stage="toy", run_dir=tmp_path, train_set=clips, val_set=None, cfg=more, progress=False)
    assert res2.step == planned and m2.losses == []


def test_plan_steps_divides_the_minutes_by_the_step_time_and_names_bad_values():
    assert plan_steps(1.0, 0.06, overhead=1.0) == 1000
    assert plan_steps(1.0, 0.06) == int(60 / (0.06 * STEP_OVERHEAD)) < 1000  # steps inside fit cost more
    assert plan_steps(1e-6, 10.0) == 1
    with pytest.raises(ValueError, match="minutes=0.*seconds_per_step=0.1.*both > 0"):
        plan_steps(0, 0.1)
    with pytest.raises(ValueError, match="fit_minutes: got -1"):
        TrainConfig(fit_minutes=-1)


def test_a_checkpoint_from_before_fused_adamw_resumes_with_the_fused_kernel(tmp_path, clips):
    """The trainer's AdamW is fused on CPU and CUDA; a checkpoint saved by the unfused optimizer (``fused: None`` in its
    param groups, as before session 12) resumes with the fused kernel, not with the saved group option."""
    from worldmodel.checkpoint import load_checkpoint, save_checkpoint

    cfg = TrainConfig(
        steps=5, batch_size=4, lr=1e-2, warmup_steps=2, ckpt_every=5, eval_every=100, log_every=1
    )
    torch.manual_seed(0)
    fit(ToyModel(), stage="toy", run_dir=tmp_path, train_set=clips, val_set=None, cfg=cfg, progress=False)
    state, weights = load_checkpoint(tmp_path, "toy")
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    for g in state["optimizer"]["param_groups"]:
        g["fused"] = None
    save_checkpoint(tmp_path, "toy", weights, {k: v for k, v in state.items() if k != "weights"})
    m = ToyModel()
    fit(
        m,
        stage="toy",
        run_dir=tmp_path,
        train_set=clips,
        val_set=None,
        cfg=replace(cfg, steps=8),
        progress=False,
    )
    after, _ = load_checkpoint(tmp_path, "toy")
    assert len(m.losses) == 3 and all(np.isfinite(m.losses))
    assert all(g["fused"] for g in after["optimizer"]["param_groups"])
