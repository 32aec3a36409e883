"""The config keys of the feature cache (no torch): Open-Sora's names plus `feature_views` and
`feature_snapshot`.

    load_video_features = True   # train from stored VAE latents (no VAE on the workers)
    load_text_features = True    # train from stored caption embeddings (no text encoder)
    feature_views = 1            # encodings per clip, each its own crop; training picks one per epoch
    feature_snapshot = None      # a feature snapshot directory or root; default {outputs}/features
    caption_dropout = "model"    # "model": the model's y_embedder drops captions to its learned null;
                                 # "empty": the stored "" caption's embedding replaces them instead

Open-Sora's extraction keys (`save_text_features`, `save_compressed_text_features`, `bin_size`,
`log_time`) are accepted: captions are always stored without padding, in Parquet shards per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opensora_core.errors import ConfigError

FEATURES_DIR = "features"  # under `outputs`
CAPTION_DROPOUT = ("model", "empty")


@dataclass(frozen=True)
class FeatureSettings:
    load_video_features: bool
    load_text_features: bool
    views: int
    snapshot: str | None  # as the config gives it
    caption_dropout: str = "model"  # one of CAPTION_DROPOUT

    @property
    def enabled(self) -> bool:
        """Whether training reads a feature snapshot (and the pipeline runs precompute first)."""
        return self.load_video_features or self.load_text_features


def feature_settings(cfg: Any) -> FeatureSettings:
    """The feature keys of a config (an MMEngine Config or a dict); ConfigError names a bad one."""

    def flag(key: str) -> bool:
        value = cfg.get(key, False)
        if value in (None, False, 0):
            return False
        if value is True or value == 1:
            return True
        raise ConfigError(f"{key}={value!r}: expected True or False")

    views = cfg.get("feature_views", 1)
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ConfigError(f"feature_views={views!r}: expected a whole number >= 1 (encodings per clip)")
    snapshot = cfg.get("feature_snapshot")
    if snapshot is not None and not isinstance(snapshot, str):
        raise ConfigError(f"feature_snapshot={snapshot!r}: expected a path or URI string")
    dropout = cfg.get("caption_dropout", "model") or "model"
    if dropout not in CAPTION_DROPOUT:
        raise ConfigError(
            f"caption_dropout={dropout!r}: expected one of {', '.join(CAPTION_DROPOUT)} "
            "(the model's learned null caption, or the stored empty caption's embedding)"
        )
    return FeatureSettings(flag("load_video_features"), flag("load_text_features"), views, snapshot, dropout)
