"""The config's `type` strings -> models, VAEs and text encoders, and the builders that make them.

Each registry maps a name to "package.module:attribute" (see `opensora_core.registry`): naming and
checking a type imports no torch; a builder imports the one module it builds from.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opensora_core.errors import ConfigError
from opensora_core.models.weights import WEIGHT_FILES, load_model_weights, read_state_dict, weights_file
from opensora_core.registry import check_type, resolve

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "MODELS",
    "MODEL_TYPES",
    "TEXT_ENCODERS",
    "TEXT_ENCODER_TYPES",
    "VAES",
    "VAE_MODEL_TYPES",
    "VAE_TYPES",
    "WEIGHT_FILES",
    "build_model",
    "build_text_encoder",
    "build_vae",
    "check_vae_options",
    "count_component_parameters",
    "count_parameters",
    "load_model_weights",
    "model_num_heads",
    "model_preset",
    "read_state_dict",
    "weights_file",
]

# Every diffusion model an Open-Sora config may name -> its preset (a functools.partial in the model's file).
MODELS: dict[str, str] = {
    "STDiT-XL/2": "opensora_core.models.stdit:STDiT_XL_2",
    "STDiT2-XL/2": "opensora_core.models.stdit2:STDiT2_XL_2",
    "STDiT3-XL/2": "opensora_core.models.stdit3:STDiT3_XL_2",
    "STDiT3-3B/2": "opensora_core.models.stdit3:STDiT3_3B_2",
    "DiT-XL/2": "opensora_core.models.dit:DiT_XL_2",
    "DiT-XL/2x2": "opensora_core.models.dit:DiT_XL_2x2",
    "Latte-XL/2": "opensora_core.models.latte:Latte_XL_2",
    "Latte-XL/2x2": "opensora_core.models.latte:Latte_XL_2x2",
    "PixArt-XL/2": "opensora_core.models.pixart:PixArt_XL_2",
    "PixArt-1B/2": "opensora_core.models.pixart:PixArt_1B_2",
    "PixArtMS-XL/2": "opensora_core.models.pixart:PixArtMS_XL_2",
    "PixArt-Sigma-XL/2": "opensora_core.models.pixart:PixArt_Sigma_XL_2",
}
MODEL_TYPES: tuple[str, ...] = tuple(MODELS)

VAES: dict[str, str] = {
    "VideoAutoencoderKL": "opensora_core.models.vae:VideoAutoencoderKL",
    "OpenSoraVAE_V1_2": "opensora_core.models.vae_pipeline:OpenSoraVAE_V1_2",
    "VAE_Temporal_SD": "opensora_core.models.vae_temporal:VAE_Temporal_SD",
    "VideoAutoencoderPipeline": "opensora_core.models.vae_pipeline:build_pipeline",  # (vae_2d, vae_temporal)
}
VAE_TYPES: tuple[str, ...] = tuple(VAES)
# VAEs a config may name as its `model`: what Open-Sora's train_vae.py / inference_vae.py train and run
# (the video pipeline, whose forward gives the reconstructions, posterior and image-VAE latents).
VAE_MODEL_TYPES: tuple[str, ...] = ("OpenSoraVAE_V1_2", "VideoAutoencoderPipeline")

TEXT_ENCODERS: dict[str, str] = {
    "t5": "opensora_core.models.text_encoder:T5Encoder",
    "clip": "opensora_core.models.text_encoder:ClipEncoder",
    "classes": "opensora_core.models.text_encoder:ClassEncoder",  # class ids for label-conditioned DiT / Latte
}
TEXT_ENCODER_TYPES: tuple[str, ...] = tuple(TEXT_ENCODERS)

# Each VAE / text encoder type's config keys besides `type` (Open-Sora's constructor arguments).
VAE_OPTIONS: dict[str, frozenset[str]] = {
    "VideoAutoencoderKL": frozenset(
        {
            "from_pretrained",
            "micro_batch_size",
            "cache_dir",
            "local_files_only",
            "subfolder",
            "scaling_factor",
        }
    ),
    "OpenSoraVAE_V1_2": frozenset(
        {
            "from_pretrained",
            "micro_batch_size",
            "micro_frame_size",
            "local_files_only",
            "freeze_vae_2d",
            "cal_loss",
            "force_huggingface",
        }
    ),
    "VAE_Temporal_SD": frozenset({"from_pretrained", "num_groups", "activation_fn"}),
    "VideoAutoencoderPipeline": frozenset(
        {
            "vae_2d",
            "vae_temporal",
            "from_pretrained",
            "micro_frame_size",
            "shift",
            "scale",
            "freeze_vae_2d",
            "cal_loss",
        }
    ),
}
TEXT_ENCODER_OPTIONS: dict[str, frozenset[str]] = {
    "t5": frozenset(
        {"from_pretrained", "model_max_length", "cache_dir", "local_files_only", "shardformer", "subfolder"}
    ),
    "clip": frozenset({"from_pretrained", "model_max_length", "cache_dir", "local_files_only"}),
    "classes": frozenset({"num_classes", "model_max_length"}),
}

# Keys Open-Sora configs carry that do not change how our models are built.
IGNORED_MODEL_KEYS = frozenset(
    {"local_files_only", "cache_dir", "force_huggingface", "shardformer", "micro_frame_size", "dtype"}
)
MODEL_OPTIONS = frozenset(
    {
        "input_size",
        "input_sq_size",
        "patch_size",
        "hidden_size",
        "depth",
        "num_heads",
        "mlp_ratio",
        "class_dropout_prob",
        "pred_sigma",
        "drop_path",
        "qk_norm",
        "qk_norm_legacy",
        "enable_flash_attn",
        "enable_layernorm_kernel",
        "enable_sequence_parallelism",
        "only_train_temporal",
        "freeze_y_embedder",
        "skip_y_embedder",
        "grad_checkpoint",
        "freeze",
        "no_temporal_pos_emb",
        "space_scale",
        "time_scale",
        "base_size",
        "condition",
        "learn_sigma",
    }
)
# Set by the pipeline from the VAE / text encoder; a config may repeat them only with the same value.
DERIVED_MODEL_OPTIONS = ("in_channels", "caption_channels", "model_max_length")


def model_preset(type_name: str) -> Callable[..., nn.Module]:
    """The preset `type_name` names (imports its model module, and so torch)."""
    return resolve(MODELS[check_type("model", type_name, MODEL_TYPES)])


def model_num_heads(model: Mapping[str, Any]) -> int | None:
    """Attention heads of a config's `model` section: its own `num_heads`, else its preset's.

    Only a section without `num_heads` imports the preset's module to read it.
    """
    if model.get("num_heads") is not None:
        return int(model["num_heads"])
    if model.get("type") not in MODELS:
        return None
    keywords = getattr(model_preset(model["type"]), "keywords", None) or {}  # presets are functools.partial
    return keywords.get("num_heads")


# Option names earlier Open-Sora releases used (v1.0 / v1.1 configs), and the name each has now.
LEGACY_MODEL_OPTIONS = {"enable_flashattn": "enable_flash_attn"}


@functools.cache
def _legacy_option(key: str) -> str:
    current = LEGACY_MODEL_OPTIONS[key]
    log.info("model.%s is Open-Sora's earlier name of model.%s; read as that", key, current)
    return current


def parse_condition(condition: str) -> int | None:
    """Number of classes for `condition="label_<N>"`, None for `condition="text"`."""
    if condition == "text":
        return None
    prefix, _, count = condition.rpartition("_")
    if prefix == "label" and count.isdigit() and int(count) > 0:
        return int(count)
    raise ConfigError(f"model.condition={condition!r} is not valid; valid: 'text', 'label_<num_classes>'")


def check_num_classes(num_classes: object) -> int:
    """`text_encoder.num_classes` as a positive int (torch-free: the config check uses it too)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"text_encoder.num_classes={num_classes!r}: expected a positive integer, e.g. 1000")
    return num_classes


