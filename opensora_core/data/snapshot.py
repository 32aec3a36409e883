"""Build and open bucket snapshots: the metadata table sorted into buckets for one (seed, epoch).

Layout of a snapshot directory (immutable once written; `ROOT/CURRENT` names the live one):

    ROOT/<snapshot_id>/manifest.json
    ROOT/<snapshot_id>/report.png      (samples per resolution x num_frames, aspect-ratio histogram)
    ROOT/<snapshot_id>/bucket_res=240p/bucket_frames=16/bucket_ar=0.56/part-00000.parquet
    ROOT/<snapshot_id>/sitting_out/part-00000.parquet      (rows no bucket kept this epoch)

Directories are hive-style for people and tools, but every shard also holds all columns
(metadata + bucket_res, bucket_frames, bucket_ar, bucket_height, bucket_width), so read it with
`open_snapshot` (or pyarrow without partition discovery). Rows are ordered by bucket (table order
of resolution, frames, ratio key) then path; kept rows come first and sitting-out rows last, so
row i of `Snapshot.table()` is row i of `Snapshot.full_table()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
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

from opensora_core.data.bucket import BucketConfig, BucketKey, assign_buckets
from opensora_core.errors import ConfigError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_PLOT_NAME = "report.png"
CURRENT_NAME = "CURRENT"
SITTING_OUT_DIR = "sitting_out"
BUCKET_COLUMNS = ("bucket_res", "bucket_frames", "bucket_ar", "bucket_height", "bucket_width")
REQUIRED_COLUMNS = ("path", "num_frames", "height", "width")
FINGERPRINT_COLUMNS = ("path", "file_size", "mtime_ns")
ROWS_PER_FILE = 1_000_000
_ORDER_COLUMN = "__bucket_order"  # temporary sort key: (resolution, frames, ratio) in table order
_SITTING_OUT_ORDER = np.iinfo(np.int64).max


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
    """What `build_snapshot` wrote: the snapshot directory and its manifest."""

    path: Path
    manifest: Manifest


@dataclass
class Snapshot:
    """An opened snapshot; tables are read on first use."""

    path: Path
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
            tables = [pq.read_table(self.path / f) for f in files]
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


def bucket_columns(
    table: pa.Table, cfg: BucketConfig, frame_interval: int, seed: int, epoch: int
) -> pa.Table:
    """`table` with the bucket columns (and the temporary sort key) appended."""
    a = assign_buckets(
        table["num_frames"].to_numpy(zero_copy_only=False),
        table["height"].to_numpy(zero_copy_only=False),
        table["width"].to_numpy(zero_copy_only=False),
        table["path"].to_numpy(zero_copy_only=False),
        cfg,
        frame_interval,
        seed,
        epoch,
    )
    out = ~a.kept
    order = (
        (a.resolution_index.astype(np.int64) << 40)
        | (a.num_frames.astype(np.int64) << 12)
        | a.aspect_index.astype(np.int64)
    )
    order[out] = _SITTING_OUT_ORDER
    columns = {
        "bucket_res": pa.array(a.resolution, type=pa.string()),
        "bucket_frames": pa.array(a.num_frames, type=pa.int32(), mask=out),
        "bucket_ar": pa.array(a.aspect_ratio, type=pa.string()),
        "bucket_height": pa.array(a.height, type=pa.int32(), mask=out),
        "bucket_width": pa.array(a.width, type=pa.int32(), mask=out),
        _ORDER_COLUMN: pa.array(order, type=pa.int64()),
    }
    for name, column in columns.items():
        if name in table.column_names:
            table = table.drop_columns([name])  # a previous snapshot's columns are recomputed
        table = table.append_column(name, column)
    return table


def _assign_in_ray(
    meta_path: Path,
    cfg: BucketConfig,
    frame_interval: int,
    seed: int,
    epoch: int,
    num_workers: int | None,
    num_blocks: int | None,
    progress: bool,
) -> pa.Table:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()  # a caller that connected to a cluster first keeps its connection
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.read_parquet(str(meta_path))
    if num_blocks is not None:
        ds = ds.repartition(num_blocks)  # Ray merges small files into one block otherwise
    ds = ds.map_batches(
        bucket_columns,
        batch_format="pyarrow",
        batch_size=None,  # one call per block
        fn_kwargs={"cfg": cfg, "frame_interval": frame_interval, "seed": seed, "epoch": epoch},
        concurrency=num_workers,
    )
    blocks = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not blocks:
        return pa.table({})
    return pa.concat_tables(blocks, promote_options="permissive")


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


def _sorted_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Deterministic row order: bucket, then path, then the remaining simple columns."""
    target = pa.schema(
        [*schema, *(pa.field(n, t) for n, t in zip(BUCKET_COLUMNS, _BUCKET_TYPES, strict=True))]
    ).append(pa.field(_ORDER_COLUMN, pa.int64()))
    table = table.select(target.names).cast(target)
    tie_breakers = [
        f.name
        for f in schema
        if f.name != "path" and (pa.types.is_primitive(f.type) or pa.types.is_string(f.type))
    ]
    keys = [(_ORDER_COLUMN, "ascending"), ("path", "ascending")] + [(n, "ascending") for n in tie_breakers]
    return table.take(pc.sort_indices(table, sort_keys=keys))


