"""Training data: fixed-length clip windows of a store (or token cache) and the seeded, resumable,
DDP-aware order in which the training loop reads them.

:class:`ClipDataset` cuts windows that never cross an episode boundary from anything with the
store's read interface (:class:`~worldmodel.store.EpisodeStore`,
:class:`~worldmodel.token_cache.TokenCache`); :class:`SeededSampler` is the data order that
:func:`worldmodel.training.fit` resumes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from worldmodel.store import EpisodeStore


class ClipDataset(Dataset):
    """Fixed-length clip windows that never cross an episode boundary.

    Item ``i`` is a dict of tensors for ``L = clip_len`` frames:
    ``frames`` uint8 ``(L, H, W, 3)``, ``rewards`` float32 ``(L-1,)``, ``terminated`` bool ``(L-1,)``,
    and ``actions`` int64 ``(L-1,)`` or float32 ``(L-1, A)`` unless the store is action-free.

    Args:
        store: an :class:`EpisodeStore` (or its path), or any object with the same
            ``episode_ids(split)``, ``length(id)``, ``read_clip(id, start, length)`` and ``root``
            (e.g. :class:`worldmodel.token_cache.TokenCache`, whose clips hold ``tokens``).
        split: ``'train' | 'val' | 'test'`` or None for all episodes.
        clip_len: frames per clip; episodes shorter than this are skipped.
        stride: distance in frames between consecutive window starts (default 1: every window).
    """

    def __init__(
        self,
        store: EpisodeStore | str | os.PathLike,
        split: str | None = "train",
        clip_len: int = 16,
        stride: int = 1,
    ) -> None:
        self.store = EpisodeStore(store) if isinstance(store, (str, os.PathLike)) else store
        if clip_len < 1 or stride < 1:
            raise ValueError(f"clip_len and stride must be >= 1, got clip_len={clip_len}, stride={stride}")
        self.clip_len, self.stride, self.split = clip_len, stride, split
        ids = self.store.episode_ids(split)
        if not ids:
            raise ValueError(f"store {self.store.root} has no episodes in split {split!r}")
        lengths = np.array([self.store.length(i) for i in ids])
        if lengths.max() < clip_len:
            raise ValueError(
                f"clip_len={clip_len} is longer than every episode in split {split!r} of "
                f"{self.store.root} (longest has {lengths.max()} frames)"
            )
        self.episode_ids = [i for i, n in zip(ids, lengths) if n >= clip_len]
        self.num_skipped = len(ids) - len(self.episode_ids)
        counts = np.array([(n - clip_len) // stride + 1 for n in lengths if n >= clip_len])
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[str, int]:
        """Map a window index to ``(episode_id, start_frame)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range [0, {len(self)})")
        e = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.episode_ids[e], int(index - self._offsets[e]) * self.stride

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        eid, start = self.locate(int(index))
        clip = self.store.read_clip(eid, start, self.clip_len)
        # np.ascontiguousarray turns 0-d arrays (e.g. a clip's class id) into 1-d ones: keep scalars scalar
        return {
            k: torch.from_numpy(np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v))
            for k, v in clip.items()
        }


class SeededSampler(Sampler[int]):
    """Infinite, seeded stream of dataset indices: a fresh permutation per epoch.

    The order depends only on ``(seed, n)``; ``start`` skips that many samples, so a resumed run
    that passes ``start = step * batch_size`` sees exactly the data order of an uninterrupted one.
    With ``rank``/``world_size`` each process takes a disjoint interleaved share (DDP).
    """

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("SeededSampler needs a non-empty dataset")
        self.n, self.seed, self.start, self.rank, self.world_size = n, seed, start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        pos = self.start * self.world_size + self.rank  # global position in the shared stream
        epoch, offset = divmod(pos, self.n)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            while offset < self.n:
                yield perm[offset]
                offset += self.world_size
            epoch, offset = epoch + 1, offset - self.n

    def __len__(self) -> int:  # an infinite sampler; DataLoader only needs this for len(loader)
        return 2**62
