"""The config's `type` strings -> models, VAEs and text encoders, plus loading `from_pretrained` weights."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opensora_core.errors import CheckpointError, ConfigError, first_line
from opensora_core.models.dit import DIT_MODELS
from opensora_core.models.latte import LATTE_MODELS
from opensora_core.models.pixart import PIXART_MODELS
from opensora_core.models.stdit import STDIT_MODELS
from opensora_core.models.stdit2 import STDIT2_MODELS
from opensora_core.models.stdit3 import STDIT3_MODELS

log = logging.getLogger(__name__)

# Every name an Open-Sora config may use; only some are built here so far.
MODEL_TYPES: tuple[str, ...] = (
    "STDiT-XL/2",
    "STDiT2-XL/2",
    "STDiT3-XL/2",
    "STDiT3-3B/2",
    "DiT-XL/2",
    "DiT-XL/2x2",
    "Latte-XL/2",
    "Latte-XL/2x2",
    "PixArt-XL/2",
    "PixArt-1B/2",
    "PixArtMS-XL/2",
    "PixArt-Sigma-XL/2",
)
VAE_TYPES: tuple[str, ...] = (
    "VideoAutoencoderKL",
    "OpenSoraVAE_V1_2",
    "VAE_Temporal_SD",
    "VideoAutoencoderPipeline",
)
TEXT_ENCODER_TYPES: tuple[str, ...] = ("t5", "clip")

MODELS = {
    **STDIT3_MODELS,
    **STDIT2_MODELS,
    **STDIT_MODELS,
    **DIT_MODELS,
    **LATTE_MODELS,
    **PIXART_MODELS,
}

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

WEIGHT_FILES = ("ema.safetensors", "model.safetensors", "model.safetensors.index.json", "ema.pt", "model.pt")


def check_type(section: str, type_name: Any, valid: tuple[str, ...]) -> str:
    """Return `type_name` if it is one of `valid`; otherwise a ConfigError naming the valid types."""
    if type_name not in valid:
        raise ConfigError(f"{section}.type={type_name!r} is not a known type; valid: {', '.join(valid)}")
    return type_name


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


def build_model(
    cfg: dict[str, Any], *, in_channels: int, caption_channels: int, model_max_length: int
) -> nn.Module:
    """Build the diffusion model named by `cfg["type"]`; load `from_pretrained` strictly if given."""
    type_name = check_type("model", cfg.get("type"), MODEL_TYPES)
    kwargs = model_kwargs(
        cfg, in_channels=in_channels, caption_channels=caption_channels, model_max_length=model_max_length
    )
    accepted = inspect.signature(MODELS[type_name]).parameters
    for key in kwargs:
        if key not in accepted:  # MODEL_OPTIONS spans all types; each type takes only its own
            valid = sorted(set(accepted) - set(DERIVED_MODEL_OPTIONS))
            raise ConfigError(f"model.{key} is not an option of {type_name}; valid: {', '.join(valid)}")
    model = MODELS[type_name](**kwargs)
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
    check_type("model", type_name, MODEL_TYPES)
    settings = {"in_channels": 4, "caption_channels": 4096, "model_max_length": 300}
    settings.update(PUBLISHED_SETTINGS.get(type_name, {}))
    with torch.device("meta"):
        model = MODELS[type_name](**settings)
    return sum(p.numel() for p in model.parameters())


def weights_file(path: str | Path) -> Path:
    """The weights file for `from_pretrained`: the file itself, or the first of WEIGHT_FILES in a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{p}: no weights file in this directory; expected one of {', '.join(WEIGHT_FILES)}"
        )
    raise CheckpointError(
        f"{path}: no such file or directory (weights are never downloaded here: fetch them first, "
        "e.g. `hf download <repo> --local-dir DIR`, and point from_pretrained at DIR)"
    )


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a sharded safetensors index, or a torch .pt/.pth/.bin state dict."""
    from safetensors.torch import load_file

    try:
        if file.name.endswith(".safetensors.index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(file.parent / shard))
            return state
        if file.suffix == ".safetensors":
            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and pickle raise their own types; all mean an unreadable file
        raise CheckpointError(f"{file}: cannot read weights ({first_line(err)})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    return state


def load_model_weights(model: nn.Module, path: str | Path, *, type_name: str, section: str = "model") -> None:
    """Load weights with strict=True; a checkpoint of another model type raises CheckpointError."""
    file = weights_file(path)
    state = read_state_dict(file)
    if hasattr(model, "adapt_checkpoint"):  # e.g. fixed-size models recompute their position tables
        state = model.adapt_checkpoint(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        example = (missing or unexpected or wrong_shape)[0]
        raise CheckpointError(
            f"{file}: does not fit {section}.type={type_name!r}: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong_shape)} wrongly shaped keys (e.g. {example!r})"
        )
    model.load_state_dict(state, strict=True)
    log.info("loaded %s weights from %s", type_name, file)


def build_vae(cfg: dict[str, Any]) -> nn.Module:
    """Build the VAE named by `cfg["type"]` from its local `from_pretrained` directory."""
    from opensora_core.models.vae import VideoAutoencoderKL
    from opensora_core.models.vae_pipeline import OpenSoraVAE_V1_2, build_pipeline
    from opensora_core.models.vae_temporal import VAE_Temporal_SD

    type_name = check_type("vae", cfg.get("type"), VAE_TYPES)
    options = {k: v for k, v in cfg.items() if k != "type"}
    if type_name == "VideoAutoencoderKL":
        options.pop("micro_frame_size", None)  # a v1.2 pipeline option; the KL VAE works frame by frame
    valid = VAE_OPTIONS[type_name]
    for key in options:
        if key not in valid:
            raise ConfigError(f"vae.{key} is not a {type_name} option; valid: {', '.join(sorted(valid))}")
    if type_name == "VideoAutoencoderKL":
        if not options.get("from_pretrained"):
            raise ConfigError("vae.from_pretrained is required: a local AutoencoderKL directory")
        return VideoAutoencoderKL(**options)
    if type_name == "OpenSoraVAE_V1_2":
        return OpenSoraVAE_V1_2(**options)
    if type_name == "VideoAutoencoderPipeline":
        for key in ("vae_2d", "vae_temporal"):
            if not isinstance(options.get(key), dict):
                raise ConfigError(f"vae.{key} is required for VideoAutoencoderPipeline: a dict with its type")
        return build_pipeline(options.pop("vae_2d"), options.pop("vae_temporal"), **options)
    weights = options.pop("from_pretrained", None)
    model = VAE_Temporal_SD(**options)
    if weights:
        load_model_weights(model, weights, type_name=type_name, section="vae")
    return model


def build_text_encoder(
    cfg: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Build the text encoder named by `cfg["type"]` (frozen, eval mode) on `device`."""
    from opensora_core.models.text_encoder import ClipEncoder, T5Encoder

    type_name = check_type("text_encoder", cfg.get("type"), TEXT_ENCODER_TYPES)
    options = {k: v for k, v in cfg.items() if k != "type"}
    valid = TEXT_ENCODER_OPTIONS[type_name]
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"text_encoder.{key} is not a {type_name} option; valid: {', '.join(sorted(valid))}"
            )
    encoder_class, kind = {"t5": (T5Encoder, "T5"), "clip": (ClipEncoder, "CLIP")}[type_name]
    if not options.get("from_pretrained"):
        raise ConfigError(f"text_encoder.from_pretrained is required: a local {kind} directory")
    return encoder_class(**options, device=device, dtype=dtype)


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
        },
    }[section]
    check_type(section, type_name, tuple(builders))
    with torch.device("meta"):
        model = builders[type_name]()
    return sum(p.numel() for p in model.parameters())
