"""Writers of small files in the exact on-disk formats of the real datasets (test fixtures).

They are written independently of the readers in ``worldmodel/sources``: the BAIR TFRecords use a
hand encoder of the protobuf wire format and the TFRecord framing (CRC-32C from google-crc32c); the
RoboNet file is laid out as RoboNet's saver lays it out, with the mp4 blob produced by imageio-ffmpeg
exactly as that saver does; UCF avis are written with PyAV (MPEG-4 part 2 tagged XVID, as the real
clips, or lossless codecs); TGIF GIFs with Pillow.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import av
import google_crc32c
import h5py
import imageio.v2 as imageio
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Content: smooth, moving, colourful frames (codec-friendly, so lossy codecs stay > 30 dB)
# ----------------------------------------------------------------------------------------------


def moving_frames(T: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``: colour gradients (one drifting in phase) plus a bright square moving ~6 px/frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    c0 = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    out = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        base = np.stack(
            [x / max(W - 1, 1), y / max(H - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 9.0 + 0.9 * t)], -1
        )
        img = 0.6 * base + 0.4 * c0
        s = max(4, H // 4)
        cy, cx = (t * 5 + seed) % max(1, H - s), (t * 4 + 3 * seed) % max(1, W - s)
        img[cy : cy + s, cx : cx + s] = [0.95, 0.9, 0.6]
        out[t] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------------------------
# BAIR: protobuf wire format + TFRecord framing, by hand
# ----------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def pb_feature(value: bytes | list[bytes] | np.ndarray) -> bytes:
    """A serialized ``tensorflow.Feature`` (bytes_list=1, float_list=2 packed, int64_list=3 packed)."""
    if isinstance(value, bytes):
        value = [value]
    if isinstance(value, list):
        return _len_delimited(1, b"".join(_len_delimited(1, v) for v in value))
    a = np.asarray(value)
    if np.issubdtype(a.dtype, np.floating):
        return _len_delimited(2, _len_delimited(1, struct.pack(f"<{a.size}f", *a.ravel().tolist())))
    return _len_delimited(3, _len_delimited(1, b"".join(_varint(int(v) & (2**64 - 1)) for v in a.ravel())))


def pb_example(features: dict[str, bytes | list[bytes] | np.ndarray]) -> bytes:
    """A serialized ``tensorflow.Example``: Example.features(1) -> Features.feature(1) map entries."""
    entries = b"".join(
        _len_delimited(1, _len_delimited(1, k.encode()) + _len_delimited(2, pb_feature(v)))
        for k, v in features.items()
    )
    return _len_delimited(1, entries)


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % (1 << 32)


def tfrecord_bytes(records: list[bytes]) -> bytes:
    out = bytearray()
    for r in records:
        n = struct.pack("<Q", len(r))
        out += n + struct.pack("<I", _masked_crc(n)) + r + struct.pack("<I", _masked_crc(r))
    return bytes(out)


def bair_example(seed: int, T: int = 30) -> tuple[bytes, dict[str, np.ndarray]]:
    """One BAIR-format Example and its ground truth (``aux1``, ``main``, ``action``, ``eef``)."""
    rng = np.random.default_rng(seed)
    truth = {
        "aux1": moving_frames(T, 64, 64, seed),
        "main": moving_frames(T, 64, 64, seed + 100)[..., ::-1].copy(),
        "action": rng.normal(size=(T, 4)).astype(np.float32),
        "eef": rng.normal(size=(T, 3)).astype(np.float32),
    }
    feats: dict[str, bytes | list[bytes] | np.ndarray] = {}
    for t in range(T):
        feats[f"{t}/action"] = truth["action"][t]
        feats[f"{t}/endeffector_pos"] = truth["eef"][t]
        feats[f"{t}/image_aux1/encoded"] = truth["aux1"][t].tobytes()
        feats[f"{t}/image_main/encoded"] = truth["main"][t].tobytes()
    return pb_example(feats), truth


def write_bair(root: Path, train_files: int = 2, per_file: int = 2, test_files: int = 1, T: int = 30) -> dict:
    """``root/softmotion30_44k/{train,test}/traj_<a>_to_<b>.tfrecords``; returns ``{(split, stem, i): truth}``."""
    truths = {}
    seed = 0
    for split, n_files in (("train", train_files), ("test", test_files)):
        d = root / "softmotion30_44k" / split
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n_files):
            start = (256 if split == "train" else 0) + k * per_file
            stem = f"traj_{start}_to_{start + per_file - 1}"
            recs = []
            for i in range(per_file):
                data, truth = bair_example(seed, T)
                seed += 1
                recs.append(data)
                truths[(split, stem, i)] = truth
            (d / f"{stem}.tfrecords").write_bytes(tfrecord_bytes(recs))
    return truths


# ----------------------------------------------------------------------------------------------
# RoboNet: hdf5 as written by RoboNet's saver (mp4 blob from imageio-ffmpeg, or cv2-style JPEGs)
# ----------------------------------------------------------------------------------------------


def mp4_blob(frames: np.ndarray, fps: int = 10) -> np.ndarray:
    """The saver's ``serialize_video``: imageio writes an mp4 (libx264), whose bytes become uint8."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "temp.mp4"
        w = imageio.get_writer(p, fps=fps)
        for f in frames:
            w.append_data(f)
        w.close()
        return np.frombuffer(p.read_bytes(), dtype=np.uint8)


