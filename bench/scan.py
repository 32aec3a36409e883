"""Benchmark: `opensora scan` files/s against a single-process PyAV header loop, and an unchanged rescan.

Writes `--files` small clips (a few distinct encodes, copied, each with a caption sidecar), then
times (a) the baseline: one process that opens each file with PyAV and reads its stream header,
(b) ours: `opensora_core.data.scan.scan` with all cores, on the same files, first scan. Then an
unchanged rescan of `--rescan-files` files: hard links to one clip in 1,000-file folders plus the
metadata table a first scan of them writes (every row is one file's probe), timed end to end
(listing, stat, reuse, writing the table). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from opensora_core.data.demo_data import write_video
from opensora_core.data.mp4_header import read_mp4_video
from opensora_core.data.probe import probe
from opensora_core.data.scan import METADATA_SCHEMA, scan

SIZES = [(144, 256), (240, 426), (360, 640), (256, 256), (426, 240), (480, 640)]


def write_clips(folder: Path, n: int) -> list[Path]:
    """`n` clips: one encode per size (different lengths and rates), copied round-robin."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    sources = []
    for i, (h, w) in enumerate(SIZES):
        frames = rng.integers(0, 255, (8 + 4 * i, h, w, 3), dtype=np.uint8)
        path = folder / f"source_{i}.mp4"
        write_video(path, frames, fps=24 + i)
        sources.append(path)
    paths = []
    for i in range(n):
        sub = folder / f"part{i // 100:03d}"
        sub.mkdir(exist_ok=True)
        path = sub / f"clip_{i:05d}.mp4"
        shutil.copyfile(sources[i % len(sources)], path)
        path.with_suffix(".txt").write_text(f"clip number {i}")
        paths.append(path)
    for path in sources:
        path.unlink()
    return paths


def header_loop(paths: list[Path]) -> list[tuple]:
    """The baseline: for each file, open it and read the video stream's header fields."""
    rows = []
    for path in paths:
        st = os.stat(path)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            rows.append((str(path), stream.frames, stream.codec_context.height, stream.codec_context.width,
                         float(rate) if rate else None, st.st_size, st.st_mtime_ns))  # fmt: skip
    return rows


def unchanged_rescan(work: Path, n: int) -> tuple[float, int, int]:
    """Seconds to rescan `n` unchanged files, with (files reused, files probed again)."""
    folder = work / "many"
    folder.mkdir()
    source = work / "one.mp4"
    write_video(source, np.zeros((8, 144, 256, 3), dtype=np.uint8), fps=24)
    info = probe(source)
    row = {
        "text": "", "num_frames": info.num_frames, "height": info.height, "width": info.width,
        "fps": info.fps, "aspect_ratio": info.height / info.width, "resolution": info.height * info.width,
        "duration": info.duration, "codec": info.codec, "file_size": info.file_size,
        "mtime_ns": info.mtime_ns, "is_image": False,
    }  # fmt: skip
    rows = []
    for i in range(n):
        sub = folder / f"d{i // 1000:03d}"
        if i % 1000 == 0:  # a copy per folder: a file system allows only so many hard links to one file
            sub.mkdir()
            copy = work / f"source_{i // 1000:03d}.mp4"
            shutil.copyfile(source, copy)
            st = os.stat(copy)
        path = sub / f"c{i:06d}.mp4"
        os.link(copy, path)  # same inode as the copy: same size and mtime
        rows.append({**row, "path": str(path), "file_size": st.st_size, "mtime_ns": st.st_mtime_ns})
    rows.sort(key=lambda r: r["path"])
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    output = work / "many.parquet"
    pq.write_table(table, output)
    start = time.perf_counter()
    result = scan(folder, output, progress=False)
    return time.perf_counter() - start, result.n_reused, result.n_reprobed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--rescan-files", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    try:
        paths = write_clips(work / "clips", args.files)
        header_loop(paths[:20])  # warm the page cache and PyAV's first-use costs for both sides

        start = time.perf_counter()
        baseline_rows = header_loop(paths)
        baseline_s = time.perf_counter() - start

        start = time.perf_counter()
        result = scan(work / "clips", work / "meta.parquet", workers=args.workers, progress=False)
        ours_s = time.perf_counter() - start
        assert result.n_ok == len(baseline_rows) == args.files, (result.n_ok, len(baseline_rows))

        # How many files the scan answered from the MP4 index; the rest went to PyAV.
        fast_path_files = sum(read_mp4_video(p, os.path.getsize(p)) is not None for p in paths)

        rescan_s, reused, reprobed = unchanged_rescan(work, args.rescan_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        json.dumps(
            {
                "bench": "scan",
                "ratio": round(baseline_s / ours_s, 2),
                "goal_ratio": 1.8,
                "files": args.files,
                "workers": args.workers,
                "cpus": os.cpu_count(),
                "ours_s": round(ours_s, 2),
                "ours_files_per_s": round(args.files / ours_s, 1),
                "baseline_s": round(baseline_s, 2),
                "baseline_files_per_s": round(args.files / baseline_s, 1),
                "fast_path_files": fast_path_files,
                "fallback_files": args.files - fast_path_files,
                "unchanged_rescan_files": args.rescan_files,
                "unchanged_rescan_s": round(rescan_s, 2),
                "unchanged_rescan_reused": reused,
                "unchanged_rescan_reprobed": reprobed,
                "goal_unchanged_rescan_s": 10,
            }
        )
    )


if __name__ == "__main__":
    main()
