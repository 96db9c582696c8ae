"""Tokenizer speed (fp32 vs bf16) and, given a store, reconstruction PSNR after a training budget.

Prints one JSON line. Speed is measured for the dream geometry (64x64 frames, stride (1, 8, 8),
the ``small`` vizdoom_hgs preset): train step ms for a batch of 8 clips x 8 frames, and encode /
decode frames/s, each in fp32 and under bf16 autocast, in the same run.

With ``--store DIR`` the ``small`` preset's tokenizer is also trained on that store for at most
``--minutes`` and the held-out (val split) reconstruction PSNR is reported.

Usage: python benchmarks/bench_tokenizer.py [--store data/hgs --minutes 30 --run-dir runs/bench-tok]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

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
            out[f"encode_frames_per_s_{tag}"] = round(clips.shape[0] * clips.shape[1] / _time(lambda: model.encode(clips), 3), 1)
            out[f"decode_frames_per_s_{tag}"] = round(
                clips.shape[0] * clips.shape[1] / _time(lambda tokens=tokens: model.decode(tokens), 3), 1)
    out["train_speedup_bf16"] = round(out["train_step_ms_fp32"] / out["train_step_ms_bf16"], 2)


def quality(out: dict, store: str, minutes: float, run_dir: str) -> None:
    from worldmodel.stages import train_tokenizer

    cfg = get_preset("vizdoom_hgs", "small")
    cfg = replace(cfg, data=replace(cfg.data, store=store),
                  tokenizer_train=replace(cfg.tokenizer_train, max_minutes=minutes, steps=100_000))
    res = train_tokenizer(cfg, run_dir, resume=False, progress=False)
    out.update({"store": store, "train_minutes": round(res.minutes, 1), "train_steps": res.step,
                "batch": cfg.tokenizer_train.batch_size, "clip_len": cfg.data.clip_len,
                "val_psnr_db": round(res.val_metrics.get("psnr", float("nan")), 2),
                "val_codebook_usage": round(res.val_metrics.get("codebook_usage", float("nan")), 3)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="episode store to train on for the PSNR measurement (skipped if absent)")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget in minutes")
    p.add_argument("--run-dir", default="runs/bench-tokenizer", help="where the benchmark's run is written")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--skip-speed", action="store_true", help="only the PSNR measurement")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"bench": "tokenizer", "geometry": "64x64 stride (1,8,8) small preset", "threads": torch.get_num_threads()}
    if not args.skip_speed:
        speed(out)
    if args.store:
        quality(out, args.store, args.minutes, args.run_dir)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
