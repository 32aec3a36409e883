"""Training: `train(cfg, ...)` runs the Open-Sora train step on Ray Train workers with DeepSpeed."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
) -> TrainResult:
    """Train the config's model on a bucket snapshot; checkpoints go to a new `{output_dir}/NNN-{model}/`.

    `cfg` is an MMEngine `Config` (or a `ValidatedConfig`, whose `.raw` is used). `cfg.load`
    resumes from a checkpoint directory. `use_gpu=None` uses GPUs when the Ray cluster has one
    per worker.
    """
    from opensora_core.errors import CheckpointError
    from opensora_core.parallel.launch import cluster_has_gpus, connect_ray, run_training
    from opensora_core.train.checkpoint import read_running_states
    from opensora_core.train.loop import train_loop_per_worker

    raw = getattr(cfg, "raw", cfg)
    config: dict[str, Any] = absolute_paths(raw.to_dict())
    config_text = raw.pretty_text
    if config.get("load"):  # fail here, before any worker starts, on a bad path or another model
        states = read_running_states(config["load"])
        if states.model_type != config["model"]["type"]:
            raise CheckpointError(
                f"load={config['load']}: checkpoint of model {states.model_type!r}, "
                f"but model.type is {config['model']['type']!r}"
            )
    exp_dir = new_experiment_dir(output_dir, config["model"]["type"])
    config.update(
        snapshot_dir=str(Path(snapshot_dir).resolve()) if snapshot_dir else None,
        output_dir=str(exp_dir),
        mlflow_run_id=mlflow_run_id,
        config_text=config_text,
    )
    connect_ray(ray_address)
    if use_gpu is None:
        use_gpu = cluster_has_gpus(num_workers)
    start = time.perf_counter()
    result = run_training(
        train_loop_per_worker,
        config,
        num_workers=num_workers,
        use_gpu=use_gpu,
        ray_address=ray_address,
        storage_path=str(exp_dir.parent),
        run_name=exp_dir.name,
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
    loss = metrics.get("loss")
    return TrainResult(
        checkpoint=checkpoint,
        global_step=global_step,
        final_loss=float(loss) if loss is not None else None,
        elapsed=elapsed,
        exp_dir=str(exp_dir),
    )


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Config paths are relative to the caller's working directory (as in Open-Sora); Ray workers run
    elsewhere, so local paths that exist here are made absolute. Hub names are left as they are."""
    config = dict(config)
    for section in ("model", "vae", "text_encoder"):
        part = config.get(section)
        if isinstance(part, dict) and part.get("from_pretrained") and Path(part["from_pretrained"]).exists():
            config[section] = {**part, "from_pretrained": str(Path(part["from_pretrained"]).resolve())}
    if config.get("load"):
        config["load"] = str(Path(config["load"]).resolve())
    return config


def new_experiment_dir(output_dir: str | Path, model_type: str) -> Path:
    """`{output_dir}/{NNN}-{model type with / as -}`, NNN = entries already there (as Open-Sora)."""
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    index = len(list(root.iterdir()))
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model_type)
    while True:
        path = root / f"{index:03d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took this number meanwhile
            index += 1
