"""The top-level keys of Open-Sora v1.2's VAE configs (`configs/vae/{train,inference}/*.py`), checked into
one typed value: loss weights, the perceptual network's local weights, the mixed video / image strategy and
the optional discriminator of `scripts/train_vae.py`. No torch: `opensora config show` reads this.

Open-Sora's LPIPS downloads its VGG weights on first use; here `lpips_path` names a local file (see
opensora_core.models.lpips) and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core.errors import ConfigError

MIXED_STRATEGIES = ("mixed_video_image", "mixed_video_random")
GAN_LOSS_TYPES = ("hinge", "vanilla", "non-saturating")
# train_vae.py feeds its discriminator frames, [(B T), C, H, W]: only the 2D PatchGAN fits that input.
DISCRIMINATOR_TYPES = ("NLayerDiscriminator",)
DISCRIMINATOR_OPTIONS = frozenset({"input_nc", "ndf", "n_layers", "use_actnorm", "from_pretrained"})


@dataclass(frozen=True)
class VaeLossSettings:
    """What train_vae.py (and inference_vae.py's loss) reads from the config, with its defaults."""

    perceptual_loss_weight: float = 0.1
    kl_loss_weight: float = 1e-6
    logvar_init: float = 0.0  # a constant: train_vae.py never hands VAELoss's logvar to an optimizer
    lpips_path: str | None = None  # local LPIPS weights file, needed when perceptual_loss_weight > 0
    mixed_strategy: str | None = None
    mixed_image_ratio: float = 0.0
    use_real_rec_loss: bool = False
    use_z_rec_loss: bool = False
    use_image_identity_loss: bool = False
    discriminator: dict[str, Any] | None = None  # dict(type="NLayerDiscriminator", ...) or None
    discriminator_factor: float = 1.0
    discriminator_start: int = -1
    generator_factor: float = 0.5
    generator_loss_type: str = "hinge"
    discriminator_loss_type: str = "hinge"

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual_loss_weight > 0


def vae_loss_settings(cfg: Mapping[str, Any]) -> VaeLossSettings:
    """The VAE keys of `cfg`, each checked; ConfigError names the first bad one."""
    d = VaeLossSettings()
    mixed = cfg.get("mixed_strategy")
    if mixed is not None and mixed not in MIXED_STRATEGIES:
        raise ConfigError(
            f"mixed_strategy={mixed!r} is unknown; valid: {', '.join(MIXED_STRATEGIES)}, or None"
        )
    for key in ("lecam_loss_weight", "gradient_penalty_loss_weight"):
        if cfg.get(key):
            # train_vae.py calls DiscriminatorLoss without the EMA logits or real frames these need
            raise ConfigError(
                f"{key}={cfg.get(key)!r}: Open-Sora v1.2's train_vae.py cannot use it (its discriminator loss "
                "is called without what it needs); set it to None"
            )
    lpips_path = cfg.get("lpips_path")
    if lpips_path is not None and not isinstance(lpips_path, str):
        raise ConfigError(f"lpips_path={lpips_path!r}: expected the path of a local LPIPS weights file")
    return VaeLossSettings(
        # None turns a term off, as in Open-Sora's VAELoss
        perceptual_loss_weight=_number(cfg, "perceptual_loss_weight", d.perceptual_loss_weight, none=0.0),
        kl_loss_weight=_number(cfg, "kl_loss_weight", d.kl_loss_weight, none=0.0),
        logvar_init=_number(cfg, "logvar_init", d.logvar_init, low=None),
        lpips_path=lpips_path,
        mixed_strategy=mixed,
        mixed_image_ratio=_number(cfg, "mixed_image_ratio", d.mixed_image_ratio, high=1.0),
        use_real_rec_loss=bool(cfg.get("use_real_rec_loss", False)),
        use_z_rec_loss=bool(cfg.get("use_z_rec_loss", False)),
        use_image_identity_loss=bool(cfg.get("use_image_identity_loss", False)),
        discriminator=_discriminator(cfg.get("discriminator")),
        discriminator_factor=_number(cfg, "discriminator_factor", d.discriminator_factor),
        discriminator_start=int(_number(cfg, "discriminator_start", d.discriminator_start, low=None)),
        generator_factor=_number(cfg, "generator_factor", d.generator_factor),
        generator_loss_type=_gan_loss(cfg, "generator_loss_type", ("hinge", "non-saturating")),
        discriminator_loss_type=_gan_loss(cfg, "discriminator_loss_type", GAN_LOSS_TYPES),
    )


def _discriminator(section: Any) -> dict[str, Any] | None:
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"discriminator: expected dict(type=..., ...), got {type(section).__name__}")
    options = dict(section)
    type_name = options.get("type")
    if type_name not in DISCRIMINATOR_TYPES:
        raise ConfigError(
            f"discriminator.type={type_name!r} is not supported; valid: {', '.join(DISCRIMINATOR_TYPES)} "
            "(train_vae.py feeds the discriminator single frames)"
        )
    for key in options:
        if key != "type" and key not in DISCRIMINATOR_OPTIONS:
            raise ConfigError(
                f"discriminator.{key} is not an option; valid: {', '.join(sorted(DISCRIMINATOR_OPTIONS))}"
            )
    if options.get("use_actnorm"):
        raise ConfigError(
            "discriminator.use_actnorm=True: Open-Sora's NLayerDiscriminator always uses BatchNorm"
        )
    return options


def _gan_loss(cfg: Mapping[str, Any], key: str, valid: tuple[str, ...]) -> str:
    value = cfg.get(key, "hinge")
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(valid)}")
    return value


def _number(
    cfg: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    none: float | None = None,
) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default if none is None else none
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: expected a number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{key}={value}: must be {bounds}")
    return float(value)


def check_vae_training(cfg: Mapping[str, Any], settings: VaeLossSettings) -> None:
    """Before any worker starts: the local files VAE training reads exist, and some term trains the VAE."""
    from opensora_core.models.vae_pipeline import spatial_weights_dir

    if not (settings.use_real_rec_loss or settings.use_z_rec_loss or settings.use_image_identity_loss):
        if not settings.discriminator:
            raise ConfigError(
                "use_real_rec_loss, use_z_rec_loss and use_image_identity_loss are all False and there is no "
                "discriminator: nothing trains the VAE; set one of them True"
            )
    if settings.discriminator and settings.discriminator_factor <= 0:
        raise ConfigError(
            f"discriminator_factor={settings.discriminator_factor}: a discriminator needs a factor > 0 "
            "(or remove the discriminator section)"
        )
    if settings.uses_perceptual and not settings.lpips_path:
        raise ConfigError(
            f"perceptual_loss_weight={settings.perceptual_loss_weight}: needs lpips_path, a local LPIPS (VGG16) "
            "weights file (nothing is downloaded); or set perceptual_loss_weight = 0"
        )
    if settings.uses_perceptual and not Path(settings.lpips_path).is_file():
        raise ConfigError(
            f"lpips_path={settings.lpips_path!r}: no such file (perceptual_loss_weight="
            f"{settings.perceptual_loss_weight} needs local LPIPS weights; nothing is downloaded)"
        )
    from opensora_core.models.weights import weights_file

    model = cfg["model"]
    if model.get("from_pretrained"):
        weights_file(model["from_pretrained"])  # e.g. stage2's outputs/vae_stage1: a checkpoint directory
    elif model.get("type") == "VideoAutoencoderPipeline":
        spatial_weights_dir(model.get("vae_2d") or {}, where="model.vae_2d")  # the image VAE starts trained
