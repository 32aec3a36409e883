"""The manifest of a bucket snapshot (`_manifest.json`): what was built from what, and its buckets'
counts, batch sizes and files; with the bucket config's JSON form and the hash that identifies it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from opensora_core.data.bucket import BucketConfig, BucketKey

FORMAT_VERSION = 1
# A leading underscore: Parquet readers (pyarrow, pandas, Spark) skip the file when they open the snapshot.
MANIFEST_NAME = "_manifest.json"


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
