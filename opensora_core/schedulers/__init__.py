"""Diffusion schedulers by the config's `scheduler.type`: training losses and sampling steps (`set_timesteps` / `step`)."""

from __future__ import annotations

import inspect
from typing import Any

from opensora_core.errors import ConfigError
from opensora_core.schedulers.dpm_solver import DPMSolver
from opensora_core.schedulers.iddpm import IDDPM, IDDPMSpeed
from opensora_core.schedulers.rflow import RFlow

# Every name an Open-Sora config may use.
SCHEDULER_TYPES: tuple[str, ...] = ("iddpm", "iddpm-speed", "dpm-solver", "rflow")
# Types with no training loss: a training config naming one is rejected when it is loaded.
SAMPLING_ONLY_SCHEDULERS: tuple[str, ...] = ("dpm-solver",)
SCHEDULERS = {"iddpm": IDDPM, "iddpm-speed": IDDPMSpeed, "dpm-solver": DPMSolver, "rflow": RFlow}
Scheduler = IDDPM | DPMSolver | RFlow


def build_scheduler(cfg: dict[str, Any]) -> Scheduler:
    """The scheduler named by `cfg["type"]`, built from the other keys of the config's `scheduler` dict."""
    type_name = cfg.get("type")
    if type_name not in SCHEDULER_TYPES:
        raise ConfigError(
            f"scheduler.type={type_name!r} is not a known type; valid: {', '.join(SCHEDULER_TYPES)}"
        )
    cls = SCHEDULERS[type_name]
    valid = [name for name in inspect.signature(cls).parameters if name != "self"]
    options = {k: v for k, v in cfg.items() if k != "type"}
    for key in options:
        if key not in valid:
            raise ConfigError(f"scheduler.{key} is not a {type_name} option; valid: {', '.join(valid)}")
    return cls(**options)


__all__ = [
    "SAMPLING_ONLY_SCHEDULERS",
    "SCHEDULER_TYPES",
    "build_scheduler",
    "DPMSolver",
    "IDDPM",
    "IDDPMSpeed",
    "RFlow",
]
