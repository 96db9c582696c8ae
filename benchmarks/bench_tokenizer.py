"""Tokenizer speed (fp32 vs bf16) and, given a store, reconstruction PSNR after a training budget.

Prints one JSON line. Speed is measured for the dream geometry (64x64 frames, stride (1, 8, 8),
the ``small`` vizdoom_hgs preset): train step ms for a batch of 8 clips x 8 frames, and encode /
decode frames/s, each in fp32 and under bf16 autocast, in the same run.

With ``--store DIR`` the ``small`` preset's tokenizer is also trained on that store for at most
``--minutes`` and the held-out (val split) reconstruction PSNR is reported.

With ``--checkpoint BUNDLE`` (issue 23: sharp tokens that keep small objects) it measures the bundle on
held-out clips (``--n-clips`` clips of 16 frames, set A; a disjoint set B of real clips from other episodes
for the FVD noise floor): ``recon`` {psnr, ssim, sharpness (mean Laplacian variance of the grey recon /
of the real frames), frac_off_48 (pixels whose largest channel error exceeds 48/255)}, ``fvd_recon`` (real A
vs recon A, as evaluate.py) beside ``fvd_real_real`` (real A vs real B; null with ``fvd_info.reason`` when
I3D is absent), ``tokens_per_frame``, ``train_minutes`` (``timings.json`` of the run, else null),
``dream`` {step 1/4/8: the same four metrics of open-loop frames under the true actions, context 4},
``dream_frames_per_s`` (batch ``--n-clips``) and, with ``--objects``, ``objects`` {error inside object
boxes (medkits / fireballs from ViZDoom's labels buffer) vs elsewhere, and their ratio}.

Usage: python benchmarks/bench_tokenizer.py [--store data/hgs --minutes 30 --run-dir runs/bench-tok]
       python benchmarks/bench_tokenizer.py --skip-speed --checkpoint runs/vizdoom_hgs-tiny --objects
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldmodel.config import get_preset
from worldmodel.tokenizer import VQVAE


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def speed(out: dict) -> None:
    cfg = get_preset("vizdoom_hgs", "small").tokenizer
    torch.manual_seed(0)
    model = VQVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clips = torch.randint(0, 256, (8, 8, 64, 64, 3), dtype=torch.uint8)
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"

        def train_step(bf16: bool = bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model.compute_loss({"frames": clips})
            opt.zero_grad()
            loss.backward()
            opt.step()

        model.train()
        out[f"train_step_ms_{tag}"] = round(1000 * _time(train_step, 3), 1)
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = model.encode(clips)
            out[f"encode_frames_per_s_{tag}"] = round(
                clips.shape[0] * clips.shape[1] / _time(lambda: model.encode(clips), 3), 1
            )
            out[f"decode_frames_per_s_{tag}"] = round(
                clips.shape[0] * clips.shape[1] / _time(lambda tokens=tokens: model.decode(tokens), 3), 1
            )
    out["train_speedup_bf16"] = round(out["train_step_ms_fp32"] / out["train_step_ms_bf16"], 2)


def quality(out: dict, store: str, minutes: float, run_dir: str) -> None:
    from worldmodel.stages import train_tokenizer

    cfg = get_preset("vizdoom_hgs", "small")
    cfg = replace(
        cfg,
        data=replace(cfg.data, store=store),
        tokenizer_train=replace(cfg.tokenizer_train, max_minutes=minutes, steps=100_000),
    )
    res = train_tokenizer(cfg, run_dir, resume=False, progress=False)
    out.update(
        {
            "store": store,
            "train_minutes": round(res.minutes, 1),
            "train_steps": res.step,
            "batch": cfg.tokenizer_train.batch_size,
            "clip_len": cfg.data.clip_len,
            "val_psnr_db": round(res.val_metrics.get("psnr", float("nan")), 2),
            "val_codebook_usage": round(res.val_metrics.get("codebook_usage", float("nan")), 3),
        }
    )


def image_metrics(fake: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """PSNR (dB), SSIM, sharpness ratio and fraction of pixels off by > 48/255 of uint8 (..., H, W, 3) pairs."""
    from worldmodel.metrics.image import fraction_off, psnr, sharpness_ratio, ssim

    return {
        "psnr": float(psnr(fake, real).mean()),
        "ssim": float(ssim(fake, real).mean()),
        "sharpness": sharpness_ratio(fake, real),
        "frac_off_48": float(fraction_off(fake, real).mean()),
    }


def disjoint_clips(store: Any, n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Two sets of ``n`` real clips of ``length`` frames from disjoint held-out episodes (alternate episodes);
    the second is None when there are fewer than two such episodes. -> (A, B, split)."""
    from worldmodel.store import heldout_episode_ids

    ids, split = heldout_episode_ids(store, "test", length)
    rng = np.random.default_rng(seed)
    halves = [ids[0::2], ids[1::2]]

    def draw(pool: list[str]) -> np.ndarray:
        clips = []
        for _ in range(n):
            e = pool[int(rng.integers(len(pool)))]
            clips.append(
                store.read_clip(e, int(rng.integers(0, store.length(e) - length + 1)), length)["frames"]
            )
        return np.stack(clips)

    return draw(halves[0] if len(ids) > 1 else ids), (draw(halves[1]) if len(ids) > 1 else None), split


