"""The feature snapshot format: VAE latents and caption embeddings of a bucket snapshot's kept samples.

Layout (immutable once written; `ROOT/CURRENT` names the live one, as for bucket snapshots):

    ROOT/<feature_id>/_manifest.json           lineage: bucket snapshot, encoders, dtype, transform, seed
    ROOT/<feature_id>/_empty_caption.parquet   the "" caption's embedding, once (caption dropout)
    ROOT/<feature_id>/_errors.parquet          clips that failed to encode: path, bucket, error
    ROOT/<feature_id>/240p-51-0.56/part-00000.parquet   one folder per bucket, named by its id

Each bucket shard is plain Parquet, one row per (sample, view):

    sample          int64   row of the bucket snapshot's full table (the sampler's index)
    path, text      string
    view            int16   which of `feature_views` encodings of the clip (each its own crop)
    reuse_key       string  hash of what made the row (file, bucket, view, encoders): an incremental
                            rebuild copies rows whose key it would compute again
    num_frames, height, width (int32), fps, ar (float32): the conditioning the model gets
    latent          fixed_shape_tensor<V>[C, T', H', W']        (absent without video features)
    text_len        int32   caption tokens kept
    text_embedding  list<fixed_size_list<V, D>>, text_len long  (absent without text features)

V is float32 for fp32, float16 for fp16 and uint16 for bf16 (its bit pattern; Parquet has no
bfloat16). Captions are stored without their padding (Open-Sora's `save_compressed_text_features`):
`FeatureSnapshot.sample` pads them back to `model_max_length` with a mask.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from opensora_core.errors import ConfigError

FORMAT_VERSION = 1
MANIFEST_NAME = "_manifest.json"
EMPTY_CAPTION_NAME = "_empty_caption.parquet"
ERRORS_NAME = "_errors.parquet"
CURRENT_NAME = "CURRENT"
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("bucket", pa.string()), ("error", pa.string())])
ROW_GROUP_BYTES = 8 << 20  # a reader fetches one row group per sample: keep it a few MB

_STORAGE = {
    "fp32": (np.float32, pa.float32()),
    "fp16": (np.float16, pa.float16()),
    "bf16": (np.uint16, pa.uint16()),
}
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- tensors <-> arrow ---------------------------------------------------------------------------


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored for `dtype` (bf16: its uint16 bit pattern)."""
    values = values.detach().to("cpu", _TORCH[dtype]).contiguous()
    if dtype == "bf16":
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def from_storage(values: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_storage` (a copy: Arrow's buffers are read-only)."""
    values = np.array(values, copy=True, order="C")
    if dtype == "bf16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def latent_array(latents: np.ndarray) -> pa.Array:
    """[N, C, T, H, W] -> a fixed_shape_tensor column of N rows."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(latents))


def embedding_array(embeddings: list[np.ndarray], dtype: str) -> pa.Array:
    """Per row an [L_i, D] caption embedding -> list<fixed_size_list<V, D>> (no padding)."""
    _, value_type = _STORAGE[dtype]
    dim = embeddings[0].shape[1] if embeddings else 1
    flat = np.concatenate([e.reshape(-1) for e in embeddings]) if embeddings else np.zeros(0)
    tokens = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.astype(_STORAGE[dtype][0]), type=value_type), dim
    )
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in embeddings])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), tokens)


def read_latents(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A latent column back to [N, C, T, H, W]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def read_embedding(column: pa.ChunkedArray | pa.Array, row: int) -> np.ndarray:
    """Row `row` of a text_embedding column as [L, D]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    tokens = column[row].values  # FixedSizeListArray of L items
    dim = tokens.type.list_size
    return tokens.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


# --- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderInfo:
    """One frozen encoder as the features were made with it."""

    config: dict[str, Any]  # the config section, `dict(type=..., **options)`
    fingerprint: str  # see features.fingerprint: settings and weights files
    output_dim: int  # VAE: latent channels; text encoder: embedding width
    model_max_length: int | None = None  # text encoder only: the padded caption length
    masked: bool = (
        True  # text encoder only: its captions come with a padding mask (T5; not CLIP's pooled token)
    )


@dataclass(frozen=True)
class FeatureBucket:
    """One bucket folder: its id, pixel size, latent shape, rows and files."""

    id: str
    num_frames: int
    height: int
    width: int
    latent_shape: tuple[int, ...] | None  # [C, T', H', W'], None without video features
    count: int  # samples (each has `views` rows)
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureManifest:
    """`_manifest.json` of a feature snapshot."""

    feature_id: str
    created_at: str
    bucket_snapshot_id: str
    bucket_snapshot_path: str
    dtype: str  # "fp32" | "fp16" | "bf16"
    transform_name: str
    frame_interval: int
    seed: int  # frame-sampling seed: view v of a clip starts where (seed, v, path) says
    views: int
    video_features: bool
    text_features: bool
    vae: EncoderInfo | None
    text_encoder: EncoderInfo | None
    buckets: tuple[FeatureBucket, ...]
    num_samples: int  # kept samples of the bucket snapshot
    num_encoded: int  # rows encoded by this build
    num_reused: int  # rows copied from `reused_from`
    num_errors: int  # samples left out (see _errors.parquet)
    reused_from: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FeatureManifest:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"feature snapshot {data.get('feature_id')}: format version {data.get('format_version')}, "
                f"this version reads {FORMAT_VERSION}; run `opensora precompute` again"
            )
        buckets = tuple(
            FeatureBucket(
                **{
                    **b,
                    "latent_shape": tuple(b["latent_shape"]) if b["latent_shape"] else None,
                    "files": tuple(b["files"]),
                }
            )
            for b in data.pop("buckets")
        )
        encoders = {k: EncoderInfo(**data[k]) if data.get(k) else None for k in ("vae", "text_encoder")}
        return cls(**{**data, **encoders, "buckets": buckets})

    def with_files(self, files: Mapping[str, tuple[str, ...]]) -> FeatureManifest:
        return replace(self, buckets=tuple(replace(b, files=files.get(b.id, b.files)) for b in self.buckets))


# --- writing -------------------------------------------------------------------------------------


def feature_schema(dtype: str, latent_shape: tuple[int, ...] | None, text_dim: int | None) -> pa.Schema:
    """The columns of a bucket shard (see the module docstring)."""
    _, value_type = _STORAGE[dtype]
    fields = [
        ("sample", pa.int64()),
        ("path", pa.string()),
        ("text", pa.string()),
        ("view", pa.int16()),
        ("reuse_key", pa.string()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fps", pa.float32()),
        ("ar", pa.float32()),
    ]
    if latent_shape is not None:
        fields.append(("latent", pa.fixed_shape_tensor(value_type, list(latent_shape))))
    if text_dim is not None:
        fields += [("text_len", pa.int32()), ("text_embedding", pa.list_(pa.list_(value_type, text_dim)))]
    return pa.schema(fields)


def rows_per_group(schema: pa.Schema, max_text_len: int = 1) -> int:
    """Rows per Parquet row group so a group holds about ROW_GROUP_BYTES."""
    row_bytes = 64
    for f in schema:
        if isinstance(f.type, pa.FixedShapeTensorType):
            row_bytes += int(np.prod(f.type.shape)) * f.type.value_type.bit_width // 8
        elif f.name == "text_embedding":
            row_bytes += (
                max_text_len * f.type.value_type.list_size * f.type.value_type.value_type.bit_width // 8
            )
    return max(1, ROW_GROUP_BYTES // row_bytes)


def write_shard(table: pa.Table, path: Path) -> None:
    """Write one bucket shard (rows sorted by sample, view); a reader fetches one small row group per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    max_len = int(max(table["text_len"].to_pylist() or [1])) if "text_len" in table.column_names else 1
    pq.write_table(
        table,
        path,
        row_group_size=rows_per_group(table.schema, max_len),
        compression="zstd",
        use_dictionary=["num_frames", "height", "width", "fps", "ar", "view"],
    )


def write_empty_caption(directory: Path, embedding: np.ndarray, dtype: str) -> None:
    """The "" caption's [L, D] embedding, stored once."""
    table = pa.table(
        {
            "text_len": pa.array([len(embedding)], pa.int32()),
            "text_embedding": embedding_array([embedding], dtype),
        }
    )
    pq.write_table(table, directory / EMPTY_CAPTION_NAME)


def write_errors(directory: Path, rows: list[dict[str, str]]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), directory / ERRORS_NAME)


# --- reading -------------------------------------------------------------------------------------


@dataclass
class FeatureSnapshot:
    """An opened feature snapshot: `sample(row, view)` gives one sample's stored features.

    The (sample, view) -> (file, row) index is three numpy arrays built on first use from the shards'
    small columns (a few bytes per row, so millions of clips index in memory). Reading fetches the
    row group holding the row and keeps the last one.
    """

    path: Path
    manifest: FeatureManifest
    _index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _files: list[Path] = field(default_factory=list, repr=False)
    _group_starts: list[np.ndarray] = field(default_factory=list, repr=False)
    _open: dict[int, pq.ParquetFile] = field(default_factory=dict, repr=False)
    _group: tuple[int, int, pa.Table] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own files
        return {**self.__dict__, "_open": {}, "_group": None}

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.manifest.dtype]

    def _keys(self, sample: np.ndarray, view: np.ndarray) -> np.ndarray:
        return sample.astype(np.int64) * self.manifest.views + view.astype(np.int64)

    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted keys sample * views + view, file number, row in file)."""
        if self._index is None:
            keys, files, rows = [], [], []
            self._files = [self.path / f for b in self.manifest.buckets for f in b.files]
            self._group_starts = []
            for i, file in enumerate(self._files):
                meta = pq.ParquetFile(file)
                sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
                self._group_starts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
                small = meta.read(columns=["sample", "view"])
                keys.append(self._keys(small["sample"].to_numpy(), small["view"].to_numpy()))
                files.append(np.full(small.num_rows, i, dtype=np.int32))
                rows.append(np.arange(small.num_rows, dtype=np.int64))
            key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
            order = np.argsort(key, kind="stable")
            self._index = (
                key[order],
                (np.concatenate(files) if files else np.zeros(0, np.int32))[order],
                (np.concatenate(rows) if rows else np.zeros(0, np.int64))[order],
            )
        return self._index

    @property
    def samples(self) -> np.ndarray:
        """The bucket-snapshot rows that have features for every view, sorted."""
        keys = self.index()[0]
        samples, counts = np.unique(keys // self.manifest.views, return_counts=True)
        return samples[counts == self.manifest.views]

    def has(self, sample: int, view: int = 0) -> bool:
        keys = self.index()[0]
        key = sample * self.manifest.views + view
        i = int(np.searchsorted(keys, key))
        return i < len(keys) and int(keys[i]) == key

    def _row(self, sample: int, view: int) -> tuple[pa.Table, int]:
        keys, files, rows = self.index()
        key = sample * self.manifest.views + view
        i = int(np.searchsorted(keys, key))
        if i >= len(keys) or int(keys[i]) != key:
            raise KeyError(f"feature snapshot {self.path}: no features for sample {sample} view {view}")
        file, row = int(files[i]), int(rows[i])
        starts = self._group_starts[file]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        if self._group is None or self._group[:2] != (file, group):
            if file not in self._open:
                self._open[file] = pq.ParquetFile(self._files[file])
            self._group = (file, group, self._open[file].read_row_group(group))
        return self._group[2], row - int(starts[group])

    def sample(self, sample: int, view: int = 0) -> dict[str, Any]:
        """One sample's features: `latent` [C, T', H', W'], `y` [1, L, D] (padded to model_max_length
        with its `mask` [L], 1 = real token, for a masked encoder such as T5) and the conditioning
        (num_frames, height, width, fps, ar), plus path and text."""
        table, row = self._row(sample, view)
        out: dict[str, Any] = {
            k: table[k][row].as_py() for k in ("path", "text", "num_frames", "height", "width", "fps", "ar")
        }
        dtype = self.manifest.dtype
        if "latent" in table.column_names:
            out["latent"] = from_storage(read_latents(table["latent"].slice(row, 1))[0], dtype)
        if "text_embedding" in table.column_names:
            y, mask = self._pad(read_embedding(table["text_embedding"], row))
            out["y"] = y
            if mask is not None:
                out["mask"] = mask
        return out

    def empty_caption(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The "" caption's (y [1, L, D], mask [L] or None), for caption dropout."""
        table = pq.read_table(self.path / EMPTY_CAPTION_NAME)
        return self._pad(read_embedding(table["text_embedding"], 0))

    def _pad(self, embedding: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        info = self.manifest.text_encoder
        assert info is not None
        tokens = from_storage(embedding, self.manifest.dtype)
        if not info.masked:  # e.g. CLIP's pooled single token: stored whole
            return tokens[None], None
        length = info.model_max_length or len(tokens)
        y = torch.zeros((length, tokens.shape[1]), dtype=tokens.dtype)
        y[: len(tokens)] = tokens[:length]
        mask = torch.zeros(length, dtype=torch.int64)
        mask[: len(tokens)] = 1
        return y[None], mask

    def errors(self) -> pa.Table:
        """The clips that failed to encode (path, bucket, error)."""
        if (self.path / ERRORS_NAME).is_file():
            return pq.read_table(self.path / ERRORS_NAME)
        return ERRORS_SCHEMA.empty_table()


def open_features(root_or_dir: str | Path) -> FeatureSnapshot:
    """Open the feature snapshot `root/CURRENT` names, or the snapshot directory given."""
    path = Path(root_or_dir)
    if not (path / MANIFEST_NAME).is_file():
        pointer = path / CURRENT_NAME
        if not pointer.is_file():
            raise ConfigError(
                f"feature snapshot {str(path)!r}: no {MANIFEST_NAME} or {CURRENT_NAME} there; "
                "make one with `opensora precompute`"
            )
        path = path / pointer.read_text().strip()
        if not (path / MANIFEST_NAME).is_file():
            raise ConfigError(f"feature snapshot {str(path)!r} named by {pointer} has no {MANIFEST_NAME}")
    return FeatureSnapshot(path, FeatureManifest.from_json((path / MANIFEST_NAME).read_text()))
