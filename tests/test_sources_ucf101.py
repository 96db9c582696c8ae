"""UCF-101 avi -> action-free store: labels, official fold split, exact frames with lossless codecs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures_formats import UCF_CLASSES, psnr, write_avi, write_ucf
from worldmodel.sources import ucf101
from worldmodel.sources._common import SourceError
from worldmodel.sources._video import resize_center_crop
from worldmodel.store import EpisodeStore, split_for_id


def test_xvid_clips_labels_and_fold_split(tmp_path):
    truth = write_ucf(tmp_path / "raw", codec="mpeg4")  # lossy MPEG-4 part 2 tagged XVID, like the real clips
    r = ucf101.convert(tmp_path / "raw", tmp_path / "s", fold=1, resolution=60, progress=False)
    assert r.converted == 12 and r.splits == {"train": 6, "val": 0, "test": 6}
    store = EpisodeStore(tmp_path / "s")
    assert store.meta.action_spec.kind == "none" and store.meta.extra["class_names"] == UCF_CLASSES
    assert store.meta.fps == 25.0
    for eid in store.episode_ids():
        ep = store.load(eid)
        label, frames = truth[eid]
        assert (
            ep.actions is None and ep.attrs["label"] == label and ep.attrs["label_name"] == UCF_CLASSES[label]
        )
        assert ep.split == ("test" if ep.attrs["group"] <= 7 else "train")
        assert ep.attrs["source_fps"] == 25.0
        assert psnr(ep.frames, frames[:, :, 10:70]) > 30.0  # 80x60 -> centre 60x60 crop, no resampling
    # the HandstandPushups quirk (folder vs file-name case) resolves to the right class
    assert store.load("v_HandStandPushups_g08_c01").attrs["label_name"] == "HandstandPushups"


@pytest.mark.parametrize("codec", ["rawvideo", "ffv1"])
def test_lossless_codecs_are_exact_including_resize_and_frame_skip(tmp_path, codec):
    truth = write_ucf(tmp_path / "raw", codec=codec, groups=(1, 8), T=9)
    ucf101.convert(
        tmp_path / "raw",
        tmp_path / "s",
        resolution=32,
        frame_skip=2,
        max_frames=4,
        classes=("Basketball",),
        progress=False,
    )
    store = EpisodeStore(tmp_path / "s")
    assert store.episode_ids() == ["v_Basketball_g01_c01", "v_Basketball_g08_c01"]
    for eid in store.episode_ids():
        want = np.stack([resize_center_crop(f, 32) for f in truth[eid][1][::2][:4]])
        np.testing.assert_array_equal(store.load(eid).frames, want)
    assert store.meta.fps == 12.5


def test_val_split_is_by_group_and_resume(tmp_path):
    write_ucf(tmp_path / "raw", codec="rawvideo", T=3)
    r1 = ucf101.convert(
        tmp_path / "raw", tmp_path / "s", resolution=16, val_fraction=0.5, max_videos=5, progress=False
    )
    r2 = ucf101.convert(tmp_path / "raw", tmp_path / "s", resolution=16, val_fraction=0.5, progress=False)
    assert (r1.converted, r2.already_present, r2.converted) == (5, 5, 7)
    store = EpisodeStore(tmp_path / "s")
    for eid in store.episode_ids():
        ep = store.load(eid)
        want = (
            "test"
            if ep.attrs["group"] <= 7
            else split_for_id(f"{ep.attrs['label_name']}_g{ep.attrs['group']:02d}", 0.5, 0.0)
        )
        assert ep.split == want


def test_corrupt_and_missing_clips(tmp_path):
    write_ucf(tmp_path / "raw", codec="rawvideo", T=3)
    bad = tmp_path / "raw" / "UCF-101" / "Basketball" / "v_Basketball_g08_c01.avi"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00AVI garbage" * 10)
    (tmp_path / "raw" / "UCF-101" / "Basketball" / "v_Basketball_g09_c01.avi").unlink()
    with pytest.raises(SourceError, match=r"v_Basketball_g08_c01\.avi"):
        ucf101.convert(tmp_path / "raw", tmp_path / "s", resolution=16, progress=False)
    with pytest.warns(UserWarning):
        r = ucf101.convert(
            tmp_path / "raw", tmp_path / "s2", resolution=16, skip_corrupt=True, progress=False
        )
    assert r.converted == 10 and len(r.skipped) == 2
    assert any("g09" in s and "missing on disk" in s for s in r.skipped)


def test_layout_errors(tmp_path):
    with pytest.raises(SourceError, match="ucfTrainTestlist/classInd.txt"):
        ucf101.convert(tmp_path, tmp_path / "s", progress=False)
    write_ucf(tmp_path / "raw", codec="rawvideo", T=2, groups=(1,))
    with pytest.raises(ValueError, match="fold"):
        ucf101.convert(tmp_path / "raw", tmp_path / "s", fold=4, progress=False)
    with pytest.raises(ValueError, match=r"classes: \['Nope'\] not in classInd.txt"):
        ucf101.convert(tmp_path / "raw", tmp_path / "s", classes=("Nope",), progress=False)


def test_fixture_avi_is_a_riff_avi_tagged_xvid(tmp_path):
    # the fixture's lossy clips carry the real clips' container and FourCC
    write_avi(tmp_path / "a.avi", np.zeros((2, 16, 16, 3), np.uint8), codec="mpeg4")
    head = (tmp_path / "a.avi").read_bytes()[:4096]
    assert head[:4] == b"RIFF" and head[8:12] == b"AVI " and b"XVID" in head


def test_download_is_checked_against_the_published_sha256(tmp_path, monkeypatch):
    from tests.test_sources_tgif import _Server
    from worldmodel.sources._download import DownloadError

    for sha in (ucf101.VIDEOS_SHA256, ucf101.SPLITS_SHA256):
        assert len(sha) == 64 and int(sha, 16) >= 0  # pinned SHA-256 values, not placeholders
    with _Server(
        {
            "/UCF101.rar": b"Rar!\x1a\x07\x00 not the published archive",
            "/splits.zip": b"PK\x05\x06" + bytes(18),
        }
    ) as srv:
        monkeypatch.setattr(ucf101, "VIDEOS_URL", srv.url("/UCF101.rar"))
        monkeypatch.setattr(ucf101, "SPLITS_URL", srv.url("/splits.zip"))
        with pytest.raises(DownloadError, match=f"does not match the pinned {ucf101.VIDEOS_SHA256}"):
            ucf101.download(tmp_path, progress=False)
        monkeypatch.setattr(
            ucf101, "VIDEOS_SHA256", None
        )  # the videos accepted: the split zip is checked too
        with pytest.raises(DownloadError, match=f"does not match the pinned {ucf101.SPLITS_SHA256}"):
            ucf101.download(tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UCF101.rar"]