def object_check(wm: Any, episodes: int, seed: int) -> dict[str, Any]:
    """Mean absolute reconstruction error (grey levels) inside object boxes vs elsewhere, on real frames."""
    from envs.objects import OBJECTS, box_mask, collect_object_frames
    from envs.policy import real_env_kwargs
    from worldmodel.dynamics_eval import reconstruct

    env = wm.cfg.env
    if env not in OBJECTS:
        return {"reason": f"no object labels for env {env!r}"}
    R = wm.obs_shape[0]
    data = collect_object_frames(env, episodes=episodes, seed=seed, resolution=R, **real_env_kwargs(wm))
    inside = [0.0, 0]
    outside = [0.0, 0]
    n_frames = 0
    for frames, boxes in zip(data.frames, data.boxes):
        L = (len(frames) // wm.cfg.data.clip_len) * wm.cfg.data.clip_len
        if L == 0:
            continue
        err = np.abs(
            reconstruct(wm, frames[None, :L])[0].astype(np.int16) - frames[:L].astype(np.int16)
        ).mean(-1)
        for t in range(L):
            if not boxes[t]:
                continue
            m = box_mask(boxes[t], R)
            inside[0] += float(err[t][m].sum())
            inside[1] += int(m.sum())
            outside[0] += float(err[t][~m].sum())
            outside[1] += int((~m).sum())
            n_frames += 1
    if not n_frames:
        return {
            "objects": list(OBJECTS[env]),
            "n_frames": 0,
            "reason": "no object in view in the episodes played",
        }
    e_in, e_out = inside[0] / inside[1], outside[0] / outside[1]
    return {
        "objects": list(OBJECTS[env]),
        "n_frames": n_frames,
        "error_inside": e_in,
        "error_elsewhere": e_out,
        "ratio": e_in / max(e_out, 1e-9),
    }


def checkpoint_quality(
    out: dict,
    checkpoint: str,
    n_clips: int,
    seed: int,
    objects: bool,
    object_episodes: int,
    i3d_weights: str | None,
) -> None:
    """The issue-23 measurements of a bundle (see the module docstring) into ``out``."""
    from worldmodel.bundle import WorldModel
    from worldmodel.checkpoint import has_weights
    from worldmodel.dynamics_eval import open_loop, reconstruct, sample_clips
    from worldmodel.evaluation import fvd_section
    from worldmodel.store import EpisodeStore

    wm = WorldModel.from_pretrained(checkpoint) if has_weights(checkpoint, "prior") else None
    if wm is None:  # a tokenizer-only run: no dream measurements
        from worldmodel.checkpoint import load_weights, read_run_config
        from worldmodel.config import ExperimentConfig

        d = read_run_config(checkpoint)
        wm = WorldModel(ExperimentConfig.from_dict(d["experiment"]), d["store"])
        wm.tokenizer.load_state_dict(load_weights(checkpoint, "tokenizer"))
        wm.eval()
    store = EpisodeStore(wm.store_path)
    tc = wm.cfg.tokenizer
    h, w = tc.resolution // tc.stride[1], tc.resolution // tc.stride[2]
    timings = Path(checkpoint) / "timings.json"
    out.update(
        {
            "checkpoint": str(checkpoint),
            "tokens_per_frame": h * w,
            "token_grid": [h, w],
            "codebook_size": tc.codebook_size,
            "recon_loss": tc.recon_loss,
            "adv_weight": tc.adv_weight,
            "perceptual_weight": tc.perceptual_weight,
            "train_minutes": json.loads(timings.read_text()) if timings.exists() else None,
        }
    )
    real_a, real_b, split = disjoint_clips(store, n_clips, 16, seed)
    recon_a = reconstruct(wm, real_a)
    out["split"], out["n_clips"] = split, n_clips
    out["recon"] = image_metrics(recon_a, real_a)
    fv = fvd_section(real_a, recon_a, real_b if real_b is not None else recon_a, weights=i3d_weights)
    out["fvd_recon"] = fv["fvd_recon"]
    out["fvd_real_real"] = fv["fvd"] if real_b is not None else None  # real A vs real B: the noise floor
    out["fvd_info"] = fv["fvd_info"]
    if real_b is None:
        out["fvd_info"]["floor_reason"] = (
            f"fewer than two '{split}' episodes of 16 frames: no disjoint real set"
        )
    if has_weights(checkpoint, "prior") and wm.action_spec.kind != "none":
        context, horizon = 4, 8
        clips = sample_clips(store, split=split, n=n_clips, length=context + horizon, seed=seed)
        ro = open_loop(wm, clips.frames, clips.actions, context=context, horizon=horizon)
        real = clips.frames[:, context:]
        out["dream"] = {str(k): image_metrics(ro.frames[:, k - 1], real[:, k - 1]) for k in (1, 4, 8)}
        out["dream_frames_per_s"] = ro.frames.shape[0] * horizon / ro.seconds
        out["dream_batch"] = n_clips
    else:
        out["dream"] = None
    if objects:
        out["objects"] = object_check(wm, object_episodes, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="episode store to train on for the PSNR measurement (skipped if absent)")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget in minutes")
    p.add_argument("--run-dir", default="runs/bench-tokenizer", help="where the benchmark's run is written")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--skip-speed", action="store_true", help="only the PSNR measurement")
    p.add_argument(
        "--checkpoint", help="bundle / run dir to measure on held-out clips of its store (issue 23)"
    )
    p.add_argument("--n-clips", type=int, default=16, help="held-out 16-frame clips per set (FVD: >= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip draws and the object episodes")
    p.add_argument(
        "--objects", action="store_true", help="object check on real ViZDoom frames (labels buffer)"
    )
    p.add_argument("--object-episodes", type=int, default=4, help="real episodes played for the object check")
    p.add_argument("--i3d-weights", help="I3D checkpoint for FVD (default: the cache path)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {
        "bench": "tokenizer",
        "geometry": "64x64 stride (1,8,8) small preset",
        "threads": torch.get_num_threads(),
    }
    if not args.skip_speed:
        speed(out)
    if args.store:
        quality(out, args.store, args.minutes, args.run_dir)
    if args.checkpoint:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint_quality(
                out,
                args.checkpoint,
                args.n_clips,
                args.seed,
                args.objects,
                args.object_episodes,
                args.i3d_weights,
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
