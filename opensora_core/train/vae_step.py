"""One micro-batch of Open-Sora v1.2's VAE training (scripts/train_vae.py) on DeepSpeed engines.

The video pipeline (`VideoAutoencoderPipeline`, temporal VAE on a frozen or trained image VAE) encodes and
decodes the clip; the loss adds, as the config's switches say, the pixel reconstruction (L1 + LPIPS) with
the KL (`use_real_rec_loss`), the image-VAE latents' reconstruction (`use_z_rec_loss`), for one-frame
clips the temporal VAE's identity on them (`use_image_identity_loss`), and with a `discriminator` the
adaptive GAN term; the discriminator then takes its own step on its own engine and optimizer. Every
part is returned for logging, in train_vae.py's names.

Randomness: the mixed strategy's draws come from the micro-batch's `random.Random(seed)` (train_vae.py
draws from the global one), the posterior's noise from the global torch RNG seeded with `seed`; so a
step is the same whatever the number of workers, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opensora_core.models.lpips import LPIPS
from opensora_core.train.step import StepResult
from opensora_core.train.vae_loss import VaeLoss, discriminator_loss, frames, generator_loss
from opensora_core.train.vae_settings import VaeLossSettings


def build_vae_model(section: dict[str, Any]) -> torch.nn.Module:
    """The `model` section's VAE in Open-Sora's training mode (`cal_loss`: no latent normalisation,
    forward returns reconstructions, posterior and image-VAE latents)."""
    from opensora_core.models.registry import build_vae

    return build_vae({**section, "cal_loss": True}, section="model")


def mixed_clip(x: Tensor, settings: VaeLossSettings, rng: random.Random) -> Tensor:
    """train_vae.py's `mixed_strategy`: the first frame only with probability `mixed_image_ratio`
    ("mixed_video_image"), or the first 1..T frames, uniformly ("mixed_video_random")."""
    if settings.mixed_strategy == "mixed_video_image":
        if rng.random() < settings.mixed_image_ratio:
            return x[:, :, :1]
    elif settings.mixed_strategy == "mixed_video_random":
        return x[:, :, : rng.randint(1, x.shape[2])]
    return x


class VaeStep:
    """The VAE's micro-batch: forward, losses, backward and step of the VAE engine, then of the
    discriminator's engine when there is one (`extra_engines`, saved and resumed with the checkpoint)."""

    def __init__(
        self,
        engine: Any,
        settings: VaeLossSettings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        perceptual: LPIPS | None = None,
        discriminator_engine: Any | None = None,
    ) -> None:
        self.engine, self.settings, self.device, self.dtype = engine, settings, device, dtype
        self.loss = VaeLoss(
            perceptual=perceptual,
            perceptual_weight=settings.perceptual_loss_weight,
            kl_weight=settings.kl_loss_weight,
            logvar=settings.logvar_init,
        )
        self.discriminator = discriminator_engine
        self.extra_engines = {"discriminator": discriminator_engine} if discriminator_engine else {}

    def write_model_files(self, directory: Path) -> None:
        """config.json and vae_2d/config.json beside the checkpoint's weights: they make the checkpoint a
        `from_pretrained` directory of OpenSoraVAE_V1_2 / VideoAutoencoderPipeline."""
        self.engine.module.write_config(directory)

    def __call__(self, batch: dict[str, Any], *, seed: int, weight: float, global_step: int) -> StepResult:
        s, rng = self.settings, random.Random(seed)
        torch.manual_seed(seed)
        x = mixed_clip(batch["video"].to(device=self.device, dtype=self.dtype), s, rng)
        if self.discriminator is not None:  # the generator's pass leaves the discriminator's gradients alone
            self.discriminator.module.requires_grad_(False)
        x_rec, x_z_rec, z, posterior, x_z = self.engine(x)

        # the pixel NLL is needed with a graph only when it trains the VAE or weighs the GAN term
        with torch.set_grad_enabled(s.use_real_rec_loss or self.discriminator is not None):
            real = self.loss(x, x_rec, posterior)
        with torch.set_grad_enabled(s.use_z_rec_loss):
            latent = self.loss(x_z, x_z_rec, posterior, no_perceptual=True)
        parts = {
            "nll_loss": real.nll.detach(),
            "kl_loss": real.weighted_kl.detach(),
            "z_nll_loss": latent.nll.detach(),
        }
        loss = torch.zeros((), device=self.device, dtype=torch.float32)
        if s.use_real_rec_loss:
            loss = loss + real.nll + real.weighted_kl
        if s.use_z_rec_loss:
            loss = loss + latent.nll
        if s.use_image_identity_loss:
            identity = torch.zeros((), device=self.device)
            if x.shape[2] == 1:
                identity = self.loss(x_z, z, posterior, no_perceptual=True).nll
                loss = loss + identity
            parts["image_identity_loss"] = identity.detach()  # 0 on video clips
        if self.discriminator is not None:
            adversarial = generator_loss(
                self.discriminator(frames(x_rec)), real.nll, self.engine.module.temporal_vae.decoder.conv_out.conv.weight,
                global_step=global_step, discriminator_factor=s.discriminator_factor,
                discriminator_start=s.discriminator_start, generator_factor=s.generator_factor,
                loss_type=s.generator_loss_type,
            )  # fmt: skip
            loss = loss + adversarial
            parts["adversarial_loss"] = adversarial.detach()
        if not loss.requires_grad:
            # identity loss alone on a video clip: every rank must still run backward (ZeRO's collectives)
            loss = loss + 0.0 * x_rec.float().mean()
        self.engine.backward(loss * weight)
        self.engine.step()
        if self.discriminator is not None:
            self.discriminator.module.requires_grad_(True)
            parts["disc_loss"] = self._discriminator_step(x, x_rec, weight=weight, global_step=global_step)
        # tokens as the diffusion step counts them: latent positions (T' x H' x W') the clips encode to
        tokens = x.shape[0] * z.shape[2:].numel()
        return StepResult(loss.detach(), x.shape[0], tokens, parts)

    def _discriminator_step(self, x: Tensor, x_rec: Tensor, *, weight: float, global_step: int) -> Tensor:
        s = self.settings
        real_logits = self.discriminator(frames(x).detach())
        fake_logits = self.discriminator(frames(x_rec).detach())
        loss = discriminator_loss(
            real_logits, fake_logits, global_step=global_step, discriminator_factor=s.discriminator_factor,
            discriminator_start=s.discriminator_start, loss_type=s.discriminator_loss_type,
        )  # fmt: skip
        self.discriminator.backward(loss * weight)
        self.discriminator.step()
        return loss.detach()


def create_vae_step(
    engine: Any,
    settings: VaeLossSettings,
    *,
    device: torch.device,
    dtype: torch.dtype,
    ds_config: dict[str, Any],
    lr: float,
    weight_decay: float,
    adam_eps: float,
) -> VaeStep:
    """The VAE step with its LPIPS (when the perceptual weight is > 0) and its discriminator engine (when
    the config has a `discriminator`): AdamW at the VAE's lr and weight decay, as train_vae.py, under the
    same DeepSpeed settings."""
    import deepspeed

    from opensora_core.models.discriminator import build_discriminator
    from opensora_core.models.lpips import load_lpips

    perceptual = None
    if settings.uses_perceptual:
        perceptual = load_lpips(settings.lpips_path).to(device=device, dtype=dtype)
    discriminator_engine = None
    if settings.discriminator:
        model = build_discriminator(settings.discriminator).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=adam_eps)
        config = {k: v for k, v in ds_config.items() if k != "checkpoint"}
        discriminator_engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
    return VaeStep(
        engine, settings, device=device, dtype=dtype, perceptual=perceptual,
        discriminator_engine=discriminator_engine,
    )  # fmt: skip
