"""Build a bucket snapshot: Ray Data tasks sort the metadata into buckets, the driver gathers the rows in
snapshot order and writes them as zstd Parquet shards, one folder per bucket, then publishes it.

A snapshot for a URI root is built on local disk, then copied up: shards, then the manifest, then
`CURRENT` (see `publish`). The shards are byte-identical whatever the Ray parallelism.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from opensora_core.data.bucket import BucketAssignment, BucketConfig, assign_table
from opensora_core.data.bucket_report import REPORT_PLOT_NAME, write_report_plot
from opensora_core.data.fingerprint import metadata_fingerprint
from opensora_core.data.manifest import MANIFEST_NAME, BucketStats, Manifest, bucket_config_to_json
from opensora_core.data.metadata_table import REQUIRED_COLUMNS, metadata_schema, read_metadata
from opensora_core.data.publish import (
    disk_full_error,
    move_into_place,
    point_current,
    remove_abandoned_builds,
    staging_dir,
    upload_snapshot,
)
from opensora_core.data.snapshot import SITTING_OUT_DIR
from opensora_core.errors import ConfigError, is_disk_full
from opensora_core.storage import Location, is_uri, location

ROWS_PER_FILE = 1_000_000
_UNIQUE_COLUMNS = frozenset({"path", "text"})  # (nearly) one value per row
_ORDER_COLUMN = "__bucket_order"  # temporary sort key: (resolution, frames, ratio) in table order
_SITTING_OUT_ORDER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class SnapshotInfo:
    """What `build_snapshot` wrote: the snapshot directory (a Path, or a Location for a URI) and its manifest."""

    path: Path | Location
    manifest: Manifest


# --- assignment (runs inside Ray Data tasks) -----------------------------------------------------

_ROW_COLUMN = "__row"  # position in the metadata table, so results land in place whatever the block order
_INDEX_COLUMNS = ("resolution_index", "num_frames", "aspect_index")


def bucket_indices(
    table: pa.Table, cfg: BucketConfig, frame_interval: int, seed: int, epoch: int
) -> pa.Table:
    """The bucket of each row of `table` as small integer columns (-1 where it sits out this epoch).

    This is what a Ray Data task returns: a few bytes per row instead of the whole metadata row.
    """
    a = assign_table(table, cfg, frame_interval, seed, epoch)
    columns = {
        "resolution_index": a.resolution_index,
        "num_frames": a.num_frames,
        "aspect_index": a.aspect_index,
    }
    if _ROW_COLUMN in table.column_names:
        columns[_ROW_COLUMN] = table[_ROW_COLUMN]
    return pa.table(columns)


def _order_key(a: BucketAssignment) -> np.ndarray:
    """int64 sort key: buckets in table order (resolution, frames, ratio key), sitting-out rows last."""
    order = (
        (a.resolution_index.astype(np.int64) << 40)
        | (a.num_frames.astype(np.int64) << 12)
        | a.aspect_index.astype(np.int64)
    )
    order[~a.kept] = _SITTING_OUT_ORDER
    return order


def _named_bucket_columns(a: BucketAssignment) -> dict[str, pa.Array]:
    out = ~a.kept
    return {
        "bucket_res": a.resolution_column(),
        "bucket_frames": pa.array(a.num_frames, type=pa.int32(), mask=out),
        "bucket_ar": a.aspect_ratio_column(),
        "bucket_height": pa.array(a.height, type=pa.int32(), mask=out),
        "bucket_width": pa.array(a.width, type=pa.int32(), mask=out),
    }


def bucket_columns(
    table: pa.Table, cfg: BucketConfig, frame_interval: int, seed: int, epoch: int
) -> pa.Table:
    """`table` with the bucket columns (and the temporary sort key) appended."""
    a = assign_table(table, cfg, frame_interval, seed, epoch)
    columns = {**_named_bucket_columns(a), _ORDER_COLUMN: pa.array(_order_key(a), type=pa.int64())}
    for name, column in columns.items():
        if name in table.column_names:
            table = table.drop_columns([name])  # a previous snapshot's columns are recomputed
        table = table.append_column(name, column)
    return table


def _assign_in_ray(
    keys: pa.Table,
    cfg: BucketConfig,
    frame_interval: int,
    seed: int,
    epoch: int,
    num_workers: int | None,
    num_blocks: int | None,
    progress: bool,
) -> pa.Table:
    """`bucket_indices` of `keys` (path, num_frames, height, width), computed by Ray Data tasks, in row order.

    The driver reads the metadata itself (pyarrow reads Parquet with all cores) and hands Ray only
    the four columns the rules need; the tasks send back three small integer columns.
    """
    import ray
    import ray.data

    from opensora_core.parallel.launch import connect_ray

    connect_ray()  # RAY_ADDRESS's cluster, else a local one; a caller that connected first keeps its connection
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    n = keys.num_rows
    if num_blocks is None:
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        num_blocks = max(cpus, -(-n // _ROWS_PER_BLOCK))
    num_blocks = max(1, min(num_blocks, n))
    keys = keys.append_column(_ROW_COLUMN, pa.array(np.arange(n, dtype=np.int64)))
    bounds = np.linspace(0, n, num_blocks + 1).astype(np.int64)
    ds = ray.data.from_arrow(
        [keys.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    ds.set_name(f"bucket-build-seed{seed}-epoch{epoch}")  # the dataset's name on Ray's dashboard and logs
    ds = ds.map_batches(
        bucket_indices,
        batch_format="pyarrow",
        batch_size=None,  # one call per block
        fn_kwargs={"cfg": cfg, "frame_interval": frame_interval, "seed": seed, "epoch": epoch},
        compute=ray.data.TaskPoolStrategy(size=num_workers),  # at most num_workers tasks at once
    )
    columns = {
        "resolution_index": np.full(n, -1, dtype=np.int16),
        "num_frames": np.full(n, -1, dtype=np.int32),
        "aspect_index": np.full(n, -1, dtype=np.int16),
    }
    for block in ray.get(ds.to_arrow_refs()):
        rows = block[_ROW_COLUMN].to_numpy()
        for name, values in columns.items():
            values[rows] = block[name].to_numpy()
    return pa.table(columns)


_ROWS_PER_BLOCK = 500_000  # rows per Ray Data block: enough work per task to hide its overhead


def _row_order(meta: pa.Table, order: np.ndarray) -> np.ndarray:
    """Permutation giving the snapshot's deterministic row order: bucket, then path, then the other simple columns."""
    tie_breakers = [
        f.name
        for f in meta.schema
        if f.name != "path" and (pa.types.is_primitive(f.type) or pa.types.is_string(f.type))
    ]
    keyed = meta.append_column(_ORDER_COLUMN, pa.array(order, type=pa.int64()))  # zero-copy
    keys = [(_ORDER_COLUMN, "ascending"), ("path", "ascending")] + [(n, "ascending") for n in tie_breakers]
    return pc.sort_indices(keyed, sort_keys=keys).to_numpy()


