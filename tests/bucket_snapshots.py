"""A bucket snapshot on disk without Ray: the layout `build_snapshot` writes, for tests of what reads one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from opensora_core.data.bucket import BucketConfig, BucketKey
from opensora_core.data.bucket_build import bucket_columns
from opensora_core.data.manifest import MANIFEST_NAME, BucketStats, Manifest, bucket_config_to_json
from opensora_core.data.snapshot import SITTING_OUT_DIR


def clip_table(shapes: list[tuple[int, int, int]], *, root: str = "/d") -> pa.Table:
    """A metadata table with one row per (num_frames, height, width)."""
    return pa.table(
        {
            "path": [f"{root}/{i:04d}.mp4" for i in range(len(shapes))],
            "text": [f"clip {i}" for i in range(len(shapes))],
            "num_frames": [s[0] for s in shapes],
            "height": [s[1] for s in shapes],
            "width": [s[2] for s in shapes],
            "fps": [24.0] * len(shapes),
        }
    )


def write_snapshot(
    directory: Path, meta: pa.Table, bucket_config: dict, *, frame_interval: int = 1, seed: int = 0
) -> Path:
    """Bucket `meta` for (seed, epoch 0) and write the snapshot directory `directory`."""
    cfg = BucketConfig.from_dict(bucket_config)
    table = bucket_columns(meta, cfg, frame_interval, seed, 0)
    table = table.take(pc.sort_indices(table, [("__bucket_order", "ascending"), ("path", "ascending")]))
    table = table.drop_columns(["__bucket_order"])
    kept = table.filter(pc.is_valid(table["bucket_res"]))
    stats = []
    ids = [
        f"{r}|{t}|{a}"
        for r, t, a in zip(
            *(kept[c].to_pylist() for c in ("bucket_res", "bucket_frames", "bucket_ar")), strict=True
        )
    ]
    for bucket_id in dict.fromkeys(ids):
        res, t, ar = bucket_id.split("|")
        key = BucketKey.from_names(res, int(t), ar)
        rows = kept.take(pa.array(np.flatnonzero(np.array(ids) == bucket_id)))
        file = f"{key.id}/part-00000.parquet"
        (directory / key.id).mkdir(parents=True)
        pq.write_table(rows, directory / file)
        bs = int(cfg.batch_size(res, int(t)))
        h, w = key.size
        stats.append(BucketStats(res, int(t), ar, h, w, rows.num_rows, bs, rows.num_rows // bs, (file,)))
    (directory / SITTING_OUT_DIR).mkdir(parents=True, exist_ok=True)
    sitting = f"{SITTING_OUT_DIR}/part-00000.parquet"
    pq.write_table(table.filter(pc.is_null(table["bucket_res"])), directory / sitting)
    manifest = Manifest(
        snapshot_id=directory.name, created_at="", config_hash="", metadata_fingerprint="", metadata_path="",
        seed=seed, epoch=0, frame_interval=frame_interval, bucket_config=bucket_config_to_json(cfg),
        num_samples=meta.num_rows, num_kept=kept.num_rows, buckets=tuple(stats), sitting_out_files=(sitting,),
    )  # fmt: skip
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return directory
