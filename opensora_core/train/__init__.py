"""Training: `train(cfg, ...)` runs the Open-Sora train step on Ray Train workers with DeepSpeed."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run left behind."""

    checkpoint: str | None  # the last checkpoint directory
    global_step: int
    final_loss: float | None
    elapsed: float  # seconds, launch to finish
    exp_dir: str = ""  # the run's directory: checkpoints and Ray's run state


def train(
    cfg: Any,
    *,
    snapshot_dir: str | None,
    output_dir: str,
    mlflow_run_id: str | None,
    num_workers: int = 2,
    ray_address: str | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 0,
    features: str | None = None,
    progress: bool = False,
    clips: str | None = None,
) -> TrainResult:
    """Train the config's model on a bucket snapshot; checkpoints go to a new `{output_dir}/NNN-{model}/`.

    `cfg` is a `ValidatedConfig` (or an MMEngine `Config`, validated here as a training config); the
    workers get its typed settings as a `TrainJob` (`opensora_core.train.job`). `cfg.load`
    resumes from a checkpoint directory (a path or a URI). `use_gpu=None` uses GPUs when the Ray
    cluster has one per worker. An `output_dir` URI (`s3://...`) gets a copy of every checkpoint, saved
    first under its local mirror (`opensora_core.storage`); the result then names the URIs.
    A config that trains from features reads the feature snapshot `features` (default: its
    `feature_snapshot` key, else `{outputs}/features`), checked here first (opensora_core.features.lineage);
    without `snapshot_dir` the buckets are those of the bucket snapshot it was made for.
    `progress=True` draws a progress bar on the driver, fed by rank 0 (opensora_core.train.progress).
    A fixed-size dataset (VideoTextDataset: the VAE configs) reads `clips`, a metadata table or a
    bucket snapshot, at the dataset's num_frames and image_size.
    """
    from opensora_core import tracking
    from opensora_core.features.lineage import feature_input
    from opensora_core.parallel.launch import cluster_has_gpus, connect_ray, run_training
    from opensora_core.train.checkpoint import read_running_states
    from opensora_core.train.job import train_job, training_config
    from opensora_core.train.loop import train_loop_per_worker
    from opensora_core.train.preflight import preflight, preflight_clips

    cfg = training_config(cfg)  # a bad key fails here, before anything is written
    check_load(cfg.raw)  # and so does a bad `load` path, or a checkpoint of another model
    stored = feature_input(
        cfg, snapshot_dir=snapshot_dir, features=features
    )  # and features of another lineage
    snapshot_dir = snapshot_dir or (stored.bucket_snapshot_dir if stored else None)
    if cfg.is_vae_model:
        from opensora_core.train.vae_settings import check_vae_training

        check_vae_training(cfg.raw, cfg.vae_loss)  # local weights for the losses and the image VAE
    if clips:  # and data that gives no full step
        clips = str(Path(clips).resolve())
        preflight_clips(cfg, clips, num_workers=num_workers)
    else:
        preflight(cfg, snapshot_dir=snapshot_dir, num_workers=num_workers)
    exp_dir = new_experiment_dir(output_dir, cfg.model.type)
    shared = storage.is_uri(exp_dir)
    local_dir = storage.local_mirror(exp_dir)  # exp_dir itself unless it is a URI
    local_dir.mkdir(parents=True, exist_ok=True)
    if snapshot_dir and not storage.is_uri(snapshot_dir):
        snapshot_dir = str(Path(snapshot_dir).resolve())
    job = train_job(
        cfg,
        snapshot_dir=snapshot_dir,
        output_dir=str(local_dir),
        checkpoint_uri=exp_dir if shared else None,
        mlflow_run_id=mlflow_run_id,
        features=stored,
        clips_table=clips,
    )
    tracked = bool(mlflow_run_id) and tracking.tracking_enabled()
    lineage = training_lineage(cfg, snapshot_dir, stored)
    if tracked:  # before any worker starts: a run that fails still says what it trained on
        tracking.set_tags(mlflow_run_id, lineage)
    connect_ray(ray_address)
    if use_gpu is None:
        use_gpu = cluster_has_gpus(num_workers)
    start = time.perf_counter()
    with _progress(cfg, progress) as progress_actor:
        result = run_training(
            train_loop_per_worker,
            dataclasses.replace(job, progress=progress_actor),
            num_workers=num_workers,
            use_gpu=use_gpu,
            ray_address=ray_address,
            storage_path=str(local_dir.parent),
            run_name=local_dir.name,
            max_failures=max_failures,
        )
    elapsed = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    global_step = int(metrics.get("global_step", 0))
    if checkpoint is not None:
        global_step = read_running_states(checkpoint).global_step
        if shared:
            checkpoint = storage.join(exp_dir, Path(checkpoint).name)
    if tracked and checkpoint is not None:
        _register(cfg, mlflow_run_id, checkpoint, global_step, lineage)
    loss = metrics.get("loss")
    return TrainResult(
        checkpoint=checkpoint,
        global_step=global_step,
        final_loss=float(loss) if loss is not None else None,
        elapsed=elapsed,
        exp_dir=str(exp_dir),
    )


