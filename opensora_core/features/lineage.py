"""Pre-flight for training from a feature snapshot, on the driver before any Ray worker starts.

`feature_input` finds the feature snapshot (`--features`, else the `feature_snapshot` key, else
`{outputs}/features`) and refuses, in one line naming both ids, one made for another bucket
snapshot, VAE, text encoder (fingerprints, when the config has those sections) or
`model_max_length`; it checks the latent channels and caption width against the model config
(`model.in_channels` / `model.caption_channels`, `vae_out_channels`, `text_encoder_output_dim`).
What it returns is what the workers need instead of the encoders: the model's input sizes.

It also says, once each, what Open-Sora's feature-training keys mean here: our features hold the
raw text-encoder output, so the model's y_embedder still runs on them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core import storage
from opensora_core.config.schema import ComponentSpec, ValidatedConfig
from opensora_core.errors import ConfigError
from opensora_core.features.settings import FEATURES_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureInput:
    """The feature snapshot a training run reads, as the workers get it (plain data)."""

    path: str  # the feature snapshot directory
    feature_id: str
    bucket_snapshot_dir: str  # the bucket snapshot it was made for: the sampler's buckets
    video: bool  # stored latents replace the VAE
    text: bool  # stored captions replace the text encoder
    in_channels: int | None  # latent channels (video features)
    caption_channels: int | None  # caption width (text features)
    model_max_length: int | None  # padded caption length (text features)
    caption_dropout: str = "model"  # "model" | "empty" (opensora_core.train.step)


def feature_root(cfg: ValidatedConfig) -> Path | str:
    """Where `opensora precompute` publishes and training looks: `feature_snapshot` when it names a root
    (not one snapshot's directory), else `{outputs}/features`."""
    from opensora_core.config.schema import resolve_path
    from opensora_core.features.store import MANIFEST_NAME

    named = cfg.features.snapshot if cfg.features else None
    if named and not (storage.is_uri(named) or (resolve_path(named) / MANIFEST_NAME).is_file()):
        return resolve_path(named)
    outputs = cfg.training.outputs
    return storage.join(outputs, FEATURES_DIR) if storage.is_uri(outputs) else Path(outputs) / FEATURES_DIR


def feature_input(
    cfg: ValidatedConfig, *, snapshot_dir: str | None, features: str | None
) -> FeatureInput | None:
    """The checked feature snapshot of a config that trains from features (None when it does not)."""
    from opensora_core.data.snapshot import open_snapshot
    from opensora_core.features.store import open_features

    settings = cfg.features
    if settings is None or not settings.enabled:
        if features:
            raise ConfigError(
                f"features={features}: the config reads no features; set load_video_features = True "
                "and/or load_text_features = True"
            )
        return None
    if cfg.raw.get("synthetic_data"):
        raise ConfigError(
            "synthetic_data: synthetic clips are raw video and captions, but this config trains from stored "
            "features (load_video_features / load_text_features); drop one of the two"
        )
    stored = open_features(features or settings.snapshot or feature_root(cfg))
    m = stored.manifest
    for wanted, held, what in (
        (settings.load_video_features, m.video_features, "video"),
        (settings.load_text_features, m.text_features, "text"),
    ):
        if wanted and not held:
            raise ConfigError(
                f"feature snapshot {m.feature_id} has no {what} features but load_{what}_features = True; "
                f"run `opensora precompute` with load_{what}_features = True"
            )
    bucket_dir = snapshot_dir or m.bucket_snapshot_path
    bucket_id = open_snapshot(bucket_dir).manifest.snapshot_id
    if bucket_id != m.bucket_snapshot_id:
        raise ConfigError(
            f"feature snapshot {m.feature_id} was made for bucket snapshot {m.bucket_snapshot_id}, but training "
            f"reads bucket snapshot {bucket_id} ({bucket_dir}); run `opensora precompute` for it"
        )
    _explain_open_sora_keys(cfg)
    video = settings.load_video_features
    text = settings.load_text_features
    if video:
        _check_encoder(cfg, "vae", m.feature_id, m.vae)
    if text:
        _check_encoder(cfg, "text_encoder", m.feature_id, m.text_encoder)
    in_channels = m.vae.output_dim if video else None
    caption_channels = m.text_encoder.output_dim if text else None
    max_length = m.text_encoder.model_max_length if text else None
    raw = cfg.raw
    model = cfg.model.options
    for key, value, stored_value, what in (
        ("vae_out_channels", raw.get("vae_out_channels"), in_channels, "latent channels"),
        ("model.in_channels", model.get("in_channels"), in_channels, "latent channels"),
        ("text_encoder_output_dim", raw.get("text_encoder_output_dim"), caption_channels, "caption width"),
        ("model.caption_channels", model.get("caption_channels"), caption_channels, "caption width"),
        ("model_max_length", raw.get("model_max_length"), max_length, "caption length"),
        ("model.model_max_length", model.get("model_max_length"), max_length, "caption length"),
    ):
        if value is not None and stored_value is not None and value != stored_value:
            raise ConfigError(
                f"{key}={value}: feature snapshot {m.feature_id} stores {what} {stored_value}; "
                f"set {key} = {stored_value} or run `opensora precompute` again"
            )
    return FeatureInput(
        path=str(Path(stored.path).resolve()),
        feature_id=m.feature_id,
        bucket_snapshot_dir=str(bucket_dir),
        video=video,
        text=text,
        in_channels=in_channels,
        caption_channels=caption_channels,
        model_max_length=max_length,
        caption_dropout=settings.caption_dropout,
    )


def _check_encoder(cfg: ValidatedConfig, key: str, feature_id: str, info: Any) -> None:
    """A `vae` / `text_encoder` section the config still has must be the one the features were made with."""
    from opensora_core.features.fingerprint import encoder_fingerprint
    from opensora_core.train import absolute_paths

    spec: ComponentSpec | None = getattr(cfg, key)
    if key == "text_encoder":
        wanted = (spec.options.get("model_max_length") if spec else None) or cfg.raw.get("model_max_length")
        if wanted is not None and wanted != info.model_max_length:
            raise ConfigError(
                f"text_encoder.model_max_length={wanted}: feature snapshot {feature_id} stores captions of "
                f"{info.model_max_length} tokens; run `opensora precompute` again"
            )
    if spec is None:
        return
    section = absolute_paths({key: spec.as_dict()})[key]
    fingerprint = encoder_fingerprint(section)
    if fingerprint != info.fingerprint:
        raise ConfigError(
            f"{key}: feature snapshot {feature_id} was made with {key} {info.fingerprint} "
            f"({info.config.get('type')}), the config's is {fingerprint} ({spec.type}); "
            "run `opensora precompute` again"
        )


def _explain_open_sora_keys(cfg: ValidatedConfig) -> None:
    """One line for each Open-Sora feature-training key the config sets, on what it means here."""
    dataset = cfg.dataset.options if cfg.dataset else {}
    if dataset.get("dummy_text_feature"):
        log.info(
            "dataset.dummy_text_feature=True: captions come from the feature snapshot; nothing else to do"
        )
    if cfg.model.options.get("freeze_y_embedder"):
        log.info(
            "model.freeze_y_embedder=True: the y_embedder projecting the stored text-encoder features "
            "is not trained"
        )
    if cfg.model.options.get("skip_y_embedder") and cfg.features.load_text_features:
        log.info(
            "model.skip_y_embedder=True: our features hold the raw text-encoder output, so the y_embedder "
            "still runs on them; it is frozen instead (as freeze_y_embedder=True)"
        )


def model_section(model: dict[str, Any], features: FeatureInput | None) -> dict[str, Any]:
    """The `model` section the workers build from features: skip_y_embedder becomes freeze_y_embedder
    (see `_explain_open_sora_keys`); with caption_dropout "empty" the model's own dropout is off."""
    if features is None:
        return model
    model = dict(model)
    if features.text and model.get("skip_y_embedder"):
        model.update(skip_y_embedder=False, freeze_y_embedder=True)
    if features.caption_dropout == "empty":
        model["class_dropout_prob"] = 0.0
    return model


def class_dropout_prob(model: dict[str, Any]) -> float:
    """The model's caption dropout probability: its section's `class_dropout_prob`, else its preset's default."""
    import inspect

    from opensora_core.models.registry import model_preset

    if model.get("class_dropout_prob") is not None:
        return float(model["class_dropout_prob"])
    preset = model_preset(model["type"])
    keywords = getattr(preset, "keywords", None) or {}
    if "class_dropout_prob" in keywords:
        return float(keywords["class_dropout_prob"])
    parameter = inspect.signature(preset).parameters.get("class_dropout_prob")
    return float(parameter.default) if parameter is not None else 0.0


def sampling_config(cfg: ValidatedConfig) -> ValidatedConfig:
    """`cfg` ready for evaluation sampling, which builds the VAE and text encoder: a feature-training
    config without those sections (Open-Sora's stage1_feat.py) takes them from the feature
    manifest; skip_y_embedder is dropped (the model's y_embedder runs on raw encoder output)."""
    from opensora_core.features.store import open_features

    if cfg.features is None or not cfg.features.enabled:
        return cfg
    changes: dict[str, Any] = {}
    if cfg.model.options.get("skip_y_embedder"):
        options = {**cfg.model.options, "skip_y_embedder": False, "freeze_y_embedder": True}
        changes["model"] = dataclasses.replace(cfg.model, options=options)
    missing = [key for key in ("vae", "text_encoder") if getattr(cfg, key) is None]
    if missing:
        manifest = open_features(cfg.features.snapshot or feature_root(cfg)).manifest
        for key in missing:
            info = getattr(manifest, key)
            if info is None:
                raise ConfigError(
                    f"{key}: missing, and feature snapshot {manifest.feature_id} does not name one; "
                    f"evaluation needs {key} = dict(type=..., ...)"
                )
            options = dict(info.config)
            changes[key] = ComponentSpec(key, options.pop("type"), options)
    return dataclasses.replace(cfg, **changes) if changes else cfg
