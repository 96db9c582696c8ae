"""robomimic hdf5 -> store: exact frames/actions/rewards, filter-key splits, errors, and a cross-check
against robomimic's own SequenceDataset when robomimic is installed."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.fixtures_formats import write_robomimic
from worldmodel.sources import robomimic
from worldmodel.sources._common import SourceError
from worldmodel.sources._video import resize
from worldmodel.store import EpisodeStore


@pytest.fixture()
def rm_file(tmp_path):
    path = tmp_path / "image.hdf5"
    return path, write_robomimic(path)


def test_convert_exact_with_next_obs_and_mask_splits(rm_file, tmp_path):
    path, truth = rm_file
    r = robomimic.convert(path, tmp_path / "s", progress=False)
    assert r.converted == 4 and r.splits == {"train": 3, "val": 1, "test": 0}
    store = EpisodeStore(tmp_path / "s")
    assert store.meta.obs_shape == (84, 84, 3) and store.meta.action_spec.dim == 7
    assert store.meta.extra["env_args"]["env_name"] == "Lift"
    for demo, d in truth.items():
        ep = store.load(f"image-{demo}")
        N = len(d["actions"])
        assert len(ep) == N + 1
        np.testing.assert_array_equal(ep.frames[:N], d["obs"])
        np.testing.assert_array_equal(ep.frames[1:], d["next_obs"])  # frames[t+1] is the obs after actions[t]
        np.testing.assert_allclose(ep.actions, d["actions"].astype(np.float32))
        np.testing.assert_array_equal(ep.rewards, d["rewards"].astype(np.float32))
        np.testing.assert_array_equal(ep.terminated, d["dones"] != 0)
        assert not ep.truncated and ep.attrs["demo"] == demo and ep.attrs["num_samples"] == N
        assert ep.split == ("val" if demo == "demo_3" else "train")


def test_camera_resolution_and_no_next_obs(rm_file, tmp_path):
    path, truth = rm_file
    robomimic.convert(
        path,
        tmp_path / "s",
        camera="robot0_eye_in_hand_image",
        resolution=64,
        use_next_obs=False,
        progress=False,
    )
    store = EpisodeStore(tmp_path / "s")
    ep = store.load("image-demo_1")
    N = len(truth["demo_1"]["actions"])
    assert ep.frames.shape == (N, 64, 64, 3) and ep.actions.shape == (N - 1, 7) and ep.truncated
    with h5py.File(path) as f:
        want = np.stack([resize(x, (64, 64)) for x in f["data/demo_1/obs/robot0_eye_in_hand_image"][()]])
    np.testing.assert_array_equal(ep.frames, want)


def test_filters_select_and_leave_out_demos(tmp_path):
    path = tmp_path / "mh.hdf5"
    write_robomimic(
        path, lengths=(3, 3, 3, 3, 3), masks={"train": [0, 1, 2, 3], "valid": [4], "better": [0, 4]}
    )
    r = robomimic.convert(path, tmp_path / "s", train_filter="better", val_filter=None, progress=False)
    assert r.converted == 2 and r.filtered == 3  # only the 'better' demos
    with pytest.raises(
        SourceError,
        match=r"filter key\(s\) \['nope'\] not in mask/ \(available: \['better', 'train', 'valid'\]\)",
    ):
        robomimic.convert(path, tmp_path / "s2", train_filter="nope", progress=False)


def test_missing_camera_and_corrupt_demo(rm_file, tmp_path):
    path, _ = rm_file
    with pytest.raises(
        SourceError,
        match=r"image\.hdf5: demo 'demo_0' has no obs/frontview_image \(obs keys: \['agentview_image'",
    ):
        robomimic.convert(path, tmp_path / "s", camera="frontview_image", progress=False)
    with h5py.File(path, "a") as f:
        del f["data/demo_2/actions"]
        f["data/demo_2/actions"] = np.zeros((2, 7))  # wrong length
    with pytest.raises(SourceError, match=r"demo 'demo_2': actions is float64\(2, 7\), expected \(4, A\)"):
        robomimic.convert(path, tmp_path / "s", progress=False)
    with pytest.warns(UserWarning):
        r = robomimic.convert(path, tmp_path / "s3", skip_corrupt=True, progress=False)
    assert r.converted == 3 and "demo_2" in r.skipped[0]


def test_matches_robomimic_sequence_dataset(rm_file, tmp_path):
    try:
        import robomimic.utils.obs_utils as ObsUtils
        from robomimic.utils.dataset import SequenceDataset
    except ImportError as e:
        pytest.skip(f"robomimic is not importable ({e}); it is an optional extra")
    path, _ = rm_file
    robomimic.convert(path, tmp_path / "s", progress=False)
    store = EpisodeStore(tmp_path / "s")
    ObsUtils.initialize_obs_modality_mapping_from_dict({"rgb": ["agentview_image"], "low_dim": []})
    for filt, split in (("train", "train"), ("valid", "val")):
        ds = SequenceDataset(
            str(path),
            obs_keys=("agentview_image",),
            dataset_keys=("actions", "rewards", "dones"),
            seq_length=1,
            hdf5_cache_mode=None,
            filter_by_attribute=filt,
            hdf5_use_swmr=False,
        )
        assert sorted(f"image-{d}" for d in ds.demos) == store.episode_ids(split)
        for i in range(len(ds)):
            item = ds[i]
            demo = ds._index_to_demo_id[i]
            t = i - ds._demo_id_to_start_indices[demo]
            ep = store.load(f"image-{demo}")
            np.testing.assert_array_equal(item["obs"]["agentview_image"][0], ep.frames[t])
            np.testing.assert_array_equal(item["next_obs"]["agentview_image"][0], ep.frames[t + 1])
            np.testing.assert_allclose(item["actions"][0], ep.actions[t], rtol=1e-6)
            assert item["rewards"][0] == ep.rewards[t] and bool(item["dones"][0]) == ep.terminated[t]


def _replace_with(path, key: str, make) -> None:
    with h5py.File(path, "a") as f:
        parent, name = key.rsplit("/", 1)
        old = f[key]
        shape, dtype = old.shape, old.dtype
        del f[key]
        make(f[parent], name, shape, dtype)


def test_inputs_that_read_outside_the_file_are_refused(rm_file, tmp_path):
    """An image dataset stored externally in a local file (or reached through an external link or a virtual
    dataset) must not be converted with that file's bytes as frames."""
    path, _ = rm_file
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"local secret " * 20_000)
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as g:
        g.create_dataset("x", data=np.zeros((5, 84, 84, 3), np.uint8))
    key = "data/demo_0/obs/agentview_image"

    def external(grp, name, shape, dtype):
        grp.create_dataset(name, shape=shape, dtype=dtype, external=[(str(secret), 0, int(np.prod(shape)))])

    def link(grp, name, shape, dtype):
        grp[name] = h5py.ExternalLink(str(other), "/x")

    def virtual(grp, name, shape, dtype):
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(str(other), "x", shape=shape)
        grp.create_virtual_dataset(name, layout)

    for make, what in (
        (external, "external storage in"),
        (link, "external link to"),
        (virtual, "virtual dataset from"),
    ):
        bad = tmp_path / f"bad-{make.__name__}.hdf5"
        bad.write_bytes(path.read_bytes())
        _replace_with(bad, key, make)
        with pytest.raises(
            SourceError, match=rf"bad-{make.__name__}\.hdf5: refers to data outside the file .*{what}"
        ):
            robomimic.convert(bad, tmp_path / f"s-{make.__name__}", progress=False)
        assert not (tmp_path / f"s-{make.__name__}" / "store.json").exists()


def test_a_shard_that_reads_outside_itself_is_refused(tmp_path):
    from worldmodel.store import ActionSpec, StoreError, StoreWriter

    with StoreWriter(tmp_path / "s", source="t", obs_shape=(8, 8, 3), action_spec=ActionSpec.none()) as w:
        eid = w.add_episode(np.zeros((3, 8, 8, 3), np.uint8))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 10)
    _replace_with(
        tmp_path / "s" / "shard-00000.h5",
        f"episodes/{eid}/frames",
        lambda grp, name, shape, dtype: grp.create_dataset(
            name, shape=shape, dtype=dtype, external=[(str(secret), 0, int(np.prod(shape)))]
        ),
    )
    with pytest.raises(StoreError, match=r"shard-00000\.h5: refers to data outside the file"):
        EpisodeStore(tmp_path / "s")
