"""A fingerprint of a frozen encoder: its config section's settings and its weights files.

Two sections fingerprint alike when they would encode alike: the same options (the weights'
location left out, so a moved copy of the same files matches) and the same files under
`from_pretrained` (each file's relative path, size and a hash of its first and last MiB, so a
multi-GB checkpoint is fingerprinted in milliseconds). A hub name that is not a local path
fingerprints by its name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 1 << 20
# options that change where or how the weights are read, never what the encoder computes
_NOT_FINGERPRINTED = ("from_pretrained", "local_files_only", "cache_dir", "shardformer")


def encoder_fingerprint(section: dict[str, Any]) -> str:
    """A short hex digest of `section` (`dict(type=..., **options)`) and its `from_pretrained` files."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in section.items() if k not in _NOT_FINGERPRINTED}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    weights = section.get("from_pretrained")
    if weights:
        path = Path(weights)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                _add_file(digest, file, file.relative_to(path).as_posix())
        elif path.is_file():
            _add_file(digest, path, path.name)
        else:
            digest.update(f"hub:{weights}".encode())
    return digest.hexdigest()[:16]


def _add_file(digest: Any, file: Path, name: str) -> None:
    size = file.stat().st_size
    digest.update(f"{name}\0{size}\0".encode())
    with file.open("rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            f.seek(size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
