"""Training batch sources: a bucket snapshot through the bucket batch sampler, the stored features
of one (the same sampler, buckets frozen at precompute), fixed-size clips of a metadata table (Open-Sora's
VideoTextDataset, e.g. the VAE configs), or synthetic clips.

Each gives one rank its micro-batches with `len()`, `set_epoch`, `bucket_of` and a resumable
`state_dict` / `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from opensora_core.errors import ConfigError
from opensora_core.parallel.layout import parallel_layout


def build_batches(
    *,
    snapshot_dir: str | None,
    dataset: dict[str, Any] | None,
    synthetic_data: dict[str, Any] | None,
    rank: int,
    world_size: int,
    seed: int,
    sp_size: int = 1,
    num_workers: int,
    features: str | None = None,
    video_features: bool = False,
    text_features: bool = False,
    clips_table: str | None = None,
    batch_size: int | None = None,
    val_fraction: float | None = None,
) -> SnapshotBatches | FeatureBatches | FixedClipBatches | SyntheticClips:
    """This rank's micro-batches: synthetic clips when `synthetic_data` is given, fixed-size clips of
    `clips_table` (batches of `batch_size`) for a VideoTextDataset, else the snapshot's, read from the
    feature snapshot directory `features` when one is given, without the `val_fraction` of its rows
    that eval-loss holds out (opensora_core.data.validation_split).

    The `sp_size` consecutive ranks of a sequence-parallel group get the same batches.
    """
    if synthetic_data:
        layout = parallel_layout(rank, world_size, sp_size)
        return SyntheticClips(**synthetic_data, rank=layout.dp_rank, world_size=layout.dp_size, seed=seed)
    if clips_table:
        layout = parallel_layout(rank, world_size, sp_size)
        return FixedClipBatches(
            clips_table, dict(dataset or {}), batch_size=batch_size or 1, rank=layout.dp_rank,
            world_size=layout.dp_size, seed=seed, num_workers=num_workers,
        )  # fmt: skip
    if features:
        return FeatureBatches(
            snapshot_dir, features, dataset, video_features=video_features, text_features=text_features,
            rank=rank, world_size=world_size, seed=seed, sp_size=sp_size, num_workers=num_workers,
            val_fraction=val_fraction,
        )  # fmt: skip
    return SnapshotBatches(
        snapshot_dir,
        dataset,
        rank=rank,
        world_size=world_size,
        seed=seed,
        sp_size=sp_size,
        num_workers=num_workers,
        val_fraction=val_fraction,
    )


def clip_dataset(snapshot: Any, dataset_cfg: dict[str, Any], seed: int) -> Any:
    """The decoded clips of a snapshot's rows at their bucket sizes, as the config's `dataset` section says."""
    from opensora_core.data.dataset import VariableVideoTextDataset

    return VariableVideoTextDataset(
        snapshot,
        frame_interval=int(dataset_cfg.get("frame_interval", 1) or 1),
        transform_name=dataset_cfg.get("transform_name") or "resize_crop",
        seed=seed,
    )


def loss_groups(manifest: Any) -> dict[str, str]:
    """Every bucket name the loader's `bucket_of` can give -> `<resolution>-<num_frames>`, the group whose
    loss series MLflow plots (opensora_core.train.metrics); aspect ratios of one resolution and length
    share a series. The sampler redraws the buckets each epoch (keep_prob, t_prob), so a batch can come
    from a bucket of the config that the snapshot's own draw left empty, named by its shape (T-H-W).
    The same manifest gives every rank the same groups in the same order."""
    from opensora_core.data.aspect import RATIO_TABLES

    groups = {b.key.id: f"{b.resolution}-{b.num_frames}" for b in manifest.buckets}
    for rb in manifest.bucket_cfg().resolutions:
        for entry in (*rb.videos, *([rb.image] if rb.image else [])):
            for height, width in RATIO_TABLES[rb.resolution].values():
                groups.setdefault(
                    f"{entry.num_frames}-{height}-{width}", f"{rb.resolution}-{entry.num_frames}"
                )
    return groups


class SnapshotBatches:
    """Batches of decoded clips from a bucket snapshot; DataLoader workers do the decoding.

    A batch whose every sample failed to load comes out as None (see `collate_fn`). The rows of the
    validation split (`val_fraction`) sit out.
    """

    def __init__(
        self,
        snapshot_dir: str | None,
        dataset: dict[str, Any] | None,
        *,
        rank: int,
        world_size: int,
        seed: int,
        sp_size: int = 1,
        num_workers: int,
        val_fraction: float | None = None,
    ) -> None:
        from opensora_core.data.sampler import BucketBatchSampler
        from opensora_core.data.snapshot import open_snapshot
        from opensora_core.data.validation_split import training_rows

        dataset_cfg = dict(dataset or {})
        if dataset_cfg.get("type", "VariableVideoTextDataset") != "VariableVideoTextDataset":
            raise ConfigError(
                f"dataset.type={dataset_cfg['type']!r}: training reads bucket snapshots; "
                "use dataset.type='VariableVideoTextDataset'"
            )
        if not snapshot_dir:
            raise ConfigError(
                "snapshot_dir: training needs a bucket snapshot (build one with `opensora bucket`)"
            )
        snapshot = open_snapshot(snapshot_dir)
        buckets = snapshot.manifest.buckets
        if not buckets:
            raise ConfigError(
                f"bucket snapshot {snapshot.path}: no bucket kept any sample; check bucket_config"
            )
        self.dataset = clip_dataset(snapshot, dataset_cfg, seed)
        # the sampler's seed is the snapshot's, so epoch 0 uses the buckets drawn at build time
        self.sampler = BucketBatchSampler(
            snapshot, num_replicas=world_size, rank=rank, sp_size=sp_size, drop_last=True,
            rows=training_rows(snapshot.full_table(), val_fraction),
        )  # fmt: skip
        self.num_workers = num_workers
        self.bucket_names = [b.key.id for b in buckets]
        self.loss_groups = loss_groups(snapshot.manifest)
        self._names = {f"{b.num_frames}-{b.height}-{b.width}": b.key.id for b in buckets}
        self.max_batch_size = max(b.batch_size for b in buckets)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def skipped(self) -> int:
        """Files that failed to load on this rank so far (the dataset logs a warning for each)."""
        return self.dataset.skipped

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        from opensora_core.data.dataset import collate_fn

        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def bucket_of(self, batch: dict[str, Any]) -> str:
        """The batch's bucket id, e.g. "144p-17-0.56"."""
        shape = batch["bucket"][0]
        return self._names.get(shape, shape)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def state_dict(self, num_batches: int) -> dict[str, Any]:
        return self.sampler.state_dict(num_batches)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class FeatureBatches(SnapshotBatches):
    """Batches of stored features (`opensora_core.features.dataset`), dealt out by the same bucket
    batch sampler as SnapshotBatches, so exact resume and resume on another world size work alike.

    The clips were cropped and encoded at their stored bucket's size, so every epoch keeps the
    bucket snapshot's buckets (no redraw), and the rows without features (clips that failed at
    precompute) sit out, and so do the rows of the validation split (`val_fraction`). Without video
    features the clips are decoded as SnapshotBatches does.
    """

    def __init__(
        self,
        snapshot_dir: str | None,
        features: str,
        dataset: dict[str, Any] | None,
        *,
        video_features: bool,
        text_features: bool,
        rank: int,
        world_size: int,
        seed: int,
        sp_size: int = 1,
        num_workers: int,
        val_fraction: float | None = None,
    ) -> None:
        from opensora_core.data.sampler import BucketBatchSampler
        from opensora_core.data.snapshot import open_snapshot
        from opensora_core.data.validation_split import training_rows
        from opensora_core.features.dataset import FeatureDataset
        from opensora_core.features.store import open_features

        stored = open_features(features)
        snapshot = open_snapshot(snapshot_dir or stored.manifest.bucket_snapshot_path)
        buckets = snapshot.manifest.buckets
        if not buckets or not len(stored.samples):
            raise ConfigError(
                f"feature snapshot {stored.path}: no sample has features; run `opensora precompute`"
            )
        video = None if video_features else clip_dataset(snapshot, dict(dataset or {}), seed)
        self.dataset = FeatureDataset(
            stored, video_features=video_features, text_features=text_features, seed=seed, video=video
        )
        training = training_rows(snapshot.full_table(), val_fraction)
        self.sampler = BucketBatchSampler(
            snapshot, num_replicas=world_size, rank=rank, sp_size=sp_size, drop_last=True,
            redraw=False, rows=_without_held_out(stored.samples, training),
        )  # fmt: skip
        self.num_workers = num_workers
        self.bucket_names = [b.key.id for b in buckets]
        self.loss_groups = loss_groups(snapshot.manifest)
        self._names = {f"{b.num_frames}-{b.height}-{b.width}": b.key.id for b in buckets}
        self.max_batch_size = max(b.batch_size for b in buckets)


