"""`opensora eval-loss`: the diffusion loss of a checkpoint per (resolution, num_frames) bucket and per timestep.

Open-Sora's eval_loss semantics: every bucket_config entry with a batch size is evaluated on its own (its
samples are those a `{resolution: {num_frames: (1.0, batch_size)}}` config keeps, so keep_prob `None`, or any
keep_prob, means "keep all"), at `num_eval_timesteps` timesteps evenly spaced inside (0, num_timesteps); a
bucket's loss is the mean over its timesteps of the per-sample mean loss.

The held-out split: `val_data_path` (a metadata .parquet from `opensora scan`, or a bucket snapshot), else
the rows of the training snapshot whose path hash falls below `val_fraction` (data/validation_split.py: the
same on every machine, run and location; training, its pre-flight check and `plan` leave them out).
Noise, VAE sampling, masks and timesteps are fixed by (eval_seed, bucket, batch), so losses of two
checkpoints, or two runs, compare sample for sample.

The work is a list of (bucket, batch) items. The evaluate stage (and `opensora eval-loss` when the config's
`num_train_workers` is above 1) runs them as a Ray Train job on a worker group shaped as training's: each
rank evaluates every world_size-th item, and one all_gather per checkpoint, which every rank joins, brings
the item losses together, summed in item order, so the result does not depend on the number of workers.
The model runs whole on each rank (no sequence parallelism: a rank evaluates whole samples). With one
worker and no Ray it runs in this process.
"""

from __future__ import annotations