def check_class_condition(model: Mapping[str, Any], text_encoder: Mapping[str, Any] | None) -> None:
    """A `classes` text encoder and a `condition="label_<N>"` model go together, with N = num_classes."""
    condition = model.get("condition")
    num_labels = parse_condition(condition) if isinstance(condition, str) else None
    if text_encoder is None or text_encoder.get("type") != "classes":
        if num_labels is not None and text_encoder is not None:
            raise ConfigError(
                f"model.condition={condition!r} takes class ids: set text_encoder = "
                f'dict(type="classes", num_classes={num_labels})'
            )
        return
    num_classes = check_num_classes(text_encoder.get("num_classes"))
    if num_labels is None:
        raise ConfigError(
            f"text_encoder.type='classes' gives class ids: model.condition must be 'label_{num_classes}' "
            f"(a DiT or Latte type), got model.condition={condition!r}"
        )
    if num_labels != num_classes:
        raise ConfigError(
            f"model.condition={condition!r} has {num_labels} classes but text_encoder.num_classes={num_classes}"
        )


def model_kwargs(
    cfg: dict[str, Any], *, in_channels: int, caption_channels: int, model_max_length: int
) -> dict:
    """Constructor arguments from a config's `model` dict (type and from_pretrained excluded)."""
    derived = {
        "in_channels": in_channels,
        "caption_channels": caption_channels,
        "model_max_length": model_max_length,
    }
    kwargs: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in ("type", "from_pretrained") or key in IGNORED_MODEL_KEYS:
            continue
        if key in LEGACY_MODEL_OPTIONS:
            key = _legacy_option(key)
        if key in DERIVED_MODEL_OPTIONS:
            if value is not None and value != derived[key]:
                raise ConfigError(
                    f"model.{key}={value!r} does not match the VAE / text encoder, which give {derived[key]}"
                )
            continue
        if key not in MODEL_OPTIONS:
            valid = sorted(
                MODEL_OPTIONS | IGNORED_MODEL_KEYS | {"type", "from_pretrained", *DERIVED_MODEL_OPTIONS}
            )
            raise ConfigError(f"model.{key} is not a model option; valid: {', '.join(valid)}")
        if key in ("input_size", "patch_size") and value is not None:
            value = tuple(value)
        kwargs[key] = value
    return {**kwargs, **derived}


