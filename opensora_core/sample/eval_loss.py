"""`opensora eval-loss`: the diffusion loss of a checkpoint per (resolution, num_frames) bucket and per timestep.

Open-Sora's eval_loss semantics: every bucket_config entry with a batch size is evaluated on its own (its
samples are those a `{resolution: {num_frames: (1.0, batch_size)}}` config keeps, so keep_prob `None`, or any
keep_prob, means "keep all"), at `num_eval_timesteps` timesteps evenly spaced inside (0, num_timesteps); a
bucket's loss is the mean over its timesteps of the per-sample mean loss.

The held-out split: `val_data_path` (a metadata .parquet from `opensora scan`, or a bucket snapshot), else
the rows of the training snapshot whose path hash falls below `val_fraction`; the path is taken below the
dataset's common folder, so the split is the same on every machine, run and location. Noise, VAE sampling,
masks and timesteps are fixed by (eval_seed, bucket, batch), so losses of two checkpoints, or two runs,
compare sample for sample. The training sampler does not leave the `val_fraction` rows out yet (they are
trained on too); `val_data_path` gives a split that training never sees.

It runs in one process after training (the evaluate stage), not inside the training worker group, so no
rank waits on another while it runs.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from opensora_core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = 10


@dataclass(frozen=True)
class EvalBucket:
    resolution: str
    num_frames: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.resolution}-{self.num_frames}"


@dataclass
class EvalLoss:
    """One checkpoint's losses: per bucket the mean over timesteps, and the loss at each timestep."""

    checkpoint: str
    global_step: int
    timesteps: list[float]
    per_timestep: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def per_bucket(self) -> dict[str, float]:
        return {name: float(np.mean(losses)) for name, losses in self.per_timestep.items()}

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_bucket.values())))

    def metrics(self) -> dict[str, float]:
        return {**{f"eval_loss/{k}": v for k, v in self.per_bucket.items()}, "eval_loss/mean": self.mean}


def eval_buckets(raw: Any) -> list[EvalBucket]:
    """bucket_config entries with a batch size, keep_prob None accepted; errors name the key and valid values."""
    from opensora_core.data.bucket import BucketConfig

    if not isinstance(raw, dict) or not raw:
        raise ConfigError('bucket_config: expected a dict such as {"240p": {51: (None, 24)}}')
    keep_all = {
        res: {t: (1.0, e[1]) if isinstance(e, tuple | list) and len(e) == 2 else e for t, e in frames.items()}
        if isinstance(frames, dict)
        else frames
        for res, frames in raw.items()
    }
    parsed = BucketConfig.from_dict(keep_all)  # names, frame keys and batch sizes checked here
    return [EvalBucket(r, t, bs) for (r, t), bs in parsed.batch_sizes().items()]


def eval_config(path: str | Path, cfg_options: Sequence[str] | None = None) -> tuple[Any, list[EvalBucket]]:
    """(config validated for training with keep-all buckets, the buckets to evaluate)."""
    from opensora_core.config import apply_args, read_config, validate_config

    raw = read_config(path)
    apply_args(raw, {"cfg_options": cfg_options} if cfg_options else {}, training=True)
    buckets = eval_buckets(raw.get("bucket_config"))
    stand_in = raw.copy()
    keep_all: dict[str, dict[int, tuple[float, int]]] = {}
    for b in buckets:
        keep_all.setdefault(b.resolution, {})[b.num_frames] = (1.0, b.batch_size)
    stand_in.bucket_config = keep_all
    return validate_config(stand_in, mode="train", path=str(path)), buckets


