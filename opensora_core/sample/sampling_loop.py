"""The one sampling loop: caption encoding, classifier-free guidance and condition frames around any
scheduler's `set_timesteps` / `step` (rflow, iddpm, dpm-solver)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from opensora_core.schedulers.frames import FrameMasks


class SamplingScheduler(Protocol):
    """What the loop needs of a scheduler (diffusers' shape, plus frame masks for condition frames)."""

    cfg_scale: float
    timesteps: Tensor  # [steps, B]: what the model is given at each step, per sample

    def set_timesteps(
        self, num_sampling_steps: int | None = None, device: torch.device | str | None = None, **kwargs: Any
    ) -> None:
        """Keyword arguments: batch_size and model_args (rflow's timestep transform reads them)."""

    def step(
        self, model_output: Tensor, timestep: Tensor, sample: Tensor, generator: torch.Generator | None = None
    ) -> Tensor: ...

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor: ...

    def noise_like(self, sample: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def frame_masks(self, mask: Tensor, index: int) -> FrameMasks: ...


def caption_args(text_encoder: Any, prompts: list[str], *, with_null: bool) -> dict[str, Any]:
    """Model kwargs from the text encoder; with `with_null`, `y` holds the captions then as many null
    captions (the model's learned one), the batch layout `guided_prediction` expects."""
    args = dict(text_encoder.encode(prompts))
    if with_null:
        null = text_encoder.null(len(prompts)).to(args["y"])
        args["y"] = torch.cat([args["y"], null], 0)
    return args


def guided_prediction(
    model: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    model_args: dict[str, Any],
    scale: float,
    *,
    channels: int | None = None,
) -> Tensor:
    """Model output for x [B] with classifier-free guidance on its first `channels` output channels
    (default half: the prediction, not the variance); the other channels come from the conditional half.

    The model sees [x, x] at [t, t] with `model_args` built by `caption_args(with_null=True)`. At scale 1
    guidance changes nothing, so the model sees x alone with the captions (as diffusers and DPM-Solver do).
    """
    if scale == 1.0:
        return model(x, t, **model_args)
    B = x.shape[0]
    out = model(torch.cat([x, x], 0), torch.cat([t, t], 0), **model_args)
    k = out.shape[1] // 2 if channels is None else channels
    if k > out.shape[1]:
        raise ValueError(f"scheduler.cfg_channel={k} exceeds the model's {out.shape[1]} output channels")
    cond, uncond = out[:B], out[B:]
    return torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)


@torch.no_grad()
def sample_latents(
    model: Callable[..., Tensor],
    text_encoder: Any,
    scheduler: SamplingScheduler,
    z: Tensor,
    prompts: list[str],
    *,
    model_args: dict[str, Any] | None = None,
    mask: Tensor | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:
    """Denoise `z` [B, C, T, H, W] to latents for `prompts`, guided by the null caption.

    `model_args`: extra model kwargs per sample (height, width, num_frames, fps, ...; rflow's timestep
    transform reads them too). `mask` [B, T] float per latent frame: 1 = generate, 0 = keep z's frame
    (a condition), in between = a partial edit, re-noised part way through (the scheduler says when).
    `guidance_scale` defaults to the scheduler's `cfg_scale`; iddpm's `cfg_channel` limits it to the
    first channels.
    """
    scale = scheduler.cfg_scale if guidance_scale is None else guidance_scale
    guided = scale != 1.0
    B = z.shape[0]
    extra = dict(model_args or {})
    args = {**caption_args(text_encoder, prompts, with_null=guided), **extra}
    x_mask = args.pop("x_mask", None)
    if guided and x_mask is not None and x_mask.shape[0] == B:
        x_mask = torch.cat([x_mask, x_mask], 0)
    channels = getattr(scheduler, "cfg_channel", None)
    if mask is not None:
        mask = mask.to(z.device)

    scheduler.set_timesteps(device=z.device, batch_size=B, model_args=extra)
    steps = enumerate(scheduler.timesteps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(scheduler.timesteps), desc="sampling")
    for i, t in steps:
        if mask is not None:
            frames = scheduler.frame_masks(mask, i)
            x0 = z
            # drawn on every step, renoised or not, so seeded runs match Open-Sora's
            noise = scheduler.noise_like(z, generator)
            z = torch.where(_per_frame(frames.renoise), scheduler.add_noise(x0, noise, t), x0)
            x_mask = torch.cat([frames.generate, frames.generate], 0) if guided else frames.generate
        call_args = args if x_mask is None else {**args, "x_mask": x_mask}
        out = guided_prediction(model, z, t, call_args, scale, channels=channels)
        z = scheduler.step(out, t, z, generator=generator)
        if mask is not None:
            z = torch.where(_per_frame(frames.keep), x0, z)
    return z


def _per_frame(frames: Tensor) -> Tensor:
    """[B, T] -> [B, 1, T, 1, 1], to select latent frames of [B, C, T, H, W]."""
    return frames[:, None, :, None, None]
