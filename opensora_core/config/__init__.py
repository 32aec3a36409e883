"""The one config reader: MMEngine `.py` files, Open-Sora's CLI overrides, validated into typed views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opensora_core.config.load import apply_args, parse_cfg_options, read_config
from opensora_core.config.schema import ComponentSpec, Mode, ValidatedConfig, detect_mode, validate_config

__all__ = [
    "ComponentSpec",
    "ValidatedConfig",
    "load_config",
    "parse_cfg_options",
    "read_config",
    "validate_config",
]


def load_config(
    path: str | Path,
    args: Mapping[str, Any] | None = None,
    *,
    cfg_options: Sequence[str] | Mapping[str, Any] | None = None,
    mode: Mode | None = None,
    needs_scheduler: bool = True,
) -> ValidatedConfig:
    """Read `path`, apply CLI `args` (argparse names, None = not given) and `cfg_options`, validate
    (`needs_scheduler`: see `validate_config`)."""
    cfg = read_config(path)
    mode = mode or detect_mode(cfg)
    merged = dict(args or {})
    if cfg_options:
        merged["cfg_options"] = cfg_options
    apply_args(cfg, merged, training=mode == "train")
    return validate_config(cfg, mode=mode, path=str(path), needs_scheduler=needs_scheduler)
