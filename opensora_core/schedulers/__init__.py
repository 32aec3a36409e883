"""Diffusion schedulers by the config's `scheduler.type`: training losses and sampling steps
(`set_timesteps` / `step`); `opensora_core.sample.sampling_loop` runs them.

The registry names each class as "module:attribute" (see `opensora_core.registry`), so checking a
type imports no torch; `build_scheduler` imports the one module it builds from.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from opensora_core.errors import ConfigError
from opensora_core.registry import check_type, resolve

if TYPE_CHECKING:
    from opensora_core.schedulers.dpm_solver import DPMSolver
    from opensora_core.schedulers.iddpm import IDDPM
    from opensora_core.schedulers.rflow import RFlow

    Scheduler = IDDPM | DPMSolver | RFlow

SCHEDULERS: dict[str, str] = {
    "iddpm": "opensora_core.schedulers.iddpm:IDDPM",
    "iddpm-speed": "opensora_core.schedulers.iddpm:IDDPMSpeed",
    "dpm-solver": "opensora_core.schedulers.dpm_solver:DPMSolver",
    "rflow": "opensora_core.schedulers.rflow:RFlow",
}
SCHEDULER_TYPES: tuple[str, ...] = tuple(SCHEDULERS)
# Types with no training loss: a training config naming one is rejected when it is loaded.
SAMPLING_ONLY_SCHEDULERS: tuple[str, ...] = ("dpm-solver",)


def check_scheduler_type(type_name: Any, *, training: bool = False) -> str:
    """`type_name` if it names a scheduler (one with a training loss when `training`); else a ConfigError."""
    check_type("scheduler", type_name, SCHEDULER_TYPES)
    if training and type_name in SAMPLING_ONLY_SCHEDULERS:
        trainable = [t for t in SCHEDULER_TYPES if t not in SAMPLING_ONLY_SCHEDULERS]
        raise ConfigError(
            f"scheduler.type={type_name!r} only samples; a training config needs one of {', '.join(trainable)}"
        )
    return type_name


def scheduler_class(type_name: str) -> type:
    """The class `type_name` names (imports its module, and so torch)."""
    return resolve(SCHEDULERS[check_scheduler_type(type_name)])


def build_scheduler(cfg: dict[str, Any]) -> Scheduler:
    """The scheduler named by `cfg["type"]`, built from the other keys of the config's `scheduler` dict."""
    type_name = check_scheduler_type(cfg.get("type"))
    cls = scheduler_class(type_name)
    valid = [name for name in inspect.signature(cls).parameters if name != "self"]
    options = {k: v for k, v in cfg.items() if k != "type"}
    for key in options:
        if key not in valid:
            raise ConfigError(f"scheduler.{key} is not a {type_name} option; valid: {', '.join(valid)}")
    return cls(**options)


__all__ = [
    "SAMPLING_ONLY_SCHEDULERS",
    "SCHEDULERS",
    "SCHEDULER_TYPES",
    "build_scheduler",
    "check_scheduler_type",
    "scheduler_class",
]