import dataclasses
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

    def to_dict(self) -> dict[str, Any]:
        """As eval_loss.json holds it: the fields, plus per_bucket and mean for readers."""
        return {
            "checkpoint": self.checkpoint, "global_step": self.global_step, "timesteps": self.timesteps,
            "per_timestep": self.per_timestep, "per_bucket": self.per_bucket, "mean": self.mean,
            "samples": self.samples,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalLoss:
        return cls(
            data["checkpoint"], int(data["global_step"]), list(data["timesteps"]),
            dict(data["per_timestep"]), dict(data["samples"]),
        )  # fmt: skip


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
    from opensora_core.train import absolute_paths

    raw = read_config(path)
    apply_args(raw, {"cfg_options": cfg_options} if cfg_options else {}, training=True)
    buckets = eval_buckets(raw.get("bucket_config"))
    keep_all: dict[str, dict[int, tuple[float, int]]] = {}
    for b in buckets:
        keep_all.setdefault(b.resolution, {})[b.num_frames] = (1.0, b.batch_size)
    stand_in = raw.copy()
    stand_in.bucket_config = keep_all  # built whole: a ConfigDict copies a dict set into it
    # local weight folders made absolute: the eval-loss workers run in a folder of their own
    for key, section in absolute_paths({k: raw.get(k) for k in ("model", "vae", "text_encoder")}).items():
        if section is not None:
            stand_in[key] = section
    return validate_config(stand_in, mode="train", path=str(path)), buckets


def validation_table(cfg: Any, snapshot_dir: str | Path | None) -> pa.Table:
    """The held-out rows: `val_data_path`'s table, else the training snapshot's rows below `val_fraction`
    (opensora_core.data.validation_split, the rule training leaves out)."""
    import pyarrow.parquet as pq

    from opensora_core.data.snapshot import open_snapshot
    from opensora_core.data.validation_split import held_out, held_out_fraction

    raw = cfg.raw
    if raw.get("val_data_path"):
        source = Path(raw.val_data_path)
        table = pq.read_table(source) if source.suffix == ".parquet" else open_snapshot(source).full_table()
        where = f"val_data_path={raw.val_data_path!r}"
    else:
        fraction = held_out_fraction(raw)
        if fraction is None:
            raise ConfigError(
                f"val_fraction={raw.get('val_fraction')!r}: set it within (0, 1), or set val_data_path"
            )
        if not snapshot_dir:
            raise ConfigError("val_fraction: needs the training snapshot (--snapshot), or set val_data_path")
        full = open_snapshot(snapshot_dir).full_table()
        table = full.filter(pa.array(held_out(full, fraction)))
        where = f"val_fraction={fraction} of {full.num_rows} samples"
    if table.num_rows == 0:
        raise ConfigError(f"{where}: the validation split is empty; raise val_fraction or set val_data_path")
    return table


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


@dataclass(frozen=True)
class EvalItem:
    """One held-out batch of one bucket: the unit of work; its noise, VAE sample, masks and timesteps follow
    from (eval_seed, bucket, batch) alone, so its losses do not depend on which rank computes it."""

    bucket: int  # index in the evaluated buckets
    batch: int  # index of the batch within its bucket
    names: tuple[str, ...]  # "idx-T-H-W" of its samples (idx = row of the validation table)


@dataclass(frozen=True)
class EvalLossJob:
    """What every eval-loss rank is given: plain data, pickled to each worker of the group."""

    cfg: Any  # the ValidatedConfig of eval_config
    buckets: tuple[EvalBucket, ...]
    table: pa.Table  # the validation split
    items: tuple[EvalItem, ...]  # every bucket's batches, bucket by bucket
    checkpoints: tuple[str, ...]
    progress: bool = False

    @property
    def seed(self) -> int:
        return int(self.cfg.raw.get("eval_seed", 1024))


# (sum over the item's samples of the loss at each timestep, number of samples) per (bucket, batch)
ItemLosses = dict[tuple[int, int], tuple[list[float], int]]


def eval_job(
    cfg: Any, buckets: Sequence[EvalBucket], table: pa.Table, checkpoints: Sequence[Path], *, progress: bool
) -> EvalLossJob:
    """The work of an eval-loss run; ConfigError (one line) when no validation sample fits any bucket,
    CheckpointError when a checkpoint has no weights: both before any worker starts."""
    from opensora_core.sample.evaluate import checkpoint_weights

    for checkpoint in checkpoints:
        checkpoint_weights(Path(checkpoint))
    # absolute: the workers run in a folder of their own
    job = EvalLossJob(
        cfg, tuple(buckets), table, (), tuple(str(Path(c).resolve()) for c in checkpoints), progress
    )
    frame_interval = int(cfg.dataset.options.get("frame_interval", 1) or 1)
    items: list[EvalItem] = []
    for b_index, bucket in enumerate(buckets):
        batches = bucket_batches(table, bucket, frame_interval, job.seed)
        if not batches:
            log.warning("eval-loss: no validation sample for bucket %s", bucket.name)
        items += [EvalItem(b_index, i, tuple(names)) for i, names in enumerate(batches)]
    if not items:
        raise ConfigError(
            f"bucket_config: no validation sample fits any of {', '.join(b.name for b in buckets)}; "
            "check the buckets or the validation split"
        )
    return dataclasses.replace(job, items=tuple(items))


def eval_timesteps(cfg: Any) -> list[float]:
    """`num_eval_timesteps` timesteps evenly spaced inside (0, num_timesteps)."""
    from opensora_core.schedulers import build_scheduler

    n = int(cfg.raw.get("num_eval_timesteps", DEFAULT_TIMESTEPS))
    return torch.linspace(0, build_scheduler(cfg.scheduler.as_dict()).num_timesteps, n + 2)[1:-1].tolist()


def item_losses(
    job: EvalLossJob, checkpoint: str, items: Sequence[EvalItem], *, device: torch.device | None = None,
    progress: bool = False,
) -> ItemLosses:  # fmt: skip
    """The checkpoint's (EMA) weights on `items` at the fixed timesteps; an item whose every sample failed
    to load counts no sample."""
    from opensora_core.data.dataset import VariableVideoTextDataset, collate_fn
    from opensora_core.sample.evaluate import checkpoint_weights
    from opensora_core.sample.generate import build_components
    from opensora_core.train.mask import MaskGenerator
    from opensora_core.train.step import encode_batch, micro_batch_seed

    if not items:  # a rank of a group larger than the work: nothing to build
        return {}
    cfg, seed = job.cfg, job.seed
    parts = build_components(cfg, model_weights=str(checkpoint_weights(Path(checkpoint))), device=device)
    timesteps = eval_timesteps(cfg)
    masks = MaskGenerator(dict(cfg.raw.mask_ratios)) if cfg.raw.get("mask_ratios") else None
    dataset = VariableVideoTextDataset(
        job.table, frame_interval=int(cfg.dataset.options.get("frame_interval", 1) or 1),
        transform_name=cfg.dataset.options.get("transform_name") or "resize_crop", seed=seed,
    )  # fmt: skip
    out: ItemLosses = {}
    for item in _progress(items, Path(checkpoint).name, progress):
        batch = collate_fn([dataset[name] for name in item.names])
        if batch is None:
            out[item.bucket, item.batch] = ([0.0] * len(timesteps), 0)
            continue
        batch_seed = micro_batch_seed(seed, item.bucket, item.batch)
        torch.manual_seed(batch_seed)
        sums = []
        with torch.no_grad():
            latents, model_args, mask = encode_batch(
                batch, parts.vae, parts.text_encoder, device=parts.device, dtype=parts.dtype,
                mask_generator=masks, rng=random.Random(batch_seed),
            )  # fmt: skip
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(batch_seed))
            noise = noise.to(latents)
            for t in timesteps:
                t_batch = torch.full((latents.shape[0],), t, device=parts.device, dtype=parts.dtype)
                losses = parts.scheduler.training_losses(
                    parts.model, latents, model_args, noise=noise, mask=mask, t=t_batch
                )["loss"]
                sums.append(float(losses.double().sum()))
        out[item.bucket, item.batch] = (sums, int(latents.shape[0]))
    return out


