"""Convert a public video dataset into an episode store (resumable: re-run the same command after a kill).

Examples:
    python experiments/convert.py bair data/raw/bair --out data/bair
    python experiments/convert.py robonet data/raw/robonet/hdf5 --out data/robonet --robots sawyer widowx
    python experiments/convert.py robomimic data/raw/lift/ph/image.hdf5 --out data/lift --resolution 64
    python experiments/convert.py ucf101 data/raw/ucf --out data/ucf101 --fold 1 --resolution 64
    python experiments/convert.py tgif data/raw/tgif --out data/tgif
    python experiments/convert.py bair data/raw/bair --download --dry-run   # print what would be fetched

With ``--download`` the dataset is fetched into SRC (resumable) instead of converted; run the command
again without it to convert.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from worldmodel.sources import bair, robomimic, robonet, tgif, ucf101
from worldmodel.sources._download import DownloadError
from worldmodel.store import StoreError


@dataclass
class Common:
    src: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="SRC")]]
    """Source: the dataset directory (a file for robomimic). With --download: where to fetch it to."""
    out: str = ""
    """Episode store directory (created, or appended to: episodes already there are skipped)."""
    skip_corrupt: bool = False
    """Skip corrupt files/records (listed at the end) instead of stopping at the first one."""
    episodes_per_shard: int = 32
    """Episodes per HDF5 shard; a kill loses at most the episodes of one unfinished shard."""
    merge: bool = False
    """Append to a store whose metadata (source, fps, camera, fold, ...) differs; without it that is an error."""
    download: bool = False
    """Fetch the dataset from its public URL into SRC instead of converting (resumable)."""
    dry_run: bool = False
    """With --download: only print the URLs and local paths, fetch nothing."""


@dataclass
class Bair(Common):
    """BAIR robot pushing TFRecords (softmotion30_44k/{train,test}/*.tfrecords)."""

    camera: str = "image_aux1"
    """Camera: 'image_aux1' (as VideoGPT/SAVP) or 'image_main'."""
    val_fraction: float = 0.05
    """Share of train-file trajectories put in the val split (by id hash); test/ files are the test split."""
    max_files: int | None = None
    """Convert at most this many files per split (default: all)."""
    max_episodes: int | None = None
    """Stop after this many episodes (default: all)."""


@dataclass
class Robonet(Common):
    """RoboNet hdf5 files (hdf5/*.hdf5); actions normalised to 5-d (see worldmodel/sources/robonet.py)."""

    camera: int = 0
    """Camera index i of env/cam{i}_video."""
    robots: tuple[str, ...] | None = None
    """Keep only these robots (metadata attr 'robot', e.g. sawyer widowx baxter franka kuka R3 fetch)."""
    resolution: int = 64
    """Output height and width in pixels (frames are squashed, not cropped, as RoboNet/VideoGPT do)."""
    action_dim: int = 5
    """Stored action width: autograsp gripper imputed, shorter zero-padded, longer truncated."""
    val_fraction: float = 0.05
    """Share of files in the val split (by id hash)."""
    test_fraction: float = 0.05
    """Share of files in the test split (by id hash)."""
    max_files: int | None = None
    """Convert at most this many files (default: all)."""
    sample: bool = False
    """With --download: fetch the ~100 MB sampler instead of the 36 GB release."""


@dataclass
class Robomimic(Common):
    """A robomimic hdf5 file with image observations (e.g. lift/ph/image.hdf5)."""

    camera: str = "agentview_image"
    """Image observation key under obs/ (e.g. agentview_image, robot0_eye_in_hand_image)."""
    resolution: int | None = None
    """Output height and width in pixels (default: keep the file's, 84 in the release)."""
    train_filter: str | None = "train"
    """mask/ filter key of the train split (none: every demo not in val/test)."""
    val_filter: str | None = "valid"
    """mask/ filter key of the val split."""
    test_filter: str | None = None
    """mask/ filter key of the test split."""
    max_demos: int | None = None
    """Convert at most this many demos (default: all)."""
    task: str = "lift"
    """With --download: task (lift, can, square, transport, tool_hang)."""
    dataset_type: str = "ph"
    """With --download: ph (proficient human), mh (multi human) or mg (machine generated)."""


@dataclass
class Ucf101(Common):
    """UCF-101 clips (UCF-101/<Class>/*.avi + ucfTrainTestlist/), one official fold."""

    fold: int = 1
    """Official train/test split: 1, 2 or 3."""
    resolution: int = 64
    """Square output side: short side resized to it, then centre crop (VideoGPT's preprocessing)."""
    frame_skip: int = 1
    """Keep every k-th frame (25 fps / k)."""
    max_frames: int | None = None
    """Keep at most this many frames per clip (default: all)."""
    val_fraction: float = 0.0
    """Share of train groups (gXX) moved to a val split; clips of one group stay together."""
    classes: tuple[str, ...] | None = None
    """Convert only these classes (names from classInd.txt)."""
    max_videos: int | None = None
    """Convert at most this many clips (default: all)."""


@dataclass
class Tgif(Common):
    """TGIF GIFs (tgif-v1.0.tsv + splits/*.txt + gifs/<basename>)."""

    gif_dir: str | None = None
    """Directory of the downloaded GIFs (default: SRC/gifs)."""
    resolution: int = 64
    """Square output side: short side resized to it, then centre crop."""
    frame_skip: int = 1
    """Keep every k-th frame."""
    max_frames: int | None = None
    """Keep at most this many frames per GIF (default: all)."""
    max_videos: int | None = None
    """Convert (or with --download fetch) at most this many GIFs (default: all)."""


Args = (
    Annotated[Bair, tyro.conf.subcommand("bair")]
    | Annotated[Robonet, tyro.conf.subcommand("robonet")]
    | Annotated[Robomimic, tyro.conf.subcommand("robomimic")]
    | Annotated[Ucf101, tyro.conf.subcommand("ucf101")]
    | Annotated[Tgif, tyro.conf.subcommand("tgif")]
)


def fetch(args: Common) -> None:
    dry = args.dry_run
    if isinstance(args, Bair):
        plan = bair.download(args.src, dry_run=True)
    elif isinstance(args, Robonet):
        plan = robonet.download(args.src, sample=args.sample, dry_run=True)
    elif isinstance(args, Robomimic):
        plan = robomimic.download(args.src, task=args.task, dataset_type=args.dataset_type, dry_run=True)
    elif isinstance(args, Ucf101):
        plan = ucf101.download(args.src, dry_run=True)
    else:
        plan = tgif.download(args.src, dry_run=True)
    for url, path in plan:  # type: ignore[union-attr]
        print(f"{'would fetch' if dry else 'fetch'} {url} -> {path}")
    if isinstance(args, Tgif):
        print(
            f"{'would fetch' if dry else 'then fetch'} the GIFs listed in the split files -> {args.src}/gifs/"
        )
    if dry:
        return
    if isinstance(args, Bair):
        bair.download(args.src)
    elif isinstance(args, Robonet):
        robonet.download(args.src, sample=args.sample)
    elif isinstance(args, Robomimic):
        robomimic.download(args.src, task=args.task, dataset_type=args.dataset_type)
    elif isinstance(args, Ucf101):
        ucf101.download(args.src)
    else:
        print(tgif.download(args.src, max_gifs=args.max_videos))
    print("done; now convert with the same command without --download (and with --out)")


def convert(args: Common):
    kw = {
        "skip_corrupt": args.skip_corrupt,
        "episodes_per_shard": args.episodes_per_shard,
        "merge": args.merge,
    }
    if isinstance(args, Bair):
        return bair.convert(
            args.src,
            args.out,
            camera=args.camera,
            val_fraction=args.val_fraction,
            max_files=args.max_files,
            max_episodes=args.max_episodes,
            **kw,
        )
    if isinstance(args, Robonet):
        return robonet.convert(
            args.src,
            args.out,
            camera=args.camera,
            robots=args.robots,
            resolution=args.resolution,
            action_dim=args.action_dim,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            max_files=args.max_files,
            **kw,
        )
    if isinstance(args, Robomimic):
        return robomimic.convert(
            args.src,
            args.out,
            camera=args.camera,
            resolution=args.resolution,
            train_filter=args.train_filter,
            val_filter=args.val_filter,
            test_filter=args.test_filter,
            max_demos=args.max_demos,
            **kw,
        )
    if isinstance(args, Ucf101):
        return ucf101.convert(
            args.src,
            args.out,
            fold=args.fold,
            resolution=args.resolution,
            frame_skip=args.frame_skip,
            max_frames=args.max_frames,
            val_fraction=args.val_fraction,
            classes=args.classes,
            max_videos=args.max_videos,
            **kw,
        )
    assert isinstance(args, Tgif)
    return tgif.convert(
        args.src,
        args.out,
        gif_dir=args.gif_dir,
        resolution=args.resolution,
        frame_skip=args.frame_skip,
        max_frames=args.max_frames,
        max_videos=args.max_videos,
        **kw,
    )


def main(args: Common) -> None:
    try:
        if args.download:
            fetch(args)
            return
        if not args.out:
            sys.exit("error: --out is required (the episode store directory)")
        report = convert(args)
    except (StoreError, DownloadError, FileNotFoundError, ValueError) as e:  # SourceError is a StoreError
        sys.exit(f"error: {e}")
    print(report)
    for s in report.skipped:
        print(f"  skipped: {s}")


if __name__ == "__main__":
    main(tyro.cli(Args))  # type: ignore[call-overload]
