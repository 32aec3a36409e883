"""Load an MMEngine-style `.py` config and apply command-line overrides the way Open-Sora does.

Loading a config executes it as Python: only load files the user named.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmengine.config import Config

from opensora_core.config.legacy import upgrade_legacy_layout
from opensora_core.errors import ConfigError

# CLI argument -> nested config key. Every other argument given on the command line is set at
# the top level of the config under its own name (dashes become underscores), as in Open-Sora.
NESTED_ARGS: dict[str, str] = {
    "ckpt_path": "model.from_pretrained",
    "flash_attn": "model.enable_flash_attn",
    "layernorm_kernel": "model.enable_layernorm_kernel",
    "data_path": "dataset.data_path",
}
# Inference-only mappings.
NESTED_SAMPLE_ARGS: dict[str, str] = {
    "cfg_scale": "scheduler.cfg_scale",
    "num_sampling_steps": "scheduler.num_sampling_steps",
}


def read_config(path: str | Path) -> Config:
    """Parse a config file with MMEngine (`_base_` inheritance, `_delete_`, tuples kept)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a .py config")
    if path.suffix != ".py":
        raise ConfigError(f"config file {str(path)!r} must be a Python (.py) MMEngine config")
    try:
        cfg = Config.fromfile(str(path))
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: syntax error in config: {err.msg}") from None
    except Exception as err:  # mmengine wraps user errors in many types; report them in one line
        raise ConfigError(f"{path}: cannot load config: {type(err).__name__}: {err}") from None
    return upgrade_legacy_layout(cfg, str(path))


def apply_args(cfg: Config, args: Mapping[str, Any], *, training: bool) -> Config:
    """Merge parsed CLI arguments into `cfg` (values that are None were not given)."""
    mapping = dict(NESTED_ARGS)
    if not training:
        mapping.update(NESTED_SAMPLE_ARGS)
    for name, value in args.items():
        if value is None or name in ("config", "cfg_options", "command", "mode", "func"):
            continue
        if value is False and name in ("prompt_as_path", "start_from_scratch"):
            continue  # store_true flags that were not given
        if name in mapping:
            _set_nested(cfg, mapping[name], value)
        elif not training and name in ("image_size", "num_frames") and cfg.get("dataset") is not None:
            _set_nested(cfg, f"dataset.{name}", value)
        else:
            cfg[name] = value
    options = args.get("cfg_options")
    if options:
        for dotted, value in parse_cfg_options(options).items():
            set_option(cfg, dotted, value)
    return cfg


def set_option(cfg: Config, dotted: str, value: Any) -> None:
    """Set `a.b.c` in place. A numeric part addresses an int key (bucket frame counts are ints)."""
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        key: Any = part
        if part.lstrip("-").isdigit() and (int(part) in node or part not in node):
            key = int(part) if (int(part) in node or _has_int_keys(node)) else part
        if i == len(parts) - 1:
            node[key] = value
            return
        if key not in node or node[key] is None:
            node[key] = {}
        elif not hasattr(node[key], "keys"):
            raise ConfigError(f"--cfg-options {dotted}: {'.'.join(parts[: i + 1])} is not a dict")
        node = node[key]


def _has_int_keys(node: Any) -> bool:
    return any(isinstance(k, int) for k in node.keys())


def parse_cfg_options(options: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """`["model.depth=2", "bucket_config.144p.1=(1.0, 4)"]` -> {"model.depth": 2, ...}.

    Values are Python literals when they parse as one, strings otherwise.
    """
    if isinstance(options, Mapping):
        return dict(options)
    parsed: dict[str, Any] = {}
    for item in options:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cfg-options {item!r}: expected KEY=VALUE, e.g. model.depth=2")
        parsed[key.strip()] = _literal(raw.strip())
    return parsed


def _literal(raw: str) -> Any:
    if raw in ("None", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _set_nested(cfg: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if cfg.get(section) is None:
        cfg[section] = {}
    cfg[section][key] = value
