"""Reconstruction quality of a clip against its original: PSNR and SSIM over frames in [0, 1].

SSIM is Wang et al. (2004) with its standard settings (11x11 Gaussian window, sigma 1.5, K1 0.01,
K2 0.03, data range 1), computed where the window fits inside the frame (as scikit-image's
`structural_similarity(gaussian_weights=True)` reports it), per channel and frame, then averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def to_unit_range(video: Tensor) -> Tensor:
    """[-1, 1] model pixels -> [0, 1] float32, clamped (what a written file holds)."""
    return video.detach().float().clamp(-1, 1).add(1).div(2)


def psnr(original: Tensor, reconstruction: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two [0, 1] tensors (inf when equal)."""
    mse = torch.mean((original.float() - reconstruction.float()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(original: Tensor, reconstruction: Tensor) -> float:
    """Mean SSIM of two [C, T, H, W] (or [C, H, W]) tensors in [0, 1], over channels, frames and positions."""
    x, y = (_frames(t) for t in (original, reconstruction))
    size = min(WINDOW, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # an odd window that fits the frame
    window = _gaussian_window(size, SIGMA, x.device)[None, None]

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, window)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = K1**2, K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean().item()


def _frames(video: Tensor) -> Tensor:
    """[C, T, H, W] or [C, H, W] -> [C*T, 1, H, W] float64 planes, one per channel and frame (float64:
    E[x^2] - E[x]^2 in float32 leaves variances of ~1e-7 where there are none)."""
    video = video.double()
    if video.dim() == 3:
        video = video[:, None]
    c, t, h, w = video.shape
    return video.reshape(c * t, 1, h, w)
