"""The pipeline stages as plain functions: the CLI and the Prefect tasks both call these."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from opensora_core.config import ValidatedConfig
from opensora_core.config.schema import resolve_path
from opensora_core.errors import ConfigError
from opensora_core.storage import Location, is_uri, join, local_mirror

log = logging.getLogger(__name__)


def metadata_path(cfg: ValidatedConfig) -> Path:
    # scan writes on local disk: with `outputs` a URI, into its local mirror
    return local_mirror(cfg.training.outputs) / "meta" / "meta.parquet"


def snapshot_root(cfg: ValidatedConfig) -> Path | str:
    """`{outputs}/buckets`: a local path, or a URI when `outputs` is one (snapshots on shared storage)."""
    outputs = cfg.training.outputs
    return join(outputs, "buckets") if is_uri(outputs) else Path(outputs) / "buckets"


def data_source(cfg: ValidatedConfig) -> Path:
    """dataset.data_path as a path that exists (a media folder, a CSV, or a scanned .parquet)."""
    raw = cfg.dataset.options.get("data_path") if cfg.dataset else None
    if not raw:
        raise ConfigError(
            "dataset.data_path: not set; pass --data-path (a media folder, a path,text CSV or a .parquet)"
        )
    path = resolve_path(raw)
    if not path.exists():
        raise ConfigError(f"dataset.data_path={raw!r}: {path} does not exist")
    return path


def scan_stage(
    cfg: ValidatedConfig, *, output: Path | None = None, progress: bool = True
) -> tuple[Path, Any]:
    """Probe dataset.data_path into the metadata table: returns (metadata path, ScanResult).

    A `.parquet` data_path is taken as an already scanned table (the ScanResult is then None).
    """
    from opensora_core.data.scan import scan

    source = data_source(cfg)
    if source.suffix == ".parquet":
        log.info("dataset.data_path is a metadata table (%s): nothing to scan", source)
        return source, None
    output = output or metadata_path(cfg)
    result = scan(source, output, workers=cfg.training.num_bucket_build_workers, progress=progress)
    if result.n_ok == 0:
        raise ConfigError(
            f"dataset.data_path={str(source)!r}: no readable media found (see {result.errors_path})"
        )
    return result.metadata_path, result


def _frame_interval(cfg: ValidatedConfig) -> int:
    return int(cfg.dataset.options.get("frame_interval", 1) or 1)


def build_buckets(
    cfg: ValidatedConfig,
    meta: Path,
    root: str | Path | Location | None = None,
    *,
    seed: int | None = None,
    epoch: int = 0,
) -> Any:
    """Assign every sample of `meta` to its bucket with Ray Data; write a snapshot under `root`."""
    from opensora_core.data.bucket_build import build_snapshot
    from opensora_core.data.manifest import bucket_config_hash

    if cfg.bucket_config is None:
        raise ConfigError("bucket_config: required to build bucket snapshots")
    return build_snapshot(
        meta,
        root or snapshot_root(cfg),
        cfg.bucket_config,
        frame_interval=_frame_interval(cfg),
        seed=cfg.training.seed if seed is None else seed,
        epoch=epoch,
        config_hash=bucket_config_hash(cfg.bucket_config, _frame_interval(cfg)),
        num_workers=cfg.training.num_bucket_build_workers,
    )


def check_buckets(
    cfg: ValidatedConfig,
    meta: Path,
    root: str | Path | Location | None = None,
    *,
    seed: int | None = None,
    epoch: int = 0,
) -> Any:
    """Whether the current snapshot under `root` still matches `meta` and the bucket settings (a SnapshotCheck)."""
    from opensora_core.data.manifest import bucket_config_hash
    from opensora_core.data.snapshot_check import check_snapshot

    if cfg.bucket_config is None:
        raise ConfigError("bucket_config: required to build bucket snapshots")
    return check_snapshot(
        root or snapshot_root(cfg),
        meta,
        bucket_config_hash(cfg.bucket_config, _frame_interval(cfg)),
        seed=cfg.training.seed if seed is None else seed,
        epoch=epoch,
    )


def precompute_stage(
    cfg: ValidatedConfig,
    snapshot: str | Path | None = None,
    root: str | Path | None = None,
    *,
    progress: bool = True,
    num_actors: int | None = None,
) -> Any:
    """Encode a bucket snapshot (default: the CURRENT one under `snapshot_root(cfg)`) into a feature
    snapshot under `root` (default: `feature_root(cfg)`); returns a features.precompute.FeatureInfo."""
    from opensora_core.features.lineage import feature_root
    from opensora_core.features.precompute import build_features

    return build_features(
        cfg,
        snapshot if snapshot is not None else snapshot_root(cfg),
        root if root is not None else feature_root(cfg),
        progress=progress,
        num_actors=num_actors,
    )


def current_snapshot(cfg: ValidatedConfig) -> str:
    """The snapshot `{outputs}/buckets/CURRENT` names; one line saying how to build one when there is none."""
    from opensora_core.data.snapshot import open_snapshot

    return str(open_snapshot(snapshot_root(cfg)).path)


def fixed_size_clips(cfg: ValidatedConfig) -> bool:
    """Whether training reads fixed-size clips (VideoTextDataset without buckets) rather than buckets."""
    return cfg.dataset is not None and cfg.dataset.type == "VideoTextDataset" and cfg.bucket_config is None


def run_training(
    cfg: ValidatedConfig,
    *,
    snapshot: str | Path | None = None,
    features: str | Path | None = None,
    mlflow_run_id: str | None = None,
    num_workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
) -> Any:
    """Train on a bucket snapshot, built from dataset.data_path first when none is given.

    A config that trains from features reads the feature snapshot `features`; without one, a config
    with a `data_path` scans, buckets and precomputes first (incrementally: unchanged clips are not
    encoded again), and Open-Sora's `BatchFeatureDataset` reads the existing one (`feature_snapshot`,
    else `{outputs}/features`) with the bucket snapshot it was made for.
    """
    from opensora_core.train import check_load, train

    check_load(cfg.raw)  # a wrong `load` fails before the scan and bucket build write anything
    if fixed_size_clips(cfg):  # VideoTextDataset (the VAE configs): the scanned table, no buckets
        clips = snapshot if snapshot is not None else scan_stage(cfg)[0]
        return train(
            cfg, snapshot_dir=None, clips=str(clips), output_dir=cfg.training.outputs,
            mlflow_run_id=mlflow_run_id, num_workers=num_workers or cfg.training.num_train_workers,
            ray_address=ray_address,
        )  # fmt: skip
    from_features = features is not None or (cfg.features is not None and cfg.features.enabled)
    stored_only = cfg.dataset is not None and cfg.dataset.type == "BatchFeatureDataset"
    if snapshot is None and features is None and not stored_only:
        meta, _ = scan_stage(cfg)
        snapshot = build_buckets(cfg, meta).path
        if from_features:
            features = precompute_stage(cfg, snapshot).path
    return train(
        cfg,
        snapshot_dir=str(snapshot) if snapshot is not None else None,
        features=str(features) if features is not None else None,
        output_dir=cfg.training.outputs,
        mlflow_run_id=mlflow_run_id,
        num_workers=num_workers or cfg.training.num_train_workers,
        ray_address=ray_address,
        progress=progress,
    )