def cv2_style_jpeg(frame: np.ndarray) -> np.ndarray:
    """Bytes ``cv2.imencode('.jpg', frame)`` would give (cv2 reads ``frame`` as BGR), as uint8."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame[..., ::-1])).save(buf, format="JPEG", quality=95)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


ROBONET_META = {
    "camera_configuration": "multiview_3",
    "policy_desc": "random",
    "bin_type": "metal",
    "bin_insert": "none",
    "robot": "sawyer",
    "gripper": "default",
    "background": "lab",
    "action_space": "x,y,z,theta",
    "object_classes": ["toy", "cloth"],
    "primitives": "autograsp",
    "camera_type": "Logitech C920",
    "contains_annotation": False,
    "low_bound": np.array([0.4, -0.2, 0.1, -3.14, -1.0]),
    "high_bound": np.array([0.9, 0.2, 0.3, 3.14, 1.0]),
}


def write_robonet(
    path: Path,
    *,
    T: int = 12,
    H: int = 48,
    W: int = 64,
    n_cams: int = 2,
    adim: int = 4,
    encoding: str = "mp4",
    image_format: str = "RGB",
    seed: int = 0,
    meta: dict | None = None,
    img_T: int | None = None,
) -> dict[str, np.ndarray]:
    """One RoboNet file; returns ``{"frames": (n_cams, T, H, W, 3) true RGB, "actions", "states"}``."""
    rng = np.random.default_rng(seed)
    frames = np.stack([moving_frames(T, H, W, seed + 7 * c) for c in range(n_cams)])
    states = rng.normal(size=(T, 5)).astype(np.float32)
    states[:, -1] = rng.choice([-1.0, 1.0], size=T)  # gripper open/closed
    actions = rng.normal(size=(T - 1, adim)).astype(np.float32)
    m = dict(ROBONET_META if meta is None else meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("file_version", data="0.1.0")
        env = f.create_group("env")
        env.attrs["n_cams"] = n_cams
        env.attrs["cam_encoding"] = encoding
        for c in range(n_cams):
            g = env.create_group(f"cam{c}_video")
            stored = frames[c] if image_format == "RGB" else frames[c][..., ::-1]
            if encoding == "mp4":
                d = g.create_dataset("frames", data=mp4_blob(stored))
                d.attrs["shape"] = stored[0].shape
                d.attrs["T"] = T if img_T is None else img_T
                d.attrs["image_format"] = image_format
            else:
                for t in range(T):
                    # cv2.imencode got the array in `image_format` order (and read it as BGR)
                    d = g.create_dataset(f"frame{t}", data=cv2_style_jpeg(stored[t]))
                    d.attrs["shape"] = stored[t].shape
                    d.attrs["image_format"] = image_format
        env.create_dataset("state", data=states)
        f.create_group("misc").create_dataset("obj_start_pose", data=rng.normal(size=(2, 3)))
        f.create_group("policy").create_dataset("actions", data=actions)
        mg = f.create_group("metadata")
        for k, v in m.items():
            mg.attrs[k] = v
    return {"frames": frames, "actions": actions, "states": states}


# ----------------------------------------------------------------------------------------------
# robomimic
# ----------------------------------------------------------------------------------------------


def write_robomimic(
    path: Path,
    lengths: tuple[int, ...] = (5, 7, 4, 6),
    H: int = 84,
    W: int = 84,
    A: int = 7,
    masks: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """robomimic's documented structure; returns ``{demo: {obs, next_obs, actions, rewards, dones}}``."""
    rng = np.random.default_rng(seed)
    masks = {"train": [0, 1, 2], "valid": [3]} if masks is None else masks
    truth = {}
    env_args = {"env_name": "Lift", "type": 1, "env_kwargs": {"has_renderer": False, "control_freq": 20}}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = int(sum(lengths))
        data.attrs["env_args"] = json.dumps(env_args)
        for i, N in enumerate(lengths):
            seq = moving_frames(N + 1, H, W, seed + i)
            eye = moving_frames(N + 1, H, W, seed + 50 + i)
            d = {
                "obs": seq[:-1],
                "next_obs": seq[1:],
                "actions": rng.uniform(-1, 1, (N, A)),
                "rewards": np.zeros(N),
                "dones": np.zeros(N, np.int64),
            }
            d["rewards"][-1], d["dones"][-1] = 1.0, 1
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = N
            g.attrs["model_file"] = "<mujoco model='fixture'/>"
            g.create_dataset("states", data=rng.normal(size=(N, 32)))
            g.create_dataset("actions", data=d["actions"])
            g.create_dataset("rewards", data=d["rewards"])
            g.create_dataset("dones", data=d["dones"])
            for prefix, frames, efr in (("obs", seq[:-1], eye[:-1]), ("next_obs", seq[1:], eye[1:])):
                og = g.create_group(prefix)
                og.create_dataset("agentview_image", data=frames)
                og.create_dataset("robot0_eye_in_hand_image", data=efr)
                og.create_dataset("robot0_eef_pos", data=rng.normal(size=(N, 3)))
            truth[f"demo_{i}"] = d
        for k, idx in masks.items():
            f[f"mask/{k}"] = np.array([f"demo_{i}" for i in idx], dtype="S")
    return truth


