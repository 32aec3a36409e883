"""Whether the current bucket snapshot is still up to date with the metadata and the bucket settings
(the scheduled rebuild's question)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opensora_core.data.fingerprint import read_metadata_fingerprint
from opensora_core.data.manifest import Manifest
from opensora_core.data.snapshot import open_snapshot
from opensora_core.errors import ConfigError
from opensora_core.storage import Location, pathlike


@dataclass(frozen=True)
class SnapshotCheck:
    """How the metadata and bucket settings compare with the snapshot `root/CURRENT` names."""

    root: Path | Location
    current: Manifest | None  # None: no complete snapshot yet
    config_hash: str
    metadata_fingerprint: str
    seed: int
    epoch: int
    changes: tuple[str, ...]  # why a rebuild is needed; empty when the current snapshot is up to date

    @property
    def is_current(self) -> bool:
        return not self.changes


def check_snapshot(
    root: str | Path | Location, meta_path: str | Path, config_hash: str, *, seed: int, epoch: int
) -> SnapshotCheck:
    """Compare `meta_path` and the bucket settings with the current snapshot under `root`.

    A rebuild is needed when there is no current snapshot, or when the metadata fingerprint
    (paths, sizes, mtimes), the bucket config hash, the seed or the epoch differ from its manifest.
    """
    root = pathlike(root)
    fingerprint = read_metadata_fingerprint(meta_path)
    try:
        current: Manifest | None = open_snapshot(root).manifest
    except ConfigError:
        current = None
    if current is None:
        changes: tuple[str, ...] = (f"no current snapshot under {root}",)
    else:
        wanted = {
            "metadata_fingerprint": fingerprint,
            "config_hash": config_hash,
            "seed": seed,
            "epoch": epoch,
        }
        changes = tuple(
            f"{name} {getattr(current, name)} -> {value}"
            for name, value in wanted.items()
            if getattr(current, name) != value
        )
    return SnapshotCheck(root, current, config_hash, fingerprint, seed, epoch, changes)
