"""Generic training loop shared by the tokenizer and prior stages.

A model plugs in through ``model.compute_loss(batch) -> (loss, metrics)`` (IRIS style). The loop
adds: AdamW with warmup + cosine decay, gradient clipping, bf16 autocast, DDP under ``torchrun``
(gloo on CPU, nccl on CUDA; only rank 0 writes files), TensorBoard scalars, a tqdm bar, periodic
validation with a stage-specific hook, checkpoints that commit weights and trainer state together
(:func:`~worldmodel.checkpoint.save_checkpoint`) and exact resume (weights, optimizer,
step, RNG and data order) so that a ``kill -9`` loses at most one checkpoint interval.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from worldmodel.checkpoint import load_checkpoint, save_checkpoint
from worldmodel.config import TrainConfig
from worldmodel.training_data import SeededSampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed when launched by ``torchrun`` (env ``WORLD_SIZE`` > 1).

    ``device``: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local, dev)
    return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` then cosine decay to 10% of it at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _LossModule(nn.Module):
    """Routes ``forward`` to ``compute_loss`` so DDP's gradient hooks see the call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.compute_loss(batch)


def _rng_state() -> dict[str, Any]:
    # Only torch's generators drive randomness in a step (dropout, codebook restarts); data order
    # comes from SeededSampler's own generator.
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class FitResult:
    step: int
    last_metrics: dict[str, float]
    val_metrics: dict[str, float]
    minutes: float


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    batches: int,
    device: torch.device,
    bf16: bool = False,
    seed: int = 1234,
) -> dict[str, float]:
    """Mean metrics of ``compute_loss`` over ``batches`` fixed (seeded) validation batches; a metric that
    only some batches report (e.g. the prior's ``reward_mae_terminal``) is averaged over those."""
    sampler = SeededSampler(len(dataset), seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            loss, metrics = model.compute_loss(_to_device(batch, device))
            metrics = {"loss": float(loss), **metrics}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    model.train(was_training)
    return {k: v / counts[k] for k, v in sums.items()}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[list[nn.Parameter]]]:
    """AdamW over the model's parameter sets, and the sets whose gradient norms are clipped separately.

    A model may split its parameters into sets (``optimizer_param_sets() -> {name: [params]}``, e.g. the
    tokenizer and its discriminator): each set gets its decay / no-decay groups and its own gradient-norm
    clip. Default: one set of all parameters (two groups, one clip).
    """
    param_sets = (
        model.optimizer_param_sets()
        if hasattr(model, "optimizer_param_sets")
        else {"model": list(model.parameters())}
    )
    groups, clip_sets = [], []
    for params in param_sets.values():
        params = [p for p in params if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        clip_sets.append(params)
    # the fused kernel (one pass over each tensor instead of a dozen elementwise ops) is 3 % of a bf16 prior
    # step at the anchor geometry on 2 CPU cores; same update, CPU and CUDA
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused), clip_sets


