"""How a config's `type` string names a class: "package.module:attribute", imported only when built.

Registries are plain dicts of such strings, so naming and validating a type never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from opensora_core.errors import ConfigError


def check_type(section: str, type_name: Any, valid: Iterable[str]) -> str:
    """Return `type_name` if it is one of `valid`; otherwise a ConfigError naming the section and the valid types."""
    valid = tuple(valid)
    if type_name is None:
        raise ConfigError(f"{section}.type: missing; valid types: {', '.join(valid)}")
    if type_name not in valid:
        raise ConfigError(f"{section}.type={type_name!r} is unknown; valid types: {', '.join(valid)}")
    return type_name


def resolve(target: str) -> Any:
    """The object a registry entry "package.module:attribute" names (importing its module)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