def clip_rows(table: Any, num_frames: int, frame_interval: int) -> np.ndarray:
    """Rows of a metadata table that give a `num_frames` clip: images (repeated, as Open-Sora's
    VideoTextDataset does) and videos with at least num_frames * frame_interval frames."""
    is_image = table["is_image"].fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    frames = table["num_frames"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.flatnonzero(is_image | (frames >= num_frames * frame_interval))


def read_clips_table(path: str) -> Any:
    """The rows a fixed-size dataset reads: a metadata .parquet, or a bucket snapshot's full table."""
    import pyarrow.parquet as pq

    from opensora_core.data.snapshot import open_snapshot

    if str(path).endswith(".parquet"):
        return pq.read_table(path)
    return open_snapshot(path).full_table()


class GlobalBatchPosition:
    """The resumable position of a loader whose global batch i goes to rank i mod world_size: the
    epoch and how many of its batches this rank has consumed (`start`, applied to the next pass)."""

    seed: int
    world_size: int
    epoch: int  # both set by the subclass's __init__
    start: int

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a restored position belongs to the epoch it was saved in
        self.epoch = epoch

    def state_dict(self, num_batches: int) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed_batches": num_batches * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.start = int(state["consumed_batches"]) // self.world_size


class FixedClipBatches(GlobalBatchPosition):
    """Batches of `batch_size` clips at the dataset's one size (VideoTextDataset), shuffled per epoch.

    The epoch's order is a permutation drawn from (seed, epoch); global batch i goes to rank i mod R, so
    every world size sees the same global steps, and a position is the number of batches consumed.
    Rows too short for the clip sit out (counted in `left_out`); a file that fails to decode is replaced
    as in the bucketed datasets, a batch that fails entirely comes out as None.
    """

    def __init__(
        self,
        table_path: str,
        dataset: dict[str, Any],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
    ) -> None:
        from opensora_core.data.dataset import VideoTextDataset

        table = read_clips_table(table_path)
        num_frames, interval = int(dataset["num_frames"]), int(dataset.get("frame_interval", 1) or 1)
        h, w = (int(v) for v in dataset["image_size"])
        self.dataset = VideoTextDataset(
            table, num_frames=num_frames, frame_interval=interval, image_size=(h, w),
            transform_name=dataset.get("transform_name") or "center", seed=seed,
        )  # fmt: skip
        self.rows = clip_rows(table, num_frames, interval)
        self.left_out = table.num_rows - len(self.rows)
        self.batch_size, self.max_batch_size = batch_size, batch_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.epoch, self.start = 0, 0
        self.bucket_names = [f"{num_frames}-{h}-{w}"]
        self.loss_groups = {self.bucket_names[0]: f"{h}x{w}-{num_frames}"}  # a fixed size: no resolution

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size // self.world_size

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def _rank_batches(self) -> list[list[int]]:
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(self.rows)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [b.tolist() for b in batches[: len(self) * self.world_size]]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        from opensora_core.data.dataset import collate_fn

        start, self.start = self.start, 0  # a restored position applies to one pass
        self.dataset.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._rank_batches()[start:],
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def bucket_of(self, batch: dict[str, Any]) -> str:
        return self.bucket_names[0]


def _without_held_out(rows: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """`rows` that are also in `allowed` (all of them when `allowed` is None)."""
    return rows if allowed is None else np.intersect1d(rows, allowed)


class SyntheticClips(GlobalBatchPosition):
    """Random clips and captions of one shape, split across ranks like the bucket sampler.

    Micro-batch i of an epoch is a pure function of (seed, epoch, i); rank r of R takes
    i = step * R + r, so any world size sees the same global steps.
    """

    def __init__(
        self,
        *,
        num_batches: int,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        fps: int = 24,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.num_batches, self.batch_size = num_batches, batch_size
        self.shape = (3, num_frames, height, width)
        self.fps, self.rank, self.world_size, self.seed = fps, rank, world_size, seed
        self.epoch, self.start = 0, 0
        self.max_batch_size = batch_size
        self.bucket_names = [f"{num_frames}-{height}-{width}"]
        self.loss_groups = {self.bucket_names[0]: f"{height}x{width}-{num_frames}"}  # no resolution name
        self.skipped = 0  # random clips never fail to load

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, self.start = self.start, 0  # a restored position applies to one pass
        _, t, h, w = self.shape
        n = self.batch_size
        for step in range(start, len(self)):
            index = step * self.world_size + self.rank
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            )
            yield {
                "video": torch.rand(n, *self.shape, generator=generator) * 2 - 1,
                "text": [f"synthetic clip {index}-{j}" for j in range(n)],
                "num_frames": torch.full((n,), t),
                "height": torch.full((n,), h),
                "width": torch.full((n,), w),
                "ar": torch.full((n,), h / w),
                "fps": torch.full((n,), self.fps),
                "bucket": [self.bucket_names[0]] * n,
            }

    def bucket_of(self, batch: dict[str, Any]) -> str:
        return batch["bucket"][0]
