"""Benchmark: bucket assignment and snapshot build against Open-Sora's per-row method.

Synthetic metadata shaped like a real corpus (30% images, clips of 2-900 frames, 144p to 4K,
many aspect ratios), bucketed with configs/opensora-v1-2/train/stage1.py's bucket_config.
Baseline: one Python call per row with a fresh per-sample RNG, applied with pandas
(`DataFrame.apply(axis=1)`), as Open-Sora's sampler does at every epoch start; it runs on a
subset and is compared in rows/s.

`ratio` compares the same work: assigning every sample of one epoch to its bucket, done by our
vectorised rule (`assign_buckets`, the function both the Ray Data build and the sampler call).
That is what a training run waits for at an epoch start. `build_ratio` is the whole snapshot
build (`build_snapshot`: Ray Data assignment, sort, zstd Parquet shards per bucket, manifest,
report plot) on a warm local Ray, which does more than the baseline and runs ahead of training.
Also builds a larger table written as 1M-row files and reports the peak memory of this process
and of all its children (the local Ray) while it runs. The default is 2M rows so the run stays
near 3 minutes on 2 cores; `--streamed-rows 10000000` gives the issue's full figure.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from opensora_core.config import load_config
from opensora_core.data.aspect import NUM_PIXELS, RATIO_TABLES
from opensora_core.data.bucket import BucketConfig, assign_buckets
from opensora_core.data.bucket_build import build_snapshot
from opensora_core.data.manifest import bucket_config_hash

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/opensora-v1-2/train/stage1.py"
HEIGHTS = np.array([144, 240, 256, 360, 480, 512, 540, 720, 1024, 1080, 1440, 2048, 2160])
RATIOS = np.array([16 / 9, 4 / 3, 1.0, 9 / 16, 3 / 4, 21 / 9, 2.39, 1.85, 5 / 4, 3 / 2, 2 / 3, 1.9])
SEED = 42


def synthetic_metadata(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    """`n` metadata rows with the scan's columns; row ids start at `start` so chunks never repeat paths."""
    rng = np.random.default_rng(seed)
    is_image = rng.random(n) < 0.3
    height = rng.choice(HEIGHTS, n, p=_height_weights())
    ratio = rng.choice(RATIOS, n) * rng.uniform(0.97, 1.03, n)  # encoders round sizes; not exact ratios
    width = np.maximum(16, np.round(height * ratio / 2) * 2).astype(np.int64)
    portrait = rng.random(n) < 0.15
    height, width = np.where(portrait, width, height), np.where(portrait, height, width)
    fps = np.where(is_image, 0.0, rng.choice([24.0, 25.0, 30.0, 60.0], n))
    frames = np.where(is_image, 1, np.clip(rng.lognormal(5.0, 0.8, n), 2, 900).astype(np.int64))
    ids = np.arange(start, start + n)
    paths = [f"/corpus/part{i // 10_000:05d}/{'img' if im else 'clip'}_{i:09d}.{'jpg' if im else 'mp4'}"
             for i, im in zip(ids.tolist(), is_image.tolist(), strict=True)]  # fmt: skip
    return pa.table(
        {
            "path": paths,
            "text": [f"a scene, sample {i}" for i in ids.tolist()],
            "num_frames": frames,
            "height": height,
            "width": width,
            "fps": fps,
            "aspect_ratio": height / width,
            "resolution": height * width,
            "duration": np.where(is_image, 0.0, frames / np.maximum(fps, 1)),
            "codec": np.where(is_image, "jpeg", "h264"),
            "file_size": rng.integers(10_000, 500_000_000, n),
            "mtime_ns": rng.integers(1_600_000_000 * 10**9, 1_700_000_000 * 10**9, n),
            "is_image": is_image,
        }
    )


def _height_weights() -> np.ndarray:
    w = np.array([3, 6, 2, 8, 8, 2, 4, 10, 2, 10, 3, 1, 3], dtype=float)
    return w / w.sum()


# --- baseline: Open-Sora's method, one Python call per row ---------------------------------------


def baseline_bucket_id(row: pd.Series, cfg: dict, frame_interval: int, seed: int) -> tuple | None:
    """Rules of spec/buckets.md for one sample, with a fresh RNG per sample (as Open-Sora does)."""
    rng = np.random.default_rng(seed + int(row["sample_id"]))
    T, H, W = int(row["num_frames"]), int(row["height"]), int(row["width"])
    for res, frames in cfg.items():
        if H * W < 0.8 * NUM_PIXELS[res]:
            continue
        chosen = None
        if T == 1:
            if 1 in frames:
                chosen = (1, frames[1][0])
        else:
            for t in sorted((t for t in frames if t != 1), reverse=True):
                probs = frames[t][0]
                keep_prob, t_prob = probs if isinstance(probs, tuple) else (probs, 1.0)
                if T > t * frame_interval and (t_prob >= 1 or rng.random() < t_prob):
                    chosen = (t, keep_prob)
                    break
        if chosen is None:
            continue
        t, keep_prob = chosen
        if keep_prob >= 1 or rng.random() < keep_prob:
            table = RATIO_TABLES[res]
            ratio = min(table, key=lambda k: abs(float(k) - H / W))
            return res, t, ratio
    return None


