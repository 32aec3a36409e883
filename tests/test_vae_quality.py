"""PSNR and SSIM against values known in closed form."""

import math

import pytest
import torch

from opensora_core.sample.quality import K1, K2, psnr, ssim


def test_psnr_of_a_known_mean_squared_error():
    x = torch.full((3, 2, 16, 16), 0.5)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert psnr(x, x) == math.inf


def test_ssim_of_two_flat_frames_is_the_luminance_term():
    # no variance or covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) wherever the window sits
    a, b = 0.2, 0.7
    c1 = K1**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = ssim(torch.full((3, 2, 24, 24), a), torch.full((3, 2, 24, 24), b))
    assert value == pytest.approx(expected, rel=1e-5)


def test_ssim_of_a_contrast_change_on_a_flat_mean():
    # y = m + k (x - m) with the same local means: SSIM -> (2k s^2 + C2) / ((1 + k^2) s^2 + C2) where the
    # window's mean is m; a checkerboard of +-d has local mean m and variance d^2 inside every 11x11
    # window up to the odd-count imbalance, so the value is close to the closed form
    m, d, k = 0.5, 0.2, 0.5
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1.0
    x = (m + d * board).expand(1, 1, 64, 64)
    y = m + k * (x - m)
    s2, c2 = d * d, K2**2
    expected = (2 * k * s2 + c2) / ((1 + k * k) * s2 + c2)
    assert ssim(x, y) == pytest.approx(expected, rel=1e-2)


def test_ssim_is_one_for_identical_frames_and_lower_for_noise():
    x = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, noisy) < 0.9


def test_ssim_window_shrinks_to_fit_a_small_frame():
    x = torch.rand(3, 1, 6, 8, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
