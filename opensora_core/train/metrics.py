"""The numbers each logged step reports: losses kept on the device, summed over ranks only when asked.

No host sync and no collective on the other steps: `all_reduce` is called on logged or saved steps only.
Besides the step's loss, the window since the last logged step keeps each bucket's loss sum and count
(one slot per bucket, on the device), so MLflow plots one `loss/<resolution>-<num_frames>` series per
bucket group rather than a bucket index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepTotals:
    """One step's numbers over all ranks (each sequence-parallel group counted once)."""

    loss: float  # this step's loss, the mean over ranks
    window_loss: float  # the mean loss over ranks and over the steps since the last logged one
    samples: float  # trained this step
    tokens: float  # latent tokens trained this step
    skipped: float  # files that failed to load, since the workers started
    parts: dict[str, float] = field(default_factory=dict)  # named parts of this step's loss, mean over ranks
    # `loss/<group>` -> the window's mean loss of that bucket group
    bucket_losses: dict[str, float] = field(default_factory=dict)


def bucket_loss_means(sums: list[float], counts: list[float], groups: list[str]) -> dict[str, float]:
    """`loss/<group>` -> mean loss of the buckets of `groups[i]` (summed slot by slot), for the groups
    that trained in the window. Buckets of one (resolution, num_frames) with other aspect ratios share a
    group, so a group's mean weighs each of its micro-batches alike."""
    total: dict[str, list[float]] = {}
    for loss, count, group in zip(sums, counts, groups, strict=True):
        if count > 0:
            acc = total.setdefault(group, [0.0, 0.0])
            acc[0] += loss
            acc[1] += count
    return {f"loss/{group}": loss / count for group, (loss, count) in total.items()}


class StepMetrics:
    """The loss window since the last logged step, and the metrics dict of a logged step.

    `loss_groups` maps each bucket id the loader yields to its group name (`<resolution>-<num_frames>`).
    """

    def __init__(
        self, device: torch.device, loss_groups: Mapping[str, str], *, world_size: int, sp_size: int
    ) -> None:
        self.device, self.world_size, self.sp_size = device, world_size, sp_size
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.window_steps = 0
        self.slots = {bucket: i for i, bucket in enumerate(loss_groups)}
        self.groups = list(loss_groups.values())
        # per bucket: loss sum and micro-batch count (their weights) since the last logged step
        self.bucket_window = torch.zeros((2, len(self.slots)), dtype=torch.float64, device=device)

    def add_micro_batch(self, bucket: str, loss: torch.Tensor, weight: float) -> None:
        """Count one micro-batch's loss (a device scalar) under its bucket; no host sync. A bucket the
        groups do not name is left out of the bucket series (never an error: the slots must stay the
        same on every rank, and a metric must not stop training)."""
        slot = self.slots.get(bucket)
        if slot is None:
            return
        self.bucket_window[0, slot] += loss.detach().double() * weight
        self.bucket_window[1, slot] += weight

    def add(self, step_loss: torch.Tensor) -> None:
        """Count one finished step's loss (a float64 scalar on the device) in the window."""
        self.window_loss += step_loss
        self.window_steps += 1

    def all_reduce(
        self,
        step_loss: torch.Tensor,
        samples: int,
        tokens: int,
        skipped: int,
        parts: dict[str, torch.Tensor] | None = None,
    ) -> StepTotals:
        """Sum this step over all ranks: a collective, so every rank calls it on the same steps (with
        the same `parts` names: a step object gives the same names on every micro-batch)."""
        # each SP group's ranks hold the same samples, so they read and skip the same files; their
        # bucket sums count sp_size times in the sum and in the count alike, so the means hold
        names = sorted(parts or {})
        counted = torch.tensor(
            [n / self.sp_size for n in (samples, tokens, skipped)], dtype=torch.float64, device=self.device
        )
        losses = [step_loss, self.window_loss]
        losses += [parts[name].to(device=self.device, dtype=torch.float64) for name in names]
        totals = torch.cat([torch.stack(losses), counted, self.bucket_window.flatten()])
        dist.all_reduce(totals)
        step_loss_sum, window_loss_sum, *rest = totals.tolist()
        part_sums, rest = rest[: len(names)], rest[len(names) :]
        samples_sum, tokens_sum, skipped_sum, *bucket_sums = rest
        n = len(self.groups)
        return StepTotals(
            loss=step_loss_sum / self.world_size,
            window_loss=window_loss_sum / self.world_size / self.window_steps,
            samples=samples_sum,
            tokens=tokens_sum,
            skipped=skipped_sum,
            parts={name: value / self.world_size for name, value in zip(names, part_sums, strict=True)},
            bucket_losses=bucket_loss_means(bucket_sums[:n], bucket_sums[n:], self.groups),
        )

    def logged(
        self,
        totals: StepTotals,
        *,
        lr: float,
        grad_norm: float | None,
        step_time: float,
        epoch: int,
        global_step: int,
    ) -> dict[str, float]:
        """The metrics of a logged step (MLflow's names); the window starts again after it."""
        metrics = {
            "loss": totals.loss,
            "avg_loss": totals.window_loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": totals.samples / step_time,
            "tokens_per_s": totals.tokens / step_time,
            "samples_skipped": totals.skipped,  # failed files, since the workers started
            "step_time": step_time,
            "epoch": float(epoch),
            "global_step": float(global_step),
            **totals.parts,
            **totals.bucket_losses,
        }
        self.window_loss.zero_()
        self.window_steps = 0
        self.bucket_window.zero_()
        return metrics
