"""Typed views of a loaded config, and the checks that turn bad values into one-line errors.

The raw MMEngine `Config` stays the source of truth (stages pass component dicts such as
`cfg.model` to their builders); these dataclasses validate it and give the stages typed access.
Each section is checked by its own component against its own registry; none of them imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mmengine.config import Config, ConfigDict

from opensora_core.config.credentials import check_no_credentials
from opensora_core.data.aspect import ASPECT_RATIO_MAP, RESOLUTIONS, get_image_size, get_num_frames
from opensora_core.data.bucket import BucketConfig
from opensora_core.data.validation_split import held_out_fraction
from opensora_core.errors import ConfigError
from opensora_core.features.settings import FeatureSettings, feature_settings
from opensora_core.models.registry import (
    MODEL_TYPES,
    TEXT_ENCODER_TYPES,
    VAE_MODEL_TYPES,
    VAE_TYPES,
    check_class_condition,
    check_vae_options,
    model_num_heads,
)
from opensora_core.parallel.deepspeed_config import check_plugin
from opensora_core.parallel.layout import check_heads_divisible, check_sp_size
from opensora_core.registry import check_type
from opensora_core.schedulers import SCHEDULER_TYPES, check_scheduler_type
from opensora_core.train.mask_ratios import check_mask_ratios
from opensora_core.train.vae_settings import VaeLossSettings, vae_loss_settings

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")
# The VAEs downsample 8x and the models cut latents into 2x2 patches: a side under 16 pixels gives no patch.
MIN_IMAGE_SIDE = 16
# BatchFeatureDataset (Open-Sora's stage1_feat.py): train from a feature snapshot's stored latents and captions
DATASET_TYPES = ("VariableVideoTextDataset", "VideoTextDataset", "BatchFeatureDataset")
# Top-level sizes of a config without vae / text_encoder sections (stage1_feat.py), checked against the features
FEATURE_DIM_KEYS = ("vae_out_channels", "model_max_length", "text_encoder_output_dim")
Mode = Literal["train", "sample"]
# Keys only a training config sets: they tell a VAE training config from a VAE inference config, as both
# carry a fixed-size dataset (configs/vae/{train,inference}/*.py)
VAE_TRAINING_KEYS = ("epochs", "outputs", "lr", "ckpt_every", "load")


@dataclass(frozen=True)
class ComponentSpec:
    """One `dict(type=..., **options)` section: model, vae, text_encoder, scheduler or dataset."""

    key: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def from_pretrained(self) -> str | None:
        return self.options.get("from_pretrained")

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options}


@dataclass(frozen=True)
class TrainingSettings:
    """The top-level training knobs of an Open-Sora training config."""

    seed: int
    outputs: str
    epochs: int
    max_steps: int | None
    log_every: int
    ckpt_every: int
    batch_size: int | None
    lr: float
    grad_clip: float
    ema_decay: float
    adam_eps: float
    weight_decay: float
    warmup_steps: int | None
    dtype: str
    plugin: str
    sp_size: int
    grad_checkpoint: bool
    num_workers: int
    num_bucket_build_workers: int
    num_train_workers: int
    wandb: bool
    load: str | None
    start_from_scratch: bool
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    val_fraction: float | None = (
        None  # the snapshot's share eval-loss holds out of training (data.validation_split)
    )


@dataclass(frozen=True)
class SamplingSettings:
    """The top-level knobs of an Open-Sora inference config."""

    seed: int
    batch_size: int
    dtype: str
    save_dir: str
    num_frames: int | None
    fps: int
    frame_interval: int
    save_fps: int | None
    image_size: tuple[int, int] | None
    resolution: str | None
    aspect_ratio: str | None


@dataclass(frozen=True)
class ValidatedConfig:
    """A config that passed every check, with typed sections; `raw` is the MMEngine Config."""

    path: str
    mode: Mode
    raw: Config
    model: ComponentSpec
    vae: ComponentSpec | None
    text_encoder: ComponentSpec | None
    scheduler: ComponentSpec | None  # None for a VAE model (train_vae.py / inference_vae.py), or extract.py
    dataset: ComponentSpec | None = None
    bucket_config: BucketConfig | None = None
    training: TrainingSettings | None = None
    sampling: SamplingSettings | None = None
    features: FeatureSettings | None = None  # training only: which stored features it reads
    vae_loss: VaeLossSettings | None = None  # a VAE model's losses and mixed strategy

    @property
    def is_vae_model(self) -> bool:
        """Whether the config trains / runs a VAE (`model.type` a VAE) rather than a diffusion model."""
        return self.model.type in VAE_MODEL_TYPES


def _model_type(cfg: Config) -> Any:
    model = cfg.get("model")
    return model.get("type") if isinstance(model, (dict, ConfigDict)) else None


def detect_mode(cfg: Config) -> Mode:
    """Training configs carry a dataset; inference configs do not. A VAE config has a dataset either way
    (the clips it reconstructs): it trains when it sets a training-only key."""
    if _model_type(cfg) in VAE_MODEL_TYPES:
        return "train" if any(cfg.get(key) is not None for key in VAE_TRAINING_KEYS) else "sample"
    return "train" if cfg.get("dataset") is not None or cfg.get("bucket_config") is not None else "sample"


def validate_config(
    cfg: Config, *, mode: Mode | None = None, path: str = "<config>", needs_scheduler: bool = True
) -> ValidatedConfig:
    """Check every key a stage will use; raise ConfigError naming the first bad key.

    `needs_scheduler=False` is for the stages that never diffuse (bucket, precompute): Open-Sora's
    misc/extract.py, the feature-extraction config, has no scheduler section, as its script builds none.
    """
    check_no_credentials(cfg)
    mode = mode or detect_mode(cfg)
    if _model_type(cfg) in VAE_MODEL_TYPES:
        return _validate_vae_config(cfg, mode, path)
    model = _component(cfg, "model", MODEL_TYPES + VAE_MODEL_TYPES, required=True)
    vae = _component(cfg, "vae", VAE_TYPES, required=False)
    text_encoder = _component(cfg, "text_encoder", TEXT_ENCODER_TYPES, required=False)
    check_class_condition(model.as_dict(), text_encoder.as_dict() if text_encoder else None)
    scheduler = _component(cfg, "scheduler", SCHEDULER_TYPES, required=needs_scheduler)
    dtype = _choice(cfg, "dtype", DTYPES, default="bf16")

    if mode == "train":
        if scheduler is not None:
            check_scheduler_type(scheduler.type, training=True)
        dataset = _component(cfg, "dataset", DATASET_TYPES, required=True)
        bucket_config = _bucket_config(cfg, dataset)
        if cfg.get("mask_ratios") is not None:
            check_mask_ratios(_plain(cfg.mask_ratios))
        _image_size(cfg, "eval_image_size")  # the evaluation after each checkpoint samples at this size
        training = _training_settings(cfg, dtype, model)
        features = _features(cfg, dataset)
        return ValidatedConfig(
            path, mode, cfg, model, vae, text_encoder, scheduler, dataset, bucket_config,
            training=training, features=features,
        )  # fmt: skip
    sampling = _sampling_settings(cfg, dtype)
    return ValidatedConfig(path, mode, cfg, model, vae, text_encoder, scheduler, sampling=sampling)


def _validate_vae_config(cfg: Config, mode: Mode, path: str) -> ValidatedConfig:
    """A config whose `model` is a VAE (Open-Sora's configs/vae/): no scheduler or text encoder; a
    fixed-size VideoTextDataset (train_vae.py asserts that type), the VAE losses' keys."""
    model = _component(cfg, "model", VAE_MODEL_TYPES, required=True)
    check_vae_options(model.as_dict(), "model")
    dtype = _choice(cfg, "dtype", DTYPES, default="bf16")
    vae_loss = vae_loss_settings(cfg)
    dataset = _component(cfg, "dataset", ("VideoTextDataset",), required=mode == "train")
    if mode == "sample":
        sampling = _sampling_settings(_with_dataset_sizes(cfg, dataset), dtype)
        return ValidatedConfig(
            path, mode, cfg, model, None, None, None, dataset, sampling=sampling, vae_loss=vae_loss
        )
    _bucket_config(cfg, dataset)  # num_frames and image_size must be set
    _image_size(cfg, "image_size")
    training = _training_settings(cfg, dtype, model)
    return ValidatedConfig(
        path, mode, cfg, model, None, None, None, dataset, training=training, vae_loss=vae_loss
    )


def _with_dataset_sizes(cfg: Config, dataset: ComponentSpec | None) -> Config:
    """`cfg` with the dataset's image_size / num_frames: the clips are read at those (and the CLI's
    --image-size / --num-frames set them there)."""
    if dataset is None:
        return cfg
    sizes = {
        k: dataset.options[k] for k in ("image_size", "num_frames") if dataset.options.get(k) is not None
    }
    if not sizes:
        return cfg
    merged = cfg.copy()
    merged.merge_from_dict(sizes)
    return merged


def _component(cfg: Config, key: str, valid: tuple[str, ...], *, required: bool) -> ComponentSpec | None:
    section = cfg.get(key)
    if section is None:
        if required:
            raise ConfigError(
                f"{key}: missing; expected {key} = dict(type=..., ...) with type one of {_fmt(valid)}"
            )
        return None
    if not isinstance(section, (dict, ConfigDict)):
        raise ConfigError(f"{key}: expected a dict(type=..., ...), got {type(section).__name__}")
    options = dict(section)
    type_name = check_type(key, options.pop("type", None), valid)
    return ComponentSpec(key, type_name, options)


def _bucket_config(cfg: Config, dataset: ComponentSpec) -> BucketConfig | None:
    raw = cfg.get("bucket_config")
    if dataset.type == "BatchFeatureDataset":  # the buckets are the feature snapshot's bucket snapshot's
        return BucketConfig.from_dict(_plain(raw)) if raw is not None else None
    if dataset.type == "VariableVideoTextDataset":
        if raw is None:
            raise ConfigError(
                "bucket_config: missing; VariableVideoTextDataset needs e.g. "
                'bucket_config = {"240p": {16: (1.0, 8)}}'
            )
        return BucketConfig.from_dict(_plain(raw))
    for key in ("num_frames", "image_size"):
        if dataset.options.get(key) in (None, (None, None), [None, None]):
            raise ConfigError(f"dataset.{key}: required for VideoTextDataset (fixed-size clips)")
    return BucketConfig.from_dict(_plain(raw)) if raw is not None else None


def _features(cfg: Config, dataset: ComponentSpec) -> FeatureSettings:
    """The feature keys; `BatchFeatureDataset` means both features (as in Open-Sora's stage1_feat.py)."""
    settings = feature_settings(cfg)
    for key in FEATURE_DIM_KEYS:
        _int(cfg, key, None, minimum=1)
    if dataset.type != "BatchFeatureDataset":
        return settings
    for key in ("load_video_features", "load_text_features"):
        if cfg.get(key) is not None and not getattr(settings, key):
            raise ConfigError(
                f"{key}={cfg.get(key)!r}: dataset.type='BatchFeatureDataset' reads stored latents and "
                "captions both; set it True, or use dataset.type='VariableVideoTextDataset'"
            )
    return replace(settings, load_video_features=True, load_text_features=True)


def _training_settings(cfg: Config, dtype: str, model: ComponentSpec) -> TrainingSettings:
    num_train_workers = _int(cfg, "num_train_workers", 2, minimum=1)
    sp_size = _int(cfg, "sp_size", 1, minimum=1)
    check_sp_size(sp_size, num_train_workers)
    if sp_size > 1:
        # Ulysses gives each SP rank num_heads / sp_size heads; a preset's count is read only when unset
        num_heads = model_num_heads(model.as_dict())
        if num_heads is not None:
            check_heads_divisible(num_heads, sp_size)
    plugin = check_plugin(_sequence_parallel_plugin(cfg, model, sp_size), sp_size)
    return TrainingSettings(
        seed=_int(cfg, "seed", 1024),
        outputs=str(cfg.get("outputs", "outputs")),
        epochs=_int(cfg, "epochs", 1000, minimum=1),
        max_steps=_int(cfg, "max_steps", None, minimum=1),
        log_every=_int(cfg, "log_every", 10, minimum=1),
        ckpt_every=_int(cfg, "ckpt_every", 0, minimum=0),
        batch_size=_int(cfg, "batch_size", None, minimum=1),
        lr=_float(cfg, "lr", 1e-4, low=0.0, low_open=True),
        grad_clip=_float(cfg, "grad_clip", 0.0, low=0.0),
        ema_decay=_float(cfg, "ema_decay", 0.9999, low=0.0, high=1.0),
        adam_eps=_float(cfg, "adam_eps", 1e-8, low=0.0, low_open=True),
        weight_decay=_float(cfg, "weight_decay", 0.0, low=0.0),
        warmup_steps=_int(cfg, "warmup_steps", None, minimum=0),
        dtype=dtype,
        plugin=plugin,
        sp_size=sp_size,
        grad_checkpoint=bool(cfg.get("grad_checkpoint", False)),
        num_workers=_int(cfg, "num_workers", 4, minimum=0),
        num_bucket_build_workers=_int(cfg, "num_bucket_build_workers", 1, minimum=1),
        num_train_workers=num_train_workers,
        wandb=bool(cfg.get("wandb", False)),
        load=cfg.get("load"),
        start_from_scratch=bool(cfg.get("start_from_scratch", False)),
        grad_accum=_int(cfg, "grad_accum", 1, minimum=1),
        val_fraction=held_out_fraction(cfg),
    )


def _sequence_parallel_plugin(cfg: Config, model: ComponentSpec, sp_size: int) -> str:
    """`plugin`, with v1.1's form of a sequence-parallel config read as 'zero2-seq'.

    v1.1.0 and v1.2.0 ship opensora/train/64x512x512-sp.py with plugin='zero2' beside sp_size=2 and
    model.enable_sequence_parallelism=True; v1.0.0's same file says 'zero2-seq'. Both keys ask for SP.
    """
    plugin = cfg.get("plugin") or "zero2"
    if plugin == "zero2" and sp_size > 1 and model.options.get("enable_sequence_parallelism"):
        log.info(
            "plugin='zero2' with sp_size=%d and model.enable_sequence_parallelism=True: "
            "running as plugin='zero2-seq' (sequence parallelism, as this config asks)",
            sp_size,
        )
        return "zero2-seq"
    return plugin


def _sampling_settings(cfg: Config, dtype: str) -> SamplingSettings:
    image_size = _image_size(cfg, "image_size")
    resolution = cfg.get("resolution")
    aspect_ratio = cfg.get("aspect_ratio")
    if image_size is None:
        if resolution is None or aspect_ratio is None:
            raise ConfigError(
                "image_size: missing; set image_size = (H, W) or both resolution and aspect_ratio"
            )
        if resolution not in RESOLUTIONS:
            raise ConfigError(f"resolution={resolution!r} is unknown; valid: {_fmt(RESOLUTIONS)}")
        if aspect_ratio not in ASPECT_RATIO_MAP:
            raise ConfigError(
                f"aspect_ratio={aspect_ratio!r} is unknown; valid: {_fmt(tuple(ASPECT_RATIO_MAP))}"
            )
        get_image_size(resolution, aspect_ratio)  # the pair must exist in the resolution's table
    num_frames = cfg.get("num_frames")
    if num_frames is not None:
        num_frames = get_num_frames(num_frames)
        if num_frames < 1:
            raise ConfigError(f"num_frames={cfg.get('num_frames')!r}: must be >= 1 (1 means an image)")
    return SamplingSettings(
        seed=_int(cfg, "seed", 1024),
        batch_size=_int(cfg, "batch_size", 1, minimum=1),
        dtype=dtype,
        save_dir=str(cfg.get("save_dir", "./samples/samples/")),
        num_frames=num_frames,
        fps=_int(cfg, "fps", 24, minimum=1),
        frame_interval=_int(cfg, "frame_interval", 1, minimum=1),
        save_fps=_int(cfg, "save_fps", None, minimum=1),
        image_size=image_size,
        resolution=resolution,
        aspect_ratio=aspect_ratio,
    )


def _image_size(cfg: Config, key: str) -> tuple[int, int] | None:
    value = cfg.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < MIN_IMAGE_SIDE for v in value)
    ):
        raise ConfigError(
            f"{key}={tuple(value) if isinstance(value, list) else value!r}: expected (height, width), two "
            f"integers >= {MIN_IMAGE_SIDE} (the VAE downsamples 8x, the model takes 2x2 latent patches)"
        )
    return int(value[0]), int(value[1])


def _choice(cfg: Config, key: str, valid: tuple[str, ...], *, default: str) -> str:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is unknown; valid values: {_fmt(valid)}")
    return value


def _int(cfg: Config, key: str, default: int | None, *, minimum: int | None = None) -> int | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")
    return value


def _float(
    cfg: Config,
    key: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: expected a number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{key}={value}: must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}={value}: must be <= {high}")
    return float(value)


def _plain(value: Any) -> Any:
    """ConfigDict -> dict recursively (keeps tuples and int keys as written)."""
    if isinstance(value, (dict, ConfigDict)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _fmt(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names)


def resolve_path(value: str | None, *, base: Path | None = None) -> Path | None:
    """Config paths are relative to the working directory, as in Open-Sora."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base or Path.cwd()) / path
