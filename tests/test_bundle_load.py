"""Loading bundles: a broken bundle never blocks discovery of the others, every load error names the file,
config types are checked, and training another config into a trained run is refused before anything changes."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401 - registers the dream env ids
from tests.conftest import make_bundle, tiny_experiment
from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import (
    CONFIG_JSON,
    WEIGHTS,
    BundleError,
    load_trainer_state,
    load_weights,
    save_trainer_state,
    trainer_state_path,
)
from worldmodel.paths import BundleSkippedWarning, find_bundles
from worldmodel.stages import prepare_run

HGS = "VideoGPTDream-VizdoomHGS-v0"


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(run, fn) -> None:
    d = json.loads((run / CONFIG_JSON).read_text())
    (run / CONFIG_JSON).write_text(json.dumps(fn(d)))


def _set_channels(d, value):
    d["experiment"]["tokenizer"]["channels"] = value
    return d


BREAKAGES = {
    "truncated weights": (
        lambda run: _truncate(run / WEIGHTS),
        rf"{WEIGHTS}: not a readable safetensors file",
    ),
    "config not JSON": (
        lambda run: (run / CONFIG_JSON).write_text("{not json"),
        rf"{CONFIG_JSON}: not readable as JSON",
    ),
    "config is a list": (
        lambda run: (run / CONFIG_JSON).write_text("[1, 2]"),
        rf"{CONFIG_JSON}: holds a JSON list",
    ),
    "channels a string": (
        lambda run: _edit_config(run, lambda d: _set_channels(d, "abc")),
        r"tokenizer\.channels: got 'abc' \(str\), expected an integer",
    ),
    "weights of another config": (
        lambda run: _edit_config(run, lambda d: _set_channels(d, 24)),
        r"the tokenizer weights do not fit the tokenizer config",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_bundle_is_skipped_by_discovery_and_named_on_load(breakage, hgs_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLDMODEL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "home" / "runs"
    good = make_bundle(tiny_experiment(hgs_store), runs / "good")
    broken = runs / "broken"
    shutil.copytree(good, broken)
    break_it, message = BREAKAGES[breakage]
    break_it(broken)
    import os

    os.utime(good / WEIGHTS, (1, 1))  # the broken bundle is the newest: discovery must not stop at it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make(HGS)
        assert env.unwrapped.world_model.path.resolve() == good.resolve()
        assert [d.resolve() for d in find_bundles("vizdoom_hgs")] in (
            [good.resolve()],
            [broken.resolve(), good.resolve()],
        )
    skipped = [str(w.message) for w in caught if issubclass(w.category, BundleSkippedWarning)]
    assert skipped and all(str(broken) in m for m in skipped), skipped
    # named on an explicit load, with what was expected (never "has no trained prior yet")
    with pytest.raises(BundleError, match=message) as e:
        gym.make(HGS, checkpoint=broken)
    assert str(broken) in str(e.value) and "no trained prior" not in str(e.value)


def test_load_errors_name_the_file(tiny_bundle, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run)
    save_trainer_state(run, "prior", {"step": 3, "opt": {"w": torch.zeros(1000)}})
    assert load_trainer_state(run, "prior")["step"] == 3
    _truncate(trainer_state_path(run, "prior"))
    with pytest.raises(BundleError, match=r"trainer_state/prior\.pt: unreadable trainer state .*prior stage"):
        load_trainer_state(run, "prior")
    _truncate(run / WEIGHTS, 0.9)
    with pytest.raises(BundleError, match=rf"{run / WEIGHTS}: not a readable safetensors file"):
        load_weights(run, "prior")
    with pytest.raises(BundleError, match=rf"{run / WEIGHTS}"):
        WorldModel.from_pretrained(run)


def test_files_of_a_bundle_get_the_users_umask(hgs_store, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        run = make_bundle(tiny_experiment(hgs_store), tmp_path / "run")
        save_trainer_state(run, "prior", {"step": 1})
    finally:
        os.umask(old)
    for p in (run / CONFIG_JSON, run / WEIGHTS, trainer_state_path(run, "prior")):
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_prepare_run_refuses_another_config_before_touching_the_run(hgs_store, tmp_path):
    cfg = tiny_experiment(hgs_store)
    run = make_bundle(cfg, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run / CONFIG_JSON, run / WEIGHTS)}
    other = replace(
        cfg, name="vizdoom_battle2", prior=replace(cfg.prior, n_embd=64)
    )  # the tokenizer is the same
    with pytest.raises(ValueError, match=r"holds a trained tokenizer and prior of another config") as e:
        prepare_run(other, run)
    assert "name: 'vizdoom_hgs' -> 'vizdoom_battle2'" in str(e.value) and "prior.n_embd: 32 -> 64" in str(
        e.value
    )
    assert "tokenizer." not in str(e.value)
    with pytest.raises(ValueError, match=r"prior_train\.lr: 0\.001 -> 0\.01"):
        prepare_run(replace(cfg, prior_train=replace(cfg.prior_train, lr=1e-2)), run)
    assert {p.name: p.read_bytes() for p in (run / CONFIG_JSON, run / WEIGHTS)} == before
    WorldModel.from_pretrained(run)  # still a working bundle
    # budgets may change (a resumed or continued run trains longer), and so may the precision: a run trained in
    # fp32 before the presets' bf16 "auto" continues under it
    longer = replace(
        cfg, prior_train=replace(cfg.prior_train, steps=60, eval_every=30, max_minutes=5.0, bf16="auto")
    )
    prepare_run(longer, run)
    recorded = json.loads((run / CONFIG_JSON).read_text())["experiment"]["prior_train"]
    assert recorded["steps"] == 60 and recorded["bf16"] == "auto"
