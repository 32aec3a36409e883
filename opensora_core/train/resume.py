"""Where a training run starts: the run's own latest checkpoint after a worker failure, else `load`.

A checkpoint whose ZeRO optimizer state was split over another number of ranks loads through
DeepSpeed's universal form, which each machine writes once into its cache and removes once loaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opensora_core import storage
from opensora_core.train.checkpoint import (
    fetch_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    needs_resharding,
    saved_zero_ranks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePlan:
    """The checkpoint to resume from (None: a fresh start), decided before DeepSpeed starts."""

    checkpoint: str | Path | None
    own: bool  # the run's own checkpoint (a restarted worker group), not `load`
    universal_dir: Path | None  # set when the optimizer state must be re-split: DeepSpeed loads it universal


@dataclass(frozen=True)
class Position:
    """Where the loop starts: `step` steps of `epoch` are done, `global_step` in all."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


def plan_resume(
    ray_checkpoint: str | None,
    load: str | None,
    *,
    output_dir: str,
    world_size: int,
    zero_stage: int,
    rank: int,
) -> ResumePlan:
    """What to resume from: Ray's latest checkpoint of this run, else the newest in `output_dir`, else `load`.

    A restarted worker group may see no Ray checkpoint when a worker died before Ray registered the
    last report, so the run's own directory is searched too (a new run's directory is empty).
    """
    own = ray_checkpoint or latest_checkpoint(output_dir)
    checkpoint = own or load
    universal_dir = None
    if checkpoint and needs_resharding(checkpoint, world_size, zero_stage):
        # saved by another number of ranks: DeepSpeed re-splits the optimizer state only from its
        # universal form, which each machine writes once into its cache (removed once loaded)
        key = hashlib.sha1(f"{output_dir}\n{checkpoint}".encode()).hexdigest()[:16]
        universal_dir = storage.cache_dir() / "universal" / f"{socket.gethostname()}-{key}"
        if rank == 0:
            log.info(
                "%s holds the optimizer state of %d ranks, this run has %d: loading it as a DeepSpeed "
                "universal checkpoint", checkpoint, saved_zero_ranks(fetch_checkpoint(checkpoint)), world_size,
            )  # fmt: skip
    return ResumePlan(checkpoint=checkpoint, own=own is not None, universal_dir=universal_dir)


def resume(
    plan: ResumePlan,
    engine: Any,
    ema: torch.nn.Module | None,
    loader: Any,
    *,
    model_type: str,
    start_from_scratch: bool,
    rank: int,
    local_rank: int,
    extra_engines: dict[str, Any] | None = None,
) -> Position:
    """Load `plan.checkpoint` into the engine, EMA and loader; the position to continue from.

    With `start_from_scratch` a `load` checkpoint gives the weights and optimizer moments only: the
    run starts at step 0 of epoch 0 (the run's own checkpoint always restores its position).
    """
    if not plan.checkpoint:
        return Position()
    from_scratch = not plan.own and start_from_scratch
    states = load_checkpoint(
        plan.checkpoint,
        engine,
        ema,
        loader,
        model_type=model_type,
        rank=rank,
        restore_position=not from_scratch,
        universal_dir=plan.universal_dir,
        extra_engines=extra_engines,
    )
    if plan.universal_dir is not None:
        dist.barrier()  # every rank of this machine has read its share
        if local_rank == 0:
            shutil.rmtree(plan.universal_dir, ignore_errors=True)
    position = Position() if from_scratch else Position(states.epoch, states.step, states.global_step)
    if rank == 0:
        log.info(
            "resumed from %s at epoch %d step %d (global step %d)",
            plan.checkpoint, states.epoch, states.step, states.global_step,
        )  # fmt: skip
    return position
