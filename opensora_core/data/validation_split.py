"""The validation split of a bucket snapshot: the rows whose path hash falls below `val_fraction`.

One rule for both sides of the split: eval-loss evaluates these rows (opensora_core.sample.eval_loss) and
training, the pre-flight check and `opensora plan` leave them out. The path is taken below the dataset's
common folder, so the split is the same on every machine, run and location. A `val_data_path` is a
dataset of its own and holds nothing of the snapshot out.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from opensora_core.data.stable_hash import key_hashes, splitmix64
from opensora_core.errors import ConfigError

# Mixed into the path hash so the split is independent of the bucket draws, which hash the same paths.
_SPLIT_SALT = np.uint64(0x5EED_0F_5A_11D_5E7)


def held_out_fraction(cfg: Any) -> float | None:
    """The share of the training snapshot held out for validation: `val_fraction` (checked), or None when
    it is unset or 0, or when `val_data_path` names the validation data instead."""
    fraction = cfg.get("val_fraction")
    if cfg.get("val_data_path") or fraction is None or fraction == 0:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(f"val_fraction={fraction!r}: set it within (0, 1), or set val_data_path")
    return float(fraction)


def held_out(table: pa.Table, fraction: float) -> np.ndarray:
    """For each row of a snapshot's full table, whether it belongs to the validation split."""
    paths = table["path"].to_pylist()
    if not paths:
        return np.zeros(0, dtype=bool)
    # the raw string hash is a polynomial (similar paths give close values): finalised to spread evenly
    uniform = splitmix64(key_hashes(_relative_paths(paths)) ^ _SPLIT_SALT).astype(np.float64) / 2.0**64
    return uniform < fraction


def training_rows(table: pa.Table, fraction: float | None) -> np.ndarray | None:
    """Row numbers of the full table that training may use; None (all rows) without a hold-out."""
    if fraction is None:
        return None
    return np.flatnonzero(~held_out(table, fraction))


def _relative_paths(paths: list[str]) -> list[str]:
    """Paths below their common folder: the split stays the same when the dataset moves."""
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, root) for p in paths]