def validation_table(cfg: Any, snapshot_dir: str | Path | None) -> pa.Table:
    """The held-out rows: `val_data_path`'s table, else the training snapshot's rows below `val_fraction`."""
    import pyarrow.parquet as pq

    from opensora_core.data.snapshot import open_snapshot
    from opensora_core.data.stable_hash import key_hashes

    raw = cfg.raw
    if raw.get("val_data_path"):
        source = Path(raw.val_data_path)
        table = pq.read_table(source) if source.suffix == ".parquet" else open_snapshot(source).full_table()
        where = f"val_data_path={raw.val_data_path!r}"
    else:
        fraction = raw.get("val_fraction")
        if fraction is None or not 0 < float(fraction) < 1:
            raise ConfigError(f"val_fraction={fraction!r}: set it within (0, 1), or set val_data_path")
        if not snapshot_dir:
            raise ConfigError("val_fraction: needs the training snapshot (--snapshot), or set val_data_path")
        full = open_snapshot(snapshot_dir).full_table()
        uniform = key_hashes(_relative_paths(full["path"].to_pylist())).astype(np.float64) / 2.0**64
        table = full.filter(pa.array(uniform < float(fraction)))
        where = f"val_fraction={fraction} of {full.num_rows} samples"
    if table.num_rows == 0:
        raise ConfigError(f"{where}: the validation split is empty; raise val_fraction or set val_data_path")
    return table


def _relative_paths(paths: list[str]) -> list[str]:
    """Paths below their common folder: the split stays the same when the dataset moves."""
    import os

    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, root) for p in paths]


def bucket_batches(table: pa.Table, bucket: EvalBucket, frame_interval: int, seed: int) -> list[list[str]]:
    """The bucket's samples (as a one-bucket keep-all config keeps them) in batches of one aspect ratio each,
    in table order, the last batch of each ratio partial."""
    from opensora_core.data.bucket import BucketConfig, assign_table

    cfg = BucketConfig.from_dict({bucket.resolution: {bucket.num_frames: (1.0, bucket.batch_size)}})
    a = assign_table(table, cfg, frame_interval, seed, 0)
    batches = []
    for ar in np.unique(a.aspect_index[a.resolution_index >= 0]):
        rows = np.flatnonzero((a.resolution_index >= 0) & (a.aspect_index == ar))
        h, w = int(a.height[rows[0]]), int(a.width[rows[0]])
        names = [f"{i}-{bucket.num_frames}-{h}-{w}" for i in rows.tolist()]
        batches += [names[i : i + bucket.batch_size] for i in range(0, len(names), bucket.batch_size)]
    return batches


def evaluate_loss(
    cfg: Any, buckets: Sequence[EvalBucket], checkpoint: Path, table: pa.Table, *, progress: bool = True
) -> EvalLoss:
    """The checkpoint's (EMA) weights on every bucket's held-out batches at the fixed timesteps."""
    from opensora_core.data.dataset import VariableVideoTextDataset, collate_fn
    from opensora_core.sample.evaluate import checkpoint_step, checkpoint_weights
    from opensora_core.sample.generate import build_components
    from opensora_core.train.mask import MaskGenerator
    from opensora_core.train.step import encode_batch, micro_batch_seed

    parts = build_components(cfg, model_weights=str(checkpoint_weights(checkpoint)))
    raw = cfg.raw
    seed = int(raw.get("eval_seed", 1024))
    frame_interval = int(cfg.dataset.options.get("frame_interval", 1) or 1)
    n = int(raw.get("num_eval_timesteps", DEFAULT_TIMESTEPS))
    timesteps = torch.linspace(0, parts.scheduler.num_timesteps, n + 2)[1:-1].tolist()
    masks = MaskGenerator(dict(raw.mask_ratios)) if raw.get("mask_ratios") else None
    dataset = VariableVideoTextDataset(
        table, frame_interval=frame_interval, transform_name=cfg.dataset.options.get("transform_name") or "resize_crop",
        seed=seed,
    )  # fmt: skip
    result = EvalLoss(str(checkpoint), checkpoint_step(checkpoint), timesteps)
    for b_index, bucket in enumerate(buckets):
        batches = bucket_batches(table, bucket, frame_interval, seed)
        if not batches:
            log.warning("eval-loss: no validation sample for bucket %s", bucket.name)
            continue
        sums, count = np.zeros(len(timesteps)), 0
        for i, names in enumerate(_progress(batches, bucket.name, progress)):
            batch = collate_fn([dataset[name] for name in names])
            if batch is None:
                continue
            batch_seed = micro_batch_seed(seed, b_index, i)
            torch.manual_seed(batch_seed)
            with torch.no_grad():
                latents, model_args, mask = encode_batch(
                    batch, parts.vae, parts.text_encoder, device=parts.device, dtype=parts.dtype,
                    mask_generator=masks, rng=random.Random(batch_seed),
                )  # fmt: skip
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(batch_seed))
                noise = noise.to(latents)
                for j, t in enumerate(timesteps):
                    t_batch = torch.full((latents.shape[0],), t, device=parts.device, dtype=parts.dtype)
                    losses = parts.scheduler.training_losses(
                        parts.model, latents, model_args, noise=noise, mask=mask, t=t_batch
                    )["loss"]
                    sums[j] += float(losses.double().sum())
            count += latents.shape[0]
        if count:
            result.per_timestep[bucket.name] = (sums / count).tolist()
            result.samples[bucket.name] = count
    if not result.per_timestep:
        raise ConfigError(
            f"bucket_config: no validation sample fits any of {', '.join(b.name for b in buckets)}; "
            "check the buckets or the validation split"
        )
    return result


