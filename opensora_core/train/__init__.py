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
    from opensora_core.parallel.launch import cluster_has_gpus, connect_ray, run_training
    from opensora_core.train.checkpoint import read_running_states
    from opensora_core.train.loop import train_loop_per_worker

    raw = getattr(cfg, "raw", cfg)
    config: dict[str, Any] = raw.to_dict()
    config_text = raw.pretty_text
    if config.get("load"):
        read_running_states(config["load"])  # fail here, before any worker starts, on a bad path
    exp_dir = new_experiment_dir(output_dir, config["model"]["type"])
    config.update(
        snapshot_dir=snapshot_dir,
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