_BUCKET_TYPES = (pa.string(), pa.int32(), pa.string(), pa.int32(), pa.int32())


def metadata_fingerprint(table: pa.Table) -> str:
    """Hash of the (path, file_size, mtime_ns) columns, independent of row order."""
    present = [c for c in FINGERPRINT_COLUMNS if c in table.column_names]
    part = table.select(present)
    part = part.take(pc.sort_indices(part, sort_keys=[(c, "ascending") for c in present]))
    digest = hashlib.sha256()
    for name in present:
        # "\x00".join(str(v) for v in column), nulls as "", joined by Arrow rather than in Python
        text = pc.fill_null(part[name].combine_chunks().cast(pa.large_string()), "")
        offsets = pa.array([0, len(text)], type=pa.int64())
        joined = pc.binary_join(
            pa.LargeListArray.from_arrays(offsets, text), pa.scalar("\x00", pa.large_string())
        )[0]
        digest.update(name.encode() + b"\x00")
        if (buffer := joined.as_buffer()) is not None:  # None: an empty column
            digest.update(buffer)
    return digest.hexdigest()[:16]


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One contiguous chunk per column so page layout never depends on how Ray split the blocks.
    pq.write_table(table.combine_chunks(), path, compression="zstd", row_group_size=128 * 1024)


def _write_rows(table: pa.Table, directory: Path, base: Path, rows_per_file: int) -> tuple[str, ...]:
    files = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        path = directory / f"part-{i:05d}.parquet"
        _write_parquet(table.slice(start, rows_per_file), path)
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
    root: str | Path,
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

    Connects with `ray.init()` only when Ray is not initialised yet (and leaves that local Ray
    running for later builds). `num_workers` caps concurrent Ray tasks (None: Ray decides); `num_blocks` repartitions the
    metadata into that many blocks. The shards are byte-identical whatever either is.
    """
    # Absolute: Ray tasks run in their own working directories.
    meta_path, root = Path(meta_path).resolve(), Path(root).resolve()
    schema = _metadata_schema(meta_path)
    rows = _assign_in_ray(
        meta_path, bucket_cfg, frame_interval, seed, epoch, num_workers, num_blocks, progress
    )
    if rows.num_rows == 0:
        rows = bucket_columns(schema.empty_table(), bucket_cfg, frame_interval, seed, epoch)
    rows = _sorted_rows(rows, schema)
    fingerprint = metadata_fingerprint(rows)

    order = rows[_ORDER_COLUMN].to_numpy()
    rows = rows.drop_columns([_ORDER_COLUMN])
    num_kept = int(np.searchsorted(order, _SITTING_OUT_ORDER))
    starts = np.flatnonzero(np.r_[True, order[1:num_kept] != order[: num_kept - 1]]) if num_kept else []
    bounds = [*map(int, starts), num_kept]

    content = f"{config_hash}|{fingerprint}|{seed}|{epoch}|{frame_interval}"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    snapshot_id = f"{stamp}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{snapshot_id}-{uuid.uuid4().hex[:8]}"
    try:
        stats, shards = [], []
        # pyarrow writes without the GIL: shards (and the report plot) are written by all cores.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                part = rows.slice(lo, hi - lo)
                res, t, ar, h, w = (part[c][0].as_py() for c in BUCKET_COLUMNS)
                bs = int(bucket_cfg.batch_size(res, t))  # type: ignore[arg-type]
                directory = tmp / f"bucket_res={res}" / f"bucket_frames={t}" / f"bucket_ar={ar}"
                stats.append(BucketStats(res, t, ar, h, w, hi - lo, bs, (hi - lo) // bs))
                shards.append(pool.submit(_write_rows, part, directory, tmp, rows_per_file))
            sitting_out_shards = pool.submit(
                _write_rows, rows.slice(num_kept), tmp / SITTING_OUT_DIR, tmp, rows_per_file
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
                num_samples=rows.num_rows,
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
        while final.exists():  # two builds in the same second with the same inputs
            final = root / f"{snapshot_id}-{suffix}"
            suffix += 1
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.name != snapshot_id:
        manifest = replace(manifest, snapshot_id=final.name)
        (final / MANIFEST_NAME).write_text(manifest.to_json())
    _fsync_dir(root)
    pointer = root / f".{CURRENT_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    with open(pointer, "w") as fh:
        fh.write(final.name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT_NAME)  # readers see the old snapshot or the new one, never half
    _fsync_dir(root)
    return SnapshotInfo(final, manifest)


# --- reading -------------------------------------------------------------------------------------


def open_snapshot(root_or_dir: str | Path) -> Snapshot:
    """Open the snapshot `root/CURRENT` names, or the snapshot directory given."""
    path = Path(root_or_dir)
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

    root: Path
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
    root: str | Path, meta_path: str | Path, config_hash: str, *, seed: int, epoch: int
) -> SnapshotCheck:
    """Compare `meta_path` and the bucket settings with the current snapshot under `root`.

    A rebuild is needed when there is no current snapshot, or when the metadata fingerprint
    (paths, sizes, mtimes), the bucket config hash, the seed or the epoch differ from its manifest.
    """
    root = Path(root)
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
