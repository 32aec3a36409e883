"""The training loop each Ray Train worker runs: Open-Sora's train step on DeepSpeed, start to finish.

`config` is the resolved Open-Sora config as a plain dict plus the run keys `output_dir`,
`snapshot_dir`, `mlflow_run_id`, `config_text` and optionally `checkpoint_uri` (shared storage each
saved checkpoint is copied to), `load`, `max_steps`,
`grad_accum`, `synthetic_data` (random clips instead of a bucket snapshot: benchmarks, tests).

Randomness: before each micro-batch the global torch RNG (VAE sampling, caption dropout,
timesteps, noise) and the mask RNG are seeded from (seed, epoch, index of the micro-batch in the
epoch's global order). A step therefore draws the same numbers whatever the number of workers
(2 workers x 1 micro-batch = 1 worker x 2 accumulated micro-batches) and a resumed run repeats the
losses of an uninterrupted one.

Sequence parallelism (`sp_size` > 1, plugin "zero2-seq"): consecutive ranks form an SP group that
reads the same batch and draws the same numbers (data and seeds follow the data-parallel rank);
`opensora_core.parallel.sequence` splits each sample's tokens across the group.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from opensora_core import storage
from opensora_core.errors import ConfigError
from opensora_core.parallel.layout import parallel_layout
from opensora_core.parallel.sequence import apply_sequence_parallel, new_sequence_parallel_groups
from opensora_core.train.checkpoint import (
    RunningStates,
    fetch_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    needs_resharding,
    save_checkpoint,
    saved_zero_ranks,
)
from opensora_core.train.ema import create_ema, update_ema
from opensora_core.train.lr import build_lr_scheduler
from opensora_core.train.mask import MaskGenerator

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# batch entries that go to the model as conditioning (STDiT size / length / fps embedders, rflow)
CONDITION_KEYS = ("num_frames", "height", "width", "ar", "fps")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this worker's share of the data; every rank of the Ray Train worker group runs this."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from opensora_core import tracking
    from opensora_core.models.registry import build_model, build_text_encoder, build_vae
    from opensora_core.parallel.deepspeed_config import PLUGINS, deepspeed_config
    from opensora_core.schedulers import build_scheduler

    cfg = config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    dtype = TORCH_DTYPES[cfg.get("dtype", "bf16")]
    if not on_gpu and dtype == torch.float16:
        dtype = torch.float32  # deepspeed_config warns about this once
    seed = int(cfg.get("seed", 1024))
    epochs, max_steps = int(cfg.get("epochs", 1)), cfg.get("max_steps")
    grad_accum = int(cfg.get("grad_accum", 1))
    ema_decay = float(cfg.get("ema_decay", 0.9999))
    log_every, ckpt_every = int(cfg.get("log_every", 10)), int(cfg.get("ckpt_every", 0) or 0)
    output_dir = cfg["output_dir"]
    run_id = cfg.get("mlflow_run_id") if rank == 0 and os.environ.get("MLFLOW_TRACKING_URI") else None
    sp_size = int(cfg.get("sp_size", 1))
    layout = parallel_layout(rank, world_size, sp_size)  # data and seeds follow layout.dp_rank
    _seed_everything(seed)

    # Ray Train already created the process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it.
    if not on_gpu:
        _skip_deepspeed_shm_kernel()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", dist_init_required=False)

    # ---- models: text encoder and VAE frozen, the diffusion model trained
    text_encoder = build_text_encoder(dict(cfg["text_encoder"]), device=device)
    vae = build_vae(dict(cfg["vae"])).to(device=device, dtype=dtype).eval()
    vae.requires_grad_(False)
    model = build_model(
        dict(cfg["model"]),
        in_channels=vae.out_channels,
        caption_channels=text_encoder.output_dim,
        model_max_length=text_encoder.model_max_length,
    )
    if cfg.get("grad_checkpoint"):
        _enable_grad_checkpoint(model)
    model = model.to(device).train()
    ema = create_ema(model) if rank == 0 else None  # fp32; only rank 0 saves it
    if sp_size > 1:  # after the EMA copy: the EMA model runs whole, never sequence parallel
        sp_group, _ = new_sequence_parallel_groups(layout)
        apply_sequence_parallel(model, sp_group)
    scheduler = build_scheduler(dict(cfg["scheduler"]))
    mask_generator = MaskGenerator(cfg["mask_ratios"]) if cfg.get("mask_ratios") else None

    # ---- data: this rank's share of every global step
    loader = build_batches(cfg, rank=rank, world_size=world_size, sp_size=sp_size, seed=seed)
    num_steps_per_epoch = len(loader) // grad_accum
    if num_steps_per_epoch == 0:
        raise RuntimeError(
            f"rank {rank}: the data gives no full step ({len(loader)} micro-batches, grad_accum {grad_accum})"
        )

    # ---- optimizer, LR warmup, DeepSpeed (ZeRO stage from `plugin`)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=float(cfg.get("lr", 1e-4)),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        eps=float(cfg.get("adam_eps", 1e-8)),
    )
    lr_scheduler = build_lr_scheduler(optimizer, cfg.get("warmup_steps"))
    plugin = cfg.get("plugin", "zero2")
    ds_config = deepspeed_config(
        plugin,
        cfg.get("dtype", "bf16"),
        float(cfg.get("grad_clip", 0.0) or 0.0),
        micro_batch_size=loader.max_batch_size,
        grad_accum=grad_accum,
        sp_size=sp_size,
        on_gpu=on_gpu,
        world_size=world_size,
    )
    zero_stage = ds_config["zero_optimization"]["stage"]
    if rank == 0 and zero_stage != PLUGINS[plugin]:
        log.info(
            "plugin=%r on a single rank runs as ZeRO stage %d: no gradients to partition", plugin, zero_stage
        )

    # ---- resume: the run's latest checkpoint after a worker failure, else `load`
    # A restarted worker group may see no Ray checkpoint when a worker died before Ray registered
    # the last report, so the run's own directory is searched too (a new run's directory is empty).
    ray_checkpoint = ray.train.get_checkpoint()
    own_checkpoint = ray_checkpoint.path if ray_checkpoint is not None else latest_checkpoint(output_dir)
    resume_from = own_checkpoint or cfg.get("load")
    universal_dir = None
    if resume_from and needs_resharding(resume_from, world_size, zero_stage):
        # saved by another number of ranks: DeepSpeed re-splits the optimizer state only from its
        # universal form, which each machine writes once into its cache (removed once loaded)
        key = hashlib.sha1(f"{output_dir}\n{resume_from}".encode()).hexdigest()[:16]
        universal_dir = storage.cache_dir() / "universal" / f"{socket.gethostname()}-{key}"
        ds_config["checkpoint"] = {"load_universal": True}
        if rank == 0:
            log.info(
                "%s holds the optimizer state of %d ranks, this run has %d: loading it as a DeepSpeed "
                "universal checkpoint", resume_from, saved_zero_ranks(fetch_checkpoint(resume_from)), world_size,
            )  # fmt: skip
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        dist_init_required=False,
    )

    start_epoch = start_step = global_step = 0
    if resume_from:
        # start_from_scratch (with `load`): the weights and optimizer moments, but step 0 of epoch 0
        from_scratch = own_checkpoint is None and bool(cfg.get("start_from_scratch"))
        states = load_checkpoint(
            resume_from,
            engine,
            ema,
            loader,
            model_type=cfg["model"]["type"],
            rank=rank,
            restore_position=not from_scratch,
            universal_dir=universal_dir,
        )
        if universal_dir is not None:
            dist.barrier()  # every rank of this machine has read its share
            if context.get_local_rank() == 0:
                shutil.rmtree(universal_dir, ignore_errors=True)
        if not from_scratch:
            start_epoch, start_step, global_step = states.epoch, states.step, states.global_step
        if rank == 0:
            log.info("resumed from %s at epoch %d step %d (global step %d)", resume_from, *_position(states))

    run_log = None
    if run_id:
        # MLflow records go through a queue, so a tracking server that is away never stalls or fails a
        # step. These first ones are sent now, which also opens the tracking store before step 1.
        run_log = tracking.TrainingLog(
            run_id,
            tags={
                "train.world_size": str(world_size),
                "train.dp_size": str(layout.dp_size),
                "train.sp_size": str(sp_size),
                "train.zero_stage": str(zero_stage),
                "train.start_global_step": str(global_step),
            },
        )

    # ---- train
    # losses stay on the device between logged steps: no host sync, no collective on the other steps
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps = 0
    bucket_ids = {bucket: i for i, bucket in enumerate(loader.bucket_names)}
    logged_buckets: set[str] = set()
    done = max_steps is not None and global_step >= max_steps
    for epoch in range(start_epoch, epochs):
        if done:
            break
        loader.set_epoch(epoch)
        batches = iter(loader)  # starts after the micro-batches already consumed this epoch
        last_batch = None
        for step in range(start_step, num_steps_per_epoch):
            step_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step applies
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            step_samples = 0
            for micro in range(grad_accum):
                batch = next(batches)
                weight = 1.0
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
                order_index = ((step * grad_accum) + micro) * layout.dp_size + layout.dp_rank
                step_seed = int(np.random.SeedSequence([seed, epoch, order_index]).generate_state(1)[0])
                torch.manual_seed(step_seed)
                mask_rng = random.Random(step_seed)

                x = batch["video"].to(device=device, dtype=dtype)
                with torch.no_grad():
                    x = vae.encode(x)  # [B, C, T', H', W'] latents
                    model_args = text_encoder.encode(list(batch["text"]))  # {"y", "mask"}
                model_args = {k: _to(v, device, dtype) for k, v in model_args.items()}
                mask = None
                if mask_generator is not None:
                    mask = mask_generator.get_masks(x, mask_rng)
                    model_args["x_mask"] = mask
                model_args.update(
                    {k: batch[k].to(device=device, dtype=dtype) for k in CONDITION_KEYS if k in batch}
                )
                loss = scheduler.training_losses(engine, x, model_args, mask=mask)["loss"].mean()
                engine.backward(loss * weight)
                engine.step()  # DeepSpeed steps the optimizer and LR only at the accumulation boundary
                step_loss += loss.detach().double() * (weight / grad_accum)
                step_samples += x.shape[0]
            if ema is not None:
                update_ema(ema, engine.module, decay=ema_decay)
            global_step += 1

            window_loss += step_loss
            window_steps += 1
            done = max_steps is not None and global_step >= max_steps
            at_end = done or (epoch == epochs - 1 and step == num_steps_per_epoch - 1)
            log_now = global_step % log_every == 0 or at_end
            save_now = bool(ckpt_every and global_step % ckpt_every == 0) or at_end

            metrics: dict[str, float] = {}
            if log_now or save_now:
                # loss of this step and of the window, samples of this step and files skipped so far,
                # summed over all ranks (each SP group's ranks hold the same samples, so they read and
                # skip the same files)
                totals = torch.stack(
                    [step_loss, window_loss]
                    + [
                        torch.tensor(n / sp_size, dtype=torch.float64, device=device)
                        for n in (step_samples, loader.skipped)
                    ]
                )
                dist.all_reduce(totals)
                step_loss_sum, window_loss_sum, samples, skipped = totals.tolist()
                step_time = time.perf_counter() - step_start
                last_loss = step_loss_sum / world_size
            if log_now:
                bucket = loader.bucket_of(batch)
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "loss": last_loss,
                    "avg_loss": window_loss_sum / world_size / window_steps,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": samples / step_time,
                    "samples_skipped": skipped,  # failed files, since the workers started
                    "step_time": step_time,
                    "bucket": float(bucket_ids.setdefault(bucket, len(bucket_ids))),
                    "epoch": float(epoch),
                    "global_step": float(global_step),
                }
                window_loss.zero_()
                window_steps = 0
                if rank == 0:
                    log.info(
                        "epoch %d step %d global_step %d loss %.5f lr %.3g grad_norm %.4g %.1f samples/s [%s]",
                        epoch, step + 1, global_step, last_loss, lr, metrics["grad_norm"],
                        metrics["samples_per_s"], bucket,
                    )  # fmt: skip
                    if run_log:
                        run_log.log_metrics(metrics, step=global_step)
                        if bucket not in logged_buckets:
                            run_log.set_tags({f"bucket.{int(metrics['bucket'])}": bucket})
                            logged_buckets.add(bucket)

            if save_now:
                if run_log:
                    run_log.send_now()  # this step's records reach MLflow even if the save is cut short
                states = RunningStates(
                    epoch=epoch,
                    step=step + 1,
                    global_step=global_step,
                    batch_size=loader.max_batch_size,
                    model_type=cfg["model"]["type"],
                )
                saved = save_checkpoint(
                    output_dir,
                    engine=engine,
                    ema=ema,
                    sampler_state=loader.state_dict((step + 1) * grad_accum),
                    states=states,
                    config_text=cfg.get("config_text", ""),
                    rank=rank,
                    upload_to=cfg.get("checkpoint_uri"),
                )
                if rank == 0:
                    where = (
                        storage.join(cfg["checkpoint_uri"], saved.name)
                        if cfg.get("checkpoint_uri")
                        else str(saved)
                    )
                    log.info("saved checkpoint %s", where)
                    if run_log:
                        run_log.set_tags(
                            {"checkpoint.latest": where, f"checkpoint.global_step{global_step}": where},
                        )
                # Ray hears of checkpoints only: its report is a barrier costing ~1 s on a small CPU
                # run, and the step metrics already go to MLflow
                _report({**metrics, "loss": last_loss, "global_step": float(global_step)}, saved, rank)
            if done:
                break
        start_step = 0
    if run_log:
        run_log.close()  # queued records reach MLflow (or are reported lost) before the run is reported done


def _report(metrics: dict[str, float], checkpoint_dir: Any, rank: int) -> None:
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


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Float tensors to the training dtype; masks and ids keep theirs."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    return value


def _position(states: RunningStates) -> tuple[int, int, int]:
    return states.epoch, states.step, states.global_step


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


def _skip_deepspeed_shm_kernel() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (~1 min) on start-up.

    Only tensor-parallel inference uses it (`inference_all_reduce`); training talks through gloo,
    so the compile is skipped. Newer DeepSpeed versions without the hook are left alone.
    """
    # not `import deepspeed.comm.torch`: that name resolves to the torch package re-exported there
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