def with_latent_input_size(
    cfg: dict[str, Any], vae: Any, num_frames: int | None, image_size: Sequence[int] | None
) -> dict[str, Any]:
    """`cfg` with `input_size` set to the VAE's latent size of num_frames x image_size, for a fixed-size model
    (STDiT v1.0, DiT, Latte, PixArt) whose config leaves it unset: Open-Sora's scripts derive it the same way."""
    from opensora_core.models.fixed_size import FixedSizeModel

    preset = model_preset(check_type("model", cfg.get("type"), MODEL_TYPES))
    model_class = getattr(preset, "func", preset)
    fixed = isinstance(model_class, type) and issubclass(model_class, FixedSizeModel)
    if not fixed or cfg.get("input_size") is not None or num_frames is None or image_size is None:
        return cfg
    if None in tuple(image_size):
        return cfg
    return {**cfg, "input_size": tuple(vae.get_latent_size((int(num_frames), *map(int, image_size))))}


def build_model(
    cfg: dict[str, Any], *, in_channels: int, caption_channels: int, model_max_length: int
) -> nn.Module:
    """Build the diffusion model named by `cfg["type"]`; load `from_pretrained` strictly if given."""
    type_name = check_type("model", cfg.get("type"), MODEL_TYPES)
    kwargs = model_kwargs(
        cfg, in_channels=in_channels, caption_channels=caption_channels, model_max_length=model_max_length
    )
    preset = model_preset(type_name)
    accepted = inspect.signature(preset).parameters
    for key in kwargs:
        if key not in accepted:  # MODEL_OPTIONS spans all types; each type takes only its own
            valid = sorted(set(accepted) - set(DERIVED_MODEL_OPTIONS))
            raise ConfigError(f"model.{key} is not an option of {type_name}; valid: {', '.join(valid)}")
    model = preset(**kwargs)
    if cfg.get("from_pretrained"):
        load_model_weights(model, cfg["from_pretrained"], type_name=type_name)
    return model


# Settings of the released checkpoints (spec/state-dicts.json) where they differ from the preset's defaults.
PUBLISHED_SETTINGS: dict[str, dict[str, Any]] = {
    "STDiT2-XL/2": {"qk_norm": True, "qk_norm_legacy": True, "input_sq_size": 512, "model_max_length": 200},
    "STDiT-XL/2": {"model_max_length": 120, "input_size": (16, 32, 32), "space_scale": 0.5},
    "PixArt-XL/2": {"model_max_length": 120, "input_size": (16, 32, 32), "space_scale": 0.5},
    "PixArt-1B/2": {"model_max_length": 120},
    "PixArtMS-XL/2": {"model_max_length": 120},
    # DiT and Latte condition on a pooled CLIP ViT-B/32 text embedding
    **{
        name: {"caption_channels": 512, "model_max_length": 77, "input_size": (16, 32, 32)}
        for name in ("DiT-XL/2", "DiT-XL/2x2", "Latte-XL/2", "Latte-XL/2x2")
    },
}


def count_parameters(type_name: str) -> int:
    """Parameter count of a preset with its released settings (default: T5-XXL text, 4 latent channels), on meta."""
    import torch

    preset = model_preset(type_name)
    settings = {"in_channels": 4, "caption_channels": 4096, "model_max_length": 300}
    settings.update(PUBLISHED_SETTINGS.get(type_name, {}))
    with torch.device("meta"):
        model = preset(**settings)
    return sum(p.numel() for p in model.parameters())


