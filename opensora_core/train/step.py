"""One micro-batch of the train step: its seed, the frozen encoders' latents and conditioning, the loss.

`diffusion_loss` and `micro_batch_loss` take a DeepSpeed engine or a plain `nn.Module` alike; the
caller does the backward.

From a feature snapshot the batch carries the stored `latent` (no VAE) and / or the stored caption
`y` and `mask` (no text encoder). The encoders draw from the micro-batch's seed and the loss
(timesteps, noise, the model's caption dropout) from a second seed derived from it, so a step from
stored latents draws the same timesteps and noise as the step from raw video whose VAE sample they
are: the two give the same loss.

Caption dropout: by default the model's y_embedder drops captions to its learned null with its
`class_dropout_prob`, from raw video and from features alike (the features hold the raw
text-encoder output, so the y_embedder still runs). With `caption_dropout = "empty"` the encoded
"" caption (stored once in the feature snapshot) replaces each caption with that probability
instead, drawn from the micro-batch's `rng`, and the job turns the model's own dropout off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from opensora_core.train.mask import MaskGenerator

# batch entries that go to the model as conditioning (STDiT size / length / fps embedders, rflow)
CONDITION_KEYS = ("num_frames", "height", "width", "ar", "fps")


def micro_batch_seed(seed: int, epoch: int, order_index: int) -> int:
    """The seed of the micro-batch at `order_index` in the epoch's global order (any world size)."""
    return int(np.random.SeedSequence([seed, epoch, order_index]).generate_state(1)[0])


def loss_seed(step_seed: int) -> int:
    """The seed of the loss's draws (timesteps, noise, the model's caption dropout) after encoding."""
    return int(np.random.SeedSequence([step_seed, 1]).generate_state(1)[0])


@dataclass(frozen=True)
class EmptyCaptionDropout:
    """`caption_dropout = "empty"`: each caption becomes the encoded "" caption with probability `prob`."""

    y: torch.Tensor  # [1, L, D]
    mask: torch.Tensor | None  # [L]
    prob: float

    def apply(self, model_args: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        y = model_args["y"]
        drop = torch.tensor([rng.random() < self.prob for _ in range(y.shape[0])], device=y.device)
        out = dict(model_args)
        out["y"] = torch.where(drop[:, None, None, None], self.y.to(y.device, y.dtype)[None], y)
        if self.mask is not None and "mask" in model_args:
            mask = model_args["mask"]
            out["mask"] = torch.where(drop[:, None], self.mask.to(mask.device, mask.dtype)[None], mask)
        return out


def encode_batch(
    batch: dict[str, Any],
    vae: torch.nn.Module | None,
    text_encoder: Any | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    mask_generator: MaskGenerator | None = None,
    rng: random.Random | None = None,
    empty_caption: EmptyCaptionDropout | None = None,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """(latents [B, C, T', H', W'], model_args, mask): the batch through the frozen VAE and text encoder,
    or its stored `latent` / `y` and `mask` where the encoder is None (training from features).

    model_args holds the caption embedding (`y`, `mask`), the batch's size / fps conditioning and,
    with a `mask_generator`, the frame mask `x_mask` drawn from `rng`. The VAE samples its latents
    from the global torch RNG.
    """
    with torch.no_grad():
        if vae is None:
            latents = batch["latent"].to(device=device, dtype=dtype)
        else:
            latents = vae.encode(batch["video"].to(device=device, dtype=dtype))
        if text_encoder is None:
            model_args = {k: batch[k] for k in ("y", "mask") if k in batch}
        else:
            model_args = text_encoder.encode(list(batch["text"]))  # {"y", "mask"}
    model_args = {k: _to(v, device, dtype) for k, v in model_args.items()}
    if empty_caption is not None:
        if rng is None:
            raise ValueError("encode_batch: caption dropout to the empty caption needs an rng")
        model_args = empty_caption.apply(model_args, rng)
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


class MicroBatchLoss(NamedTuple):
    """What one micro-batch's forward gives the step: the loss to back-propagate and what it counted."""

    loss: torch.Tensor  # a device scalar: the caller does the backward
    samples: int
    tokens: int  # latent tokens the model saw: samples x `latent_tokens` of the batch's latent size


def latent_tokens(model: Any, latent_size: Any) -> int:
    """Tokens per sample of a latent of `latent_size` (T', H', W') after the model's patch embedding."""
    t, h, w = latent_size
    pt, ph, pw = getattr(getattr(model, "module", model), "patch_size", (1, 1, 1))
    return -(-t // pt) * -(-h // ph) * -(-w // pw)


def micro_batch_loss(
    model: Any,
    scheduler: Any,
    batch: dict[str, Any],
    *,
    seed: int,
    vae: torch.nn.Module | None,
    text_encoder: Any | None,
    device: torch.device,
    dtype: torch.dtype,
    mask_generator: MaskGenerator | None = None,
    empty_caption: EmptyCaptionDropout | None = None,
) -> MicroBatchLoss:
    """(loss, samples, tokens) of one micro-batch whose seed is `seed` (see `micro_batch_seed`): encoders and
    masks draw from it, the loss from `loss_seed(seed)` (the module docstring says why)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    latents, model_args, mask = encode_batch(
        batch, vae, text_encoder, device=device, dtype=dtype, mask_generator=mask_generator, rng=rng,
        empty_caption=empty_caption,
    )  # fmt: skip
    torch.manual_seed(loss_seed(seed))
    loss = diffusion_loss(model, scheduler, latents, model_args, mask)
    samples = latents.shape[0]
    return MicroBatchLoss(loss, samples, samples * latent_tokens(model, latents.shape[2:]))


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Float tensors to the training dtype; masks and ids keep theirs."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    return value


@dataclass(frozen=True)
class StepResult:
    """One micro-batch trained: its loss (detached), samples, tokens (for tokens/s), and the named parts
    of the loss to log."""

    loss: torch.Tensor
    samples: int
    tokens: int
    parts: dict[str, torch.Tensor]


@dataclass
class DiffusionStep:
    """The diffusion model's micro-batch on its DeepSpeed engine: `micro_batch_loss`, backward, step.

    The training loop calls a step object per micro-batch (this one, or train.vae_step.VaeStep for a
    VAE model); `extra_engines` are engines besides `engine` that checkpoints hold (none here).
    """

    engine: Any
    scheduler: Any
    vae: torch.nn.Module | None
    text_encoder: Any | None
    device: torch.device
    dtype: torch.dtype
    mask_generator: MaskGenerator | None = None
    empty_caption: EmptyCaptionDropout | None = None
    extra_engines: dict[str, Any] = field(default_factory=dict)
    write_model_files: Any = None  # files a checkpoint adds beside the weights (none)

    def __call__(self, batch: dict[str, Any], *, seed: int, weight: float, global_step: int) -> StepResult:
        micro = micro_batch_loss(
            self.engine, self.scheduler, batch, seed=seed, vae=self.vae, text_encoder=self.text_encoder,
            device=self.device, dtype=self.dtype, mask_generator=self.mask_generator,
            empty_caption=self.empty_caption,
        )  # fmt: skip
        self.engine.backward(micro.loss * weight)
        self.engine.step()  # DeepSpeed steps the optimizer and LR only at the accumulation boundary
        return StepResult(micro.loss.detach(), micro.samples, micro.tokens, {})