# ---------------------------------------------------------------------------------------------
# Data: the bucket snapshot through the bucket batch sampler, or synthetic clips without media.


def build_batches(
    cfg: dict[str, Any], *, rank: int, world_size: int, seed: int, sp_size: int = 1
) -> SnapshotBatches | SyntheticClips:
    """This rank's micro-batches: `len()`, `set_epoch`, resumable `state_dict` / `load_state_dict`.

    The `sp_size` consecutive ranks of a sequence-parallel group get the same batches.
    """
    if cfg.get("synthetic_data"):
        layout = parallel_layout(rank, world_size, sp_size)
        return SyntheticClips(
            **cfg["synthetic_data"], rank=layout.dp_rank, world_size=layout.dp_size, seed=seed
        )
    return SnapshotBatches(cfg, rank=rank, world_size=world_size, seed=seed)


class SnapshotBatches:
    """Batches of decoded clips from a bucket snapshot; DataLoader workers do the decoding.

    A batch whose every sample failed to load comes out as None (see `collate_fn`).
    """

    def __init__(self, cfg: dict[str, Any], *, rank: int, world_size: int, seed: int) -> None:
        from opensora_core.data.dataset import VariableVideoTextDataset
        from opensora_core.data.sampler import BucketBatchSampler
        from opensora_core.data.snapshot import open_snapshot

        dataset_cfg = dict(cfg.get("dataset") or {})
        if dataset_cfg.get("type", "VariableVideoTextDataset") != "VariableVideoTextDataset":
            raise ConfigError(
                f"dataset.type={dataset_cfg['type']!r}: training reads bucket snapshots; "
                "use dataset.type='VariableVideoTextDataset'"
            )
        if not cfg.get("snapshot_dir"):
            raise ConfigError(
                "snapshot_dir: training needs a bucket snapshot (build one with `opensora bucket`)"
            )
        snapshot = open_snapshot(cfg["snapshot_dir"])
        buckets = snapshot.manifest.buckets
        if not buckets:
            raise ConfigError(
                f"bucket snapshot {snapshot.path}: no bucket kept any sample; check bucket_config"
            )
        self.dataset = VariableVideoTextDataset(
            snapshot,
            frame_interval=int(dataset_cfg.get("frame_interval", 1) or 1),
            transform_name=dataset_cfg.get("transform_name") or "resize_crop",
            seed=seed,
        )
        # the sampler's seed is the snapshot's, so epoch 0 uses the buckets drawn at build time
        self.sampler = BucketBatchSampler(
            snapshot, num_replicas=world_size, rank=rank, sp_size=int(cfg.get("sp_size", 1)), drop_last=True
        )
        self.num_workers = int(cfg.get("num_workers", 2))
        self.bucket_names = [b.key.id for b in buckets]
        self._names = {f"{b.num_frames}-{b.height}-{b.width}": b.key.id for b in buckets}
        self.max_batch_size = max(b.batch_size for b in buckets)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def skipped(self) -> int:
        """Files that failed to load on this rank so far (the dataset logs a warning for each)."""
        return self.dataset.skipped

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        from opensora_core.data.dataset import collate_fn

        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def bucket_of(self, batch: dict[str, Any]) -> str:
        """The batch's bucket id, e.g. "144p-17-0.56"."""
        shape = batch["bucket"][0]
        return self._names.get(shape, shape)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def state_dict(self, num_batches: int) -> dict[str, Any]:
        return self.sampler.state_dict(num_batches)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class SyntheticClips:
    """Random clips and captions of one shape, split across ranks like the bucket sampler.

    Micro-batch i of an epoch is a pure function of (seed, epoch, i); rank r of R takes
    i = step * R + r, so any world size sees the same global steps.
    """

    def __init__(
        self,
        *,
        num_batches: int,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        fps: int = 24,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.num_batches, self.batch_size = num_batches, batch_size
        self.shape = (3, num_frames, height, width)
        self.fps, self.rank, self.world_size, self.seed = fps, rank, world_size, seed
        self.epoch, self.start = 0, 0
        self.max_batch_size = batch_size
        self.bucket_names = [f"{num_frames}-{height}-{width}"]
        self.skipped = 0  # random clips never fail to load

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, self.start = self.start, 0  # a restored position applies to one pass
        _, t, h, w = self.shape
        n = self.batch_size
        for step in range(start, len(self)):
            index = step * self.world_size + self.rank
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            )
            yield {
                "video": torch.rand(n, *self.shape, generator=generator) * 2 - 1,
                "text": [f"synthetic clip {index}-{j}" for j in range(n)],
                "num_frames": torch.full((n,), t),
                "height": torch.full((n,), h),
                "width": torch.full((n,), w),
                "ar": torch.full((n,), h / w),
                "fps": torch.full((n,), self.fps),
                "bucket": [self.bucket_names[0]] * n,
            }

    def bucket_of(self, batch: dict[str, Any]) -> str:
        return batch["bucket"][0]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a restored position belongs to the epoch it was saved in
        self.epoch = epoch

    def state_dict(self, num_batches: int) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed_batches": num_batches * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.start = int(state["consumed_batches"]) // self.world_size
