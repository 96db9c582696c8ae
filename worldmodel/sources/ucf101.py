"""UCF-101 action-recognition videos -> action-free episode store (one episode per clip).

Source layout (``UCF101.rar`` and ``UCF101TrainTestSplits-RecognitionTask.zip`` unpacked side by
side)::

    UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi          13,320 clips, 320x240, 25 fps, Xvid
    ucfTrainTestlist/classInd.txt                      "<1-based index> <Class>" per line
    ucfTrainTestlist/trainlist0{1,2,3}.txt             "<Class>/v_..._gGG_cCC.avi <1-based index>"
    ucfTrainTestlist/testlist0{1,2,3}.txt              "<Class>/v_..._gGG_cCC.avi"

Three official folds (``fold`` = 1, 2, 3) split by group (``gGG``, the same actors/scene), so clips of
one group never straddle train and test. A validation split, if wanted, is carved from the train list
by group too (a hash of ``<Class>_gGG``), never by clip. List entries are matched to files
case-insensitively (the lists and folders disagree on case for ``HandstandPushups``).

Each episode: frames decoded with PyAV (every ``frame_skip``-th, at most ``max_frames``), resized so
the short side is ``resolution`` and centre-cropped square (VideoGPT's preprocessing). No actions,
zero rewards. Attrs: ``label`` (0-based class index = classInd index - 1), ``label_name``, ``group``,
``clip``, ``source_file`` (``<Class>/<file>``), ``source_fps``, ``frame_skip``. Store meta extra:
``class_names`` (index = label), ``fold``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from worldmodel.sources._common import ConvertReport, SourceError, episode_id, existing_episode_ids, fail
from worldmodel.sources._download import download_file, extract_once, which
from worldmodel.sources._video import VideoDecodeError, as_path, decode_video, resize_center_crop
from worldmodel.store import ActionSpec, StoreWriter, split_for_id

VIDEOS_URL = "https://www.crcv.ucf.edu/data/UCF101/UCF101.rar"
SPLITS_URL = "https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip"
# SHA-256 of the two archives. The authors (crcv.ucf.edu) publish no checksums; these are the ones pinned by
# torchvision's dataset definitions (pytorch/vision, torchvision/prototype/datasets/_builtin/ucf101.py: both
# files) and TensorFlow Datasets (tensorflow_datasets/url_checksums/ucf101.txt: the split zip, 113,943 bytes;
# TFDS fetches the videos from another archive). A download that does not match is deleted and refused.
VIDEOS_SHA256 = "ca8dfadb4c891cb11316f94d52b6b0ac2a11994e67a0cae227180cd160bd8e55"
SPLITS_SHA256 = "5c0d1a53b8ed364a2ac830a73f405e51bece7d98ce1254fd19ed4a36b224bd27"
NOMINAL_FPS = 25.0
_NAME_RE = re.compile(r"^v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)\.avi$", re.IGNORECASE)


def find_layout(src: str | os.PathLike) -> tuple[Path, Path]:
    """``(videos_dir, lists_dir)``: ``src/UCF-101`` (or ``src``) and ``src/ucfTrainTestlist``."""
    root = as_path(src)
    videos = root / "UCF-101" if (root / "UCF-101").is_dir() else root
    lists = next(
        (
            p
            for p in (
                root / "ucfTrainTestlist",
                videos / "ucfTrainTestlist",
                root.parent / "ucfTrainTestlist",
            )
            if (p / "classInd.txt").is_file()
        ),
        None,
    )
    if lists is None:
        raise SourceError(f"{root}: no ucfTrainTestlist/classInd.txt (unpack {SPLITS_URL} next to UCF-101/)")
    return videos, lists


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise SourceError(f"{path}: missing (expected the official UCF-101 split list)")
    return [
        ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]


def read_class_index(lists: Path) -> list[str]:
    """Class names ordered by their 0-based label (classInd.txt's 1-based index minus one)."""
    entries = {}
    for ln in _lines(lists / "classInd.txt"):
        parts = ln.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SourceError(f"{lists / 'classInd.txt'}: bad line {ln!r}, expected '<index> <ClassName>'")
        entries[int(parts[0]) - 1] = parts[1]
    if sorted(entries) != list(range(len(entries))):
        raise SourceError(f"{lists / 'classInd.txt'}: indices are not 1..{len(entries)}")
    return [entries[i] for i in range(len(entries))]


def read_split(lists: Path, fold: int, which_list: str) -> list[str]:
    """Relative clip paths ``<Class>/v_....avi`` of ``trainlist0<fold>.txt`` or ``testlist0<fold>.txt``."""
    return [ln.split()[0].replace("\\", "/") for ln in _lines(lists / f"{which_list}0{fold}.txt")]


def convert(
    src: str | os.PathLike,
    out_store: str | os.PathLike,
    *,
    fold: int = 1,
    resolution: int = 64,
    frame_skip: int = 1,
    max_frames: int | None = None,
    val_fraction: float = 0.0,
    classes: tuple[str, ...] | None = None,
    max_videos: int | None = None,
    episodes_per_shard: int = 32,
    skip_corrupt: bool = False,
    merge: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert UCF-101 clips of one official fold into an action-free store (resumable; id = clip name).

    Args:
        src: directory holding ``UCF-101/`` and ``ucfTrainTestlist/`` (see :func:`find_layout`).
        out_store: store directory (created, or appended to).
        fold: official split 1, 2 or 3.
        resolution: square output side in pixels (short side resized to it, centre crop).
        frame_skip: keep every ``frame_skip``-th frame (25 fps / frame_skip).
        max_frames: keep at most this many frames per clip (None: all).
        val_fraction: share of train *groups* sent to val (0: no val split).
        classes: convert only these class names (None: all 101); others count as ``filtered``.
        max_videos: convert at most this many clips (train list first, then test; None: all).
        episodes_per_shard: episodes per HDF5 shard.
        skip_corrupt: skip (and report) undecodable or missing clips instead of raising.
        merge: append to a store whose metadata (source, fps, extra) differs (see ``StoreWriter``).
        progress: show a tqdm bar.

    Raises:
        SourceError: naming the missing list/clip or the undecodable file (unless ``skip_corrupt``).
    """
    if fold not in (1, 2, 3):
        raise ValueError(f"fold: expected 1, 2 or 3, got {fold}")
    if resolution < 1 or frame_skip < 1:
        raise ValueError(f"resolution and frame_skip must be >= 1, got {resolution}, {frame_skip}")
    videos, lists = find_layout(src)
    class_names = read_class_index(lists)
    label_of = {c.lower(): i for i, c in enumerate(class_names)}
    if classes is not None:
        unknown = [c for c in classes if c.lower() not in label_of]
        if unknown:
            raise ValueError(f"classes: {unknown} not in classInd.txt (e.g. {class_names[:3]})")
        keep = {c.lower() for c in classes}
    on_disk = {
        str(p.relative_to(videos)).replace("\\", "/").lower(): p
        for p in videos.rglob("*")
        if p.suffix.lower() == ".avi"
    }
    items = [(rel, "train") for rel in read_split(lists, fold, "trainlist")]
    items += [(rel, "test") for rel in read_split(lists, fold, "testlist")]
    out = as_path(out_store)
    done = existing_episode_ids(out)
    report = ConvertReport(out, "ucf101")
    extra = {
        "dataset": "UCF-101",
        "fold": fold,
        "class_names": class_names,
        "frame_skip": frame_skip,
        "resolution": resolution,
        "url": VIDEOS_URL,
    }
    with StoreWriter(
        out,
        source="ucf101",
        obs_shape=(resolution, resolution, 3),
        action_spec=ActionSpec.none(),
        fps=NOMINAL_FPS / frame_skip,
        episodes_per_shard=episodes_per_shard,
        val_fraction=val_fraction,
        test_fraction=0.0,
        extra=extra,
        merge=merge,
    ) as writer:
        n_seen = 0
        bar = tqdm(items, desc=f"ucf101 fold {fold}", unit="clip", disable=not progress)
        for rel, list_split in bar:
            cls_dir, _, fname = rel.rpartition("/")
            if classes is not None and cls_dir.lower() not in keep:
                report.filtered += 1
                continue
            if max_videos is not None and n_seen >= max_videos:
                break
            n_seen += 1
            m = _NAME_RE.match(fname)
            if cls_dir.lower() not in label_of or m is None:
                fail(
                    report,
                    str(lists),
                    f"list entry {rel!r} is not '<Class>/v_<Class>_gXX_cYY.avi' with a class "
                    "from classInd.txt",
                    skip_corrupt,
                )
                continue
            eid = episode_id(Path(fname).stem)
            if eid in done:
                report.already_present += 1
                continue
            path = on_disk.get(rel.lower())
            if path is None:
                fail(
                    report,
                    str(videos / rel),
                    "clip listed in the split file is missing on disk",
                    skip_corrupt,
                )
                continue
            try:
                video = decode_video(
                    path,
                    every=frame_skip,
                    max_frames=max_frames,
                    transform=lambda fr: resize_center_crop(fr, resolution),
                )
                if len(video.frames) == 0:
                    raise VideoDecodeError(f"{path}: no frames decoded")
            except VideoDecodeError as e:
                fail(report, str(path), str(e).removeprefix(f"{path}: "), skip_corrupt)
                continue
            label = label_of[cls_dir.lower()]
            group = int(m.group("group"))
            split = (
                "test"
                if list_split == "test"
                else split_for_id(f"{class_names[label]}_g{group:02d}", val_fraction, 0.0)
            )
            writer.add_episode(
                np.ascontiguousarray(video.frames),
                split=split,
                episode_id=eid,
                attrs={
                    "label": label,
                    "label_name": class_names[label],
                    "group": group,
                    "clip": int(m.group("clip")),
                    "source_file": f"{class_names[label]}/{fname}",
                    "source_fps": video.fps,
                    "frame_skip": frame_skip,
                },
            )
            report.add(split, len(video.frames))
            bar.set_postfix(episodes=report.converted)
    return report


def download(
    dest: str | os.PathLike, *, dry_run: bool = False, progress: bool = True
) -> list[tuple[str, Path]]:
    """Fetch the UCF-101 rar (6.5 GB) and the split zip into ``dest`` (resumable); unpack the zip.

    The rar needs an external tool: if ``unrar``, ``7z`` or ``bsdtar`` is on PATH it is used,
    otherwise the command to run is in the raised error.
    """
    import subprocess

    dest = as_path(dest)
    rar, zp = dest / "UCF101.rar", dest / "UCF101TrainTestSplits-RecognitionTask.zip"
    plan = [(VIDEOS_URL, rar), (SPLITS_URL, zp)]
    if dry_run:
        return plan
    for (url, target), sha in zip(plan, (VIDEOS_SHA256, SPLITS_SHA256)):
        download_file(url, target, progress=progress, sha256=sha)
    extract_once(zp, dest)  # redone unless a previous extraction completed (marker file)
    rar_done = dest / f".{rar.name}.extracted"
    if not rar_done.exists():
        for tool, args in (
            ("unrar", ["x", "-o+", str(rar), str(dest) + os.sep]),
            ("7z", ["x", "-y", f"-o{dest}", str(rar)]),
            ("bsdtar", ["-xf", str(rar), "-C", str(dest)]),
        ):
            if which(tool):
                subprocess.run([tool, *args], check=True)
                rar_done.write_text(
                    f"{rar.name}\n"
                )  # only after the tool finished: a partial unpack is redone
                break
        else:
            raise SourceError(
                f"{rar}: downloaded; unpack it with `unrar x {rar} {dest}` (apt-get install unrar-free "
                "or 7zip), then run the conversion"
            )
    return plan