def combined_loss(job: EvalLossJob, checkpoint: str, losses: ItemLosses) -> EvalLoss:
    """The checkpoint's EvalLoss from the losses of all its items, summed in (bucket, batch) order whoever
    computed them, so any number of ranks gives the same floats."""
    from opensora_core.sample.evaluate import checkpoint_step

    timesteps = eval_timesteps(job.cfg)
    result = EvalLoss(checkpoint, checkpoint_step(Path(checkpoint)), timesteps)
    for b_index, bucket in enumerate(job.buckets):
        sums, count = np.zeros(len(timesteps)), 0
        for item in job.items:
            if item.bucket == b_index:
                item_sums, item_count = losses[b_index, item.batch]
                sums += np.asarray(item_sums)
                count += item_count
        if count:
            result.per_timestep[bucket.name] = (sums / count).tolist()
            result.samples[bucket.name] = count
    if not result.per_timestep:
        raise ConfigError(
            f"bucket_config: no validation sample of {', '.join(b.name for b in job.buckets)} could be read; "
            "check the validation split's files"
        )
    return result


def evaluate_loss(job: EvalLossJob, checkpoint: str) -> EvalLoss:
    """One checkpoint's eval loss in this process."""
    return combined_loss(job, checkpoint, item_losses(job, checkpoint, job.items, progress=job.progress))


def eval_loss_per_worker(job: EvalLossJob) -> None:
    """Every rank of the Ray Train worker group runs this: its share of the items (every world_size-th, from
    its rank), then one all_gather of the item losses per checkpoint, which every rank joins whatever its
    share, so no rank waits in a collective while another computes alone. Rank 0 reports the results."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the NCCL object collectives use the current device
    mine = job.items[rank::world_size]
    results = []
    for checkpoint in job.checkpoints:
        losses = item_losses(job, checkpoint, mine, device=device, progress=job.progress and rank == 0)
        gathered: list[ItemLosses | None] = [None] * world_size
        dist.all_gather_object(gathered, losses)
        if rank == 0:
            merged = {key: value for part in gathered for key, value in part.items()}
            results.append(combined_loss(job, checkpoint, merged).to_dict())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / RESULTS_NAME).write_text(json.dumps(results))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            {"checkpoints": len(job.checkpoints)}, checkpoint=checkpoint
        )  # every rank: a barrier


RESULTS_NAME = "eval_loss_results.json"  # what rank 0 reports to the driver


def evaluate_loss_on_workers(
    job: EvalLossJob, *, num_workers: int, ray_address: str | None, storage_dir: Path
) -> list[EvalLoss]:
    """Every checkpoint's eval loss on a Ray Train worker group shaped as training's (`num_workers`
    workers, a GPU each when the cluster has them, gloo or NCCL). Ray's run state goes to a temporary
    folder in `storage_dir` (beside the results, so on storage every worker reaches), removed after."""
    import tempfile

    from opensora_core.parallel.launch import cluster_has_gpus, connect_ray, run_training

    connect_ray(ray_address)
    use_gpu = cluster_has_gpus(num_workers)
    log.info(
        "eval-loss: %d batches of %d bucket(s) on %d workers", len(job.items), len(job.buckets), num_workers
    )
    storage_dir.mkdir(parents=True, exist_ok=True)
    # absolute: Ray Train reads a relative storage path as a URI
    with tempfile.TemporaryDirectory(dir=storage_dir.resolve(), prefix=".ray-") as tmp:
        result = run_training(
            eval_loss_per_worker, job, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address,
            storage_path=tmp, run_name="eval_loss",
        )  # fmt: skip
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as reported:
            results = json.loads((Path(reported) / RESULTS_NAME).read_text())
    return [EvalLoss.from_dict(r) for r in results]


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
    num_workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> list[EvalLoss]:
    """eval-loss of every checkpoint `find_checkpoints(checkpoint)` finds; results go to
    `{output_dir}/step_G/` (default: `eval_loss/` beside the checkpoints) and to every given MLflow run.

    `num_workers`: a Ray Train worker group of that many workers (what training runs on); None: the
    config's `num_train_workers` when it sets more than one, else this process alone.
    """
    from opensora_core.sample.evaluate import find_checkpoints

    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_train_workers={num_workers}: eval-loss needs at least 1 worker")
    cfg, buckets = eval_config(config, cfg_options)
    table = validation_table(cfg, snapshot_dir)  # bad input fails here, before anything is written
    checkpoints = find_checkpoints(checkpoint)
    job = eval_job(cfg, buckets, table, checkpoints, progress=progress)
    root = Path(output_dir) if output_dir else checkpoints[0].parent / "eval_loss"
    workers = num_workers or (
        cfg.training.num_train_workers if cfg.raw.get("num_train_workers", 1) > 1 else None
    )
    if workers is None:
        results = [evaluate_loss(job, c) for c in job.checkpoints]
    else:
        results = evaluate_loss_on_workers(
            job, num_workers=workers, ray_address=ray_address, storage_dir=root
        )
    for result in results:
        out_dir = root / f"step_{result.global_step:06d}"
        write_loss_plots(result, out_dir)
        (out_dir / "eval_loss.json").write_text(json.dumps(result.to_dict(), indent=2))
        for run_id in mlflow_run_ids:
            log_eval_loss(run_id, result, out_dir)
        log.info("eval-loss step %d: mean %.5f %s", result.global_step, result.mean, result.per_bucket)
    return results
