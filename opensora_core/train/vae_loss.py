"""The losses of Open-Sora v1.2's train_vae.py: reconstruction (L1 + LPIPS) as a Gaussian NLL with a
fixed log-variance, the posterior's KL, and the GAN terms of the optional discriminator.

All reductions follow Open-Sora's: frames are flattened into the batch, the NLL is summed over every
element and divided by the number of frames, the KL summed per clip and divided by the clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from opensora_core.models.lpips import LPIPS
from opensora_core.models.vae_temporal import DiagonalGaussian


def frames(video: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], frame by frame."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


@dataclass(frozen=True)
class NllTerms:
    """One call of Open-Sora's VAELoss: the NLL (its weighted form is the same: no per-pixel weights are
    given in train_vae.py) and the weighted KL."""

    nll: Tensor
    weighted_kl: Tensor


class VaeLoss:
    """Open-Sora's VAELoss without a trainable part: its logvar is a constant (train_vae.py never gives
    it to an optimizer)."""

    def __init__(
        self, *, perceptual: LPIPS | None, perceptual_weight: float, kl_weight: float, logvar: float
    ) -> None:
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.kl_weight, self.logvar = kl_weight, logvar

    def __call__(
        self,
        video: Tensor,
        reconstruction: Tensor,
        posterior: DiagonalGaussian,
        *,
        no_perceptual: bool = False,
    ) -> NllTerms:
        x, x_rec = frames(video), frames(reconstruction)
        recon = torch.abs(x - x_rec)
        if self.perceptual is not None and self.perceptual_weight > 0 and not no_perceptual:
            recon = recon + self.perceptual_weight * self.perceptual(x, x_rec)
        nll = recon / math.exp(self.logvar) + self.logvar
        nll = torch.sum(nll) / nll.shape[0]
        kl = torch.zeros((), device=x.device, dtype=x.dtype)
        if self.kl_weight > 0:
            per_clip = posterior.kl()
            kl = torch.sum(per_clip) / per_clip.shape[0] * self.kl_weight
        return NllTerms(nll, kl)


def adopt_weight(weight: float, global_step: int, start: int) -> float:
    """`weight` from step `start` on, 0 before (the discriminator's start step)."""
    return 0.0 if global_step < start else weight


def generator_loss(
    fake_logits: Tensor,
    nll: Tensor,
    last_layer: Tensor,
    *,
    global_step: int,
    discriminator_factor: float,
    discriminator_start: int,
    generator_factor: float,
    loss_type: str,
) -> Tensor:
    """Open-Sora's AdversarialLoss: the GAN term, scaled so its gradient at the decoder's last layer is
    `generator_factor` times the NLL's (VQGAN's adaptive weight)."""
    if loss_type == "hinge":
        gen = -torch.mean(fake_logits)
    else:  # "non-saturating"
        gen = torch.mean(F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits)))
    weight = torch.zeros((), device=gen.device)
    if discriminator_factor > 0:
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        gen_grad = torch.autograd.grad(gen, last_layer, retain_graph=True)[0]
        weight = (torch.norm(nll_grad) / (torch.norm(gen_grad) + 1e-4)).clamp(0.0, 1e4).detach()
        weight = weight * generator_factor
    return weight * adopt_weight(discriminator_factor, global_step, discriminator_start) * gen


def discriminator_loss(
    real_logits: Tensor,
    fake_logits: Tensor,
    *,
    global_step: int,
    discriminator_factor: float,
    discriminator_start: int,
    loss_type: str,
) -> Tensor:
    """Open-Sora's DiscriminatorLoss (its LeCam and gradient-penalty terms are unusable from train_vae.py)."""
    if discriminator_factor <= 0:
        return torch.zeros((), device=real_logits.device)
    if loss_type == "hinge":
        loss = 0.5 * (torch.mean(F.relu(1.0 - real_logits)) + torch.mean(F.relu(1.0 + fake_logits)))
    elif loss_type == "vanilla":
        loss = 0.5 * (torch.mean(F.softplus(-real_logits)) + torch.mean(F.softplus(fake_logits)))
    else:  # "non-saturating": sigmoid cross-entropy, real -> 1, fake -> 0
        loss = 0.5 * (
            F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        )
    return adopt_weight(discriminator_factor, global_step, discriminator_start) * loss
