"""TGIF (Tumblr GIF) -> action-free episode store, plus a resumable downloader for the GIFs.

Source layout (the ``data/`` folder of github.com/raingo/TGIF-Release, plus the GIFs)::

    tgif-v1.0.tsv           "<gif url>\\t<sentence>" per line; test GIFs have 3 lines (3 sentences)
    splits/train.txt        one gif URL per line (80,000 / 10,780 / 11,360 for train/val/test)
    splits/val.txt
    splits/test.txt
    gifs/<basename of url>  the downloaded GIFs (see :func:`download`), found by basename anywhere
                            under ``gif_dir`` (default ``<src>/gifs``)

Each GIF becomes one episode: frames decoded with PyAV (FFmpeg composes partial GIF frames and
applies disposal), every ``frame_skip``-th, at most ``max_frames``, resized so the short side is
``resolution`` and centre-cropped (VideoGPT's TGIF preprocessing). Attrs: ``captions`` (JSON list of
the sentences), ``url``, ``source_file``, ``source_fps``. Splits from the split files (a URL listed
in none goes to train); without split files, by a hash of the id with ``val_fraction`` /
``test_fraction``. GIFs not on disk (many Tumblr links are dead) count as ``filtered``, not corrupt.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from worldmodel.sources._common import ConvertReport, SourceError, episode_id, existing_episode_ids, fail
from worldmodel.sources._download import DownloadReport, download_file, download_many
from worldmodel.sources._video import VideoDecodeError, as_path, decode_video, resize_center_crop
from worldmodel.store import STORE_JSON, ActionSpec, StoreMeta, StoreWriter, split_for_id

REPO_RAW = "https://raw.githubusercontent.com/raingo/TGIF-Release/master/data"
TSV_URL = f"{REPO_RAW}/tgif-v1.0.tsv"
SPLIT_URLS = {s: f"{REPO_RAW}/splits/{s}.txt" for s in ("train", "val", "test")}


def url_basename(url: str) -> str:
    """The file name of a GIF URL (``.../tumblr_xyz_500.gif`` -> ``tumblr_xyz_500.gif``)."""
    return posixpath.basename(urllib.parse.urlsplit(url.strip()).path)


def read_tsv(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{url: [sentences]}`` from ``tgif-v1.0.tsv``, in file order.

    Raises:
        SourceError: if the file is missing or a line has no tab.
    """
    path = as_path(path)
    if not path.is_file():
        raise SourceError(
            f"{path}: missing (expected tgif-v1.0.tsv: '<gif url>\\t<sentence>' per line; {TSV_URL})"
        )
    out: dict[str, list[str]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        url, tab, sentence = line.partition("\t")
        if not tab or not url.strip():
            raise SourceError(f"{path}: line {i + 1} is not '<gif url>\\t<sentence>': {line[:80]!r}")
        out.setdefault(url.strip(), []).append(sentence.strip())
    return out


def read_splits(splits_dir: str | os.PathLike) -> dict[str, str]:
    """``{url: split}`` from ``splits/{train,val,test}.txt`` (files that are absent are skipped)."""
    d = as_path(splits_dir)
    out: dict[str, str] = {}
    for split in ("train", "val", "test"):
        p = d / f"{split}.txt"
        if p.is_file():
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    out[line.strip()] = split
    return out


def index_gifs(gif_dir: str | os.PathLike) -> dict[str, Path]:
    """``{basename: path}`` of every ``*.gif`` under ``gif_dir`` (first one wins on a clash)."""
    out: dict[str, Path] = {}
    for p in sorted(as_path(gif_dir).rglob("*")):
        if p.suffix.lower() == ".gif" and p.is_file():
            out.setdefault(p.name, p)
    return out


def convert(
    src: str | os.PathLike,
    out_store: str | os.PathLike,
    *,
    gif_dir: str | os.PathLike | None = None,
    tsv: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
    resolution: int = 64,
    frame_skip: int = 1,
    max_frames: int | None = None,
    min_frames: int = 2,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_videos: int | None = None,
    fps: float | None = None,
    episodes_per_shard: int = 64,
    skip_corrupt: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert downloaded TGIF GIFs into an action-free store (resumable; id = GIF basename stem).

    Args:
        src: the TGIF ``data/`` folder (holding ``tgif-v1.0.tsv`` and ``splits/``).
        out_store: store directory (created, or appended to).
        gif_dir: where the GIFs are (default ``<src>/gifs``); matched to URLs by file name.
        tsv: the captions file (default ``<src>/tgif-v1.0.tsv``).
        splits_dir: split lists (default ``<src>/splits``; hash split if absent).
        resolution: square output side (short side resized, centre crop).
        frame_skip: keep every ``frame_skip``-th frame.
        max_frames: keep at most this many frames per GIF (None: all).
        min_frames: GIFs with fewer frames (after subsampling) are left out (``filtered``).
        val_fraction, test_fraction: hash-split shares, used only without split files.
        max_videos: convert at most this many GIFs (None: all).
        fps: frame rate recorded in the store (GIF rates vary; None: the first GIF's rate).
        episodes_per_shard: episodes per HDF5 shard.
        skip_corrupt: skip (and report) undecodable GIFs instead of raising.
        merge: append to a store whose metadata (source, fps, extra) differs (see ``StoreWriter``).
        progress: show a tqdm bar.

    Raises:
        SourceError: naming the undecodable GIF (unless ``skip_corrupt``) or a missing tsv.
    """
    if resolution < 1 or frame_skip < 1:
        raise ValueError(f"resolution and frame_skip must be >= 1, got {resolution}, {frame_skip}")
    root = as_path(src)
    captions = read_tsv(tsv if tsv is not None else root / "tgif-v1.0.tsv")
    split_of = read_splits(splits_dir if splits_dir is not None else root / "splits")
    gifs = index_gifs(gif_dir if gif_dir is not None else root / "gifs")
    out = as_path(out_store)
    done = existing_episode_ids(out)
    report = ConvertReport(out, "tgif")
    todo = [(u, gifs.get(url_basename(u))) for u in captions]
    report.filtered += sum(p is None for _, p in todo)
    todo = [(u, p) for u, p in todo if p is not None][:max_videos]
    writer: StoreWriter | None = None
    # a resumed conversion keeps the rate its store recorded (another first GIF may have another rate)
    meta_path = out / STORE_JSON
    stored_fps = (
        StoreMeta.from_dict(json.loads(meta_path.read_text()), str(meta_path)).fps
        if meta_path.exists()
        else None
    )
    extra = {
        "dataset": "TGIF-v1.0",
        "resolution": resolution,
        "frame_skip": frame_skip,
        "split_source": "split files" if split_of else "id hash",
    }
    try:
        for url, path in tqdm(todo, desc="tgif", unit="gif", disable=not progress):
            eid = episode_id(Path(path).stem)
            if eid in done:
                report.already_present += 1
                continue
            try:
                video = decode_video(
                    path,
                    every=frame_skip,
                    max_frames=max_frames,
                    transform=lambda fr: resize_center_crop(fr, resolution),
                )
            except VideoDecodeError as e:
                fail(report, str(path), str(e).removeprefix(f"{path}: "), skip_corrupt)
                continue
            if len(video.frames) < max(1, min_frames):
                report.filtered += 1
                continue
            if writer is None:  # the store's fps comes from the first GIF unless given (or already recorded)
                rate = (
                    fps
                    if fps is not None
                    else (stored_fps if stored_fps is not None else video.fps / frame_skip)
                )
                writer = StoreWriter(
                    out,
                    source="tgif",
                    obs_shape=(resolution, resolution, 3),
                    action_spec=ActionSpec.none(),
                    fps=rate,
                    episodes_per_shard=episodes_per_shard,
                    val_fraction=val_fraction,
                    test_fraction=test_fraction,
                    extra=extra,
                    merge=merge,
                )
            split = split_of.get(url, "train") if split_of else split_for_id(eid, val_fraction, test_fraction)
            writer.add_episode(
                np.ascontiguousarray(video.frames),
                split=split,
                episode_id=eid,
                attrs={
                    "captions": captions[url],
                    "url": url,
                    "source_file": path.name,
                    "source_fps": video.fps,
                },
            )
            report.add(split, len(video.frames))
    finally:
        if writer is not None:
            writer.close()
    return report


def download(
    dest: str | os.PathLike,
    *,
    splits: tuple[str, ...] = ("train", "val", "test"),
    max_gifs: int | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    dry_run: bool = False,
    progress: bool = True,
) -> DownloadReport | list[tuple[str, Path]]:
    """Fetch ``tgif-v1.0.tsv``, the split lists and the GIFs of ``splits`` into ``dest`` (resumable).

    GIFs land in ``dest/gifs/<basename>``; present files are skipped, partial ones resumed. Dead
    links (HTTP 4xx) are reported in the returned :class:`DownloadReport`, not retried. With
    ``dry_run``, returns the metadata files to fetch ``[(url, path)]`` without fetching anything.
    """
    dest = as_path(dest)
    meta = [(TSV_URL, dest / "tgif-v1.0.tsv")] + [
        (SPLIT_URLS[s], dest / "splits" / f"{s}.txt") for s in splits
    ]
    if dry_run:
        return meta
    for url, path in meta:
        download_file(url, path, retries=retries, timeout=timeout)
    return download_gifs(
        gif_urls(dest, splits)[:max_gifs], dest / "gifs", retries=retries, timeout=timeout, progress=progress
    )


def gif_urls(src: str | os.PathLike, splits: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
    """GIF URLs of ``splits`` (from the split lists), or of the whole tsv if there are no lists."""
    root = as_path(src)
    split_of = read_splits(root / "splits")
    if split_of:
        return [u for u, s in split_of.items() if s in splits]
    return list(read_tsv(root / "tgif-v1.0.tsv"))


def download_gifs(
    urls: list[str],
    out_dir: str | os.PathLike,
    *,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 1.0,
    progress: bool = True,
    **kwargs,
) -> DownloadReport:
    """Download GIF ``urls`` to ``out_dir/<basename>``; skip present files, resume ``.part`` files."""
    out_dir = as_path(out_dir)
    return download_many(
        [(u, out_dir / url_basename(u)) for u in urls],
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        progress=progress,
        **kwargs,
    )
