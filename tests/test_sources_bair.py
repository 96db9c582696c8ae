"""BAIR TFRecords -> store: exact frames/actions, splits, resume, corrupt records."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures_formats import bair_example, pb_example, tfrecord_bytes, write_bair
from worldmodel.sources import bair
from worldmodel.sources._common import SourceError
from worldmodel.store import ActionSpec, EpisodeStore, split_for_id


@pytest.fixture()
def bair_src(tmp_path):
    truths = write_bair(tmp_path / "raw", train_files=2, per_file=2, test_files=1)
    return tmp_path / "raw", truths


def _truth(truths, eid):
    split, stem, i = eid.split("-")
    return truths[(split, stem, int(i))]


def test_convert_exact_frames_actions_extras_and_splits(bair_src, tmp_path):
    src, truths = bair_src
    r = bair.convert(src, tmp_path / "store", val_fraction=0.5, progress=False)
    assert r.converted == 6 and r.frames == 6 * 30 and not r.skipped
    store = EpisodeStore(tmp_path / "store")
    assert store.meta.obs_shape == (64, 64, 3) and store.meta.action_spec == ActionSpec.continuous(
        4, names=("a0", "a1", "a2", "a3")
    )
    assert store.meta.extra["camera"] == "image_aux1"
    for eid in store.episode_ids():
        ep, tr = store.load(eid), _truth(truths, eid)
        np.testing.assert_array_equal(ep.frames, tr["aux1"])
        np.testing.assert_array_equal(ep.actions, tr["action"][:-1])  # actions[t]: frame t -> t+1
        np.testing.assert_array_equal(ep.extras["endeffector_pos"], tr["eef"])
        assert ep.attrs["camera"] == "image_aux1" and ep.attrs["source_file"].endswith(".tfrecords")
        expected = "test" if eid.startswith("test-") else split_for_id(eid, 0.5, 0.0)
        assert ep.split == expected
    assert len(store.episode_ids("test")) == 2


def test_main_camera(bair_src, tmp_path):
    src, truths = bair_src
    bair.convert(src, tmp_path / "store", camera="image_main", splits=("test",), progress=False)
    store = EpisodeStore(tmp_path / "store")
    eid = store.episode_ids()[0]
    np.testing.assert_array_equal(store.load(eid).frames, _truth(truths, eid)["main"])
    with pytest.raises(ValueError, match="camera"):
        bair.convert(src, tmp_path / "other", camera="image_aux2", progress=False)


def test_resume_skips_episodes_already_stored(bair_src, tmp_path):
    src, _ = bair_src
    r1 = bair.convert(src, tmp_path / "store", max_episodes=3, episodes_per_shard=2, progress=False)
    assert r1.converted == 3
    r2 = bair.convert(src, tmp_path / "store", episodes_per_shard=2, progress=False)
    assert (r2.already_present, r2.converted) == (3, 3)
    assert len(EpisodeStore(tmp_path / "store")) == 6


def test_corrupt_record_names_file_and_index_and_skip_corrupt_converts_the_rest(bair_src, tmp_path):
    src, _ = bair_src
    path = sorted((src / "softmotion30_44k" / "train").glob("*.tfrecords"))[0]
    raw = bytearray(path.read_bytes())
    (first_len,) = np.frombuffer(bytes(raw[:8]), "<u8")
    raw[12 + int(first_len) + 4 + 12 + 1000] ^= 0x55  # a pixel of record 1
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=rf"{path.name}: record 1: data CRC mismatch"):
        bair.convert(src, tmp_path / "store", progress=False)
    with pytest.warns(UserWarning, match="record 1"):
        r = bair.convert(src, tmp_path / "store2", skip_corrupt=True, progress=False)
    assert r.converted == 5 and len(r.skipped) == 1 and path.name in r.skipped[0]


def test_missing_key_and_wrong_image_size_are_clear_errors(tmp_path):
    d = tmp_path / "raw" / "softmotion30_44k" / "test"
    d.mkdir(parents=True)
    good, _ = bair_example(0, T=4)
    frame = np.zeros((64, 64, 3), np.uint8).tobytes()
    feats = {f"{t}/action": np.zeros(4, np.float32) for t in range(4)}
    feats.update({f"{t}/endeffector_pos": np.zeros(3, np.float32) for t in range(4)})
    feats.update({f"{t}/image_aux1/encoded": frame for t in range(4) if t != 2})
    wrong = dict(feats, **{"2/image_aux1/encoded": frame + b"\x00" * 64})
    (d / "traj_0_to_2.tfrecords").write_bytes(tfrecord_bytes([good, pb_example(feats), pb_example(wrong)]))
    with pytest.raises(SourceError, match=r"record 1: missing feature '2/image_aux1/encoded'"):
        bair.convert(tmp_path / "raw", tmp_path / "s", progress=False)
    with pytest.warns(UserWarning):
        r = bair.convert(tmp_path / "raw", tmp_path / "s2", skip_corrupt=True, progress=False)
    assert r.converted == 1 and "12288 raw uint8 pixels" in r.skipped[1] and "record 2" in r.skipped[1]


def test_no_tfrecords_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no \\*.tfrecords"):
        bair.convert(tmp_path, tmp_path / "s", progress=False)


def test_download_dry_run_plans_the_public_tar(tmp_path):
    ((url, path),) = bair.download(tmp_path, dry_run=True)
    assert url == "http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar"
    assert path == tmp_path / "bair_robot_pushing_dataset_v0.tar" and not path.exists()


def test_download_is_checked_against_the_published_sha256(tmp_path, monkeypatch):
    import io
    import tarfile

    from tests.test_sources_tgif import _Server
    from worldmodel.sources._download import DownloadError

    assert len(bair.SHA256) == 64 and int(bair.SHA256, 16) >= 0  # a pinned SHA-256, not a placeholder
    buf = io.BytesIO()  # a well-formed tar with the right layout, but not the published file
    with tarfile.open(fileobj=buf, mode="w") as t:
        rec = tfrecord_bytes([bair_example(0)[0]])
        info = tarfile.TarInfo("softmotion30_44k/train/traj_0_to_0.tfrecords")
        info.size = len(rec)
        t.addfile(info, io.BytesIO(rec))
    name = "/datasets/bair_robot_pushing_dataset_v0.tar"
    with _Server({name: buf.getvalue()}) as srv:
        monkeypatch.setattr(bair, "URL", srv.url(name))
        with pytest.raises(DownloadError, match=f"does not match the pinned {bair.SHA256}"):
            bair.download(tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither kept nor unpacked