def _progress(batches: list, name: str, enabled: bool) -> Any:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"eval-loss {name}")


def write_loss_plots(result: EvalLoss, out_dir: Path) -> list[Path]:
    """loss against timestep, one PNG per resolution, one line per num_frames."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    by_res: dict[str, list[str]] = {}
    for name in result.per_timestep:
        by_res.setdefault(name.rsplit("-", 1)[0], []).append(name)
    paths = []
    for res, names in by_res.items():
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for name in names:
            ax.plot(
                result.timesteps,
                result.per_timestep[name],
                marker="o",
                label=f"{name.rsplit('-', 1)[1]} frames",
            )
        ax.set_xlabel("timestep")
        ax.set_ylabel("loss")
        ax.set_title(f"eval loss at step {result.global_step}, {res}")
        ax.legend(fontsize=8)
        path = out_dir / f"loss_vs_timestep_{res}.png"
        fig.savefig(path, dpi=100, metadata={"Software": None})
        paths.append(path)
    return paths


def log_eval_loss(run_id: str, result: EvalLoss, out_dir: Path) -> None:
    """eval_loss/<bucket> and eval_loss/mean at the checkpoint's step; results and plots as artifacts."""
    from opensora_core import tracking

    tracking.log_metrics(run_id, result.metrics(), step=result.global_step)
    for path in sorted(out_dir.iterdir()):
        tracking.log_artifact(run_id, path, artifact_path=f"eval_loss/step_{result.global_step:06d}")


def has_validation(cfg: Any) -> bool:
    """Whether the config names a validation split (`val_data_path` or `val_fraction`)."""
    return bool(cfg.raw.get("val_data_path") or cfg.raw.get("val_fraction"))


def eval_loss_checkpoints(
    config: str | Path,
    checkpoint: str | Path,
    *,
    snapshot_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    cfg_options: Sequence[str] | None = None,
    mlflow_run_ids: Sequence[str] = (),
    progress: bool = True,
) -> list[EvalLoss]:
    """eval-loss of every checkpoint `find_checkpoints(checkpoint)` finds; results go to
    `{output_dir}/step_G/` (default: `eval_loss/` beside the checkpoints) and to every given MLflow run."""
    from opensora_core.sample.evaluate import find_checkpoints

    cfg, buckets = eval_config(config, cfg_options)
    table = validation_table(cfg, snapshot_dir)  # bad input fails here, before anything is written
    checkpoints = find_checkpoints(checkpoint)
    root = Path(output_dir) if output_dir else checkpoints[0].parent / "eval_loss"
    results = []
    for ckpt in checkpoints:
        result = evaluate_loss(cfg, buckets, ckpt, table, progress=progress)
        out_dir = root / f"step_{result.global_step:06d}"
        write_loss_plots(result, out_dir)
        (out_dir / "eval_loss.json").write_text(
            json.dumps(
                {
                    "checkpoint": result.checkpoint,
                    "global_step": result.global_step,
                    "timesteps": result.timesteps,
                    "per_timestep": result.per_timestep,
                    "per_bucket": result.per_bucket,
                    "mean": result.mean,
                    "samples": result.samples,
                },
                indent=2,
            )  # fmt: skip
        )
        for run_id in mlflow_run_ids:
            log_eval_loss(run_id, result, out_dir)
        log.info("eval-loss step %d: mean %.5f %s", result.global_step, result.mean, result.per_bucket)
        results.append(result)
    return results
