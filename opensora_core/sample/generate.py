"""Text-to-video generation: build the components named in a config and turn prompts into pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from opensora_core.config import ValidatedConfig
from opensora_core.sample.sampling_loop import sample_latents

log = logging.getLogger(__name__)

IMAGE_FPS = 120  # Open-Sora conditions single-frame samples on this fps
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Components:
    """Everything sampling needs, built from one config."""

    model: torch.nn.Module
    vae: Any
    text_encoder: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_components(
    cfg: ValidatedConfig, *, model_weights: str | None = None, device: torch.device | None = None
) -> Components:
    """Build text encoder, VAE, diffusion model and scheduler; `model_weights` overrides model.from_pretrained."""
    from opensora_core.models.registry import (
        build_model,
        build_text_encoder,
        build_vae,
        with_latent_input_size,
    )
    from opensora_core.schedulers import build_scheduler

    device = device or pick_device()
    dtype = TORCH_DTYPES[cfg.training.dtype if cfg.training else cfg.sampling.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("dtype %s requested on CPU: sampling in fp32 instead", dtype)
        dtype = torch.float32
    if cfg.text_encoder is None or cfg.vae is None:
        raise ValueError("sampling needs both `text_encoder` and `vae` sections in the config")
    text_encoder = build_text_encoder(cfg.text_encoder.as_dict(), device=device)
    vae = build_vae(cfg.vae.as_dict()).to(device).eval()
    model_cfg = cfg.model.as_dict()
    if model_weights is not None:
        model_cfg["from_pretrained"] = model_weights
    if cfg.sampling is not None:  # a training config (evaluation) keeps its own model.input_size
        model_cfg = with_latent_input_size(model_cfg, vae, cfg.sampling.num_frames, cfg.sampling.image_size)
    model = build_model(
        model_cfg,
        in_channels=vae.out_channels,
        caption_channels=text_encoder.output_dim,
        model_max_length=text_encoder.model_max_length,
    )
    model = model.to(device=device, dtype=dtype).eval()
    # Classifier-free guidance uses the model's own learned null caption, as Open-Sora does.
    text_encoder.y_embedder = model.y_embedder
    scheduler = build_scheduler(cfg.scheduler.as_dict())
    return Components(model, vae, text_encoder, scheduler, device, dtype)


def model_condition(batch: int, *, num_frames: int, height: int, width: int, fps: int, device, dtype) -> dict:
    """The size / length / fps tensors STDiT models and the rflow timestep transform read."""
    fps = IMAGE_FPS if num_frames == 1 else fps

    def full(value: float) -> torch.Tensor:
        return torch.full((batch,), float(value), device=device, dtype=dtype)

    return {
        "height": full(height),
        "width": full(width),
        "num_frames": full(num_frames),
        "ar": full(height / width),
        "fps": full(fps),
    }


def initial_noise(
    parts: Components, batch: int, *, num_frames: int, image_size: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """Gaussian latents [B, C, T, h, w] for `num_frames` pixel frames of `image_size`, drawn on the CPU."""
    latent_size = parts.vae.get_latent_size((num_frames, *image_size))
    z = torch.randn(batch, parts.vae.out_channels, *latent_size, generator=generator)
    return z.to(device=parts.device, dtype=parts.dtype)


@torch.no_grad()
def denoise(
    parts: Components,
    z: torch.Tensor,
    prompts: list[str],
    *,
    num_frames: int,
    image_size: tuple[int, int],
    fps: int,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run the sampling loop from `z` to clean latents; `mask` [B, T_latent] keeps condition frames."""
    height, width = image_size
    condition = model_condition(
        len(prompts),
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        device=parts.device,
        dtype=parts.dtype,
    )
    return sample_latents(
        parts.model,
        parts.text_encoder,
        parts.scheduler,
        z,
        prompts,
        model_args=condition,
        mask=mask,
        generator=generator,
        progress=progress,
    )


@torch.no_grad()
def generate(
    parts: Components,
    prompts: list[str],
    *,
    num_frames: int,
    image_size: tuple[int, int],
    fps: int,
    seed: int,
    mask: torch.Tensor | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Prompts -> pixel samples [B, 3, T, H, W] in [-1, 1]; the same seed gives the same samples."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = initial_noise(parts, len(prompts), num_frames=num_frames, image_size=image_size, generator=generator)
    latents = denoise(
        parts,
        z,
        prompts,
        num_frames=num_frames,
        image_size=image_size,
        fps=fps,
        generator=generator,
        mask=mask,
        progress=progress,
    )
    return parts.vae.decode(latents.to(parts.dtype), num_frames=num_frames).float()
