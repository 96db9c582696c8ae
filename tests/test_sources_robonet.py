"""RoboNet hdf5 (mp4 blob / JPEG frames) -> store: frames within codec tolerance, action normalisation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.fixtures_formats import ROBONET_META, psnr, write_robonet
from worldmodel.sources import robonet
from worldmodel.sources._common import SourceError
from worldmodel.sources._video import resize
from worldmodel.store import EpisodeStore

MIN_PSNR = 30.0  # H.264/JPEG here give ~34 dB; a channel swap or a one-frame shift gives < 17 dB


def test_mp4_autograsp_file_converts_with_imputed_gripper(tmp_path):
    tr = write_robonet(tmp_path / "hdf5" / "sawyer_traj1.hdf5", T=12, n_cams=2)
    r = robonet.convert(tmp_path, tmp_path / "s", camera=1, resolution=(48, 64), progress=False)
    assert r.converted == 1
    store = EpisodeStore(tmp_path / "s")
    ep = store.load("sawyer_traj1")
    assert ep.frames.shape == (12, 48, 64, 3) and ep.actions.shape == (11, 5)
    assert psnr(ep.frames, tr["frames"][1]) > MIN_PSNR
    assert psnr(ep.frames, tr["frames"][1][..., ::-1]) < 22.0  # colours are not swapped
    assert psnr(ep.frames[1:], tr["frames"][1][:-1]) < 22.0  # frames are aligned
    np.testing.assert_array_equal(ep.actions[:, :4], tr["actions"])
    low, high = ROBONET_META["low_bound"][-1], ROBONET_META["high_bound"][-1]
    expected = np.where(tr["states"][1:, -1] > (low + high) / 2, high, low)
    np.testing.assert_allclose(ep.actions[:, 4], expected)
    np.testing.assert_array_equal(ep.extras["state"], tr["states"])
    assert ep.attrs["action_normalisation"] == "autograsp_imputed" and ep.attrs["robot"] == "sawyer"
    assert ep.attrs["camera"] == 1 and ep.attrs["adim"] == 4 and "toy" in ep.attrs["object_classes"]
    assert store.meta.action_spec.dim == 5 and store.meta.action_spec.names[-1] == "gripper"


def test_jpeg_frames_bgr_format_and_default_square_resolution(tmp_path):
    tr = write_robonet(
        tmp_path / "rn" / "widowx_traj2.hdf5",
        T=8,
        encoding="jpeg",
        image_format="BGR",
        adim=5,
        meta=dict(ROBONET_META, robot="widowx", primitives="none"),
    )
    robonet.convert(tmp_path / "rn", tmp_path / "s", progress=False)
    ep = EpisodeStore(tmp_path / "s").load("widowx_traj2")
    assert ep.frames.shape == (8, 64, 64, 3)
    want = np.stack([resize(f, (64, 64)) for f in tr["frames"][0]])
    assert psnr(ep.frames, want) > MIN_PSNR and psnr(ep.frames, want[..., ::-1]) < 22.0
    np.testing.assert_array_equal(ep.actions, tr["actions"])
    assert ep.attrs["action_normalisation"] == "identity"


def test_usable_length_is_min_of_state_image_and_action_plus_one(tmp_path):
    write_robonet(tmp_path / "a.hdf5", T=12, img_T=9)  # the video claims 9 frames
    ep = robonet.read_file(tmp_path / "a.hdf5", resolution=32)
    assert ep["frames"].shape[0] == 9 and ep["actions"].shape == (8, 5) and ep["state"].shape[0] == 9
    with h5py.File(tmp_path / "a.hdf5", "a") as f:  # now the actions are the shortest
        acts = f["policy/actions"][:5]
        del f["policy/actions"]
        f["policy/actions"] = acts
    assert robonet.read_file(tmp_path / "a.hdf5", resolution=32)["frames"].shape[0] == 6


def test_action_normalisation_rules():
    states = np.zeros((4, 5), np.float32)
    meta = {"primitives": "none"}
    a, rule = robonet.normalise_actions(np.ones((3, 3)), states, meta)
    assert rule == "zero_padded" and a.shape == (3, 5) and np.all(a[:, 3:] == 0)
    a, rule = robonet.normalise_actions(np.arange(21.0).reshape(3, 7), states, meta)
    assert rule == "truncated" and np.array_equal(a, np.arange(21.0).reshape(3, 7)[:, :5])
    a, rule = robonet.normalise_actions(np.ones((3, 4)), states, meta)
    assert rule == "zero_padded"  # 4-d but not autograsp: no imputation
    with pytest.raises(Exception, match="low_bound/high_bound"):
        robonet.normalise_actions(np.ones((3, 4)), states, {"primitives": "autograsp"})


def test_robot_filter_and_truncated_mp4_and_missing_key(tmp_path):
    src = tmp_path / "hdf5"
    write_robonet(src / "a_sawyer.hdf5", T=10)
    write_robonet(src / "b_widowx.hdf5", T=10, meta=dict(ROBONET_META, robot="widowx"))
    write_robonet(src / "c_sawyer_truncated.hdf5", T=10)
    write_robonet(src / "d_sawyer_noactions.hdf5", T=10)
    with h5py.File(src / "c_sawyer_truncated.hdf5", "a") as f:
        blob = f["env/cam0_video/frames"][()]
        attrs = dict(f["env/cam0_video/frames"].attrs)
        del f["env/cam0_video/frames"]
        d = f["env/cam0_video"].create_dataset("frames", data=blob[: len(blob) // 2])
        d.attrs.update(attrs)
    with h5py.File(src / "d_sawyer_noactions.hdf5", "a") as f:
        del f["policy/actions"]
    with pytest.raises(SourceError, match=r"c_sawyer_truncated\.hdf5: .*env/cam0_video/frames"):
        robonet.convert(src, tmp_path / "s", robots=("sawyer",), progress=False)
    with pytest.warns(UserWarning):
        r = robonet.convert(src, tmp_path / "s2", robots=("sawyer",), skip_corrupt=True, progress=False)
    assert r.converted == 1 and r.filtered == 1 and len(r.skipped) == 2
    assert "policy/actions" in r.skipped[1] and "d_sawyer_noactions" in r.skipped[1]
    assert EpisodeStore(tmp_path / "s2").episode_ids() == ["a_sawyer"]


def test_camera_out_of_range_names_the_file(tmp_path):
    write_robonet(tmp_path / "x.hdf5", T=6, n_cams=1)
    with pytest.raises(SourceError, match=r"x\.hdf5: camera 3 out of range: the file has n_cams=1"):
        robonet.read_file(tmp_path / "x.hdf5", camera=3)