def _progress(cfg: Any, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """The driver's training bar and the actor rank 0 feeds it through (None: no bar)."""
    from opensora_core.train.progress import training_progress

    if not enabled:
        return contextlib.nullcontext(None)
    return training_progress(max_steps=cfg.training.max_steps, epochs=cfg.training.epochs)


def training_lineage(cfg: Any, snapshot_dir: str | None, features: Any) -> dict[str, str]:
    """The `lineage.*` tags of a run (opensora_core.tracking.lineage_tags): the bucket snapshot's id, the
    metadata fingerprint and bucket-config hash from its manifest, the feature snapshot's id, the hash of
    the config as resolved, and the code's commit."""
    from opensora_core import tracking
    from opensora_core.data.snapshot import open_snapshot

    manifest = open_snapshot(snapshot_dir).manifest if snapshot_dir else None
    return tracking.lineage_tags(
        config_hash=tracking.config_hash(cfg.raw.pretty_text),
        code_commit=tracking.code_commit(),
        bucket_snapshot=manifest.snapshot_id if manifest else None,
        metadata_fingerprint=manifest.metadata_fingerprint if manifest else None,
        bucket_config_hash=manifest.config_hash if manifest else None,
        feature_snapshot=features.feature_id if features else None,
    )


def checkpoint_files(checkpoint: str) -> dict[str, int]:
    """Each file of a checkpoint (a local path or a URI) relative to it, with its size in bytes."""
    import pyarrow.fs as pafs

    where = storage.location(checkpoint)
    infos = where.filesystem.get_file_info(pafs.FileSelector(where.path, recursive=True))
    root = where.path.rstrip("/") + "/"
    return {i.path.removeprefix(root): i.size for i in infos if i.type == pafs.FileType.File}


def _register(cfg: Any, run_id: str, checkpoint: str, global_step: int, lineage: dict[str, str]) -> None:
    """The final checkpoint as a model version of the config's registered model. Training is done by
    now, so a tracking server that fails here is reported, not raised."""
    from opensora_core import tracking
    from opensora_core.errors import first_line

    try:
        name, version = tracking.register_checkpoint(
            run_id, checkpoint, global_step=global_step, files=checkpoint_files(checkpoint),
            model_name=tracking.registered_model_name(cfg.path, cfg.model.type), tags=lineage,
        )  # fmt: skip
    except Exception as err:
        log.warning("MLflow: checkpoint %s was not registered: %s", checkpoint, first_line(err, limit=300))
        return
    log.info("registered %s as model %s version %s", checkpoint, name, version)


def check_load(config: Any) -> None:
    """Raise CheckpointError when `load` names no checkpoint, or one of another model type than
    `model.type`; reads only its running_states.json, so callers run it before writing anything."""
    from opensora_core.errors import CheckpointError
    from opensora_core.train.checkpoint import read_running_states

    load, model_type = config.get("load"), config["model"]["type"]
    if not load:
        return
    states = read_running_states(load)
    if states.model_type != model_type:
        raise CheckpointError(
            f"load={load}: checkpoint of model {states.model_type!r}, but model.type is {model_type!r}"
        )


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Config paths are relative to the caller's working directory (as in Open-Sora); Ray workers run
    elsewhere, so local paths that exist here are made absolute. Hub names are left as they are."""
    config = dict(config)
    for section in ("model", "vae", "text_encoder", "discriminator"):
        part = config.get(section)
        if isinstance(part, dict):
            # a VideoAutoencoderPipeline's image and temporal VAEs name their own weights
            nested = {k: _absolute_weights(v) for k, v in part.items() if k in ("vae_2d", "vae_temporal")}
            config[section] = _absolute_weights({**part, **nested})
    if config.get("lpips_path") and Path(config["lpips_path"]).exists():
        config["lpips_path"] = str(Path(config["lpips_path"]).resolve())
    if config.get("load") and not storage.is_uri(config["load"]):
        config["load"] = str(Path(config["load"]).resolve())
    return config


def _absolute_weights(part: Any) -> Any:
    if isinstance(part, dict) and part.get("from_pretrained") and Path(part["from_pretrained"]).exists():
        return {**part, "from_pretrained": str(Path(part["from_pretrained"]).resolve())}
    return part


def new_experiment_dir(output_dir: str | Path, model_type: str) -> Path | str:
    """`{output_dir}/{NNN}-{model type with / as -}`, NNN = entries already there (as Open-Sora).

    For an `output_dir` URI the directory is created there and its URI returned.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model_type)
    if storage.is_uri(output_dir):
        shared = storage.location(output_dir)
        index = len(shared.children())
        while (shared / f"{index:03d}-{name}").exists():
            index += 1
        # object stores have no exclusive create: two runs starting at once could pick the same NNN
        exp_dir = shared / f"{index:03d}-{name}"
        exp_dir.filesystem.create_dir(exp_dir.path, recursive=True)
        return exp_dir.uri
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    index = len(list(root.iterdir()))
    while True:
        path = root / f"{index:03d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took this number meanwhile
            index += 1
