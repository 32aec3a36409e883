"""Diffusion schedulers by the config's `scheduler.type`: training losses and sampling loops."""

from __future__ import annotations

import inspect
from typing import Any

from opensora_core.errors import ConfigError
from opensora_core.schedulers.rflow import RFlow

# Every name an Open-Sora config may use; only some are built here so far.
SCHEDULER_TYPES: tuple[str, ...] = ("iddpm", "iddpm-speed", "dpm-solver", "rflow")
SCHEDULERS = {"rflow": RFlow}


def build_scheduler(cfg: dict[str, Any]) -> RFlow:
    """The scheduler named by `cfg["type"]`, built from the other keys of the config's `scheduler` dict."""
    type_name = cfg.get("type")
    if type_name not in SCHEDULER_TYPES:
        raise ConfigError(
            f"scheduler.type={type_name!r} is not a known type; valid: {', '.join(SCHEDULER_TYPES)}"
        )
    if type_name not in SCHEDULERS:
        raise ConfigError(
            f"scheduler.type={type_name!r} is not available in this build yet; available: {', '.join(SCHEDULERS)}"
        )
    cls = SCHEDULERS[type_name]
    valid = [name for name in inspect.signature(cls).parameters if name != "self"]
    options = {k: v for k, v in cfg.items() if k != "type"}
    for key in options:
        if key not in valid:
            raise ConfigError(f"scheduler.{key} is not a {type_name} option; valid: {', '.join(valid)}")
    return cls(**options)


__all__ = ["SCHEDULER_TYPES", "build_scheduler", "RFlow"]