# ----------------------------------------------------------------------------------------------
# UCF-101
# ----------------------------------------------------------------------------------------------


def write_avi(path: Path, frames: np.ndarray, *, codec: str = "mpeg4", fps: int = 25) -> None:
    """An AVI: ``mpeg4`` tagged XVID (like the real clips, lossy), or lossless ``ffv1``/``rawvideo``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    T, H, W, _ = frames.shape
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = W, H
        if codec == "mpeg4":
            s.pix_fmt = "yuv420p"
            s.codec_context.codec_tag = "XVID"
            s.bit_rate = 4_000_000
        elif codec == "rawvideo":
            s.pix_fmt = "bgr24"
        else:
            s.pix_fmt = "bgr0"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


UCF_CLASSES = ["ApplyEyeMakeup", "Basketball", "HandstandPushups"]


def write_ucf(
    root: Path,
    *,
    groups: tuple[int, ...] = (1, 2, 8, 9),
    T: int = 10,
    H: int = 60,
    W: int = 80,
    codec: str = "mpeg4",
) -> dict[str, tuple[int, np.ndarray]]:
    """``root/UCF-101/<Class>/v_<Class>_gGG_c01.avi`` + ``root/ucfTrainTestlist``; fold 1: g01-g07 test.

    Reproduces the real lists' quirks: CRLF line endings, and the ``HandstandPushups`` class whose
    files are named ``v_HandStandPushups_...``. Returns ``{clip stem: (0-based label, frames)}``.
    """
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_bytes(
        "".join(f"{i + 1} {c}\r\n" for i, c in enumerate(UCF_CLASSES)).encode()
    )
    truth, train, test = {}, [], []
    for label, cls in enumerate(UCF_CLASSES):
        file_cls = "HandStandPushups" if cls == "HandstandPushups" else cls
        for g in groups:
            stem = f"v_{file_cls}_g{g:02d}_c01"
            frames = moving_frames(T, H, W, seed=label * 10 + g)
            write_avi(root / "UCF-101" / cls / f"{stem}.avi", frames, codec=codec)
            truth[stem] = (label, frames)
            (test if g <= 7 else train).append(f"{cls}/{stem}.avi")
    for fold in (1, 2, 3):
        (lists / f"trainlist0{fold}.txt").write_bytes(
            "".join(f"{r} {UCF_CLASSES.index(r.split('/')[0]) + 1}\r\n" for r in train).encode()
        )
        (lists / f"testlist0{fold}.txt").write_bytes("".join(f"{r}\r\n" for r in test).encode())
    return truth


# ----------------------------------------------------------------------------------------------
# TGIF
# ----------------------------------------------------------------------------------------------

GIF_PALETTE = np.array(
    [
        [0, 0, 0],
        [255, 255, 255],
        [230, 30, 30],
        [30, 200, 60],
        [40, 60, 220],
        [250, 220, 40],
        [120, 40, 160],
        [90, 90, 90],
    ],
    np.uint8,
)


def gif_frames(T: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """Frames drawn from an 8-colour palette (so GIF quantisation is exact): stripes + a moving box."""
    out = np.empty((T, H, W, 3), np.uint8)
    idx = (np.arange(W)[None, :] // 6 + np.arange(H)[:, None] // 10 + seed) % 4 + 1
    for t in range(T):
        fr = idx.copy()
        y, x = (2 * t) % (H - 8), (3 * t + seed) % (W - 8)
        fr[y : y + 8, x : x + 8] = 5 + (t % 3)
        out[t] = GIF_PALETTE[fr]
    return out


def write_gif(path: Path, frames: np.ndarray, duration_ms: int = 100) -> None:
    """An animated GIF (Pillow; later frames stored as changed rectangles, as encoders do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pal = Image.new("P", (1, 1))
    pal.putpalette(GIF_PALETTE.ravel().tolist() + [0] * (768 - GIF_PALETTE.size))
    imgs = [Image.fromarray(f).quantize(palette=pal, dither=Image.Dither.NONE) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0)


TGIF_URLS = [
    "https://38.media.tumblr.com/9f6c25cc350f12aa74a7dc386a5c4985/tumblr_mevmyaKtDf1rgvhr8o1_500.gif",
    "https://38.media.tumblr.com/9ead028ef62004ef6ac2b92e52edd210/tumblr_nok4eeONTv1s2yegdo1_400.gif",
    "https://33.media.tumblr.com/3b6ec0dd1d5c11f6dbe38567a9be8fa9/tumblr_nhhdkv93Du1u1h5axo1_400.gif",
    "https://38.media.tumblr.com/16798597a3f5cd6e2e22620679efefcf/tumblr_nffzlmdBIG1tecyy7o1_250.gif",
]


def write_tgif(
    root: Path, *, T: int = 8, H: int = 40, W: int = 56, present: tuple[int, ...] = (0, 1, 2)
) -> dict:
    """``root/tgif-v1.0.tsv``, ``root/splits/{train,val,test}.txt``, ``root/gifs/<basename>``.

    URL 0,1 -> train, 2 -> val, 3 -> test (3 sentences). Only GIFs in ``present`` are on disk.
    Returns ``{url: (frames, [sentences], split)}``.
    """
    sentences = [
        ["a man is glaring, and someone with sunglasses appears."],
        ["a cat tries to catch a mouse on a tablet"],
        ["a man dressed in red is dancing."],
        ["an animal comes close to another", "two animals meet", "a dog walks to a cat"],
    ]
    splits = ["train", "train", "val", "test"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "tgif-v1.0.tsv").write_text(
        "".join(f"{u}\t{s}\n" for u, ss in zip(TGIF_URLS, sentences) for s in ss)
    )
    (root / "splits").mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        (root / "splits" / f"{split}.txt").write_text(
            "".join(f"{u}\n" for u, s in zip(TGIF_URLS, splits) if s == split)
        )
    truth = {}
    for i, url in enumerate(TGIF_URLS):
        frames = gif_frames(T, H, W, seed=i)
        if i in present:
            write_gif(root / "gifs" / url.rsplit("/", 1)[1], frames)
        truth[url] = (frames, sentences[i], splits[i])
    return truth