class _Gatherer:
    """`table.take(indices)` batch by batch. Arrow's take on a chunked string column first concatenates
    all its chunks (a 10M-row metadata table read from ten files: ~1.4 GB copied for every call)."""

    def __init__(self, table: pa.Table) -> None:
        self.schema = table.schema
        self.batches = table.to_batches()  # one chunking for every column
        self.offsets = np.cumsum([0] + [b.num_rows for b in self.batches])

    def __call__(self, indices: np.ndarray) -> pa.Table:
        indices = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        by_batch = np.argsort(which, kind="stable")
        grouped, batch_of = indices[by_batch], which[by_batch]
        cuts = np.flatnonzero(np.r_[True, batch_of[1:] != batch_of[:-1], True]) if len(indices) else [0]
        parts = [
            self.batches[batch_of[a]].take(pa.array(grouped[a:b] - self.offsets[batch_of[a]]))
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        gathered = pa.Table.from_batches(parts, schema=self.schema).combine_chunks()
        back = np.empty_like(by_batch)
        back[by_batch] = np.arange(len(by_batch))  # row i of the request is row back[i] of `gathered`
        return gathered.take(pa.array(back))


_ROW_GROUP = 128 * 1024  # rows per Parquet row group; also how many rows a writer gathers at a time


def _write_parquet(rows: Callable[[int, int], pa.Table], lo: int, hi: int, path: Path) -> None:
    """Rows lo..hi into one file, gathered and written one row group at a time, so a file of a million
    rows never sits in memory whole (a 10M-row build writes ~1.4 GB of metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for start in range(lo, max(hi, lo + 1), _ROW_GROUP):
            # One contiguous chunk per column so page layout never depends on how Ray split the blocks.
            group = rows(start, min(start + _ROW_GROUP, hi)).combine_chunks()
            if writer is None:
                # Dictionary pages only pay for low-cardinality columns; for paths and captions they cost
                # time and space.
                dictionary = [n for n in group.column_names if n not in _UNIQUE_COLUMNS]
                writer = pq.ParquetWriter(path, group.schema, compression="zstd", use_dictionary=dictionary)
            writer.write_table(group, row_group_size=_ROW_GROUP)
    finally:
        if writer is not None:
            writer.close()


def _write_rows(
    rows: Callable[[int, int], pa.Table], lo: int, hi: int, directory: Path, base: Path, rows_per_file: int
) -> tuple[str, ...]:
    """Write snapshot rows lo..hi as files of at most `rows_per_file` rows (one, possibly empty, at least)."""
    files = []
    for i, start in enumerate(range(lo, max(hi, lo + 1), rows_per_file)):
        path = directory / f"part-{i:05d}.parquet"
        _write_parquet(rows, start, min(start + rows_per_file, hi), path)
        files.append(path.relative_to(base).as_posix())
    return tuple(files)


@dataclass
class _SnapshotOrder:
    """The rows in snapshot order: kept rows bucket by bucket (`bounds` between buckets), then those
    sitting out; `rows(lo, hi)` gathers that slice from the unsorted metadata, bucket columns added."""

    assignment: BucketAssignment
    perm: np.ndarray  # snapshot position -> metadata row
    num_kept: int
    bounds: list[int]
    rows: Callable[[int, int], pa.Table]

    @classmethod
    def of(cls, meta: pa.Table, assignment: BucketAssignment) -> _SnapshotOrder:
        order = _order_key(assignment)
        perm = _row_order(meta, order)
        order = order[perm]
        bucket_cols = _named_bucket_columns(assignment)
        gather = _Gatherer(meta)

        def rows(lo: int, hi: int) -> pa.Table:
            part = gather(perm[lo:hi])
            take = pa.array(perm[lo:hi])
            for name, column in bucket_cols.items():
                part = part.append_column(name, column.take(take))
            return part

        num_kept = int(np.searchsorted(order, _SITTING_OUT_ORDER))
        starts = np.flatnonzero(np.r_[True, order[1:num_kept] != order[: num_kept - 1]]) if num_kept else []
        return cls(assignment, perm, num_kept, [*map(int, starts), num_kept], rows)


def build_snapshot(
    meta_path: str | Path,
    root: str | Path | Location,
    bucket_cfg: BucketConfig,
    frame_interval: int,
    seed: int,
    epoch: int,
    *,
    config_hash: str,
    num_workers: int | None = None,
    progress: bool = True,
    num_blocks: int | None = None,
    rows_per_file: int = ROWS_PER_FILE,
) -> SnapshotInfo:
    """Assign buckets with Ray Data, write a new snapshot under `root`, then point `root/CURRENT` at it.

    `root` is a local path (written in place) or a URI (built in a local temporary directory, then
    copied up; see `publish.upload_snapshot`).

    Connects to Ray (RAY_ADDRESS, else a local instance) only when it is not initialised yet, and
    leaves it running for later builds. `num_workers` caps concurrent Ray tasks (None: Ray decides); `num_blocks` repartitions the
    metadata into that many blocks. The shards are byte-identical whatever either is.
    """
    # Absolute: Ray tasks run in their own working directories.
    meta_path = Path(meta_path).resolve()
    shared = location(root) if is_uri(root) else None  # a bad URI fails here, before any work
    schema = metadata_schema(meta_path)
    meta = read_metadata(meta_path, schema)
    idx = (
        _assign_in_ray(
            meta.select(list(REQUIRED_COLUMNS)),
            bucket_cfg,
            frame_interval,
            seed,
            epoch,
            num_workers,
            num_blocks,
            progress,
        )
        if meta.num_rows
        else bucket_indices(meta, bucket_cfg, frame_interval, seed, epoch)
    )
    snapshot = _SnapshotOrder.of(
        meta, BucketAssignment.from_indices(*(idx[c].to_numpy() for c in _INDEX_COLUMNS))
    )
    num_kept, bounds = snapshot.num_kept, snapshot.bounds
    if num_kept == 0 and meta.num_rows:
        raise ConfigError(
            f"bucket_config: keeps none of the {meta.num_rows} samples of {meta_path} (each has too few "
            "pixels for its resolutions or too few frames for their lengths, or lost its keep_prob draws)"
        )
    fingerprint = metadata_fingerprint(meta)
    content = f"{config_hash}|{fingerprint}|{seed}|{epoch}|{frame_interval}"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    snapshot_id = f"{stamp}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"
    # a URI root: the snapshot is built in a local staging directory, then copied up
    root = Path(tempfile.mkdtemp(prefix="opensora-snapshot-")) if shared is not None else Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root)
    tmp = staging_dir(root, snapshot_id)
    try:
        stats, shards = [], []
        # pyarrow writes without the GIL: shards (and the report plot) are written by all cores.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                key = snapshot.assignment.key(int(snapshot.perm[lo]))
                assert key is not None  # kept rows come first
                res, t, ar, (h, w) = key.resolution, key.num_frames, key.aspect_ratio, key.size
                bs = int(bucket_cfg.batch_size(res, t))  # type: ignore[arg-type]
                directory = tmp / key.id  # no `key=value` folders: see snapshot.py
                stats.append(BucketStats(res, t, ar, h, w, hi - lo, bs, (hi - lo) // bs))
                shards.append(pool.submit(_write_rows, snapshot.rows, lo, hi, directory, tmp, rows_per_file))
            sitting_out_shards = pool.submit(
                _write_rows,
                snapshot.rows,
                num_kept,
                len(snapshot.perm),
                tmp / SITTING_OUT_DIR,
                tmp,
                rows_per_file,
            )
            manifest = Manifest(
                snapshot_id=snapshot_id,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                config_hash=config_hash,
                metadata_fingerprint=fingerprint,
                metadata_path=str(meta_path.resolve()),
                seed=seed,
                epoch=epoch,
                frame_interval=frame_interval,
                bucket_config=bucket_config_to_json(bucket_cfg),
                num_samples=meta.num_rows,
                num_kept=num_kept,
                buckets=tuple(stats),
            )
            plot = pool.submit(write_report_plot, manifest, tmp / REPORT_PLOT_NAME)  # needs no file names
            manifest = replace(
                manifest,
                buckets=tuple(replace(b, files=f.result()) for b, f in zip(stats, shards, strict=True)),
                sitting_out_files=sitting_out_shards.result(),
            )
            plot.result()
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        final = move_into_place(tmp, root, snapshot_id, shared)
    except BaseException as err:
        full = is_disk_full(err, root)  # before the partial files go: they hold the space
        shutil.rmtree(tmp if shared is None else root, ignore_errors=True)
        if full:
            raise disk_full_error(shared or root, snapshot_id) from None
        raise
    if final.name != snapshot_id:
        manifest = replace(manifest, snapshot_id=final.name)
        (final / MANIFEST_NAME).write_text(manifest.to_json())
    if shared is not None:
        try:
            return SnapshotInfo(upload_snapshot(final, shared), manifest)
        finally:
            shutil.rmtree(root, ignore_errors=True)  # the local staging directory
    point_current(root, final.name)
    return SnapshotInfo(final, manifest)
