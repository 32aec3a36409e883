"""Which latent frames a training sample keeps clean as conditioning (Open-Sora's `mask_ratios`).

A mask is one bool per latent frame: True = the frame is noised and generated, False = the
frame is given clean, as a condition (image-to-video, extension, interpolation).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from opensora_core.train.mask_ratios import MASK_NAMES, check_mask_ratios

__all__ = ["MASK_NAMES", "MaskGenerator"]


class MaskGenerator:
    """Draws one mask kind per sample with the probabilities of `mask_ratios`.

    "identity" (no condition frames) takes whatever probability the other kinds leave; the
    randomness comes from the `random.Random` passed to `get_masks`, so callers control seeding.
    """

    def __init__(self, mask_ratios: Mapping[str, float]) -> None:
        self.mask_ratios = check_mask_ratios(mask_ratios)

    def pick(self, rng: random.Random) -> str:
        """One mask kind, drawn by cumulative probability in the config's order."""
        draw = rng.random()
        cumulative = 0.0
        for name, ratio in self.mask_ratios.items():
            cumulative += ratio
            if draw < cumulative:
                return name
        return "identity"  # the draw fell in the rounding gap of a sum just below 1

    def get_mask(self, num_frames: int, rng: random.Random) -> torch.Tensor:
        """A [num_frames] bool mask for one sample."""
        name = self.pick(rng)
        mask = torch.ones(num_frames, dtype=torch.bool)
        if num_frames <= 1 or name == "identity":
            return mask
        # Open-Sora uses T // 4 here, which makes randint(1, 0) fail for 2-3 latent frames.
        quarter = max(1, num_frames // 4)
        if name == "quarter_random":
            size = rng.randint(1, quarter)
            start = rng.randint(0, num_frames - size)
            mask[start : start + size] = False
        elif name == "quarter_head":
            mask[: rng.randint(1, quarter)] = False
        elif name == "quarter_tail":
            mask[-rng.randint(1, quarter) :] = False
        elif name == "quarter_head_tail":
            size = rng.randint(1, quarter)
            mask[:size] = False
            mask[-size:] = False
        elif name == "image_random":
            mask[rng.randint(0, num_frames - 1)] = False
        elif name == "image_head":
            mask[0] = False
        elif name == "image_tail":
            mask[-1] = False
        elif name == "image_head_tail":
            mask[0] = False
            mask[-1] = False
        elif name == "intepolate":
            mask[rng.randint(0, 1) :: 2] = False
        elif name == "random":
            threshold = rng.uniform(0.1, 0.9)
            mask = torch.tensor([rng.random() > threshold for _ in range(num_frames)], dtype=torch.bool)
            if not mask.any():
                mask[rng.randint(0, num_frames - 1)] = True
        return mask

    def get_masks(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """[B, T] masks for latents `x` of shape [B, C, T, H, W], on x's device."""
        batch, num_frames = x.shape[0], x.shape[2]
        return torch.stack([self.get_mask(num_frames, rng) for _ in range(batch)]).to(x.device)
