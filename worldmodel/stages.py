"""The training stages of a world model, as library functions the CLI calls.

``train_tokenizer`` -> ``encode_tokens`` -> ``train_prior``; each reads the resolved
:class:`~worldmodel.config.ExperimentConfig`, writes into one run directory (which is also the
bundle, see :mod:`worldmodel.checkpoint`) and can be resumed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from worldmodel.bundle import WorldModel
from worldmodel.checkpoint import (
    CONFIG_JSON,
    WEIGHTS,
    has_weights,
    load_weights,
    read_experiment_config,
    read_run_config,
    write_run_config,
)
from worldmodel.config import ExperimentConfig
from worldmodel.dynamics_eval import open_loop, render_action_strips, sample_clips
from worldmodel.prior import Prior
from worldmodel.store import OBJECT_MASK, ActionSpec, EpisodeStore, StoreMeta, heldout_episode_ids
from worldmodel.token_cache import TOKENS_FILE, TokenCache, encode_store
from worldmodel.tokenizer import VQVAE
from worldmodel.training import DistInfo, FitResult, fit
from worldmodel.training_data import ClipDataset
from worldmodel.video import grid, save_png, tensorboard_video


def resolve_config(cfg: ExperimentConfig, meta: StoreMeta) -> ExperimentConfig:
    """Make the preset consistent with the data and with itself.

    The tokenizer's resolution and the prior's vocabulary, token grid and action space follow from
    the store and the tokenizer geometry, so they are derived here rather than trusted from flags.
    """
    H, W, _ = meta.obs_shape
    if H != W:
        raise ValueError(
            f"store frames are {H}x{W}; the tokenizer needs square frames (convert with a center crop)"
        )
    tok = replace(cfg.tokenizer, resolution=H)
    st, sh, sw = tok.stride
    if H % sh or W % sw:
        raise ValueError(f"frame size {H}x{W} is not divisible by the tokenizer stride (h={sh}, w={sw})")
    if cfg.data.clip_len % st:
        raise ValueError(f"data.clip_len={cfg.data.clip_len} must be a multiple of the temporal stride {st}")
    spec = meta.action_spec if cfg.data.use_actions else ActionSpec.none()
    prior = replace(
        cfg.prior,
        vocab_size=tok.codebook_size,
        tokens_h=H // sh,
        tokens_w=W // sw,
        action_kind=spec.kind,
        n_actions=spec.n,
        action_dim=spec.dim,
        code_dim=tok.embedding_dim if cfg.prior.code_dim else 0,  # the paper's input reads the code vectors
    )
    if spec.kind != "none" and prior.action_cond == "clip":
        # whole-clip conditioning reads the window's pixel-rate actions at once: any temporal stride (the paper's 2)
        window = (prior.frames + (0 if prior.cond_pixels else prior.n_cond_frames)) * st
        if prior.clip_actions != window - 1:
            raise ValueError(
                f"prior.clip_actions={prior.clip_actions}: a whole-clip conditioned prior reads the "
                f"{window - 1} actions between the {window} pixel frames of its window (prior.frames x stride "
                f"{st}); set clip_actions={window - 1}"
            )
    elif spec.kind != "none" and st != 1:
        raise ValueError(
            f"per-step action-conditioned priors need temporal stride 1 (one latent frame per action; "
            f"prior.action_cond='clip' conditions on the whole clip at any stride); tokenizer.stride={tok.stride}"
        )
    tok = replace(tok, max_frames=max(tok.max_frames, cfg.data.clip_len))
    return replace(cfg, tokenizer=tok, prior=prior, data=replace(cfg.data, resolution=H))


TOKENIZER_SHARE = 0.16
"""--budget-minutes: the tokenizer's share of the time left after collection (the HGS main job at the tiny preset
spends 1.6 of 10.4 minutes after collection on the tokenizer, 0.4 on encoding, 8 on the prior)."""
VIDEO_RESERVE = 0.04
"""--budget-minutes: the share of the prior's time kept for the rollout videos and the summary after it."""


def stage_minutes(budget: float, elapsed: float, stage: str) -> float:
    """Minutes ``stage`` (``"tokenizer"`` or ``"prior"``) may train for under ``--budget-minutes`` ``budget`` when
    ``elapsed`` minutes of the pipeline have passed. Raises ValueError when nothing is left."""
    left = budget - elapsed
    share = {"tokenizer": TOKENIZER_SHARE, "prior": 1 - VIDEO_RESERVE}[stage]
    if left * share <= 0:
        raise ValueError(
            f"--budget-minutes {budget:g}: {elapsed:.1f} minutes spent before the {stage} stage, nothing left for "
            f"it; raise --budget-minutes or set --config.{stage}-train.steps yourself"
        )
    return left * share


