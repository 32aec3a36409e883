"""The metadata table (`opensora scan`'s Parquet output) as a bucket build reads it: the columns the
bucket rules need checked, the bucket columns of a snapshot given as metadata left out."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from opensora_core.data.snapshot import BUCKET_COLUMNS
from opensora_core.errors import ConfigError

REQUIRED_COLUMNS = ("path", "num_frames", "height", "width")


def metadata_schema(meta_path: Path) -> pa.Schema:
    """The columns of the metadata at `meta_path` (a file or a folder of Parquet files), bucket columns left out."""
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


def read_metadata(meta_path: Path, schema: pa.Schema) -> pa.Table:
    """The metadata table with `schema`'s columns (a previous snapshot's bucket columns left out)."""
    table = pads.dataset(str(meta_path), format="parquet", partitioning="hive").to_table(columns=schema.names)
    return table.cast(schema)  # chunks kept: combining would copy the whole table
