"""Distributed, resumable batch sampler over bucket assignments: each batch holds one bucket only.

It yields lists of "idx-T-H-W" strings for `VariableVideoTextDataset` (idx = row of the snapshot's
full table). The epoch's buckets come from the snapshot when it was drawn for the same (seed,
epoch); otherwise they are re-drawn in-process with `assign_buckets`, which gives the same result
a snapshot build for that epoch would. With `redraw=False` (training from a feature snapshot, whose
clips were cropped and encoded at their stored bucket's size) every epoch uses the stored buckets,
and `rows` limits the batches to the rows that have features. Ranks of one sequence-parallel group (consecutive ranks,
`sp_size` of them) receive identical batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opensora_core.data.aspect import RATIO_TABLES, RESOLUTIONS
from opensora_core.data.bucket import BucketConfig, BucketKey, assign_table
from opensora_core.data.snapshot import Snapshot
from opensora_core.errors import ConfigError


class BucketBatchSampler:
    """Batches that never mix buckets, shuffled by (seed, epoch) and split across data-parallel ranks.

    `source` is a Snapshot (bucket config, frame interval, seed and epoch default to its manifest)
    or a metadata table, which is then always bucketed in-process. `redraw=False` keeps a snapshot's
    stored buckets for every epoch; `rows` (table row numbers) are the only rows batched, others sit out. `drop_last=False` pads a bucket's last
    batch with its first samples and pads the batch list so every rank gets the same count.
    """

    def __init__(
        self,
        source: Snapshot | pa.Table,
        bucket_cfg: BucketConfig | None = None,
        *,
        frame_interval: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        sp_size: int = 1,
        seed: int | None = None,
        epoch: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        redraw: bool = True,
        rows: np.ndarray | None = None,
    ) -> None:
        if isinstance(source, Snapshot):
            manifest = source.manifest
            self.table = source.full_table()
            self.bucket_cfg = bucket_cfg or manifest.bucket_cfg()
            self.frame_interval = manifest.frame_interval if frame_interval is None else frame_interval
            self.seed = manifest.seed if seed is None else seed
            epoch = manifest.epoch if epoch is None else epoch
            same_rules = (
                self.bucket_cfg == manifest.bucket_cfg() and self.frame_interval == manifest.frame_interval
            )
            self._drawn_for: tuple[int, int] | None = (manifest.seed, manifest.epoch) if same_rules else None
        else:
            if bucket_cfg is None or frame_interval is None:
                raise ConfigError("BucketBatchSampler: a plain table needs bucket_cfg and frame_interval")
            self.table = source
            self.bucket_cfg = bucket_cfg
            self.frame_interval = frame_interval
            self.seed = 0 if seed is None else seed
            epoch = 0 if epoch is None else epoch
            self._drawn_for = None
        if not redraw and not isinstance(source, Snapshot):
            raise ConfigError("BucketBatchSampler: redraw=False needs a snapshot's stored buckets")
        self.redraw = redraw
        self.allowed: np.ndarray | None = None
        if rows is not None:
            self.allowed = np.zeros(self.table.num_rows, dtype=bool)
            self.allowed[np.asarray(rows, dtype=np.int64)] = True
        if sp_size < 1 or num_replicas % sp_size:
            raise ConfigError(f"sp_size={sp_size} must divide the number of ranks ({num_replicas})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_replicas = num_replicas
        self.rank = rank
        self.sp_size = sp_size
        self.dp_size = num_replicas // sp_size
        self.dp_rank = rank // sp_size
        self.batch_sizes = self.bucket_cfg.batch_sizes()
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = epoch
        self._start = 0  # global batch position to resume from (multiple of dp_size)
        self._consumed = 0  # global batches handed out this epoch, for state_dict()
        self._cache: tuple[tuple[int, int], list[tuple[str, np.ndarray]]] | None = None

    # --- epoch plan ------------------------------------------------------------------------------

    def bucket_rows(self) -> dict[BucketKey, np.ndarray]:
        """This epoch's buckets -> table rows (table order), buckets in table order."""
        t = self.table
        stored = not self.redraw or self._drawn_for == (self.seed, self.epoch)
        if stored and "bucket_res" in t.column_names:
            res_idx, frames, ar_idx = _stored_buckets(t)
        else:
            a = assign_table(t, self.bucket_cfg, self.frame_interval, self.seed, self.epoch)
            res_idx, frames, ar_idx = a.resolution_index.astype(np.int64), a.num_frames, a.aspect_index
        keep = res_idx >= 0
        if self.allowed is not None:
            keep &= self.allowed
        kept = np.flatnonzero(keep)
        code = (res_idx[kept] << 40) | (np.asarray(frames)[kept].astype(np.int64) << 12) | ar_idx[kept]
        order = np.argsort(code, kind="stable")  # stable: rows stay in table order inside a bucket
        codes, starts = np.unique(code[order], return_index=True)
        groups = np.split(kept[order], starts[1:])
        return {
            BucketKey(int(c >> 40), int((c >> 12) & 0x0FFFFFFF), int(c & 0xFFF)): rows
            for c, rows in zip(codes, groups, strict=True)
        }

    def _batches(self) -> list[tuple[str, np.ndarray]]:
        """Every data-parallel group's batches for this epoch, in the order they are dealt out,
        as ("-T-H-W" suffix, rows); strings are made only for the batches a rank yields."""
        if self._cache is not None and self._cache[0] == (self.seed, self.epoch):
            return self._cache[1]
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, self.epoch])
        batches: list[tuple[str, np.ndarray]] = []
        for key, rows in self.bucket_rows().items():
            bs = self.batch_sizes.get((key.resolution, key.num_frames))
            if bs is None:
                raise ConfigError(
                    f'bucket_config["{key.resolution}"][{key.num_frames}]: no batch size for a bucket '
                    "the snapshot kept; rebuild the snapshot with this config"
                )
            if self.shuffle:
                rows = rng.permutation(rows)
            n_full, rest = divmod(len(rows), bs)
            if rest and not self.drop_last:
                rows = np.resize(rows, (n_full + 1) * bs)  # repeats the bucket's first rows
                n_full += 1
            h, w = key.size
            suffix = f"-{key.num_frames}-{h}-{w}"
            batches.extend((suffix, rows[b * bs : (b + 1) * bs]) for b in range(n_full))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        rest = len(batches) % self.dp_size
        if rest:
            if self.drop_last or not batches:
                batches = batches[: len(batches) - rest]
            else:
                batches += [batches[i % len(batches)] for i in range(self.dp_size - rest)]
        self._cache = ((self.seed, self.epoch), batches)
        return batches

    # --- iteration and state ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches this rank gets over the whole epoch."""
        return len(self._batches()) // self.dp_size

    def __iter__(self) -> Iterator[list[str]]:
        batches = self._batches()
        first = self._start // self.dp_size
        for step in range(first, len(batches) // self.dp_size):
            self._consumed = (step + 1) * self.dp_size
            suffix, rows = batches[step * self.dp_size + self.dp_rank]
            yield [f"{i}{suffix}" for i in rows.tolist()]
        self._start = 0  # a second pass over the same epoch starts from the top

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start (a state loaded for this epoch keeps its position)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = 0
            self._consumed = 0

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """Position to resume from; `step` = batches this rank has trained on this epoch (the
        DataLoader prefetches, so the caller's count is the true one), else the sampler's count."""
        consumed = self._consumed if step is None else step * self.dp_size
        return {"seed": self.seed, "epoch": self.epoch, "consumed_batches": consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume mid-epoch; works with a different number of ranks (whole steps are kept)."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        consumed = state.get("consumed_batches", state.get("last_micro_batch_access_index", 0))
        self._start = int(consumed) // self.dp_size * self.dp_size
        self._consumed = self._start


def _stored_buckets(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(resolution index, frames, ratio index) from a snapshot's bucket columns; -1 where null."""
    res_idx = pc.index_in(table["bucket_res"], value_set=pa.array(RESOLUTIONS))
    res_idx = res_idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    frames = table["bucket_frames"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    ars = table["bucket_ar"]
    ar_idx = np.full(len(res_idx), -1, dtype=np.int64)
    for r in np.unique(res_idx[res_idx >= 0]):
        rows = np.flatnonzero(res_idx == r)
        keys = pa.array(list(RATIO_TABLES[RESOLUTIONS[r]]))
        found = pc.index_in(ars.take(pa.array(rows)), value_set=keys)
        ar_idx[rows] = found.fill_null(-1).to_numpy(zero_copy_only=False)
    if ((res_idx >= 0) & (ar_idx < 0)).any():
        raise ConfigError("bucket snapshot: a bucket_ar value is not in its resolution's ratio table")
    return res_idx, frames, ar_idx
