"""Turn decoded uint8 frames into model input: resize and crop to the bucket size, scale to [-1, 1],
lay out as [C, T, H, W].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from opensora_core.errors import ConfigError

TRANSFORM_NAMES = ("resize_crop", "center")


def check_transform_name(name: str, size: tuple[int, int] | None = None) -> str:
    """Return `name` if it is a known transform that works for `size`, else raise ConfigError."""
    if name not in TRANSFORM_NAMES:
        raise ConfigError(f"transform_name {name!r} is unknown; valid: {', '.join(TRANSFORM_NAMES)}")
    if name == "center" and size is not None and size[0] != size[1]:
        raise ConfigError(
            f"transform_name 'center' crops squares only, but the size is {size[0]}x{size[1]}; use 'resize_crop'"
        )
    return name


def resize_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale [T, C, H, W] frames so that `size` (height, width) is just covered, then center-crop to it."""
    th, tw = size
    h, w = video.shape[-2:]
    scale_h, scale_w = th / h, tw / w
    if scale_h > scale_w:
        new_h, new_w = th, max(tw, round(w * scale_h))
    else:
        new_h, new_w = max(th, round(h * scale_w)), tw
    if (new_h, new_w) != (h, w):
        # Antialiasing keeps downscaled frames free of aliasing; bilinear weights never overshoot.
        video = F.interpolate(
            video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
    top = int(round((new_h - th) / 2.0))
    left = int(round((new_w - tw) / 2.0))
    return video[..., top : top + th, left : left + tw]


def center_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Open-Sora's "center" transform: scale the shorter side to the (square) size, crop the middle."""
    check_transform_name("center", size)
    return resize_crop(video, size)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, C] -> float [T, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def normalize(video: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return video.sub(0.5).div_(0.5)


def apply_transform(frames: np.ndarray, size: tuple[int, int], transform_name: str) -> torch.Tensor:
    """Decoded uint8 [T, H, W, C] frames -> float [C, T, H, W] of `size`, values in [-1, 1]."""
    check_transform_name(transform_name, size)
    crop = center_crop if transform_name == "center" else resize_crop
    video = crop(frames_to_tensor(frames), size)
    return normalize(video.clamp_(0.0, 1.0)).permute(1, 0, 2, 3).contiguous()
