"""Torch datasets over the metadata / snapshot table: variable-size clips for bucketed training and
fixed-size clips, plus the collate function that drops samples that failed to load.

`VariableVideoTextDataset` is indexed by the "idx-T-H-W" strings `BucketBatchSampler` yields
(idx = row of the snapshot's full table, T frames, H x W target size), as Open-Sora's sampler does.
A file that fails to decode is replaced by another row that can give the same clip shape; if that
fails too the item is None, which `collate_fn` drops. Failures are logged (one warning per file, in
the process that read it) and counted in `skipped`, a counter shared with the DataLoader worker
processes; never raised.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset, default_collate

from opensora_core.data.snapshot import Snapshot
from opensora_core.data.transforms import apply_transform, check_transform_name
from opensora_core.data.video_io import IMG_FPS, is_image_path, read_clip, read_image
from opensora_core.errors import ConfigError, MediaError

log = logging.getLogger(__name__)

MAX_SUBSTITUTES = 3  # other rows tried after a failed file before the item is dropped


@dataclass(frozen=True)
class _Rows:
    """The columns the datasets read, as plain arrays (cheap to pickle into DataLoader workers)."""

    paths: np.ndarray  # object
    texts: np.ndarray  # object
    num_frames: np.ndarray  # int64
    is_image: np.ndarray  # bool


def _load_rows(source: Snapshot | pa.Table | str | Path, data_root: str | Path | None) -> _Rows:
    if isinstance(source, Snapshot):
        table = source.full_table()  # the sampler's row numbers index the full table
    elif isinstance(source, pa.Table):
        table = source
    else:
        table = pq.read_table(source)
    if "path" not in table.column_names:
        raise ConfigError(f"dataset table: missing column 'path'; has {', '.join(table.column_names)}")
    paths = np.array(table["path"].to_pylist(), dtype=object)
    if data_root is not None:
        paths = np.array([os.path.join(data_root, p) for p in paths], dtype=object)
    n = len(paths)
    texts = np.array(table["text"].to_pylist() if "text" in table.column_names else [""] * n, dtype=object)
    if "num_frames" in table.column_names:
        num_frames = table["num_frames"].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        num_frames = np.zeros(n, dtype=np.int64)
    if "is_image" in table.column_names:
        is_image = table["is_image"].fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    else:
        is_image = np.array([is_image_path(p) for p in paths], dtype=bool)
    return _Rows(paths, texts, num_frames, is_image)


def parse_index(index: str | Sequence[int]) -> tuple[int, int, int, int]:
    """ "idx-T-H-W" (or an (idx, T, H, W) sequence) -> four ints."""
    parts = index.split("-") if isinstance(index, str) else list(index)
    if len(parts) != 4:
        raise ValueError(f"dataset index {index!r}: expected 'idx-T-H-W'")
    idx, t, h, w = (int(p) for p in parts)
    return idx, t, h, w


class _ClipDataset(Dataset):
    """Shared loading: one row -> clip tensor, with substitutes for files that fail."""

    def __init__(
        self,
        source: Snapshot | pa.Table | str | Path,
        frame_interval: int,
        transform_name: str,
        data_root: str | Path | None,
        seed: int,
    ) -> None:
        self.rows = _load_rows(source, data_root)
        self.frame_interval = int(frame_interval)
        self.transform_name = check_transform_name(transform_name)
        self.seed = int(seed)
        self.epoch = 0
        # Shared memory: DataLoader workers (forked or spawned) do the loading, the trainer reads the count.
        self._skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.rows.paths)

    @property
    def skipped(self) -> int:
        """Files that failed to load so far, in this process and its DataLoader workers together."""
        return int(self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        """Clip start frames are drawn from (seed, epoch, row): call before each epoch's DataLoader."""
        self.epoch = int(epoch)

    def _rng(self, idx: int, attempt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, idx, attempt])

    def _sample(self, idx: int, t: int, size: tuple[int, int], replicate_image: bool) -> dict[str, Any]:
        path = self.rows.paths[idx]
        if self.rows.is_image[idx]:
            frames = read_image(path)
            if replicate_image and t > 1:
                frames = np.repeat(frames, t, axis=0)
            fps: int = IMG_FPS
        else:
            clip = read_clip(path, t, self.frame_interval, self._rng(idx, 0))
            frames = clip.frames
            fps = int(clip.fps // self.frame_interval)
        video = apply_transform(frames, size, self.transform_name)
        h, w = size
        return {
            "video": video,
            "text": self.rows.texts[idx] or "",
            "fps": fps,
            "num_frames": video.shape[1],
            "height": h,
            "width": w,
            "ar": h / w,
            "path": path,
            "index": idx,
        }

    def _can_replace(self, idx: int, t: int, replicate_image: bool) -> np.ndarray:
        """Rows that can give a clip of the same shape as row `idx` (the transform fixes H x W)."""
        long_videos = ~self.rows.is_image & (self.rows.num_frames > t * self.frame_interval)
        if replicate_image:
            ok = long_videos | self.rows.is_image
        elif self.rows.is_image[idx]:
            ok = self.rows.is_image.copy()
        else:
            ok = long_videos
        ok[idx] = False
        return np.flatnonzero(ok)

    def _load(self, idx: int, t: int, size: tuple[int, int], replicate_image: bool) -> dict[str, Any] | None:
        if not 0 <= idx < len(self):
            raise IndexError(f"dataset index {idx} out of range for {len(self)} rows")
        candidates: np.ndarray | None = None
        row = idx
        for attempt in range(MAX_SUBSTITUTES + 1):
            try:
                return self._sample(row, t, size, replicate_image)
            except (MediaError, OSError) as err:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                log.warning("skipped a sample: %s", err)
            if candidates is None:
                candidates = self._can_replace(idx, t, replicate_image)
            if len(candidates) == 0:
                break
            row = int(self._rng(idx, attempt + 1).choice(candidates))
        return None


class VariableVideoTextDataset(_ClipDataset):
    """Clips of the bucket's shape: index "idx-T-H-W" -> dict, or None when the file and its substitutes fail.

    Returns video [C, T, H, W] in [-1, 1], text, fps (video fps // frame_interval, 120 for images),
    num_frames, height, width, ar (= H / W), bucket ("T-H-W"), path and index. Images give one frame.
    """

    def __init__(
        self,
        source: Snapshot | pa.Table | str | Path,
        frame_interval: int = 1,
        transform_name: str = "resize_crop",
        *,
        data_root: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(source, frame_interval, transform_name, data_root, seed)

    def __getitem__(self, index: str | Sequence[int]) -> dict[str, Any] | None:
        idx, t, h, w = parse_index(index)
        item = self._load(idx, t, (h, w), replicate_image=False)
        if item is not None:
            item["bucket"] = f"{t}-{h}-{w}"
        return item


class VideoTextDataset(_ClipDataset):
    """Fixed-size clips: integer index -> dict as VariableVideoTextDataset's (images repeated to num_frames)."""

    def __init__(
        self,
        source: Snapshot | pa.Table | str | Path,
        num_frames: int = 16,
        frame_interval: int = 1,
        image_size: tuple[int, int] = (256, 256),
        transform_name: str = "center",
        *,
        data_root: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(source, frame_interval, transform_name, data_root, seed)
        self.num_frames = int(num_frames)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        check_transform_name(transform_name, self.image_size)

    def clip(self, index: int) -> dict[str, Any]:
        """Row `index`'s own clip, as `__getitem__` gives it, with no substitute: a file that cannot give
        it raises MediaError (for per-file work such as VAE reconstruction)."""
        item = self._sample(int(index), self.num_frames, self.image_size, replicate_image=True)
        item["bucket"] = f"{self.num_frames}-{self.image_size[0]}-{self.image_size[1]}"
        return item

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self._load(int(index), self.num_frames, self.image_size, replicate_image=True)
        if item is not None:
            t, (h, w) = self.num_frames, self.image_size
            item["bucket"] = f"{t}-{h}-{w}"
        return item


def collate_fn(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """default_collate over the samples that loaded; None when none did (skip that step)."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out = default_collate(items)
    out["num_dropped"] = len(batch) - len(items)
    return out