def run_baseline(meta: pa.Table, cfg: BucketConfig, frame_interval: int) -> float:
    frame = meta.select(["num_frames", "height", "width"]).to_pandas()
    frame["sample_id"] = np.arange(len(frame))
    walk = {rb.resolution: cfg.to_dict()[rb.resolution] for rb in cfg.resolutions}  # most pixels first
    start = time.perf_counter()
    frame.apply(baseline_bucket_id, axis=1, args=(walk, frame_interval, SEED))
    return time.perf_counter() - start


# --- ours ----------------------------------------------------------------------------------------


class PeakRss:
    """Samples the memory of this process and all its descendants (the local Ray) every 0.2 s.

    `peak_tree` sums RSS, which counts shared pages (Ray's object store is mapped by every worker) once
    per process that touched them; `peak_tree_pss` sums PSS, which splits each shared page between its
    users, so it is the memory the build really holds.
    """

    def __init__(self) -> None:
        self.peak_tree = 0
        self.peak_tree_pss = 0
        self.peak_self = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = own = me.memory_info().rss
            pss = _pss(me)
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                    pss += _pss(child)
                except psutil.Error:
                    pass
            self.peak_tree, self.peak_self = max(self.peak_tree, total), max(self.peak_self, own)
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _pss(process: psutil.Process) -> int:
    try:
        return process.memory_full_info().pss
    except (AttributeError, psutil.Error):  # no PSS on this platform: RSS is the upper bound
        return process.memory_info().rss


def timed_build(meta_path: Path, root: Path, cfg: BucketConfig, frame_interval: int) -> tuple[float, int]:
    start = time.perf_counter()
    info = build_snapshot(
        meta_path, root, cfg, frame_interval, SEED, 0,
        config_hash=bucket_config_hash(cfg, frame_interval), progress=False,
    )  # fmt: skip
    return time.perf_counter() - start, info.manifest.num_kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument("--streamed-rows", type=int, default=2_000_000, help="10000000 for the full figure")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000)
    args = parser.parse_args()

    import ray

    vcfg = load_config(CONFIG, {}, mode="train")
    cfg, frame_interval = vcfg.bucket_config, int(vcfg.dataset.options.get("frame_interval", 1) or 1)
    work = Path(tempfile.mkdtemp(prefix="bench-bucket-"))
    try:
        meta = synthetic_metadata(args.rows)
        pq.write_table(meta, work / "meta.parquet")

        baseline_s = run_baseline(meta.slice(0, args.baseline_rows), cfg, frame_interval)
        baseline_rps = args.baseline_rows / baseline_s

        keys = meta["path"]
        start = time.perf_counter()
        assign_buckets(
            meta["num_frames"].to_numpy(), meta["height"].to_numpy(), meta["width"].to_numpy(), keys,
            cfg, frame_interval, SEED, 0,
        )  # fmt: skip
        assign_s = time.perf_counter() - start
        del meta, keys

        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - start
        # Start Ray's worker processes with a small build, as a running cluster already has them.
        pq.write_table(synthetic_metadata(10_000, seed=99), work / "warmup.parquet")
        start = time.perf_counter()
        timed_build(work / "warmup.parquet", work / "warmup", cfg, frame_interval)
        warmup_s = time.perf_counter() - start
        build_s, kept = timed_build(work / "meta.parquet", work / "snapshots", cfg, frame_interval)
        ours_rps = args.rows / build_s

        streamed = work / "streamed"
        streamed.mkdir()
        for i, lo in enumerate(range(0, args.streamed_rows, args.chunk_rows)):
            n = min(args.chunk_rows, args.streamed_rows - lo)
            pq.write_table(synthetic_metadata(n, start=lo, seed=i + 1), streamed / f"part-{i:05d}.parquet")
        with PeakRss() as rss:
            streamed_s, _ = timed_build(streamed, work / "snapshots-streamed", cfg, frame_interval)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = 1 << 30
    print(
        json.dumps(
            {
                "bench": "bucket_build",
                "ratio": round(args.rows / assign_s / baseline_rps, 2),
                "ratio_basis": "epoch assignment rows/s, ours (assign_buckets) vs baseline",
                "goal_ratio": 50,
                "build_ratio": round(ours_rps / baseline_rps, 2),
                "rows": args.rows,
                "rows_kept": kept,
                "ours_build_s": round(build_s, 2),
                "ours_rows_per_s": round(ours_rps),
                "baseline_rows": args.baseline_rows,
                "baseline_s": round(baseline_s, 2),
                "baseline_rows_per_s": round(baseline_rps),
                "assign_only_s": round(assign_s, 2),
                "assign_only_rows_per_s": round(args.rows / assign_s),
                "ray_init_s": round(ray_init_s, 2),
                "ray_warmup_build_s": round(warmup_s, 2),
                "streamed_rows": args.streamed_rows,
                "streamed_scaled_from": 10_000_000 if args.streamed_rows != 10_000_000 else None,
                "streamed_build_s": round(streamed_s, 2),
                "streamed_rows_per_s": round(args.streamed_rows / streamed_s),
                "streamed_peak_rss_gib_process_tree": round(rss.peak_tree / gib, 2),
                "streamed_peak_rss_gib_driver": round(rss.peak_self / gib, 2),
                "streamed_peak_pss_gib_process_tree": round(rss.peak_tree_pss / gib, 2),
                "goal_peak_rss_gib": 4,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
