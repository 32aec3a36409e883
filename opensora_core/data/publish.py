"""Putting a finished snapshot (bucket or feature) in place: its staging folder, the rename into place and
the atomic `CURRENT` switch, the copy to shared storage, and the clean-up of what builds that died left
behind."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from opensora_core.data.manifest import MANIFEST_NAME
from opensora_core.data.snapshot import CURRENT_NAME
from opensora_core.errors import StorageError
from opensora_core.storage import Location, upload_dir, upload_file

TMP_PREFIX = ".tmp-"  # a build in progress (or one that died): never a snapshot
_TMP_OWNER = re.compile(r"-pid(\d+)@(.+)$")  # see _build_owner

log = logging.getLogger(__name__)


def staging_dir(root: Path, snapshot_id: str) -> Path:
    """A new folder name under `root` for building `snapshot_id` in (not created): no reader opens it,
    and its name says which process on which host owns it."""
    return root / f"{TMP_PREFIX}{snapshot_id}-{uuid.uuid4().hex[:8]}-{_build_owner()}"


def move_into_place(tmp: Path, root: Path, snapshot_id: str, shared: Location | None = None) -> Path:
    """Rename the complete build `tmp` to `root/<snapshot_id>`, or `<snapshot_id>-N` when that name is
    taken here or on `shared` (two builds in the same second with the same inputs)."""
    final = root / snapshot_id
    suffix = 1
    while final.exists() or (shared is not None and (shared / final.name).exists()):
        final = root / f"{snapshot_id}-{suffix}"
        suffix += 1
    os.rename(tmp, final)
    return final


def point_current(root: Path, name: str) -> None:
    """Make `root/CURRENT` name the snapshot `name`, durably: readers see the old snapshot or the new
    one, never half."""
    _fsync_dir(root)
    pointer = root / f".{CURRENT_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    with open(pointer, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer, root / CURRENT_NAME)
    _fsync_dir(root)


def upload_snapshot(local: Path, root: Location) -> Location:
    """Copy a finished snapshot to shared storage: shards first, then the manifest, then `CURRENT`.

    `CURRENT` is one small object, so a reader of `root` sees the old snapshot or the new one.
    """
    dest = root / local.name
    upload_dir(local, dest, skip=(MANIFEST_NAME,))
    upload_file(local / MANIFEST_NAME, dest / MANIFEST_NAME)
    (root / CURRENT_NAME).write_text(local.name + "\n")
    return dest


def _build_owner() -> str:
    """`pid{N}@{host}`, the end of a build's temporary directory name: a later build can then tell a
    build that died (no such process on this host) from one still running."""
    return f"pid{os.getpid()}@{socket.gethostname()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned_builds(root: Path, kind: str = "bucket snapshot") -> list[Path]:
    """Delete the temporary directories under `root` of builds whose process died on this host.

    A killed build leaves its `.tmp-` directory behind (never a snapshot: only a complete one is
    renamed into place). A running build's directory, another host's and unnamed ones stay.
    """
    host, removed = socket.gethostname(), []
    for entry in sorted(root.glob(f"{TMP_PREFIX}*")):
        owner = _TMP_OWNER.search(entry.name)
        if owner and owner[2] == host and not _process_alive(int(owner[1])):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by a %s build that died (process %s)", entry, kind, owner[1])
            removed.append(entry)
    return removed


def disk_full_error(root: Path | Location, snapshot_id: str, kind: str = "bucket snapshot") -> StorageError:
    """The one-line error of a build of `snapshot_id` (a `kind`) that ran out of space under `root`."""
    pointer = root / CURRENT_NAME
    current = pointer.read_text().strip() if pointer.is_file() else None
    kept = f"{CURRENT_NAME} still names {current}" if current else f"there is no {CURRENT_NAME} snapshot yet"
    return StorageError(
        f"{kind} {root}: no space left on device while writing {snapshot_id}; its partial files "
        f"were removed and {kept}; free space and build again"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
