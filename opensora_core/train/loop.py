"""The training loop each Ray Train worker runs: Open-Sora's train step on DeepSpeed, start to finish.

The worker gets a `TrainJob` (opensora_core.train.job): the validated training settings, the
component sections and the run's keys, built once on the driver.

Randomness: before each micro-batch the global torch RNG (VAE sampling) and the mask RNG are
seeded from (seed, epoch, index of the micro-batch in the epoch's global order), and the global
torch RNG again before the loss (caption dropout, timesteps, noise) from a seed derived from that
one (opensora_core.train.step.micro_batch_loss). A step therefore draws the same numbers whatever
the number of workers (2 workers x 1 micro-batch = 1 worker x 2 accumulated micro-batches), a
resumed run repeats the losses of an uninterrupted one, and a step from stored latents draws the
timesteps and noise of the step from raw video.

From a feature snapshot (`job.features`) the workers build neither the VAE (video features) nor
the text encoder (text features): the model's in_channels / caption_channels / model_max_length
come from the feature manifest, and the batches carry the stored latents and captions.

A VAE model (`job.is_vae`, Open-Sora's train_vae.py) trains through the same loop: the workers build the
VAE pipeline as the trained model (no text encoder, scheduler or EMA) and a `VaeStep`
(opensora_core.train.vae_step) instead of the diffusion step; its loss parts are logged beside the loss
and its discriminator's engine is checkpointed with the model's.

Sequence parallelism (`sp_size` > 1, plugin "zero2-seq"): consecutive ranks form an SP group that
reads the same batch and draws the same numbers (data and seeds follow the data-parallel rank);
`opensora_core.parallel.sequence` splits each sample's tokens across the group.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opensora_core import storage
from opensora_core.data.batches import (
    FeatureBatches,
    FixedClipBatches,
    SnapshotBatches,
    SyntheticClips,
    build_batches,
)
from opensora_core.parallel.layout import ParallelLayout, parallel_layout
from opensora_core.parallel.sequence import apply_sequence_parallel, new_sequence_parallel_groups
from opensora_core.train.checkpoint import RunningStates, save_checkpoint
from opensora_core.train.ema import create_ema, update_ema
from opensora_core.train.job import TrainJob
from opensora_core.train.lr import build_lr_scheduler
from opensora_core.train.mask import MaskGenerator
from opensora_core.train.metrics import StepMetrics
from opensora_core.train.resume import Position, plan_resume, resume
from opensora_core.train.step import DiffusionStep, EmptyCaptionDropout, micro_batch_seed
from opensora_core.train.vae_step import VaeStep, build_vae_model, create_vae_step

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train_loop_per_worker(job: TrainJob) -> None:
    """Train on this worker's share of the data; every rank of the Ray Train worker group runs this."""
    from opensora_core import tracking
    from opensora_core.console import log_to_stderr

    log_to_stderr()  # the driver sorts our records from the rest of what the worker prints by their level
    s = job.settings
    w = setup_worker(job)
    rank, engine, loader, grad_accum = w.rank, w.engine, w.loader, s.grad_accum
    run_log = None
    if rank == 0 and job.mlflow_run_id and os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow records go through a queue, so a tracking server that is away never stalls or fails a
        # step. These first ones are sent now, which also opens the tracking store before step 1.
        run_log = tracking.TrainingLog(job.mlflow_run_id, tags=_run_tags(job, w))
    progress = job.progress if rank == 0 else None  # the driver's bar; a call rank 0 does not wait for
    system_metrics = _system_metrics(job, w.world_size)

    # ---- train
    # losses stay on the device between logged steps: no host sync, no collective on the other steps
    step_metrics = StepMetrics(w.device, loader.loss_groups, world_size=w.world_size, sp_size=s.sp_size)
    start_step, global_step = w.start.step, w.start.global_step
    done = s.max_steps is not None and global_step >= s.max_steps
    for epoch in range(w.start.epoch, s.epochs):
        if done:
            break
        loader.set_epoch(epoch)
        # each epoch redraws the buckets (keep_prob, t_prob), so its number of full batches is its own
        steps_per_epoch = len(loader) // grad_accum
        batches = iter(loader)  # starts after the micro-batches already consumed this epoch
        last_batch = None
        for step in range(start_step, steps_per_epoch):
            step_start = time.perf_counter()
            lr = w.optimizer.param_groups[0]["lr"]  # the rate this step applies
            step_loss = torch.zeros((), dtype=torch.float64, device=w.device)
            step_parts: dict[str, torch.Tensor] = {}  # the loss's named parts (a VAE's)
            step_samples = step_tokens = 0
            for micro in range(grad_accum):
                batch, weight = next(batches), 1.0
                if batch is None:  # every sample failed to load: repeat the last batch with no effect,
                    if last_batch is None:  # so all ranks still take part in each collective
                        raise RuntimeError(f"rank {rank}: the first batch of epoch {epoch} failed to load")
                    batch, weight = last_batch, 0.0
                    log.warning(
                        "rank %d: a batch failed to load; its place in step %d counts zero",
                        rank,
                        global_step + 1,
                    )
                last_batch = batch
                # index of this micro-batch in the epoch's global order, independent of world size;
                # the ranks of one SP group share it (same batch, same noise and timesteps)
                order_index = ((step * grad_accum) + micro) * w.layout.dp_size + w.layout.dp_rank
                # forward, backward and (at the accumulation boundary) the optimizer step
                result = w.train_step(
                    batch, seed=micro_batch_seed(s.seed, epoch, order_index), weight=weight,
                    global_step=global_step,
                )  # fmt: skip
                step_loss += result.loss.double() * (weight / grad_accum)
                for name, part in result.parts.items():
                    step_parts[name] = step_parts.get(name, 0.0) + part.double() * (weight / grad_accum)
                step_metrics.add_micro_batch(loader.bucket_of(batch), result.loss, weight)
                step_samples += result.samples
                step_tokens += result.tokens
            if w.ema is not None:
                update_ema(w.ema, engine.module, decay=s.ema_decay)
            global_step += 1

            step_metrics.add(step_loss)
            if progress is not None:
                progress.update.remote(
                    epoch=epoch, step=step + 1, steps_per_epoch=steps_per_epoch, global_step=global_step
                )
            done = s.max_steps is not None and global_step >= s.max_steps
            at_end = done or (epoch == s.epochs - 1 and step == steps_per_epoch - 1)
            log_now = global_step % s.log_every == 0 or at_end
            save_now = bool(s.ckpt_every and global_step % s.ckpt_every == 0) or at_end

            metrics: dict[str, float] = {}
            if log_now or save_now:  # the step's only collective: losses, samples, tokens, skipped files
                totals = step_metrics.all_reduce(
                    step_loss, step_samples, step_tokens, loader.skipped, step_parts
                )
                step_time = time.perf_counter() - step_start
            if log_now:
                bucket = loader.bucket_of(batch)
                metrics = step_metrics.logged(
                    totals, lr=lr, grad_norm=engine.get_global_grad_norm(), step_time=step_time,
                    epoch=epoch, global_step=global_step,
                )  # fmt: skip
                if rank == 0:
                    log.info(
                        "epoch %d step %d global_step %d loss %.5f lr %.3g grad_norm %.4g %.1f samples/s [%s]",
                        epoch, step + 1, global_step, totals.loss, lr, metrics["grad_norm"],
                        metrics["samples_per_s"], bucket,
                    )  # fmt: skip
                    if progress is not None:
                        progress.update.remote(loss=totals.loss, samples_per_s=metrics["samples_per_s"])
                    if run_log:
                        run_log.log_metrics(metrics, step=global_step)

            if save_now:
                if run_log:
                    run_log.send_now()  # this step's records reach MLflow even if the save is cut short
                saved = _save(job, w, epoch=epoch, step=step + 1, global_step=global_step)
                if rank == 0:
                    where = storage.join(job.checkpoint_uri, saved.name) if job.checkpoint_uri else str(saved)
                    log.info("saved checkpoint %s", where)
                    if run_log:
                        run_log.set_tags(
                            {"checkpoint.latest": where, f"checkpoint.global_step{global_step}": where}
                        )
                # Ray hears of checkpoints only: its report is a barrier costing ~1 s on a small CPU
                # run, and the step metrics already go to MLflow
                _report({**metrics, "loss": totals.loss, "global_step": float(global_step)}, saved, rank)
            if done:
                break
        start_step = 0
    if system_metrics:
        tracking.stop_system_metrics(system_metrics)
    if run_log:
        run_log.close()  # queued records reach MLflow (or are reported lost) before the run is reported done


