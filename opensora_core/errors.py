"""Errors a user can act on: each names the file or key and what would be valid."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class OpenSoraError(Exception):
    """Base class for errors reported to the user as one line, without a traceback."""


class ConfigError(OpenSoraError):
    """A config key holds a value we cannot use (message names the key and the valid values)."""


class MediaError(OpenSoraError):
    """A media file cannot be read (message names the file and why)."""


class CheckpointError(OpenSoraError):
    """A checkpoint is missing, incomplete or belongs to another model."""


class StorageError(OpenSoraError):
    """A write ran out of disk space or quota; the message names the state that was kept intact."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's message cut to its first line (a library's may run to pages) and to `limit`
    characters, or its type's name."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(code) for code in _FULL_ERRNOS)  # how libraries that drop errno word it
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(err: BaseException, path: str | Path) -> bool:
    """Whether `err`, raised while writing under `path`, means the filesystem ran out of space or quota.

    Call it before removing the partial files. Python and pyarrow set errno; safetensors only words it
    ("No space left on device (os error 28)"); torch.save reports a bare short write ("unexpected pos"),
    whose one sign is a filesystem with no space left.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) in _FULL_ERRNOS or any(t in str(current) for t in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    if not isinstance(err, (OSError, RuntimeError)):
        return False  # a bug is never reported as a full disk
    try:
        return shutil.disk_usage(path).free < _NEARLY_FULL_BYTES
    except OSError:
        return False
