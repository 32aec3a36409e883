"""The numbers each logged step reports: losses kept on the device, summed over ranks only when asked.

No host sync and no collective on the other steps: `all_reduce` is called on logged or saved steps only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepTotals:
    """One step's numbers over all ranks (each sequence-parallel group counted once)."""

    loss: float  # this step's loss, the mean over ranks
    window_loss: float  # the mean loss over ranks and over the steps since the last logged one
    samples: float  # trained this step
    skipped: float  # files that failed to load, since the workers started
    parts: dict[str, float] = field(default_factory=dict)  # named parts of this step's loss, mean over ranks


class StepMetrics:
    """The loss window since the last logged step, and the metrics dict of a logged step."""

    def __init__(
        self, device: torch.device, bucket_names: list[str], *, world_size: int, sp_size: int
    ) -> None:
        self.device, self.world_size, self.sp_size = device, world_size, sp_size
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.window_steps = 0
        self.bucket_ids = {bucket: i for i, bucket in enumerate(bucket_names)}

    def add(self, step_loss: torch.Tensor) -> None:
        """Count one finished step's loss (a float64 scalar on the device) in the window."""
        self.window_loss += step_loss
        self.window_steps += 1

    def all_reduce(
        self,
        step_loss: torch.Tensor,
        samples: int,
        skipped: int,
        parts: dict[str, torch.Tensor] | None = None,
    ) -> StepTotals:
        """Sum this step over all ranks: a collective, so every rank calls it on the same steps (with
        the same `parts` names: a step object gives the same names on every micro-batch)."""
        # each SP group's ranks hold the same samples, so they read and skip the same files
        names = sorted(parts or {})
        totals = torch.stack(
            [step_loss, self.window_loss]
            + [
                torch.tensor(n / self.sp_size, dtype=torch.float64, device=self.device)
                for n in (samples, skipped)
            ]
            + [parts[name].to(device=self.device, dtype=torch.float64) for name in names]
        )
        dist.all_reduce(totals)
        step_loss_sum, window_loss_sum, samples_sum, skipped_sum, *part_sums = totals.tolist()
        return StepTotals(
            loss=step_loss_sum / self.world_size,
            window_loss=window_loss_sum / self.world_size / self.window_steps,
            samples=samples_sum,
            skipped=skipped_sum,
            parts={name: value / self.world_size for name, value in zip(names, part_sums, strict=True)},
        )

    def logged(
        self,
        totals: StepTotals,
        *,
        lr: float,
        grad_norm: float | None,
        step_time: float,
        bucket: str,
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
            "samples_skipped": totals.skipped,  # failed files, since the workers started
            "step_time": step_time,
            "bucket": float(self.bucket_ids.setdefault(bucket, len(self.bucket_ids))),
            "epoch": float(epoch),
            "global_step": float(global_step),
            **totals.parts,
        }
        self.window_loss.zero_()
        self.window_steps = 0
        return metrics
