"""Open a bucket snapshot: the metadata table sorted into buckets for one (seed, epoch).

Layout of a snapshot directory (immutable once written; `ROOT/CURRENT` names the live one):

    ROOT/<snapshot_id>/_manifest.json
    ROOT/<snapshot_id>/_report.png        (samples per resolution x num_frames, aspect-ratio histogram)
    ROOT/<snapshot_id>/240p-16-0.56/part-00000.parquet    (one folder per bucket, named by its id)
    ROOT/<snapshot_id>/sitting_out/part-00000.parquet     (rows no bucket kept this epoch)
    ROOT/.tmp-<snapshot_id>-<random>-pid<N>@<host>/         (a build in progress, or one that died:
                                                             the next build on <host> removes it)

A snapshot directory is a plain Parquet dataset: the side files start with `_`, which Parquet readers
skip, and every shard holds all its columns (metadata + bucket_res, bucket_frames, bucket_ar,
bucket_height, bucket_width), so `pandas.read_parquet(dir)` and `pyarrow.dataset.dataset(dir)` read
every row. The folder names hold no `key=value` parts, so no reader adds hive partition columns that
would clash with those in the files. `open_snapshot` reads the shards in the manifest's order: by
bucket (table order of resolution, frames, ratio key) then path, kept rows first and sitting-out
rows last, so row i of `Snapshot.table()` is row i of `Snapshot.full_table()`.

ROOT may be a local path or a URI (`file://`, `s3://`, ...; see `opensora_core.storage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opensora_core.data.manifest import MANIFEST_NAME, BucketStats, Manifest
from opensora_core.errors import ConfigError
from opensora_core.storage import Location, location, pathlike

CURRENT_NAME = "CURRENT"
SITTING_OUT_DIR = "sitting_out"
BUCKET_COLUMNS = ("bucket_res", "bucket_frames", "bucket_ar", "bucket_height", "bucket_width")
# Before the side files were hidden from Parquet readers the manifest had this name.
_OLD_MANIFEST_NAME = "manifest.json"


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


def open_snapshot(root_or_dir: str | Path | Location) -> Snapshot:
    """Open the snapshot `root/CURRENT` names, or the snapshot directory given (a path or a URI)."""
    path = pathlike(root_or_dir)
    if not (path / MANIFEST_NAME).is_file():
        _refuse_old_layout(path)
        pointer = path / CURRENT_NAME
        if not pointer.is_file():
            raise ConfigError(
                f"bucket snapshot {str(path)!r}: no {MANIFEST_NAME} or {CURRENT_NAME} there; "
                "build one with `opensora bucket`"
            )
        path = path / pointer.read_text().strip()
        if not (path / MANIFEST_NAME).is_file():
            _refuse_old_layout(path)
            raise ConfigError(f"bucket snapshot {str(path)!r} named by {pointer} has no {MANIFEST_NAME}")
    return Snapshot(path, Manifest.from_json((path / MANIFEST_NAME).read_text()))


def _refuse_old_layout(path: Path | Location) -> None:
    """A snapshot written with `manifest.json` among its shards is not read: its folders are named
    `bucket_res=...`, which hive-style readers turn into columns clashing with the shards' own."""
    if (path / _OLD_MANIFEST_NAME).is_file():
        raise ConfigError(
            f"bucket snapshot {str(path)!r} has the old layout ({_OLD_MANIFEST_NAME} among its shards); "
            "build it again with `opensora bucket`"
        )
