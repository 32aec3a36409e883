"""An fp32 exponential moving average of the model's weights (what Open-Sora samples from)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """An fp32, frozen, eval-mode copy of `model`."""
    ema = copy.deepcopy(model).to(torch.float32).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, for the trainable parameters only.

    Frozen parameters and `pos_embed` (recomputed, not learned) are left as they are, as in
    Open-Sora; decay=0 copies the weights.
    """
    ema_params = dict(ema.named_parameters())
    targets, sources = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or "pos_embed" in name:
            continue
        targets.append(ema_params[name])
        sources.append(param.detach().to(ema_params[name].dtype))
    if targets:  # one fused kernel per op over all tensors instead of two per parameter
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, sources, alpha=1.0 - decay)