@dataclass
class Worker:
    """What one rank trains with: built by `setup_worker`, used by the loop."""

    rank: int
    world_size: int
    layout: ParallelLayout  # data and seeds follow layout.dp_rank
    device: torch.device
    dtype: torch.dtype
    loader: SnapshotBatches | FeatureBatches | FixedClipBatches | SyntheticClips
    engine: Any  # the DeepSpeed engine around the trained model (diffusion model or VAE)
    optimizer: Any  # DeepSpeed's (ZeRO) optimizer
    ema: torch.nn.Module | None  # fp32; only rank 0 keeps (and saves) it; None for a VAE
    zero_stage: int
    start: Position
    train_step: DiffusionStep | VaeStep  # one micro-batch: forward, backward, optimizer step


def setup_worker(job: TrainJob) -> Worker:
    """This rank's models, data, DeepSpeed engine, and its start: the resumed position, if any."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from opensora_core.parallel.deepspeed_config import (
        PLUGINS,
        deepspeed_config,
        ignore_deepspeeds_all_gather_deprecation,
        skip_cpu_shm_kernel,
    )
    from opensora_core.schedulers import build_scheduler

    s = job.settings
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    dtype = TORCH_DTYPES[s.dtype]
    if not on_gpu and dtype == torch.float16:
        dtype = torch.float32  # deepspeed_config warns about this once
    layout = parallel_layout(rank, world_size, s.sp_size)
    _seed_everything(s.seed)

    # Ray Train already created the process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it.
    if not on_gpu:
        skip_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", dist_init_required=False)
    ignore_deepspeeds_all_gather_deprecation()

    # ---- models: text encoder and VAE frozen, the diffusion model trained; or the VAE trained
    text_encoder = vae = scheduler = mask_generator = ema = None
    if job.is_vae:
        model = build_vae_model(dict(job.model)).to(device).train()
    else:
        text_encoder, vae, model = _build_models(job, device, dtype)
        ema = create_ema(model) if rank == 0 else None  # fp32; only rank 0 saves it
        scheduler = build_scheduler(dict(job.scheduler))
        mask_generator = MaskGenerator(job.mask_ratios) if job.mask_ratios else None
    if s.grad_checkpoint and job.is_vae:
        _enable_grad_checkpoint(model)
    if s.sp_size > 1:  # after the EMA copy: the EMA model runs whole, never sequence parallel
        sp_group, _ = new_sequence_parallel_groups(layout)
        apply_sequence_parallel(model, sp_group)

    # ---- data: this rank's share of every global step
    features = job.features
    loader = build_batches(
        snapshot_dir=job.snapshot_dir, dataset=job.dataset, synthetic_data=job.synthetic_data,
        rank=rank, world_size=world_size, seed=s.seed, sp_size=s.sp_size, num_workers=s.num_workers,
        features=features.path if features else None, video_features=bool(features and features.video),
        text_features=bool(features and features.text), clips_table=job.clips_table, batch_size=s.batch_size,
        val_fraction=s.val_fraction,
    )  # fmt: skip
    empty_caption = _empty_caption(job, loader, text_encoder)
    if len(loader) // s.grad_accum == 0:
        raise RuntimeError(
            f"rank {rank}: the data gives no full step ({len(loader)} micro-batches, grad_accum {s.grad_accum})"
        )

    # ---- optimizer, LR warmup, DeepSpeed (ZeRO stage from `plugin`)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=s.lr,
        weight_decay=s.weight_decay,
        eps=s.adam_eps,
    )
    lr_scheduler = build_lr_scheduler(optimizer, s.warmup_steps)
    ds_config = deepspeed_config(
        s.plugin, s.dtype, s.grad_clip, micro_batch_size=loader.max_batch_size, grad_accum=s.grad_accum,
        sp_size=s.sp_size, on_gpu=on_gpu, world_size=world_size,
    )  # fmt: skip
    zero_stage = ds_config["zero_optimization"]["stage"]
    if rank == 0 and zero_stage != PLUGINS[s.plugin]:
        log.info(
            "plugin=%r on a single rank runs as ZeRO stage %d: no gradients to partition",
            s.plugin,
            zero_stage,
        )

    # ---- resume: the run's latest checkpoint after a worker failure, else `load`
    ray_checkpoint = ray.train.get_checkpoint()
    plan = plan_resume(
        ray_checkpoint.path if ray_checkpoint is not None else None, s.load,
        output_dir=job.output_dir, world_size=world_size, zero_stage=zero_stage, rank=rank,
    )  # fmt: skip
    if plan.universal_dir is not None:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    if job.is_vae:
        train_step = create_vae_step(
            engine, job.vae_loss, device=device, dtype=dtype, ds_config=ds_config, lr=s.lr,
            weight_decay=s.weight_decay, adam_eps=s.adam_eps,
        )  # fmt: skip
    else:
        train_step = DiffusionStep(
            engine, scheduler, vae, text_encoder, device, dtype, mask_generator, empty_caption
        )
    start = resume(
        plan, engine, ema, loader, model_type=job.model_type, start_from_scratch=s.start_from_scratch,
        rank=rank, local_rank=context.get_local_rank(), extra_engines=train_step.extra_engines,
    )  # fmt: skip
    return Worker(
        rank, world_size, layout, device, dtype, loader, engine, optimizer, ema, zero_stage, start, train_step
    )


def _save(job: TrainJob, w: Worker, *, epoch: int, step: int, global_step: int) -> Path:
    """Save (and with `checkpoint_uri` upload) the checkpoint after `step` steps of `epoch`; every rank calls it."""
    return save_checkpoint(
        job.output_dir,
        engine=w.engine,
        ema=w.ema,
        sampler_state=w.loader.state_dict(step * job.settings.grad_accum),
        states=RunningStates(
            epoch=epoch,
            step=step,
            global_step=global_step,
            batch_size=w.loader.max_batch_size,
            model_type=job.model_type,
        ),
        config_text=job.config_text,
        rank=w.rank,
        upload_to=job.checkpoint_uri,
        extra_engines=w.train_step.extra_engines,
        model_files=w.train_step.write_model_files,
    )


def _build_models(
    job: TrainJob, device: torch.device, dtype: torch.dtype
) -> tuple[Any | None, torch.nn.Module | None, torch.nn.Module]:
    """(text encoder, VAE, diffusion model): the encoders frozen in `dtype`, the model in training mode.

    An encoder whose output the feature snapshot stores is not built (None); the feature manifest
    gives the model's sizes instead.
    """
    from opensora_core.models.registry import (
        build_model,
        build_text_encoder,
        build_vae,
        with_latent_input_size,
    )

    features = job.features
    text_encoder = vae = None
    if job.text_encoder is not None:
        text_encoder = build_text_encoder(dict(job.text_encoder), device=device)
        caption_channels, max_length = text_encoder.output_dim, text_encoder.model_max_length
    else:
        caption_channels, max_length = features.caption_channels, features.model_max_length
    if job.vae is not None:
        vae = build_vae(dict(job.vae)).to(device=device, dtype=dtype).eval()
        vae.requires_grad_(False)
        in_channels = vae.out_channels
    else:
        in_channels = features.in_channels
    model_cfg = dict(job.model)
    if (
        vae is not None and job.dataset
    ):  # fixed-size clips (VideoTextDataset) fix a fixed-size model's latent size
        model_cfg = with_latent_input_size(
            model_cfg, vae, job.dataset.get("num_frames"), job.dataset.get("image_size")
        )
    model = build_model(
        model_cfg,
        in_channels=in_channels,
        caption_channels=caption_channels,
        model_max_length=max_length,
    )
    if job.settings.grad_checkpoint:
        _enable_grad_checkpoint(model)
    return text_encoder, vae, model.to(device).train()


def _empty_caption(job: TrainJob, loader: Any, text_encoder: Any | None) -> EmptyCaptionDropout | None:
    """caption_dropout "empty": the feature snapshot's stored "" caption, else the text encoder's."""
    if not job.empty_caption_prob:
        return None
    if text_encoder is None:
        y, mask = loader.dataset.features.empty_caption()
    else:
        with torch.no_grad():
            encoded = text_encoder.encode([""])
        y, mask = encoded["y"][0].cpu(), encoded["mask"][0].cpu() if "mask" in encoded else None
    return EmptyCaptionDropout(y, mask, job.empty_caption_prob)


def _run_tags(job: TrainJob, w: Worker) -> dict[str, str]:
    """The MLflow tags of how the run is laid out, where it starts, and the feature snapshot it reads."""
    tags = {
        "train.world_size": str(w.world_size),
        "train.dp_size": str(w.layout.dp_size),
        "train.sp_size": str(w.layout.sp_size),
        "train.zero_stage": str(w.zero_stage),
        "train.start_global_step": str(w.start.global_step),
    }
    if job.features is not None:
        tags["feature_snapshot"] = job.features.feature_id
    return tags


def _system_metrics(job: TrainJob, world_size: int) -> Any:
    """MLflow's system-metrics monitor on the first rank of each machine (CPU, memory, GPUs of that
    machine), named by node when the run spans several; None without a tracking server."""
    import ray.train

    from opensora_core import tracking

    context = ray.train.get_context()
    if not (job.mlflow_run_id and os.environ.get("MLFLOW_TRACKING_URI")) or context.get_local_rank() != 0:
        return None
    several = world_size > context.get_local_world_size()
    return tracking.start_system_metrics(
        job.mlflow_run_id, node_id=f"node{context.get_node_rank()}" if several else None
    )


def _report(metrics: dict[str, float], checkpoint_dir: Path, rank: int) -> None:
    """ray.train.report on every rank (it is a barrier); rank 0 attaches the checkpoint.

    The checkpoint already sits in the run's output directory, so it is recorded where it is
    instead of being copied into Ray's storage.
    """
    import ray.train

    checkpoint = None
    if checkpoint_dir is not None and rank == 0:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir is not None else None,
        checkpoint_upload_fn=_keep_in_place,
        delete_local_checkpoint_after_upload=False,
    )


def _keep_in_place(checkpoint: Any, _dir_name: str) -> Any:
    return checkpoint


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _enable_grad_checkpoint(model: torch.nn.Module) -> None:
    """Turn on the model's activation checkpointing (Open-Sora's `grad_checkpoint`)."""
    if hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = True
        return
    log.warning(
        "grad_checkpoint=True but %s has no gradient checkpointing switch; ignored", type(model).__name__
    )
