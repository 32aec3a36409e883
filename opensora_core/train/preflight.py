"""Pre-flight check of a training run: does the data give a full step, and which buckets can never fill a batch.

Runs on the driver from the snapshot's manifest (no Ray is started; with `val_fraction` the snapshot's table
is read too, and the held-out rows are not counted: training never sees them), so a run that would find no
full step refuses in one line before any worker or model is built. The arithmetic is the
bucket sampler's with `drop_last=True` (opensora_core.data.sampler): a bucket gives `samples // batch_size`
full batches, all buckets' batches are pooled and dealt out to the data-parallel ranks in whole rounds, and
a step takes `grad_accum` of a rank's batches. Later epochs redraw the buckets (keep_prob, t_prob), so
their counts differ a little from the snapshot's epoch, which is the one checked here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from opensora_core.data.manifest import BucketStats, Manifest
from opensora_core.data.snapshot import Snapshot
from opensora_core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """One epoch of the snapshot as the training loop will walk it."""

    buckets: tuple[BucketStats, ...]
    dp_size: int  # data-parallel ranks: training workers // sp_size
    grad_accum: int

    @property
    def full_batches(self) -> int:
        """Full batches of all buckets together, before they are dealt out to the ranks."""
        return sum(b.count // b.batch_size for b in self.buckets)

    @property
    def batches_per_rank(self) -> int:
        return self.full_batches // self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_rank // self.grad_accum

    @property
    def batches_per_step(self) -> int:
        """Full batches one optimizer step takes, over all data-parallel ranks."""
        return self.dp_size * self.grad_accum

    def never_full(self) -> tuple[BucketStats, ...]:
        """Kept buckets with fewer samples than one batch: their samples are never trained on."""
        return tuple(b for b in self.buckets if b.count < b.batch_size)


def step_plan(manifest: Manifest, *, num_workers: int, sp_size: int = 1, grad_accum: int = 1) -> StepPlan:
    """The epoch plan of `manifest`'s buckets on `num_workers` training workers."""
    if sp_size < 1 or num_workers % sp_size:
        raise ConfigError(f"sp_size={sp_size} must divide num_train_workers={num_workers}")
    return StepPlan(manifest.buckets, num_workers // sp_size, grad_accum)


def training_plan(snapshot: Snapshot, settings: Any, *, num_workers: int) -> StepPlan:
    """The epoch plan of the rows training uses: `snapshot`'s buckets without the validation split that
    `settings.val_fraction` holds out (a TrainingSettings)."""
    plan = step_plan(
        snapshot.manifest, num_workers=num_workers, sp_size=settings.sp_size, grad_accum=settings.grad_accum
    )
    if settings.val_fraction is None:
        return plan
    return dataclasses.replace(plan, buckets=training_buckets(snapshot, settings.val_fraction))


def training_buckets(snapshot: Snapshot, val_fraction: float) -> tuple[BucketStats, ...]:
    """The snapshot's kept buckets counting only the rows outside the validation split; buckets left with
    no row are dropped. Logs how many rows are held out."""
    from opensora_core.data.validation_split import held_out

    held = held_out(snapshot.full_table(), val_fraction)
    buckets, start = [], 0
    for b in snapshot.manifest.buckets:  # a bucket's rows are one slice of the full table, in manifest order
        count = b.count - int(np.count_nonzero(held[start : start + b.count]))
        start += b.count
        if count:
            buckets.append(dataclasses.replace(b, count=count, num_batches=count // b.batch_size))
    kept = snapshot.manifest.num_kept
    held_kept = kept - sum(b.count for b in buckets)
    log.info(
        "val_fraction=%g: %d of %d snapshot rows held out of training for eval-loss (%d of the %d kept ones)",
        val_fraction, int(held.sum()), len(held), held_kept, kept,
    )  # fmt: skip
    if kept and not buckets:
        raise ConfigError(
            f"val_fraction={val_fraction}: holds out all {kept} kept samples of bucket snapshot "
            f"{snapshot.path}; lower val_fraction or set val_data_path"
        )
    return tuple(buckets)


def fitting_batch_size(bucket: BucketStats, plan: StepPlan) -> int:
    """The batch size at which this bucket alone gives one full step (at least 1)."""
    return max(1, bucket.count // plan.batches_per_step)


def check_step_plan(plan: StepPlan, where: str) -> None:
    """Raise ConfigError (one line) when `plan` has no full step; warn about buckets that never fill a batch."""
    if not plan.buckets:
        raise ConfigError(f"bucket snapshot {where}: no bucket kept any sample; check bucket_config")
    if plan.steps_per_epoch == 0:
        need = f"{plan.batches_per_step} full batches ({plan.dp_size} data-parallel ranks"
        need += f" x grad_accum {plan.grad_accum})" if plan.grad_accum > 1 else ")"
        starved = "; ".join(
            f"{b.key.id}: {b.count} samples < batch size {b.batch_size} x {plan.batches_per_step}"
            for b in plan.buckets
        )
        fixes = ", ".join(
            f'bucket_config["{b.resolution}"][{b.num_frames}] batch size {fitting_batch_size(b, plan)}'
            for b in _largest(plan.buckets)
        )
        others = ["fewer training workers (num_train_workers)"] if plan.dp_size > 1 else []
        others += ["grad_accum=1"] if plan.grad_accum > 1 else []
        raise ConfigError(
            f"bucket snapshot {where}: no full training step; a step takes {need}, the buckets give "
            f"{plan.full_batches} ({starved}); fix: {', '.join([fixes, *others, 'more clips'])}"
        )
    never = plan.never_full()
    if never:
        log.warning(
            "bucket snapshot %s: %d kept bucket(s) can never fill a batch, their samples are never trained on: %s",
            where,
            len(never),
            ", ".join(f"{b.key.id} ({b.count} samples < batch size {b.batch_size})" for b in never),
        )


def _largest(buckets: tuple[BucketStats, ...], limit: int = 3) -> list[BucketStats]:
    """The buckets with most samples: lowering their batch sizes gains the most steps."""
    return sorted(buckets, key=lambda b: -b.count)[:limit]


def preflight(cfg: Any, *, snapshot_dir: str | None, num_workers: int) -> StepPlan | None:
    """Check a validated training config's data for `num_workers` workers; the snapshot's StepPlan, or
    None for `synthetic_data` (checked here too)."""
    from opensora_core.data.snapshot import open_snapshot

    s = cfg.training
    synthetic = cfg.raw.get("synthetic_data")
    if synthetic:
        dp_size = num_workers // s.sp_size
        if int(synthetic["num_batches"]) // dp_size // s.grad_accum == 0:
            raise ConfigError(
                f"synthetic_data.num_batches={synthetic['num_batches']}: no full step on {dp_size} "
                f"data-parallel ranks x grad_accum {s.grad_accum}; set it to at least {dp_size * s.grad_accum}"
            )
        return None
    if not snapshot_dir:
        raise ConfigError("snapshot_dir: training needs a bucket snapshot (build one with `opensora bucket`)")
    snapshot = open_snapshot(snapshot_dir)
    plan = training_plan(snapshot, s, num_workers=num_workers)
    check_step_plan(plan, str(snapshot.path))
    return plan


def preflight_clips(cfg: Any, table: str, *, num_workers: int) -> int:
    """Check that the fixed-size clips of `table` (a metadata .parquet or a bucket snapshot) give a full
    step on `num_workers` workers; returns the rows that give a clip (the others sit out, logged once)."""
    from opensora_core.data.batches import clip_rows, read_clips_table

    s, options = cfg.training, cfg.dataset.options
    rows = read_clips_table(table)
    num_frames, interval = int(options["num_frames"]), int(options.get("frame_interval", 1) or 1)
    usable = len(clip_rows(rows, num_frames, interval))
    batch_size, dp_size = s.batch_size or 1, num_workers // s.sp_size
    need = batch_size * dp_size * s.grad_accum
    if usable < need:
        raise ConfigError(
            f"{table}: {usable} of {rows.num_rows} files give a {num_frames}-frame clip (frame_interval "
            f"{interval}), but one step takes batch_size {batch_size} x {dp_size} ranks x grad_accum "
            f"{s.grad_accum} = {need}; add clips, or lower batch_size / num_train_workers"
        )
    if usable < rows.num_rows:
        log.info(
            "%d of %d files are too short for %d-frame clips and sit out",
            rows.num_rows - usable,
            rows.num_rows,
            num_frames,
        )
    return usable
