"""Shared fixtures: a small real ViZDoom HGS store and a tiny (randomly initialised or briefly trained) bundle.

``tiny_bundle`` is built once per session: real HGS episodes at 32×32 (4×4 tokens per frame), a
tokenizer and prior small enough that a dream step costs milliseconds. Its weights are random
unless a test trains them; shapes, spaces, determinism and error paths do not need a good model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# One intra-op thread in the tests and in the CLIs they start: the models here are tiny, and on a
# 2-core machine with anything else running, 2 OpenMP threads per process made the suite over 5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

from worldmodel.config import DataConfig, ExperimentConfig, PriorConfig, TokenizerConfig, TrainConfig  # noqa: E402

TINY_RES = 32


def tiny_experiment(
    store: str | Path, *, name: str = "vizdoom_hgs", clip_len: int = 4, steps: int = 6
) -> ExperimentConfig:
    """A tiny experiment over ``store`` (32×32 frames, 4×4 tokens, 1-layer prior of width 32)."""
    tt = TrainConfig(
        steps=steps, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=steps, ckpt_every=steps
    )
    return ExperimentConfig(
        name=name,
        scale="tiny",
        env=name,
        data=DataConfig(store=str(store), clip_len=clip_len),
        tokenizer=TokenizerConfig(
            resolution=TINY_RES,
            stride=(1, 8, 8),
            channels=16,
            n_res_layers=1,
            n_heads=2,
            codebook_size=32,
            embedding_dim=8,
            max_frames=clip_len,
        ),
        prior=PriorConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0, frames=clip_len),
        tokenizer_train=tt,
        prior_train=tt,
    )


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package; they import their sibling
    ``cli_args``), for tests of its functions."""
    import importlib.util
    import sys

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(name, bench_dir / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench_dir))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench_dir))
    return mod


def make_bundle(cfg: ExperimentConfig, run_dir: str | Path, seed: int = 0) -> Path:
    """Write a bundle with randomly initialised (seeded) weights for ``cfg`` at ``run_dir``."""
    import torch

    from worldmodel.bundle import WorldModel
    from worldmodel.checkpoint import read_run_config
    from worldmodel.stages import prepare_run

    cfg, _ = prepare_run(cfg, run_dir)
    torch.manual_seed(seed)
    wm = WorldModel(cfg, read_run_config(run_dir)["store"])
    wm.save_pretrained(run_dir)
    return Path(run_dir)


@pytest.fixture(scope="session", autouse=True)
def sb3_log_dir(tmp_path_factory):
    """SB3 makes a fresh ``<tmp>/SB3-<date>`` folder for every model that learns without a logger folder; point it
    (and the subprocesses' SB3, through the environment) at one pytest temporary folder instead."""
    old = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3-logs"))
    yield
    if old is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = old


