"""Rectified flow (Open-Sora v1.2's `rflow`): training loss and Euler sampling steps.

Convention: t in [0, num_timesteps]; x_t = (1 - t/N) * x0 + (t/N) * noise; the model predicts the
velocity x0 - noise, and sampling integrates from t = N (noise) down to 0.

diffusers' FlowMatchEulerDiscreteScheduler uses the same interpolation and its `shift` has the same
form as the timestep transform below, but it holds one timestep schedule for the whole batch, while
Open-Sora shifts each sample by its own resolution and length, and re-noises condition frames per
sample (frame masks). So the few lines of Euler stepping are written here instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from opensora_core.errors import ConfigError
from opensora_core.schedulers.frames import FrameMasks, mean_flat

SAMPLE_METHODS = ("uniform", "logit-normal")


def timestep_transform(
    t: Tensor,
    *,
    height: Tensor,
    width: Tensor,
    num_frames: Tensor,
    scale: float = 1.0,
    num_timesteps: int = 1000,
    base_resolution: int = 512 * 512,
) -> Tensor:
    """Shift timesteps towards noise for larger / longer videos (Open-Sora v1.2's resolution/length transform).

    ratio = sqrt(H*W / 512^2) * sqrt(latent frames) * scale, where latent frames is 1 for images and
    num_frames // 17 * 5 otherwise (the v1.2 VAE's 17 -> 5 compression);
    t' = ratio * t / (1 + (ratio - 1) * t) on t / num_timesteps.
    """
    t = t / num_timesteps
    ratio_space = (height.float() * width.float() / base_resolution).sqrt()
    if num_frames.reshape(-1)[0] == 1:
        frames = torch.ones_like(num_frames, dtype=torch.float32)
    else:
        # Open-Sora gives 0 below 17 frames, which collapses every t to 0; count at least one latent frame.
        frames = (num_frames.long() // 17 * 5).clamp(min=1).float()
    ratio = ratio_space * frames.sqrt() * scale
    new_t = ratio * t / (1 + (ratio - 1) * t)
    return new_t * num_timesteps


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, num_timesteps: int = 1000) -> Tensor:
    """x_t = (1 - t/N) * x0 + (t/N) * noise, with t per sample [B] and x [B, C, T, H, W]."""
    keep = (1 - t.float() / num_timesteps).view(-1, *([1] * (x0.dim() - 1)))
    return keep * x0 + (1 - keep) * noise


class RFlow:
    """Open-Sora's `rflow` scheduler: `training_losses` for training; `set_timesteps` and `step` for sampling."""

    def __init__(
        self,
        num_sampling_steps: int = 10,
        num_timesteps: int = 1000,
        cfg_scale: float = 4.0,
        use_discrete_timesteps: bool = False,
        use_timestep_transform: bool = False,
        sample_method: str = "uniform",
        loc: float = 0.0,
        scale: float = 1.0,
        transform_scale: float = 1.0,
    ):
        if sample_method not in SAMPLE_METHODS:
            raise ConfigError(
                f"scheduler.sample_method={sample_method!r} is not valid; valid: {', '.join(SAMPLE_METHODS)}"
            )
        if use_discrete_timesteps and sample_method != "uniform":
            raise ConfigError("scheduler.use_discrete_timesteps=True only works with sample_method='uniform'")
        self.num_sampling_steps = num_sampling_steps
        self.num_timesteps = num_timesteps
        self.cfg_scale = cfg_scale
        self.use_discrete_timesteps = use_discrete_timesteps
        self.use_timestep_transform = use_timestep_transform
        self.sample_method = sample_method
        self.loc = loc
        self.scale = scale
        self.transform_scale = transform_scale
        self.timesteps: Tensor = torch.empty(0)  # set by set_timesteps
        self._step_index = 0

    # -- training ----------------------------------------------------------------------------------

    def sample_timesteps(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training timesteps [B] in [0, num_timesteps): uniform, or sigmoid of a normal (logit-normal)."""
        gen_device = generator.device if generator is not None else device
        if self.use_discrete_timesteps:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device).float()
        elif self.sample_method == "uniform":
            t = torch.rand(batch, generator=generator, device=gen_device) * self.num_timesteps
        else:
            z = torch.randn(batch, generator=generator, device=gen_device)
            t = torch.sigmoid(self.loc + self.scale * z) * self.num_timesteps
        return t.to(device)

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x_start: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """{"loss": [B]}: squared error between predicted and true velocity (x0 - noise).

        `mask` [B, T] bool: frames where it is False are condition frames, kept clean (t = 0), left out
        of the loss, and passed to the model as `x_mask` unless the caller already set one.
        """
        model_kwargs = dict(model_kwargs or {})
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], x_start.device, generator)
            if self.use_timestep_transform:
                t = self._transform(t, model_kwargs, scale=self.transform_scale)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=_gen_device(generator, x_start))
            noise = noise.to(device=x_start.device, dtype=x_start.dtype)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")

        x_t = add_noise(x_start, noise, t, self.num_timesteps)
        if mask is not None:
            mask = mask.bool()
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_start)
            model_kwargs.setdefault("x_mask", mask)
        velocity = model(x_t, t, **model_kwargs).chunk(2, dim=1)[0]
        loss = mean_flat((velocity - (x_start - noise)).pow(2), mask=mask)
        return {"loss": loss}

    # -- sampling ----------------------------------------------------------------------------------

    def _transform(self, t: Tensor, kwargs: dict[str, Any], *, scale: float = 1.0) -> Tensor:
        missing = [k for k in ("height", "width", "num_frames") if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"use_timestep_transform needs model kwargs {', '.join(missing)}")
        return timestep_transform(
            t,
            height=kwargs["height"],
            width=kwargs["width"],
            num_frames=kwargs["num_frames"],
            scale=scale,
            num_timesteps=self.num_timesteps,
        )

    def set_timesteps(
        self,
        num_sampling_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        batch_size: int = 1,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        """`timesteps` [steps, B]: N, N*(1-1/steps), ... per sample, shifted by the transform when on
        (it reads height, width and num_frames from `model_args`)."""
        if num_sampling_steps is not None:
            self.num_sampling_steps = num_sampling_steps
        steps = [
            (1.0 - i / self.num_sampling_steps) * self.num_timesteps for i in range(self.num_sampling_steps)
        ]
        if self.use_discrete_timesteps:
            steps = [float(round(s)) for s in steps]
        rows = [torch.full((batch_size,), s, device=device) for s in steps]
        if self.use_timestep_transform:
            rows = [self._transform(t, model_args or {}) for t in rows]
        self.timesteps = torch.stack(rows)
        self._step_index = 0

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One Euler step from `timestep` [B] to the next one (to 0 after the last) along the velocity
        in the first half of `model_output`'s channels. Deterministic: `generator` is unused."""
        velocity = model_output.chunk(2, dim=1)[0]
        i = self._step_index
        dt = timestep - self.timesteps[i + 1] if i + 1 < len(self.timesteps) else timestep
        self._step_index += 1
        return sample + velocity * (dt / self.num_timesteps)[:, None, None, None, None]

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t for timesteps [B] in [0, num_timesteps]."""
        return add_noise(original_samples, noise, timesteps, self.num_timesteps)

    def noise_like(self, sample: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fresh noise for re-noising condition frames, drawn in float32 on the generator's device."""
        noise = torch.randn(sample.shape, generator=generator, device=_gen_device(generator, sample))
        return noise.to(device=sample.device, dtype=sample.dtype)

    def frame_masks(self, mask: Tensor, index: int) -> FrameMasks:
        """At step `index`, for `mask` [B, T] (1 = generate, 0 = keep, in between = re-noise from
        t = mask * N on): a frame is generated once t has fallen to mask * N, and re-noised on the
        step it starts being generated (frames with mask 1 start from the initial noise)."""
        level = mask * self.num_timesteps
        generate = level >= self.timesteps[index][:, None]
        before = mask == 1 if index == 0 else level >= self.timesteps[index - 1][:, None]
        return FrameMasks(renoise=generate & ~before, generate=generate, keep=~generate)


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device