def _resume(
    model: nn.Module, opt: torch.optim.Optimizer, run_dir: Path, stage: str, di: DistInfo
) -> dict[str, Any] | None:
    """Load the stage's last committed checkpoint into ``model`` and ``opt``; its trainer state, or None without one."""
    found = load_checkpoint(run_dir, stage, repair=di.world_size == 1)  # other ranks read it too
    if found is None:
        return None
    state, saved = found
    own = model.state_dict()
    # checked before loading: load_state_dict copies the matching tensors before it raises, which would
    # leave the model half-overwritten for a caller that then starts over with resume=False
    misfit = sorted(
        (saved.keys() ^ own.keys()) | {k for k in saved.keys() & own.keys() if saved[k].shape != own[k].shape}
    )
    if misfit:
        raise ValueError(
            f"{run_dir}: the '{stage}' checkpoint does not fit the configured model -- the config changed since it "
            f"was saved (e.g. a newer preset default such as prior.reward_given_termination). Pass the old setting "
            f"as a flag to resume, or --no-resume / a new --run-dir to start over. Missing, unexpected or "
            f"differently shaped: {', '.join(misfit)}"
        )
    model.load_state_dict(saved)
    fused = [group.get("fused") for group in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, f in zip(opt.param_groups, fused, strict=True):
        # load_state_dict brings back the saved group options: keep this build's kernel choice (a checkpoint from
        # before fused AdamW, or from a device without it), with the step counters where that kernel wants them
        group["fused"] = f
        for p in group["params"]:
            if f and "step" in opt.state.get(p, {}):
                opt.state[p]["step"] = opt.state[p]["step"].to(dtype=torch.float32, device=p.device)
    return state


def _log_step(
    writer: Any, bar: Any, stage: str, step: int, loss: float, lr: float, metrics: dict[str, float]
) -> None:
    writer.add_scalar(f"{stage}/loss", loss, step)
    writer.add_scalar(f"{stage}/lr", lr, step)
    for k, v in metrics.items():
        writer.add_scalar(f"{stage}/{k}", v, step)
    bar.set_postfix(loss=f"{loss:.4f}")


def _out_of_time(t0: float, cfg: TrainConfig, di: DistInfo) -> bool:
    """Whether the ``max_minutes`` budget is spent; every rank agrees, so that all stop together."""
    timed_out = cfg.max_minutes > 0 and (time.monotonic() - t0) / 60 >= cfg.max_minutes
    if di.world_size > 1:
        flag = torch.tensor([float(timed_out)], device=di.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        timed_out = bool(flag.item())
    return timed_out


def _validate(
    model: nn.Module,
    val_set: Dataset,
    cfg: TrainConfig,
    val_batches: int,
    di: DistInfo,
    writer: Any,
    stage: str,
    step: int,
    on_eval: Callable[[nn.Module, int, Any], None] | None,
) -> dict[str, float]:
    """Validation metrics (logged) and the ``on_eval`` hook, without moving the training RNG (or a resumed run
    would diverge)."""
    with torch.random.fork_rng(devices=[di.device] if di.device.type == "cuda" else []):
        val_metrics = evaluate(model, val_set, cfg.batch_size, val_batches, di.device, cfg.bf16)
        for k, v in val_metrics.items():
            writer.add_scalar(f"{stage}/val_{k}", v, step)
        if on_eval is not None:
            on_eval(model, step, writer)
    return val_metrics


@dataclass(frozen=True)
class Bf16Probe:
    """What :func:`probe_bf16` measured: seconds per training step each way (medians), the loss of one batch
    each way on the same weights, and the choice."""

    fp32_s: float
    bf16_s: float
    fp32_loss: float
    bf16_loss: float
    use_bf16: bool

    def describe(self) -> str:
        return (
            f"bf16 probe: {self.fp32_s * 1e3:.0f} ms/step fp32, {self.bf16_s * 1e3:.0f} ms/step bf16 "
            f"({self.fp32_s / self.bf16_s:.2f}x), loss {self.fp32_loss:.4f} vs {self.bf16_loss:.4f} -> "
            f"bf16 {'on' if self.use_bf16 else 'off'}"
        )


def time_train_steps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    modes: tuple[bool, ...] = (False, True),
    steps: int = 3,
) -> tuple[dict[bool, float], dict[bool, float]]:
    """Seconds per training step of ``model`` on ``batch`` under each bf16 mode in ``modes`` (medians), and the
    loss of ``batch`` each way on the same initial weights.

    On a deep copy of ``model`` (the model, its optimizer and torch's RNG are left as they were): one warm-up
    step per mode, then ``steps`` interleaved training steps per mode (forward, backward, AdamW with ``cfg``'s
    settings), timed.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(model).train()
        opt, _ = _optimizer(probe, cfg)

        def loss_of(bf16: bool) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return probe.compute_loss(batch)[0]

        losses = {}
        with torch.no_grad():
            for bf16 in modes:  # the same weights, and the same random draws (masks, context noise)
                torch.manual_seed(0)
                losses[bf16] = float(loss_of(bf16))
        times: dict[bool, list[float]] = {m: [] for m in modes}
        for i in range(steps + 1):
            for bf16 in modes:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                loss = loss_of(bf16)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first of each is a warm-up
                    times[bf16].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}, losses


def probe_bf16(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    steps: int = 5,
    min_speedup: float = 1.05,
    loss_rtol: float = 0.01,
) -> Bf16Probe:
    """Decide bf16 autocast for training ``model`` on ``device`` (``TrainConfig.bf16 = "auto"``).

    Times ``steps`` training steps each way with :func:`time_train_steps` (about ``2 * (steps + 1) + 2``
    training steps in all). bf16 is chosen when its median step is ``min_speedup`` times faster and the loss of
    ``batch`` under bf16 autocast matches fp32's on the same weights to ``loss_rtol`` (relative). This checks a
    step's numerics, not held-out quality after training. The probe under-reads bf16's gain on small models: the
    tiny HGS prior (6-frame windows) probed 1.08x and 1.14x in two runs where its steps inside ``fit`` were 1.27x
    faster (164 vs 129 ms), hence ``min_speedup`` 1.05 and 5 timed steps.
    """
    times, losses = time_train_steps(model, batch, cfg, device, (False, True), steps)
    fp32_s, bf16_s = times[False], times[True]
    agree = abs(losses[True] - losses[False]) <= loss_rtol * abs(losses[False])
    use = bool(fp32_s >= min_speedup * bf16_s and agree and math.isfinite(losses[True]))
    return Bf16Probe(fp32_s, bf16_s, losses[False], losses[True], use)


STEP_OVERHEAD = 1.15
"""A training step inside :func:`fit` over the probe's bare step (data loading, logging, evaluations and
checkpoints). Measured on the HGS main job (2 threads, bf16): prior 161 vs 148 ms (1.09x), tokenizer 159 vs
149 ms (1.07x); under ``train.py --budget-minutes 16``: tokenizer 164 vs 144 ms (1.14x), prior 133 vs 114 ms
(1.17x)."""


def plan_steps(minutes: float, seconds_per_step: float, overhead: float = STEP_OVERHEAD) -> int:
    """Training steps that fit in ``minutes`` at ``seconds_per_step`` (a probe's bare step) times ``overhead``;
    at least 1."""
    if minutes <= 0 or seconds_per_step <= 0:
        raise ValueError(
            f"plan_steps: got minutes={minutes}, seconds_per_step={seconds_per_step}, expected both > 0"
        )
    return max(1, int(minutes * 60 / (seconds_per_step * overhead)))


def _first_batch(train_set: Dataset, cfg: TrainConfig, di: DistInfo) -> dict[str, torch.Tensor]:
    n = min(cfg.batch_size, len(train_set))
    return _to_device(default_collate([train_set[i] for i in range(n)]), di.device)


def _resolve_bf16(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    state: dict[str, Any] | None,
    di: DistInfo,
    stage: str,
    writer: Any,
) -> TrainConfig:
    """``cfg`` with ``bf16`` a bool: as configured, as a resumed run chose it, or by :func:`probe_bf16` on
    this device's first ``batch_size`` training clips (every rank probes; bf16 only if all of them choose it)."""
    if cfg.bf16 != "auto":
        return cfg
    if state is not None and "bf16" in state:
        return replace(cfg, bf16=bool(state["bf16"]))
    found = probe_bf16(model, _first_batch(train_set, cfg, di), cfg, di.device)
    use = found.use_bf16
    if di.world_size > 1:
        flag = torch.tensor([float(use)], device=di.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        use = bool(flag.item())
    if di.is_main:
        print(
            f"{stage}: {found.describe()}"
            + ("" if use == found.use_bf16 else " (off: another rank chose fp32)")
        )
        if writer is not None:
            writer.add_scalar(f"{stage}/bf16", float(use), 0)
            writer.add_scalar(f"{stage}/bf16_probe_speedup", found.fp32_s / found.bf16_s, 0)
    return replace(cfg, bf16=use)


def _resolve_steps(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    state: dict[str, Any] | None,
    di: DistInfo,
    stage: str,
    writer: Any,
) -> TrainConfig:
    """``cfg`` with ``steps`` planned for ``cfg.fit_minutes`` (:func:`plan_steps` on a timing of this device's
    first training clips at the resolved precision; the slowest rank decides), or as a resumed run planned it;
    unchanged when ``fit_minutes`` is 0. A run continued from a checkpoint without a plan (e.g. the MBRL loop's)
    gets the planned steps on top of the ones it has."""
    if cfg.fit_minutes <= 0:
        return cfg
    if state is not None and "planned_steps" in state:
        return replace(cfg, steps=int(state["planned_steps"]))
    times, _ = time_train_steps(model, _first_batch(train_set, cfg, di), cfg, di.device, (bool(cfg.bf16),))
    steps = plan_steps(cfg.fit_minutes, times[bool(cfg.bf16)]) + (
        int(state["step"]) if state is not None else 0
    )
    if di.world_size > 1:
        t = torch.tensor([steps], device=di.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps = int(t.item())
    if di.is_main:
        print(
            f"{stage}: {cfg.fit_minutes:g}-minute plan: {times[bool(cfg.bf16)] * 1e3:.0f} ms/step measured -> "
            f"{steps} steps (the config's {cfg.steps} replaced)"
        )
        if writer is not None:
            writer.add_scalar(f"{stage}/planned_steps", steps, 0)
    return replace(cfg, steps=steps)


def _train_step(
    wrapped: nn.Module,
    opt: torch.optim.Optimizer,
    clip_sets: list[list[nn.Parameter]],
    batch: dict[str, Any],
    cfg: TrainConfig,
    step: int,
    stage: str,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step at the learning rate of ``step``: the loss and the model's metrics."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        loss, metrics = wrapped(batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{stage}: loss became {float(loss)} at step {step}; lower the learning rate "
            f"(--{stage}-train.lr) or disable bf16"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        for params in clip_sets:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return loss, metrics


def fit(
    model: nn.Module,
    *,
    stage: str,
    run_dir: str | os.PathLike,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    val_batches: int = 8,
    on_eval: Callable[[nn.Module, int, Any], None] | None = None,
    on_checkpoint: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps and checkpoint it under ``run_dir``.

    Args:
        model: has ``compute_loss(batch) -> (loss, metrics)``; its weights are saved as ``<stage>.*``
            in ``run_dir/model.safetensors``.
        stage: component name, e.g. ``"tokenizer"`` or ``"prior"``.
        train_set / val_set: map-style datasets of dicts of tensors.
        cfg: optimisation settings (``batch_size`` is per process).
        resume: continue from the stage's last committed checkpoint (``run_dir/trainer_state/<stage>.pt`` and
            its weights, :func:`~worldmodel.checkpoint.load_checkpoint`) when there is one.
        on_eval: ``f(model, step, tensorboard_writer_or_None)`` called at every evaluation on rank 0
            (e.g. reconstruction videos).
        on_checkpoint: called on rank 0 after each checkpoint (e.g. to refresh the bundle).
    """
    di = dist_info or DistInfo()
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed + di.rank)
    model.to(di.device).train()
    opt, clip_sets = _optimizer(model, cfg)
    state = _resume(model, opt, run_dir, stage, di) if resume else None
    step = int(state["step"]) if state is not None else 0
    wrapped: nn.Module = _LossModule(model)
    if di.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped,
            device_ids=[di.device.index] if di.device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    sampler = SeededSampler(
        len(train_set), seed=cfg.seed, start=step * cfg.batch_size, rank=di.rank, world_size=di.world_size
    )
    loader = iter(DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True))
    # Restore RNG only now: creating the DataLoader iterator above draws from torch's generator.
    if state is not None and di.rank < len(state.get("rng", [])):
        _set_rng_state(state["rng"][di.rank])
    writer = None
    if di.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb" / stage))
    cfg = _resolve_bf16(model, train_set, cfg, state, di, stage, writer)
    cfg = _resolve_steps(model, train_set, cfg, state, di, stage, writer)

    def checkpoint() -> None:
        rng = [_rng_state()]
        if di.world_size > 1:
            gathered: list[Any] = [None] * di.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if di.is_main:
            # weights and trainer state committed as one checkpoint (a kill between the two files cannot
            # pair one step's weights with another step's optimizer; see worldmodel.checkpoint)
            save_checkpoint(
                run_dir,
                stage,
                model.state_dict(),
                {
                    "step": step,
                    "optimizer": opt.state_dict(),
                    "rng": rng,
                    "world_size": di.world_size,
                    "bf16": cfg.bf16,
                    **({"planned_steps": cfg.steps} if cfg.fit_minutes > 0 else {}),
                },
            )
            if on_checkpoint is not None:
                on_checkpoint(model, step)

    t0 = time.monotonic()
    metrics: dict[str, float] = {}
    val_metrics: dict[str, float] = {}
    bar = tqdm(
        total=cfg.steps, initial=step, desc=stage, disable=not (progress and di.is_main), dynamic_ncols=True
    )
    stopped_early = False
    while step < cfg.steps:
        loss, metrics = _train_step(
            wrapped, opt, clip_sets, _to_device(next(loader), di.device), cfg, step, stage, di.device
        )
        step += 1
        bar.update(1)
        if writer is not None and (step % cfg.log_every == 0 or step == 1):
            _log_step(writer, bar, stage, step, loss.item(), opt.param_groups[0]["lr"], metrics)
        timed_out = _out_of_time(t0, cfg, di)
        last = step == cfg.steps or timed_out
        if (step % cfg.eval_every == 0 or last) and val_set is not None and di.is_main:
            val_metrics = _validate(model, val_set, cfg, val_batches, di, writer, stage, step, on_eval)
        if step % cfg.ckpt_every == 0 or last:
            checkpoint()
        if timed_out and step < cfg.steps:
            stopped_early = True
            break
    bar.close()
    if writer is not None:
        writer.close()
    minutes = (time.monotonic() - t0) / 60
    if stopped_early and di.is_main:
        print(f"{stage}: stopped at step {step}/{cfg.steps} after the {cfg.max_minutes}-minute budget")
    return FitResult(
        step=step,
        last_metrics={k: float(v) for k, v in metrics.items()},
        val_metrics=val_metrics,
        minutes=minutes,
    )