@pytest.fixture()
def one_thread():
    """Tiny models run far faster single-threaded on a shared 2-core machine (no oversubscribed OpenMP)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hgs_store(tmp_path_factory) -> Path:
    """Eight real HGS episodes (random policy) at 32×32, at most 24 steps each."""
    from envs.collect import collect

    root = tmp_path_factory.mktemp("hgs_store")
    collect(
        "vizdoom_hgs",
        root,
        8,
        num_envs=1,
        asynchronous=False,
        progress=False,
        env_kwargs={"resolution": TINY_RES, "max_episode_steps": 24},
    )
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, hgs_store) -> Path:
    """A vizdoom_hgs bundle (random weights) over ``hgs_store``."""
    return make_bundle(tiny_experiment(hgs_store), tmp_path_factory.mktemp("bundle") / "vizdoom_hgs-tiny")


@pytest.fixture(scope="session")
def hgs_store64(tmp_path_factory) -> Path:
    """Six real HGS episodes at the default 64×64 (what SB3's CnnPolicy needs), at most 24 steps each."""
    from envs.collect import collect

    root = tmp_path_factory.mktemp("hgs_store64")
    collect(
        "vizdoom_hgs",
        root,
        6,
        num_envs=1,
        asynchronous=False,
        progress=False,
        env_kwargs={"max_episode_steps": 24},
    )
    return root


@pytest.fixture(scope="session")
def tiny_bundle64(tmp_path_factory, hgs_store64) -> Path:
    """A vizdoom_hgs bundle (random weights) over 64×64 frames: 8×8 tokens per frame, as the default geometry."""
    return make_bundle(tiny_experiment(hgs_store64), tmp_path_factory.mktemp("bundle64") / "vizdoom_hgs-tiny")


@pytest.fixture(scope="session")
def tc_bundle(tmp_path_factory) -> Path:
    """A vizdoom_take_cover bundle (random weights) over 6 short real Take Cover episodes at 32×32."""
    from envs.collect import collect

    root = tmp_path_factory.mktemp("take_cover")
    collect(
        "vizdoom_take_cover",
        root / "store",
        6,
        num_envs=1,
        asynchronous=False,
        progress=False,
        env_kwargs={"resolution": TINY_RES, "max_episode_steps": 16},
    )
    return make_bundle(
        tiny_experiment(root / "store", name="vizdoom_take_cover"), root / "vizdoom_take_cover-tiny"
    )


def write_continuous_store(
    root: str | Path,
    *,
    source: str,
    dim: int,
    episodes: int = 6,
    length: int = 12,
    resolution: int = TINY_RES,
    seed: int = 0,
) -> Path:
    """A small store with continuous actions (frames: a square moved by the actions), like BAIR/RoboNet."""
    import numpy as np

    from worldmodel.store import ActionSpec, StoreWriter

    rng = np.random.default_rng(seed)
    with StoreWriter(
        root,
        source=source,
        obs_shape=(resolution, resolution, 3),
        action_spec=ActionSpec.continuous(dim),
        fps=10.0,
        val_fraction=0.2,
        test_fraction=0.2,
    ) as w:
        for _ in range(episodes):
            acts = rng.uniform(-2, 2, (length - 1, dim)).astype(np.float32)
            pos = np.cumsum(np.vstack([np.full((1, 2), resolution / 2), acts[:, :2]]), 0).astype(int) % (
                resolution - 6
            )
            frames = np.zeros((length, resolution, resolution, 3), np.uint8)
            for t, (y, x) in enumerate(pos):
                frames[t, y : y + 6, x : x + 6] = 255
            w.add_episode(frames, acts)
    return Path(root)


def write_rule_store(
    root: Path,
    ends: Callable[[int, int, int], bool],
    shade: Callable[[int], int] = lambda i: 128,
    episodes: int = 40,
    seed: int = 0,
) -> Path:
    """A Take Cover-shaped store of uniform random actions (2) ruled by ``ends(episode, t, action)``: episode ``i``
    ends at the first transition ``t`` where it is true; all its frames are grey level ``shade(i)``."""
    import numpy as np

    from worldmodel.store import ActionSpec, StoreWriter

    rng = np.random.default_rng(seed)
    with StoreWriter(
        root,
        source="vizdoom_take_cover",
        obs_shape=(TINY_RES, TINY_RES, 3),
        action_spec=ActionSpec.discrete(2),
        fps=8.75,
        val_fraction=0.2,
        test_fraction=0.1,
    ) as w:
        for i in range(episodes):
            acts: list[int] = []
            while True:
                acts.append(int(rng.integers(0, 2)))
                if ends(i, len(acts) - 1, acts[-1]):
                    break
            T = len(acts)
            frames = np.full((T + 1, TINY_RES, TINY_RES, 3), shade(i), np.uint8)
            term = np.zeros(T, bool)
            term[-1] = True
            w.add_episode(frames, np.array(acts), np.ones(T, np.float32), term)
    return root


def scenes(B: int = 2, T: int = 4, R: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (B, T, R, R, 3): dark floor with a few bright 2x2 'objects' that move one pixel per frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((B, T, R, R, 3), 40, dtype=torch.uint8)
    for b in range(B):
        for _ in range(3):
            y0, x0 = (int(v) for v in torch.randint(0, R - 2 - T, (2,), generator=g))
            color = torch.randint(150, 256, (3,), generator=g, dtype=torch.uint8)
            for t in range(T):
                x[b, t, y0 : y0 + 2, x0 + t : x0 + t + 2] = color
    return x


def fit_clip(
    m: torch.nn.Module, frames: torch.Tensor, steps: int = 25, lr: float = 3e-3
) -> tuple[dict[str, float], dict[str, float]]:
    """Train ``m`` on one batch of uint8 ``frames`` with Adam: (the first step's metrics, the last step's)."""
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    first: dict[str, float] = {}
    for _ in range(steps):
        loss, metrics = m.compute_loss({"frames": frames})
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or metrics
    return first, metrics
