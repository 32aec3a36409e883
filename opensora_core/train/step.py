"""One micro-batch of the train step: its seed, the frozen encoders' latents and conditioning, the loss.

`diffusion_loss` takes a DeepSpeed engine or a plain `nn.Module` alike; the caller does the backward.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from opensora_core.train.mask import MaskGenerator

# batch entries that go to the model as conditioning (STDiT size / length / fps embedders, rflow)
CONDITION_KEYS = ("num_frames", "height", "width", "ar", "fps")


def micro_batch_seed(seed: int, epoch: int, order_index: int) -> int:
    """The seed of the micro-batch at `order_index` in the epoch's global order (any world size)."""
    return int(np.random.SeedSequence([seed, epoch, order_index]).generate_state(1)[0])


def encode_batch(
    batch: dict[str, Any],
    vae: torch.nn.Module,
    text_encoder: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    mask_generator: MaskGenerator | None = None,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """(latents [B, C, T', H', W'], model_args, mask): the batch through the frozen VAE and text encoder.

    model_args holds the caption embedding (`y`, `mask`), the batch's size / fps conditioning and,
    with a `mask_generator`, the frame mask `x_mask` drawn from `rng`. The VAE samples its latents
    from the global torch RNG.
    """
    x = batch["video"].to(device=device, dtype=dtype)
    with torch.no_grad():
        latents = vae.encode(x)
        model_args = text_encoder.encode(list(batch["text"]))  # {"y", "mask"}
    model_args = {k: _to(v, device, dtype) for k, v in model_args.items()}
    mask = None
    if mask_generator is not None:
        if rng is None:
            raise ValueError("encode_batch: a mask_generator needs an rng to draw the masks from")
        mask = mask_generator.get_masks(latents, rng)
        model_args["x_mask"] = mask
    model_args.update({k: batch[k].to(device=device, dtype=dtype) for k in CONDITION_KEYS if k in batch})
    return latents, model_args, mask


def diffusion_loss(
    model: Any,
    scheduler: Any,
    latents: torch.Tensor,
    model_args: dict[str, Any],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scheduler's training loss of `model` on `latents`, averaged over the batch (a scalar).

    Timesteps and noise come from the global torch RNG.
    """
    return scheduler.training_losses(model, latents, model_args, mask=mask)["loss"].mean()


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Float tensors to the training dtype; masks and ids keep theirs."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    return value
