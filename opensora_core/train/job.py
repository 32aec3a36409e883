"""What each training worker is given: the validated settings and the run's keys, in one picklable value.

Built once on the driver (`train_job`); the workers read it and never fall back to defaults of their own.
Training from a feature snapshot (`features`, checked by opensora_core.features.lineage) the job has no
`vae` and / or `text_encoder` section: the workers build neither and take the model's input sizes
from the feature manifest. A VAE job (`model` a VAE type, Open-Sora's train_vae.py) has neither section
nor a scheduler: it carries `vae_loss` instead, and reads fixed-size clips of `clips_table`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from opensora_core.config.schema import TrainingSettings, ValidatedConfig, validate_config
from opensora_core.errors import ConfigError
from opensora_core.features.lineage import FeatureInput, class_dropout_prob, model_section
from opensora_core.train.vae_settings import VaeLossSettings


@dataclass(frozen=True)
class TrainJob:
    """One training run as the workers see it; plain data, so Ray pickles it to every worker."""

    settings: TrainingSettings  # `settings.load` is absolute (a path or a URI)
    model: dict[str, Any]  # the component sections as `dict(type=..., **options)`
    vae: dict[str, Any] | None  # None: the latents are stored in `features`
    text_encoder: dict[str, Any] | None  # None: the captions are stored in `features`
    scheduler: dict[str, Any] | None  # None: a VAE job
    dataset: dict[str, Any] | None
    mask_ratios: dict[str, float] | None
    output_dir: str  # local directory of the run: checkpoints are saved here first
    snapshot_dir: str | None  # the bucket snapshot; None with `synthetic_data`
    config_text: str  # the config file as resolved, saved beside each checkpoint
    checkpoint_uri: str | None = None  # shared storage each saved checkpoint is copied to
    mlflow_run_id: str | None = None
    synthetic_data: dict[str, Any] | None = None  # random clips instead of a snapshot: tests, benchmarks
    features: FeatureInput | None = None  # the feature snapshot the batches are read from
    empty_caption_prob: float = 0.0  # caption_dropout "empty": captions replaced by the stored "" caption
    progress: Any = (
        None  # a train.progress.TrainingProgress actor: rank 0 reports each step to the driver's bar
    )
    clips_table: str | None = None  # VideoTextDataset: a metadata table or snapshot of fixed-size clips
    vae_loss: VaeLossSettings | None = None  # set for a VAE model: its losses (train_vae.py)

    @property
    def model_type(self) -> str:
        return self.model["type"]

    @property
    def is_vae(self) -> bool:
        return self.vae_loss is not None


def training_config(cfg: Any) -> ValidatedConfig:
    """`cfg` as a validated training config: a `ValidatedConfig` as it is, an MMEngine `Config` checked now."""
    validated = cfg if isinstance(cfg, ValidatedConfig) else validate_config(cfg, mode="train")
    if validated.training is None:
        raise ConfigError(f"{validated.path}: not a training config (it has no dataset or bucket_config)")
    return validated


def train_job(
    cfg: Any,
    *,
    snapshot_dir: str | None,
    output_dir: str,
    mlflow_run_id: str | None = None,
    checkpoint_uri: str | None = None,
    features: FeatureInput | None = None,
    clips_table: str | None = None,
) -> TrainJob:
    """The job for `cfg` (a `ValidatedConfig`, or an MMEngine `Config`, validated here as a training config),
    reading the checked feature snapshot `features` when given.

    Local paths in the config (`from_pretrained`, `load`) are made absolute: the workers run elsewhere.
    """
    from opensora_core.train import absolute_paths

    validated = training_config(cfg)
    raw = absolute_paths(validated.raw.to_dict())
    if validated.is_vae_model:
        return TrainJob(
            settings=dataclasses.replace(validated.training, load=raw.get("load")),
            model=raw["model"], vae=None, text_encoder=None, scheduler=None, dataset=raw.get("dataset"),
            mask_ratios=None, output_dir=str(output_dir), snapshot_dir=None, config_text=validated.raw.pretty_text,
            checkpoint_uri=checkpoint_uri, mlflow_run_id=mlflow_run_id,
            synthetic_data=raw.get("synthetic_data") or None, clips_table=clips_table,
            vae_loss=dataclasses.replace(  # with the paths made absolute
                validated.vae_loss, lpips_path=raw.get("lpips_path"), discriminator=raw.get("discriminator")
            ),
        )  # fmt: skip
    stored = {
        "vae": features is not None and features.video,
        "text_encoder": features is not None and features.text,
    }
    for key in ("vae", "text_encoder"):
        if not raw.get(key) and not stored[key]:
            raise ConfigError(
                f"{key}: missing; training encodes its batches with {key} = dict(type=..., ...)"
            )
    dropout = features is not None and features.caption_dropout == "empty"
    return TrainJob(
        settings=dataclasses.replace(validated.training, load=raw.get("load")),
        model=model_section(raw["model"], features),
        vae=None if stored["vae"] else raw["vae"],
        text_encoder=None if stored["text_encoder"] else raw["text_encoder"],
        scheduler=raw["scheduler"],
        dataset=raw.get("dataset"),
        mask_ratios=raw.get("mask_ratios") or None,
        output_dir=str(output_dir),
        snapshot_dir=snapshot_dir or None,
        config_text=validated.raw.pretty_text,
        checkpoint_uri=checkpoint_uri,
        mlflow_run_id=mlflow_run_id,
        synthetic_data=raw.get("synthetic_data") or None,
        features=features,
        empty_caption_prob=class_dropout_prob(raw["model"]) if dropout else 0.0,
    )
