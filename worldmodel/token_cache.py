"""Token cache: every episode of a store encoded once by the tokenizer, for the prior to train on.

File ``<run>/tokens.h5``::

    attrs: tokenizer_step, clip_len, stride_t, source store path
    episodes/<id>/tokens      int16 (T', h, w)   codes of the episode's frames
                 /actions     as in the store, sub-sampled to the latent frame rate (stride_t == 1: unchanged)
                 /rewards, terminated
                 /cond_frames  uint8 (T', k, H, W, 3)  only if written with ``cond_frames=k``: pixel frames
                               s*stride_t .. s*stride_t+k-1 for each latent frame s (pixel frame conditioning)
                 /frame_actions   the store's actions at the pixel frame rate, only if written with
                               ``frame_actions`` (whole-clip action conditioning)
                 /object_tokens  bool (T', h, w)  only if the store has per-frame ``object_mask``: the tokens
                               whose patch (over the stride) holds an object pixel (``PriorConfig.object_weight``)
                 attrs: split, label (if the episode has one)

Episodes are encoded in consecutive windows of ``clip_len`` frames, the clip length the tokenizer
was trained on, so every token sees the temporal context it saw in training (with
``causal_time``, at most the previous frames of its window). The file is written under a
temporary name and renamed when complete.

:class:`TokenCache` exposes the same clip interface as :class:`~worldmodel.store.EpisodeStore`,
so :class:`~worldmodel.training_data.ClipDataset` cuts prior-training windows from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from einops import reduce
from tqdm.auto import tqdm

from worldmodel.atomic import atomic_file
from worldmodel.store import OBJECT_MASK, SPLITS, EpisodeStore

TOKENS_FILE = "tokens.h5"


@torch.inference_mode()
def encode_store(
    tokenizer: Any,
    store: EpisodeStore,
    out: str | os.PathLike,
    *,
    clip_len: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    cond_frames: int = 0,
    frame_actions: bool = False,
) -> Path:
    """Encode every episode of ``store`` with ``tokenizer.encode`` into the token cache ``out``.

    Args:
        tokenizer: has ``encode(frames uint8 (B,T,H,W,3)) -> tokens int64 (B,T',h,w)`` and
            ``cfg.stride`` (t, h, w).
        clip_len: frames per encoding window (a multiple of the temporal stride).
        batch_size: windows per ``encode`` call.
        cond_frames: k > 0 also stores, per latent frame, its first k pixel frames (a pixel frame-conditioned
            prior's input, ``PriorConfig.cond_pixels``).
        frame_actions: also store the actions at the pixel frame rate (whole-clip action conditioning,
            ``PriorConfig.action_cond="clip"``; ``actions`` holds them at the latent rate).
    """
    # The conditioning pixels live in the cache rather than being read back from the store by index: the prior
    # stage then reads one file, and the cache stays a consistent snapshot of what the tokenizer encoded (a store
    # converted or collected again later cannot pair tokens with other pixels). Only the presets that need them
    # pay for them: k of every stride_t pixel frames (the paper's BAIR: half the store).
    out = Path(out)
    st = int(tokenizer.cfg.stride[0])
    if clip_len % st:
        raise ValueError(f"clip_len={clip_len} must be a multiple of the tokenizer's temporal stride {st}")
    tokenizer.eval()
    ids = store.episode_ids()
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["clip_len"], f.attrs["stride_t"], f.attrs["store"] = clip_len, st, str(store.root)
        f.attrs["cond_frames"], f.attrs["frame_actions"] = cond_frames, frame_actions
        for k, v in (meta or {}).items():
            f.attrs[k] = v
        grp = f.create_group("episodes")
        for eid in tqdm(ids, desc="encode", unit="ep", disable=not progress):
            ep = store.load(eid)
            T = (len(ep) // st) * st
            if T == 0:
                continue
            frames = torch.from_numpy(ep.frames[:T])
            windows = list(torch.split(frames, clip_len))  # the last window may be shorter
            codes = []
            full = [w for w in windows if len(w) == clip_len]
            for i in range(0, len(full), batch_size):
                batch = torch.stack(full[i : i + batch_size]).to(device)
                codes.extend(tokenizer.encode(batch).cpu())
            if len(windows[-1]) != clip_len:
                codes.append(tokenizer.encode(windows[-1][None].to(device))[0].cpu())
            tokens = torch.cat(codes).numpy()  # (T', h, w)
            g = grp.create_group(eid)
            g.create_dataset("tokens", data=tokens.astype(np.int16))
            if ep.actions is not None:
                g.create_dataset("actions", data=ep.actions[: T - 1][::st][: len(tokens) - 1])
                if frame_actions:
                    g.create_dataset("frame_actions", data=ep.actions[: T - 1])
            if cond_frames:  # (T', k, H, W, 3): pixel frames s*st + i, clamped to the episode's last one
                idx = np.minimum(np.arange(len(tokens))[:, None] * st + np.arange(cond_frames)[None], T - 1)
                g.create_dataset("cond_frames", data=ep.frames[idx])
            if OBJECT_MASK in ep.extras:  # (T', h, w): the token's patch holds an object pixel
                sh, sw = (int(x) for x in tokenizer.cfg.stride[1:])
                m = np.asarray(ep.extras[OBJECT_MASK][:T]) > 0
                obj = reduce(m, "(t st) (h sh) (w sw) -> t h w", "max", st=st, sh=sh, sw=sw)
                g.create_dataset("object_tokens", data=obj[: len(tokens)], compression="lzf")
            # Per latent step: sum of rewards and any termination over the stride's transitions.
            rew = ep.rewards[: T - 1]
            term = ep.terminated[: T - 1]
            n = len(tokens) - 1
            g.create_dataset(
                "rewards", data=np.array([rew[i * st : (i + 1) * st].sum() for i in range(n)], np.float32)
            )
            g.create_dataset(
                "terminated", data=np.array([term[i * st : (i + 1) * st].any() for i in range(n)], bool)
            )
            g.attrs["split"] = ep.split
            if "label" in ep.attrs:
                g.attrs["label"] = int(ep.attrs["label"])
    return out


class TokenCache:
    """Read-only view of a token cache with the clip interface of an :class:`EpisodeStore`.

    ``read_clip`` returns ``tokens`` int64 ``(L, h, w)``, ``rewards``, ``terminated``, ``actions``
    (if any), ``class_ids`` int64 scalar (if episodes carry a ``label``), ``cond_frames`` uint8 (k, H, W, 3) (the
    window's first k pixel frames, if the cache holds them) and ``clip_actions`` (the window's
    ``L * stride_t - 1`` pixel-rate actions, if the cache holds them) and ``object_tokens`` bool (L, h, w) (the tokens
    whose patch holds a pixel of the store's ``object_mask``, if the store had masks).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path)
        if not self.root.exists():
            raise FileNotFoundError(
                f"{self.root}: token cache missing; create it with "
                f"python experiments/train.py --env <preset> --stage encode"
            )
        self._f: h5py.File | None = None
        self._pid = -1
        with h5py.File(self.root, "r") as f:
            self.attrs = dict(f.attrs)
            self.index = {
                eid: {"length": int(g["tokens"].shape[0]), "split": str(g.attrs.get("split", "train"))}
                for eid, g in f["episodes"].items()
            }
            first = next(iter(f["episodes"].values()), None)
            self.grid = tuple(first["tokens"].shape[1:]) if first is not None else None

    def _file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = h5py.File(self.root, "r"), os.getpid()
        return self._f

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_f": None, "_pid": -1}

    def __len__(self) -> int:
        return len(self.index)

    def episode_ids(self, split: str | None = None) -> list[str]:
        if split is not None and split not in SPLITS:
            raise ValueError(f"split: got {split!r}, expected one of {SPLITS} or None")
        return sorted(i for i, e in self.index.items() if split is None or e["split"] == split)

    def length(self, episode_id: str) -> int:
        return self.index[episode_id]["length"]

    def read_clip(self, episode_id: str, start: int, length: int) -> dict[str, np.ndarray]:
        T = self.length(episode_id)
        if start < 0 or length < 1 or start + length > T:
            raise ValueError(
                f"clip [{start}, {start + length}) out of range for episode {episode_id!r} of {T} latent frames"
            )
        g = self._file()["episodes"][episode_id]
        s, e = start, start + length
        out = {
            "tokens": g["tokens"][s:e].astype(np.int64),
            "rewards": g["rewards"][s : e - 1],
            "terminated": g["terminated"][s : e - 1],
        }
        if "actions" in g:
            out["actions"] = g["actions"][s : e - 1]
        if "frame_actions" in g:  # the pixel-rate actions between the window's pixel frames
            st = int(self.attrs["stride_t"])
            out["clip_actions"] = g["frame_actions"][s * st : e * st - 1]
        if "cond_frames" in g:
            out["cond_frames"] = g["cond_frames"][s]
        if "object_tokens" in g:
            out["object_tokens"] = g["object_tokens"][s:e]
        if "label" in g.attrs:
            out["class_ids"] = np.array(int(g.attrs["label"]), np.int64)
        return out

    def load_tokens(self, episode_id: str) -> np.ndarray:
        return self._file()["episodes"][episode_id]["tokens"][()].astype(np.int64)
