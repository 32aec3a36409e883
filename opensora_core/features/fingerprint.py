"""A cheap fingerprint of a frozen encoder (VAE or text encoder): its output-changing settings and its
weight files, without loading a model, so training can check a feature snapshot on the driver."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opensora_core.config.schema import resolve_path

# Options that change how an encoder runs (memory, parallelism, where files come from), never its output.
RUNTIME_OPTIONS = frozenset({"micro_batch_size", "shardformer", "local_files_only", "cache_dir", "device"})
EDGE_BYTES = 1 << 20  # a weight file is fingerprinted by its size and its first and last MiB


def encoder_fingerprint(section: Mapping[str, Any]) -> str:
    """16 hex digits naming what an encoder section computes.

    A local `from_pretrained` file or directory contributes each file's relative name, size and a hash of
    its first and last MiB (not its path or mtime: weights copied to another machine keep their
    fingerprint); a name that is not a local path (a hub id) is hashed as a name. Nested sections (the
    `vae_2d` / `vae_temporal` of a VideoAutoencoderPipeline) are fingerprinted the same way.
    """
    return hashlib.sha256(json.dumps(_describe(section), sort_keys=True).encode()).hexdigest()[:16]


def _describe(section: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key in RUNTIME_OPTIONS:
            continue
        if isinstance(value, Mapping):
            out[key] = _describe(value)
        elif key == "from_pretrained" and isinstance(value, str):
            out[key] = _weights(value)
        else:
            out[key] = _plain(value)
    return out


def _weights(name: str) -> Any:
    path = resolve_path(name)
    if path is None or not path.exists():
        return {"name": name}  # a hub id (or a path that is not here): only its name is known
    if path.is_file():
        return [_file_entry(path, path.name)]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [_file_entry(p, p.relative_to(path).as_posix()) for p in files]


def _file_entry(path: Path, name: str) -> list[Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            fh.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(fh.read(EDGE_BYTES))
    return [name, size, digest.hexdigest()]


def _plain(value: Any) -> Any:
    """Tuples as lists, anything JSON cannot hold as its repr, so equal settings hash equally."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
