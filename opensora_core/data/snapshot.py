"""Build and open bucket snapshots: the metadata table sorted into buckets for one (seed, epoch).

Layout of a snapshot directory (immutable once written; `ROOT/CURRENT` names the live one):

    ROOT/<snapshot_id>/manifest.json
    ROOT/<snapshot_id>/report.png      (samples per resolution x num_frames, aspect-ratio histogram)
    ROOT/<snapshot_id>/bucket_res=240p/bucket_frames=16/bucket_ar=0.56/part-00000.parquet
    ROOT/<snapshot_id>/sitting_out/part-00000.parquet      (rows no bucket kept this epoch)
    ROOT/.tmp-<snapshot_id>-<random>-pid<N>@<host>/          (a build in progress, or one that died:
                                                              the next build on <host> removes it)

ROOT may be a local path or a URI (`file://`, `s3://`, ...; see `opensora_core.storage`): a snapshot
for a URI is built on local disk, then copied up, `manifest.json` after its shards and `CURRENT` last.

Directories are hive-style for people and tools, but every shard also holds all columns
(metadata + bucket_res, bucket_frames, bucket_ar, bucket_height, bucket_width), so read it with
`open_snapshot` (or pyarrow without partition discovery). Rows are ordered by bucket (table order
of resolution, frames, ratio key) then path; kept rows come first and sitting-out rows last, so
row i of `Snapshot.table()` is row i of `Snapshot.full_table()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from opensora_core.data.bucket import (
    BucketAssignment,
    BucketConfig,
    BucketKey,
    assign_table,
    key_hashes,
    splitmix64,
)
from opensora_core.errors import ConfigError, StorageError, is_disk_full
from opensora_core.storage import Location, is_uri, location, pathlike, upload_dir, upload_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_PLOT_NAME = "report.png"
CURRENT_NAME = "CURRENT"
SITTING_OUT_DIR = "sitting_out"
BUCKET_COLUMNS = ("bucket_res", "bucket_frames", "bucket_ar", "bucket_height", "bucket_width")
REQUIRED_COLUMNS = ("path", "num_frames", "height", "width")
FINGERPRINT_COLUMNS = ("path", "file_size", "mtime_ns")
ROWS_PER_FILE = 1_000_000
_UNIQUE_COLUMNS = frozenset({"path", "text"})  # (nearly) one value per row
_ORDER_COLUMN = "__bucket_order"  # temporary sort key: (resolution, frames, ratio) in table order
_SITTING_OUT_ORDER = np.iinfo(np.int64).max
TMP_PREFIX = ".tmp-"  # a build in progress (or one that died): never a snapshot
_TMP_OWNER = re.compile(r"-pid(\d+)@(.+)$")  # see _build_owner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketStats:
    """One bucket of a snapshot: its key, target size, sample count and batches."""

    resolution: str
    num_frames: int
    aspect_ratio: str
    height: int
    width: int
    count: int
    batch_size: int
    num_batches: int  # full batches, count // batch_size (before padding / rank rounding)
    files: tuple[str, ...] = ()

    @property
    def key(self) -> BucketKey:
        return BucketKey.from_names(self.resolution, self.num_frames, self.aspect_ratio)


@dataclass(frozen=True)
class Manifest:
    """Contents of `manifest.json`."""

    snapshot_id: str
    created_at: str
    config_hash: str
    metadata_fingerprint: str
    metadata_path: str
    seed: int
    epoch: int
    frame_interval: int
    bucket_config: dict[str, dict[str, dict[str, Any]]]  # JSON form, see bucket_config_to_json
    num_samples: int
    num_kept: int
    buckets: tuple[BucketStats, ...]
    sitting_out_files: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def num_sitting_out(self) -> int:
        return self.num_samples - self.num_kept

    @property
    def num_batches(self) -> int:
        return sum(b.num_batches for b in self.buckets)

    @property
    def batch_sizes(self) -> dict[tuple[str, int], int]:
        return self.bucket_cfg().batch_sizes()

    def bucket_cfg(self) -> BucketConfig:
        return bucket_config_from_json(self.bucket_config)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_sitting_out"] = self.num_sitting_out
        data["num_batches"] = self.num_batches
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data.pop("num_sitting_out", None)
        data.pop("num_batches", None)
        buckets = tuple(BucketStats(**{**b, "files": tuple(b["files"])}) for b in data.pop("buckets"))
        return cls(**{**data, "buckets": buckets, "sitting_out_files": tuple(data["sitting_out_files"])})


@dataclass(frozen=True)
class SnapshotInfo:
    """What `build_snapshot` wrote: the snapshot directory (a Path, or a Location for a URI) and its manifest."""

    path: Path | Location
    manifest: Manifest


@dataclass
class Snapshot:
    """An opened snapshot (a local directory, or a Location on shared storage); tables are read on first use."""

    path: Path | Location
    manifest: Manifest
    _full: pa.Table | None = field(default=None, repr=False)

    def buckets(self) -> tuple[BucketStats, ...]:
        return self.manifest.buckets

    def full_table(self) -> pa.Table:
        """Every metadata row: kept rows (bucket order) then the rows sitting out."""
        if self._full is None:
            files = [f for b in self.manifest.buckets for f in b.files] + list(
                self.manifest.sitting_out_files
            )
            source = location(self.path)
            tables = [pq.read_table((source / f).path, filesystem=source.filesystem) for f in files]
            self._full = pa.concat_tables(tables) if tables else pa.table({})
        return self._full

    def table(self) -> pa.Table:
        """The kept rows, in bucket order."""
        return self.full_table().slice(0, self.manifest.num_kept)


def bucket_config_to_json(cfg: BucketConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """JSON-safe form of a BucketConfig (frame keys become strings)."""
    return {
        rb.resolution: {
            str(e.num_frames): {"keep_prob": e.keep_prob, "t_prob": e.t_prob, "batch_size": e.batch_size}
            for e in (*rb.videos, *([rb.image] if rb.image else []))
        }
        for rb in cfg.resolutions
    }


def bucket_config_from_json(data: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> BucketConfig:
    return BucketConfig.from_dict(
        {
            res: {int(t): ((e["keep_prob"], e["t_prob"]), e["batch_size"]) for t, e in frames.items()}
            for res, frames in data.items()
        }
    )


def bucket_config_hash(cfg: BucketConfig, frame_interval: int) -> str:
    """Stable hash of the settings that decide bucket membership (not the seed or epoch)."""
    text = json.dumps(
        {"bucket_config": bucket_config_to_json(cfg), "frame_interval": frame_interval}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    ds = ds.map_batches(
        bucket_indices,
        batch_format="pyarrow",
        batch_size=None,  # one call per block
        fn_kwargs={"cfg": cfg, "frame_interval": frame_interval, "seed": seed, "epoch": epoch},
        concurrency=num_workers,
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


# --- writing -------------------------------------------------------------------------------------


def _metadata_schema(meta_path: Path) -> pa.Schema:
    try:
        schema = pads.dataset(str(meta_path), format="parquet", partitioning="hive").schema
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as err:
        raise ConfigError(
            f"metadata {str(meta_path)!r}: cannot read as Parquet ({err}); run `opensora scan`"
        ) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ConfigError(
            f"metadata {str(meta_path)!r}: missing columns {', '.join(missing)}; "
            f"needs {', '.join(REQUIRED_COLUMNS)} (written by `opensora scan`)"
        )
    fields = [f for f in schema if f.name not in BUCKET_COLUMNS]
    return pa.schema(fields)  # without metadata: pandas/Ray annotations vary between writers


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


def _read_metadata(meta_path: Path, schema: pa.Schema) -> pa.Table:
    """The metadata table with `schema`'s columns (a previous snapshot's bucket columns left out)."""
    table = pads.dataset(str(meta_path), format="parquet", partitioning="hive").to_table(columns=schema.names)
    return table.cast(schema)  # chunks kept: combining would copy the whole table


def metadata_fingerprint(table: pa.Table) -> str:
    """Hash of the (path, file_size, mtime_ns) columns, independent of row order.

    Each row's values hash to one uint64 (vectorised, no per-row Python); the rows combine as a
    multiset (count, wrapping sum and xor of two mixes), so neither row order nor chunking matters
    and no sort of the whole table is needed.
    """
    present = [c for c in FINGERPRINT_COLUMNS if c in table.column_names]
    rows = np.zeros(table.num_rows, dtype=np.uint64)
    for i, name in enumerate(present):
        rows = splitmix64(rows ^ _column_hashes(table[name]) ^ np.uint64(i + 1))
    with np.errstate(over="ignore"):
        total = int(rows.sum(dtype=np.uint64))
    mixed = int(np.bitwise_xor.reduce(splitmix64(rows ^ np.uint64(0x9E3779B97F4A7C15)), initial=np.uint64(0)))
    text = f"v2|{','.join(present)}|{table.num_rows}|{total:016x}|{mixed:016x}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _column_hashes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A uint64 per value; nulls hash apart from every value."""
    if isinstance(column, pa.ChunkedArray):  # chunk by chunk: combining a 10M-row path column copies ~0.5 GB
        if not column.num_chunks:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([_column_hashes(chunk) for chunk in column.chunks])
    if column.null_count:
        fill = 0 if pa.types.is_integer(column.type) else ""
        null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        column = pc.fill_null(
            column if pa.types.is_integer(column.type) else pc.cast(column, pa.string()), fill
        )
    else:
        null = None  # no copies of a column without nulls (a 10M-row path column is ~0.5 GB)
    if pa.types.is_integer(column.type):
        values = splitmix64(column.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64))
    else:
        values = key_hashes(column)
    return values if null is None else np.where(null, np.uint64(0xA5A5A5A5A5A5A5A5), values)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    copied up; see `_publish`).

    Connects to Ray (RAY_ADDRESS, else a local instance) only when it is not initialised yet, and
    leaves it running for later builds. `num_workers` caps concurrent Ray tasks (None: Ray decides); `num_blocks` repartitions the
    metadata into that many blocks. The shards are byte-identical whatever either is.
    """
    # Absolute: Ray tasks run in their own working directories.
    meta_path = Path(meta_path).resolve()
    shared = location(root) if is_uri(root) else None  # a bad URI fails here, before any work
    schema = _metadata_schema(meta_path)
    meta = _read_metadata(meta_path, schema)
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
    assignment = BucketAssignment.from_indices(*(idx[c].to_numpy() for c in _INDEX_COLUMNS))
    fingerprint = metadata_fingerprint(meta)
    order = _order_key(assignment)
    perm = _row_order(meta, order)
    order = order[perm]
    bucket_cols = _named_bucket_columns(assignment)

    gather = _Gatherer(meta)

    def rows(lo: int, hi: int) -> pa.Table:
        """Rows lo..hi of the snapshot order: metadata plus bucket columns, gathered from the unsorted table."""
        part = gather(perm[lo:hi])
        take = pa.array(perm[lo:hi])
        for name, column in bucket_cols.items():
            part = part.append_column(name, column.take(take))
        return part

    num_kept = int(np.searchsorted(order, _SITTING_OUT_ORDER))
    if num_kept == 0 and meta.num_rows:
        raise ConfigError(
            f"bucket_config: keeps none of the {meta.num_rows} samples of {meta_path} (each has too few "
            "pixels for its resolutions or too few frames for their lengths, or lost its keep_prob draws)"
        )
    starts = np.flatnonzero(np.r_[True, order[1:num_kept] != order[: num_kept - 1]]) if num_kept else []
    bounds = [*map(int, starts), num_kept]

    content = f"{config_hash}|{fingerprint}|{seed}|{epoch}|{frame_interval}"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    snapshot_id = f"{stamp}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"
    # a URI root: the snapshot is built in a local staging directory, then copied up by _publish
    root = Path(tempfile.mkdtemp(prefix="opensora-snapshot-")) if shared is not None else Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root)
    tmp = root / f"{TMP_PREFIX}{snapshot_id}-{uuid.uuid4().hex[:8]}-{_build_owner()}"
    try:
        stats, shards = [], []
        # pyarrow writes without the GIL: shards (and the report plot) are written by all cores.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                key = assignment.key(int(perm[lo]))
                assert key is not None  # kept rows come first
                res, t, ar, (h, w) = key.resolution, key.num_frames, key.aspect_ratio, key.size
                bs = int(bucket_cfg.batch_size(res, t))  # type: ignore[arg-type]
                directory = tmp / f"bucket_res={res}" / f"bucket_frames={t}" / f"bucket_ar={ar}"
                stats.append(BucketStats(res, t, ar, h, w, hi - lo, bs, (hi - lo) // bs))
                shards.append(pool.submit(_write_rows, rows, lo, hi, directory, tmp, rows_per_file))
            sitting_out_shards = pool.submit(
                _write_rows, rows, num_kept, len(perm), tmp / SITTING_OUT_DIR, tmp, rows_per_file
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
        final = root / snapshot_id
        suffix = 1
        # two builds in the same second with the same inputs
        while final.exists() or (shared is not None and (shared / final.name).exists()):
            final = root / f"{snapshot_id}-{suffix}"
            suffix += 1
        os.rename(tmp, final)
    except BaseException as err:
        full = is_disk_full(err, root)  # before the partial files go: they hold the space
        shutil.rmtree(tmp if shared is None else root, ignore_errors=True)
        if full:
            raise _disk_full_error(shared or root, snapshot_id) from None
        raise
    if final.name != snapshot_id:
        manifest = replace(manifest, snapshot_id=final.name)
        (final / MANIFEST_NAME).write_text(manifest.to_json())
    if shared is not None:
        try:
            return SnapshotInfo(_publish(final, shared), manifest)
        finally:
            shutil.rmtree(root, ignore_errors=True)  # the local staging directory
    _fsync_dir(root)
    pointer = root / f".{CURRENT_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    with open(pointer, "w") as fh:
        fh.write(final.name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT_NAME)  # readers see the old snapshot or the new one, never half
    _fsync_dir(root)
    return SnapshotInfo(final, manifest)


def _build_owner() -> str:
    """`pid{N}@{host}`, the end of a build's temporary directory name: a later build can then tell a
    build that died (no such process on this host) from one still running."""
    return f"pid{os.getpid()}@{socket.gethostname()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned_builds(root: Path) -> list[Path]:
    """Delete the temporary directories under `root` of builds whose process died on this host.

    A killed build leaves its `.tmp-` directory behind (never a snapshot: only a complete one is
    renamed into place). A running build's directory, another host's and unnamed ones stay.
    """
    host, removed = socket.gethostname(), []
    for entry in sorted(root.glob(f"{TMP_PREFIX}*")):
        owner = _TMP_OWNER.search(entry.name)
        if owner and owner[2] == host and not _process_alive(int(owner[1])):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by a bucket build that died (process %s)", entry, owner[1])
            removed.append(entry)
    return removed


def _disk_full_error(root: Path | Location, snapshot_id: str) -> StorageError:
    pointer = root / CURRENT_NAME
    current = pointer.read_text().strip() if pointer.is_file() else None
    kept = f"{CURRENT_NAME} still names {current}" if current else f"there is no {CURRENT_NAME} snapshot yet"
    return StorageError(
        f"bucket snapshot {root}: no space left on device while writing {snapshot_id}; its partial files "
        f"were removed and {kept}; free space and build again"
    )


def _publish(local: Path, root: Location) -> Location:
    """Copy a finished snapshot to shared storage: shards first, then manifest.json, then `CURRENT`.

    `CURRENT` is one small object, so a reader of `root` sees the old snapshot or the new one.
    """
    dest = root / local.name
    upload_dir(local, dest, skip=(MANIFEST_NAME,))
    upload_file(local / MANIFEST_NAME, dest / MANIFEST_NAME)
    (root / CURRENT_NAME).write_text(local.name + "\n")
    return dest


# --- reading -------------------------------------------------------------------------------------


def open_snapshot(root_or_dir: str | Path | Location) -> Snapshot:
    """Open the snapshot `root/CURRENT` names, or the snapshot directory given (a path or a URI)."""
    path = pathlike(root_or_dir)
    if not (path / MANIFEST_NAME).is_file():
        pointer = path / CURRENT_NAME
        if not pointer.is_file():
            raise ConfigError(
                f"bucket snapshot {str(path)!r}: no {MANIFEST_NAME} or {CURRENT_NAME} there; "
                "build one with `opensora bucket`"
            )
        path = path / pointer.read_text().strip()
        if not (path / MANIFEST_NAME).is_file():
            raise ConfigError(f"bucket snapshot {str(path)!r} named by {pointer} has no {MANIFEST_NAME}")
    return Snapshot(path, Manifest.from_json((path / MANIFEST_NAME).read_text()))


def format_report(manifest: Manifest) -> str:
    """A plain-text table of samples and batches per bucket."""
    header = ("resolution", "frames", "ratio", "size", "samples", "batch", "batches")
    lines = [
        (b.resolution, str(b.num_frames), b.aspect_ratio, f"{b.height}x{b.width}", str(b.count),
         str(b.batch_size), str(b.num_batches))
        for b in manifest.buckets
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [
        f"snapshot {manifest.snapshot_id}  seed {manifest.seed}  epoch {manifest.epoch}  "
        f"frame_interval {manifest.frame_interval}  config {manifest.config_hash}",
        fmt.format(*header),
        *(fmt.format(*row) for row in lines),
        f"{manifest.num_kept} of {manifest.num_samples} samples kept in {len(manifest.buckets)} buckets "
        f"({manifest.num_sitting_out} sit out this epoch), {manifest.num_batches} full batches",
    ]
    return "\n".join(out)


def write_report_plot(manifest: Manifest, path: str | Path) -> Path:
    """PNG of a snapshot: samples per (resolution, num_frames) heat map and an aspect-ratio histogram."""
    from opensora_core.data.bucket_plot import plot_bucket_report

    return plot_bucket_report(manifest, Path(path))


# --- scheduled rebuilds --------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotCheck:
    """How the metadata and bucket settings compare with the snapshot `root/CURRENT` names."""

    root: Path | Location
    current: Manifest | None  # None: no complete snapshot yet
    config_hash: str
    metadata_fingerprint: str
    seed: int
    epoch: int
    changes: tuple[str, ...]  # why a rebuild is needed; empty when the current snapshot is up to date

    @property
    def is_current(self) -> bool:
        return not self.changes


def read_metadata_fingerprint(meta_path: str | Path) -> str:
    """`metadata_fingerprint` of a metadata table on disk, as `build_snapshot` records it."""
    meta_path = Path(meta_path)
    schema = _metadata_schema(meta_path)
    present = [c for c in FINGERPRINT_COLUMNS if c in schema.names]
    table = pads.dataset(str(meta_path), format="parquet", partitioning="hive").to_table(columns=present)
    return metadata_fingerprint(table.cast(pa.schema([schema.field(c) for c in present])))


def check_snapshot(
    root: str | Path | Location, meta_path: str | Path, config_hash: str, *, seed: int, epoch: int
) -> SnapshotCheck:
    """Compare `meta_path` and the bucket settings with the current snapshot under `root`.

    A rebuild is needed when there is no current snapshot, or when the metadata fingerprint
    (paths, sizes, mtimes), the bucket config hash, the seed or the epoch differ from its manifest.
    """
    root = pathlike(root)
    fingerprint = read_metadata_fingerprint(meta_path)
    try:
        current: Manifest | None = open_snapshot(root).manifest
    except ConfigError:
        current = None
    if current is None:
        changes: tuple[str, ...] = (f"no current snapshot under {root}",)
    else:
        wanted = {
            "metadata_fingerprint": fingerprint,
            "config_hash": config_hash,
            "seed": seed,
            "epoch": epoch,
        }
        changes = tuple(
            f"{name} {getattr(current, name)} -> {value}"
            for name, value in wanted.items()
            if getattr(current, name) != value
        )
    return SnapshotCheck(root, current, config_hash, fingerprint, seed, epoch, changes)
