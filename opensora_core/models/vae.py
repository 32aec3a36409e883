"""VideoAutoencoderKL: a diffusers image AutoencoderKL applied frame by frame to videos [B, C, T, H, W]."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from opensora_core.errors import CheckpointError


class VideoAutoencoderKL(nn.Module):
    """Frozen image VAE for videos: pixels in [-1, 1] <-> latents scaled by `scaling_factor`.

    Frames are flattened into the batch and processed `micro_batch_size` at a time to bound memory.
    The state dict is the AutoencoderKL's with a `module.` prefix, as in Open-Sora checkpoints.
    """

    def __init__(
        self,
        from_pretrained: str | None = None,
        *,
        micro_batch_size: int | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        subfolder: str | None = None,
        scaling_factor: float = 0.18215,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        if (from_pretrained is None) == (config is None):
            raise ValueError("give exactly one of from_pretrained (weights) or config (architecture only)")
        if config is not None:
            # Random weights: for wrappers whose own checkpoint carries this VAE's weights.
            self.module = AutoencoderKL.from_config(dict(config))
        else:
            try:
                self.module = AutoencoderKL.from_pretrained(
                    from_pretrained,
                    subfolder=subfolder,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            except (OSError, ValueError) as err:
                where = f"{from_pretrained}" + (f" (subfolder {subfolder!r})" if subfolder else "")
                raise CheckpointError(
                    f"vae.from_pretrained={where}: cannot load a diffusers AutoencoderKL ({err})"
                ) from err
        self.module.requires_grad_(False)
        self.module.eval()
        config = self.module.config
        factor = 2 ** (len(config.block_out_channels) - 1)  # one 2x downsample between encoder blocks
        self.out_channels: int = config.latent_channels
        self.patch_size: tuple[int, int, int] = (1, factor, factor)
        self.micro_batch_size = micro_batch_size
        # Open-Sora uses SD's factor for every KL VAE, whatever the loaded config says.
        self.scaling_factor = scaling_factor

    def _frame_chunks(self, x: Tensor) -> list[Tensor]:
        step = self.micro_batch_size or x.shape[0]
        return [x[i : i + step] for i in range(0, x.shape[0], step)]

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, C, T, H, W] pixels -> [B, latent_channels, T, H/f, W/f] (a posterior sample)."""
        B, C, T, H, W = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        latents = [
            self.module.encode(chunk).latent_dist.sample(generator=generator) * self.scaling_factor
            for chunk in self._frame_chunks(frames)
        ]
        z = torch.cat(latents)
        return z.view(B, T, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """[B, latent_channels, T, h, w] -> [B, 3, T, h*f, w*f]; `num_frames` is accepted for API parity."""
        B, C, T, h, w = z.shape
        frames = z.permute(0, 2, 1, 3, 4).reshape(B * T, C, h, w)
        pixels = torch.cat(
            [self.module.decode(chunk / self.scaling_factor).sample for chunk in self._frame_chunks(frames)]
        )
        return pixels.view(B, T, *pixels.shape[1:]).permute(0, 2, 1, 3, 4)

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """Latent (T, H, W) for a pixel (T, H, W); None stays None (variable-size datasets)."""
        return [None if s is None else s // p for s, p in zip(input_size, self.patch_size, strict=True)]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype
