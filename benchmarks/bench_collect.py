"""Collection and store-read throughput. Prints one JSON line.

- env steps/s of ViZDoom HGS (64x64, frame skip 4, sticky random policy) collected into a store with
  1 and 2 worker processes (AsyncVectorEnv), measured in the same run;
- store read throughput in clips/s for random 16-frame 64x64 clips through ClipDataset.

Usage: python benchmarks/bench_collect.py [--episodes 16] [--clips 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from envs.collect import collect
from worldmodel.training_data import ClipDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=16, help="episodes collected per worker setting")
    p.add_argument("--clips", type=int, default=500, help="random clips read for the read benchmark")
    args = p.parse_args()
    out: dict[str, float | int | str] = {
        "bench": "collect",
        "env": "vizdoom_hgs",
        "resolution": 64,
        "frame_skip": 4,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            root = Path(tmp) / f"w{workers}"
            t0 = time.perf_counter()
            r = collect("vizdoom_hgs", root, args.episodes, num_envs=workers, seed=workers, progress=False)
            dt = time.perf_counter() - t0
            out[f"steps_per_s_{workers}_workers"] = round(r.env_steps / dt, 1)
            out[f"env_steps_{workers}_workers"] = r.env_steps
        out["speedup_2_vs_1"] = round(out["steps_per_s_2_workers"] / out["steps_per_s_1_workers"], 2)  # type: ignore[operator]
        ds = ClipDataset(Path(tmp) / "w2", split=None, clip_len=16)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(ds), args.clips)
        ds[int(idx[0])]  # open the shard files outside the timed loop
        t0 = time.perf_counter()
        for i in idx:
            ds[int(i)]
        out["store_read_clips_per_s_16x64x64"] = round(args.clips / (time.perf_counter() - t0), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