def check_vae_options(cfg: Mapping[str, Any], section: str = "vae") -> str:
    """The type of a VAE section whose keys are all options of that type (no torch); else ConfigError."""
    type_name = check_type(section, cfg.get("type"), VAE_TYPES)
    valid = VAE_OPTIONS[type_name]
    for key in cfg:
        if key == "type" or (type_name == "VideoAutoencoderKL" and key == "micro_frame_size"):
            continue  # micro_frame_size: a v1.2 pipeline option; the KL VAE works frame by frame
        if key not in valid:
            raise ConfigError(
                f"{section}.{key} is not a {type_name} option; valid: {', '.join(sorted(valid))}"
            )
    return type_name


def build_vae(cfg: dict[str, Any], section: str = "vae") -> nn.Module:
    """Build the VAE named by `cfg["type"]` from its local `from_pretrained` directory."""
    type_name = check_vae_options(cfg, section)
    options = {k: v for k, v in cfg.items() if k != "type"}
    if type_name == "VideoAutoencoderKL":
        options.pop("micro_frame_size", None)
    if type_name == "VideoAutoencoderKL" and not options.get("from_pretrained"):
        raise ConfigError(f"{section}.from_pretrained is required: a local AutoencoderKL directory")
    if type_name == "VideoAutoencoderPipeline":
        for key in ("vae_2d", "vae_temporal"):
            if not isinstance(options.get(key), dict):
                raise ConfigError(
                    f"{section}.{key} is required for VideoAutoencoderPipeline: a dict with its type"
                )
        return resolve(VAES[type_name])(options.pop("vae_2d"), options.pop("vae_temporal"), **options)
    if type_name == "VAE_Temporal_SD":
        weights = options.pop("from_pretrained", None)
        model = resolve(VAES[type_name])(**options)
        if weights:
            load_model_weights(model, weights, type_name=type_name, section="vae")
        return model
    return resolve(VAES[type_name])(**options)


def build_text_encoder(
    cfg: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """Build the text encoder named by `cfg["type"]` (frozen, eval mode) on `device`, in `dtype` (float32)."""
    import torch

    type_name = check_type("text_encoder", cfg.get("type"), TEXT_ENCODER_TYPES)
    options = {k: v for k, v in cfg.items() if k != "type"}
    valid = TEXT_ENCODER_OPTIONS[type_name]
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"text_encoder.{key} is not a {type_name} option; valid: {', '.join(sorted(valid))}"
            )
    if type_name == "classes":
        options.setdefault("num_classes", None)  # required: the encoder names the key when it is missing
    elif not options.get("from_pretrained"):
        kind = {"t5": "T5", "clip": "CLIP"}[type_name]
        raise ConfigError(f"text_encoder.from_pretrained is required: a local {kind} directory")
    encoder_class = resolve(TEXT_ENCODERS[type_name])
    return encoder_class(**options, device=device, dtype=torch.float32 if dtype is None else dtype)


# Released architectures of the VAEs and text encoders, for `opensora models` (no weights needed).
T5_XXL_CONFIG = dict(  # DeepFloyd/t5-v1_1-xxl, the encoder Open-Sora's configs name
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
CLIP_B32_TEXT_CONFIG = dict(  # openai/clip-vit-base-patch32's text tower, Open-Sora's DiT/Latte configs
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77,
)  # fmt: skip


def count_component_parameters(section: str, type_name: str) -> int:
    """Parameter count of a VAE or text encoder type at its released size, built on the meta device."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from opensora_core.models.vae import VideoAutoencoderKL
    from opensora_core.models.vae_pipeline import SDXL_VAE_CONFIG, OpenSoraVAE_V1_2
    from opensora_core.models.vae_temporal import VAE_Temporal_SD

    builders = {
        "vae": {
            "VideoAutoencoderKL": lambda: VideoAutoencoderKL(config=SDXL_VAE_CONFIG),
            "OpenSoraVAE_V1_2": OpenSoraVAE_V1_2,
            "VideoAutoencoderPipeline": OpenSoraVAE_V1_2,  # the class behind OpenSoraVAE_V1_2
            "VAE_Temporal_SD": VAE_Temporal_SD,
        },
        "text_encoder": {
            "t5": lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)),
            "clip": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_B32_TEXT_CONFIG)),
            "classes": torch.nn.Module,  # class ids: the model's label table holds the weights
        },
    }[section]
    check_type(section, type_name, tuple(builders))
    with torch.device("meta"):
        model = builders[type_name]()
    return sum(p.numel() for p in model.parameters())
