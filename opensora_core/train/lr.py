"""Learning-rate schedule: Open-Sora's linear warmup, constant afterwards (no decay)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class LinearWarmup:
    """lr factor (step+1)/(warmup_steps+1) for the first `warmup_steps` optimizer steps, then 1.

    A dataclass rather than a lambda so the schedule pickles (Ray) and shows in state dicts.
    """

    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        return (step + 1) / (self.warmup_steps + 1)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int | None) -> LambdaLR:
    """The scheduler stepped once per optimizer step; no warmup_steps means a constant lr."""
    return LambdaLR(optimizer, LinearWarmup(warmup_steps or 0))