def _split_with_fallback(source: Any, split: str, clip_len: int) -> ClipDataset | None:
    """Clips of ``split`` (or the split :func:`~worldmodel.store.heldout_episode_ids` falls back to); None when
    no episode has ``clip_len`` frames."""
    try:
        _, used = heldout_episode_ids(source, split, clip_len)
    except ValueError:
        return None
    return ClipDataset(source, split=used, clip_len=clip_len)


_BUDGET_FIELDS = ("steps", "max_minutes", "fit_minutes", "log_every", "eval_every", "ckpt_every", "bf16")
"""Fields of a stage's TrainConfig that a resumed or continued run may change (how long, how often and in which
precision, not what is trained: the MBRL loop raises ``steps`` every iteration, and a run trained in fp32 before
the presets' bf16 ``"auto"`` continues under it; a resumed ``"auto"`` run keeps its trainer state's choice)."""


def _diff(old: Any, new: Any, prefix: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}.{k}" if prefix else k, out)
    elif old != new:
        out.append(f"{prefix}: {old!r} -> {new!r}")


def run_config_differences(run_dir: str | os.PathLike, cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """``(trained stages, differences)`` between the config of the stages already trained in ``run_dir`` and
    ``cfg`` (resolved): the preset's identity (``name``, ``scale``, ``env``), ``data`` (store compared as a
    resolved path; ``num_workers`` ignored), and for each trained stage its model config and its
    TrainConfig except the budget fields :data:`_BUDGET_FIELDS`. Differences read ``key: old -> new``."""
    run_dir = Path(run_dir)
    trained = [s for s in ("tokenizer", "prior") if has_weights(run_dir, s)]
    if not trained:
        return [], []
    old_cfg = read_experiment_config(run_dir)
    old_store = (read_run_config(run_dir).get("store") or {}).get("path")

    def view(c: ExperimentConfig, store_path: str | None) -> dict[str, Any]:
        d = c.to_dict()
        out: dict[str, Any] = {k: d[k] for k in ("name", "scale", "env")}
        out["data"] = {k: v for k, v in d["data"].items() if k not in ("num_workers", "store")}
        out["data"]["store"] = store_path
        for stage in trained:
            out[stage] = d[stage]
            out[f"{stage}_train"] = {k: v for k, v in d[f"{stage}_train"].items() if k not in _BUDGET_FIELDS}
        return out

    diffs: list[str] = []
    _diff(view(old_cfg, old_store), view(cfg, str(Path(cfg.data.store).resolve())), "", diffs)
    return trained, diffs


def prepare_run(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> tuple[ExperimentConfig, EpisodeStore]:
    """Open the store, resolve the config against it and write ``config.json`` (the bundle config).

    If ``run_dir`` already holds trained weights, the config of every trained stage is compared first
    (:func:`run_config_differences`) and a difference raises ``ValueError`` listing the differing keys,
    before anything in ``run_dir`` is written: training another config into a run would leave a bundle
    whose config no longer describes its weights."""
    store = EpisodeStore(cfg.data.store)
    cfg = resolve_config(cfg, store.meta)
    run_dir = Path(run_dir)
    trained, diffs = run_config_differences(run_dir, cfg) if (run_dir / WEIGHTS).exists() else ([], [])
    if diffs:
        shown = "; ".join(diffs[:12]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 12 else "")
        raise ValueError(
            f"{run_dir} holds a trained {' and '.join(trained)} of another config ({shown}); nothing was "
            f"changed there. Use a new --run-dir, or the config the run was trained with "
            f"({run_dir / CONFIG_JSON})"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = store.meta.to_dict()
    meta["path"] = str(Path(cfg.data.store).resolve())
    spec = store.meta.action_spec
    if cfg.data.use_actions and spec.kind == "continuous" and (spec.low is None or spec.high is None):
        # dream envs expose continuous actions normalised to [-1, 1]; record the data's range to map them back
        acts = np.concatenate(
            [a for e in store.episode_ids() if (a := store.load_actions(e)) is not None and len(a)]
        )
        meta["action_spec"]["low"] = acts.min(0).astype(float).tolist()
        meta["action_spec"]["high"] = acts.max(0).astype(float).tolist()
    write_run_config(run_dir, cfg.to_dict(), meta)
    return cfg, store


def estimate_variance(dataset: ClipDataset, n_clips: int = 64, seed: int = 0) -> float:
    """Variance of pixel values scaled to [-0.5, 0.5] over ``n_clips`` random clips (paper's normaliser)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(n_clips, len(dataset)), replace=False)
    x = torch.stack([dataset[int(i)]["frames"] for i in idx]).float() / 255.0 - 0.5
    return float(x.var())


def train_tokenizer(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    progress: bool = True,
) -> FitResult:
    """Train the VQ-VAE on clips of the store; writes weights, TensorBoard logs and ``recon.png``."""

    cfg, store = prepare_run(cfg, run_dir)
    run_dir = Path(run_dir)
    train_set = ClipDataset(store, split="train", clip_len=cfg.data.clip_len)
    if cfg.tokenizer.object_weight > 0 and OBJECT_MASK not in train_set[0]:
        raise ValueError(
            f"tokenizer.object_weight={cfg.tokenizer.object_weight} needs per-frame object masks, and store "
            f"{store.root} has none: collect it with --config.collect-object-masks (experiments/collect.py "
            "--object-mask), or pass --config.tokenizer.object-weight 0"
        )
    val_set = _split_with_fallback(store, "val", cfg.data.clip_len)
    torch.manual_seed(cfg.tokenizer_train.seed)  # initial weights depend on the seed only
    model = VQVAE(cfg.tokenizer)
    model.set_data_variance(estimate_variance(train_set, seed=cfg.tokenizer_train.seed))
    di = dist_info or DistInfo()
    sample = torch.stack(
        [(val_set or train_set)[i]["frames"] for i in range(min(4, len(val_set or train_set)))]
    )

    def on_eval(m: torch.nn.Module, step: int, writer: Any) -> None:
        recon = _reconstruct(m, sample.to(di.device))
        png = save_recon_png(sample.numpy(), recon.numpy(), run_dir / "recon.png")
        if writer is not None:
            writer.add_image("tokenizer/reconstruction", np.asarray(Image.open(png)), step, dataformats="HWC")
            # video: originals (top) over reconstructions (bottom), clips side by side
            vid = torch.cat(
                [torch.cat(list(sample), dim=2), torch.cat(list(recon), dim=2)], dim=1
            )  # (T, 2H, N*W, 3)
            tensorboard_video(writer, "tokenizer/reconstruction_video", vid.numpy(), step)

    return fit(
        model,
        stage="tokenizer",
        run_dir=run_dir,
        train_set=train_set,
        val_set=val_set,
        cfg=cfg.tokenizer_train,
        dist_info=di,
        resume=resume,
        on_eval=on_eval,
        progress=progress,
    )


@torch.no_grad()
def _reconstruct(model: Any, frames: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model.decode(model.encode(frames)).cpu()
    model.train(was)
    return out


def save_recon_png(originals: np.ndarray, recons: np.ndarray, path: str | os.PathLike) -> Path:
    """Grid of originals (odd rows) over reconstructions (even rows); inputs uint8 ``(N, T, H, W, 3)``."""
    rows = []
    for o, r in zip(originals, recons):
        rows += [o, r]
    return save_png(grid(rows), path)


def load_tokenizer(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """The trained VQ-VAE of a run directory, in eval mode."""

    cfg = read_experiment_config(run_dir)
    model = VQVAE(cfg.tokenizer)
    model.load_state_dict(load_weights(run_dir, "tokenizer"))
    return model.to(device).eval()


def encode_tokens(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Encode the whole store with the run's tokenizer into ``run_dir/tokens.h5`` (skipped if up to date)."""
    cfg, store = prepare_run(cfg, run_dir)
    out = Path(run_dir) / TOKENS_FILE
    # Keyed to the tokenizer's weights themselves: model.safetensors also changes whenever the prior
    # is saved, which must not trigger a re-encode.
    digest = tokenizer_digest(run_dir)
    # what the prior reads beside the tokens: conditioning pixels (cond_pixels), pixel-rate actions (clip)
    k = cfg.prior.n_cond_frames if cfg.prior.cond_pixels else 0
    frame_actions = cfg.prior.action_cond == "clip"
    if out.exists() and not force:
        cache = TokenCache(out)
        if (
            cache.attrs.get("tokenizer_sha1") == digest
            and len(cache) == len(store)
            and (k == 0 or int(cache.attrs.get("cond_frames", 0)) == k)
            and (bool(cache.attrs.get("frame_actions", False)) or not frame_actions)
        ):
            return out
    tok = load_tokenizer(run_dir, device)
    return encode_store(
        tok,
        store,
        out,
        clip_len=cfg.data.clip_len,
        device=device,
        progress=progress,
        meta={"tokenizer_sha1": digest},
        cond_frames=k,
        frame_actions=frame_actions,
    )


def tokenizer_digest(run_dir: str | os.PathLike) -> str:
    """SHA-1 of the run's tokenizer weights (names, shapes and bytes)."""
    import hashlib

    h = hashlib.sha1()
    for name, t in sorted(load_weights(run_dir, "tokenizer").items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class EndPaddedClips(Dataset):
    """Prior training windows: every ``clip_len``-frame window inside an episode (a
    :class:`~worldmodel.training_data.ClipDataset`), plus, per episode, the windows that start in its last
    ``clip_len - 2`` transitions and run past its end, padded, so its last transition sits on every
    window position ``1 .. clip_len-1`` and not only on the last one.

    Why: inside-episode windows hold a terminal transition only at their last position, so the
    termination and reward heads learn that episodes never end (nor pay their terminal reward) at an
    earlier position -- and the dream's sliding window reads new frames at positions
    ``keep .. frames-1`` (:class:`~worldmodel.sampling.Rollout`), where such a head never fires: on 300
    HGS episodes the teacher-forced recall (p > 0.5) at the dream's positions was 0 of 13.

    Items are the store's clip dicts plus ``valid`` (clip_len,) bool, False on the padding frames
    (copies of the last frame; actions 0, rewards 0, not terminated), which the prior's loss ignores,
    and ``termination_only`` (bool): True on the padded windows when ``termination_only`` is set, so
    they train the termination head but add no token or reward loss (their frames and rewards already
    appear in inside windows; scoring them again over-weights episode ends and the death penalty --
    on HGS, with tokens and rewards scored, that cost 0.17 bits per token).
    The padding is causal-safe: a prior's predictions for a frame never depend on later frames.
    """

    def __init__(self, source: Any, split: str, clip_len: int, termination_only: bool = True) -> None:
        self.inside = ClipDataset(source, split=split, clip_len=clip_len)
        self.source, self.clip_len, self.termination_only = source, clip_len, termination_only
        self.padded = [
            (e, s)
            for e in source.episode_ids(split)
            for n in [source.length(e)]
            if n >= 2
            for s in range(max(0, n - clip_len + 1), n - 1)
        ]

    def __len__(self) -> int:
        return len(self.inside) + len(self.padded)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        L = self.clip_len
        if index < len(self.inside):
            return {
                **self.inside[index],
                "valid": torch.ones(L, dtype=torch.bool),
                "termination_only": torch.tensor(False),
            }
        eid, start = self.padded[index - len(self.inside)]
        n = self.source.length(eid) - start  # real frames in the window, 2 <= n < L
        clip = self.source.read_clip(eid, start, n)
        out = {}
        for k, v in clip.items():
            v = np.asarray(v)
            if k in ("rewards", "terminated", "actions"):  # per transition: L-1
                v = np.concatenate([v, np.zeros((L - n, *v.shape[1:]), v.dtype)])
            elif v.ndim and len(v) == n:  # per frame (tokens / frames): repeat the last one
                v = np.concatenate([v, np.repeat(v[-1:], L - n, 0)])
            out[k] = torch.from_numpy(np.ascontiguousarray(v) if v.ndim else v)
        out["valid"] = torch.arange(L) < n
        out["termination_only"] = torch.tensor(self.termination_only)
        return out


def _prior_video_hook(cfg: ExperimentConfig, run_dir: str | os.PathLike, n: int = 2, horizon: int = 8):
    """``on_eval`` of the prior stage: an open-loop TensorBoard video (``prior/open_loop``) of ``n``
    held-out clips -- real context then greedy dream frames under the real actions, real (top) over
    dream (bottom), clips side by side. Action-conditioned priors without frame conditioning only;
    skipped with one warning when the store has no clip long enough."""

    if cfg.prior.action_kind == "none" or cfg.prior.n_cond_frames or cfg.prior.action_cond == "clip":
        return None  # (a clip-conditioned prior is not stepped action by action)
    context = min(4, cfg.prior.frames - 1)
    state: dict[str, Any] = {}

    def on_eval(m: torch.nn.Module, step: int, writer: Any) -> None:
        if writer is None or state.get("skip"):
            return
        if "wm" not in state:
            try:
                clips = sample_clips(
                    EpisodeStore(cfg.data.store), split="val", n=n, length=context + horizon, seed=0
                )
            except ValueError as e:
                warnings.warn(f"prior stage: no open-loop video in TensorBoard ({e})", stacklevel=2)
                state["skip"] = True
                return
            wm = WorldModel(cfg, read_run_config(run_dir)["store"])
            wm.tokenizer.load_state_dict(load_weights(run_dir, "tokenizer"))
            state.update(wm=wm.to(next(m.parameters()).device).eval(), clips=clips)
        wm, clips = state["wm"], state["clips"]
        wm.prior = m  # the weights being trained, no copy
        was_training = m.training
        try:
            dream = open_loop(
                wm, clips.frames, clips.actions, context=context, horizon=horizon
            ).frames  # (n, H, h, w, 3)
        finally:
            m.train(was_training)
        real = clips.frames[:, context : context + horizon]
        video = np.concatenate(
            [np.concatenate(list(real), axis=2), np.concatenate(list(dream), axis=2)], axis=1
        )
        tensorboard_video(writer, "prior/open_loop", video, step)  # (horizon, 2h, n*w, 3)

    return on_eval


def train_prior(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    progress: bool = True,
) -> FitResult:
    """Train the GPT prior on windows of the token cache (encodes it first if needed)."""

    di = dist_info or DistInfo()
    cfg, _ = prepare_run(cfg, run_dir)
    path = Path(run_dir) / TOKENS_FILE
    if di.is_main:
        encode_tokens(cfg, run_dir, device=di.device, progress=progress)
    if di.world_size > 1:
        torch.distributed.barrier()
    cache = TokenCache(path)
    # conditioning latent frames come first in each clip (token frame conditioning; pixel frames come beside it)
    p = cfg.prior
    clip = p.frames + (0 if p.cond_pixels else p.n_cond_frames)
    # frame-conditioned priors need real conditioning frames; a whole-clip action vector has no padded form
    if p.n_cond_frames or p.action_cond == "clip" or not cfg.data.pad_episode_ends:
        train_set, val_set = (
            ClipDataset(cache, split="train", clip_len=clip),
            _split_with_fallback(cache, "val", clip),
        )
    else:
        train_set = EndPaddedClips(cache, "train", clip)
        val = _split_with_fallback(cache, "val", clip)
        val_set = None if val is None else EndPaddedClips(cache, val.split, clip)
    needs_objects = cfg.prior.object_weight > 0 or cfg.prior.object_aux_weight > 0
    if needs_objects and "object_tokens" not in train_set[0]:
        raise ValueError(
            f"prior.object_weight / object_aux_weight > 0 need the token cache's object_tokens, and {path} has "
            "none: its store must hold object masks (--config.collect-object-masks); after collecting one, delete "
            "the cache and re-encode (--stage encode); or pass --config.prior.object-weight 0 --config.prior.object-aux-weight 0"
        )
    torch.manual_seed(cfg.prior_train.seed)
    model = Prior(cfg.prior)
    if (
        cfg.prior.code_dim
    ):  # the paper's input: the trained tokenizer's code vectors (a checkpoint restores its own)
        model.tok_emb.set_codes(load_tokenizer(run_dir).codebook.embeddings)
    res = fit(
        model,
        stage="prior",
        run_dir=run_dir,
        train_set=train_set,
        val_set=val_set,
        cfg=cfg.prior_train,
        dist_info=di,
        resume=resume,
        progress=progress,
        on_eval=_prior_video_hook(cfg, run_dir),
    )
    if di.is_main and cfg.prior.action_kind == "discrete" and cfg.prior.action_cond != "clip":
        wm = WorldModel.from_pretrained(run_dir)
        render_action_strips(
            wm,
            EpisodeStore(cfg.data.store),
            str(Path(run_dir) / "action_strips.png"),
            context=min(4, cfg.prior.frames - 1),
        )
    return res
