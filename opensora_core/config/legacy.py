"""Config layouts of earlier Open-Sora releases, read as the current layout (no torch).

v1.0.0's training configs have no `dataset` section: `data_path`, `root`, `num_frames`, `frame_interval`,
`image_size` and `use_image_transform` sit at the top level, and its train script built a fixed-size
dataset of them (resize the short side, centre crop: `center` here, for video and image transforms both).
"""

from __future__ import annotations

import logging

from mmengine.config import Config

from opensora_core.errors import ConfigError

log = logging.getLogger(__name__)

V1_0_DATASET_KEYS = ("data_path", "root", "use_image_transform")


def upgrade_legacy_layout(cfg: Config, path: str) -> Config:
    """`cfg` with v1.0's top-level dataset keys turned into `dataset = dict(type="VideoTextDataset", ...)`."""
    if cfg.get("dataset") is not None or "data_path" not in cfg:
        return cfg
    if cfg.get("root"):
        raise ConfigError(
            f"{path}: root={cfg.root!r}: v1.0's prefix for the CSV's relative paths is not supported; "
            "set data_path to the folder of clips (or a metadata table) and root = None"
        )
    image_size = cfg.get("image_size")
    if image_size is not None and not isinstance(image_size, (list, tuple)):
        image_size = (image_size, image_size)
    cfg.dataset = dict(
        type="VideoTextDataset",
        data_path=cfg.data_path,
        num_frames=cfg.get("num_frames"),
        frame_interval=cfg.get("frame_interval", 1),
        image_size=tuple(image_size) if image_size is not None else None,
        transform_name="center",
    )
    for key in V1_0_DATASET_KEYS:
        cfg.pop(key, None)
    log.info(
        "%s: v1.0's top-level data_path / num_frames / frame_interval / image_size read as "
        "dataset = dict(type='VideoTextDataset', transform_name='center', ...)",
        path,
    )
    return cfg
