"""Bucket configs and the rules that sort samples into (resolution, num_frames, aspect ratio) buckets.

`bucket_of_sample` states the rule of spec/buckets.md for one sample; `assign_buckets` applies the same
rule to whole columns at once. Its random draws are a pure function of (seed, epoch, sample key,
resolution, num_frames), so any chunking gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from opensora_core.data.aspect import NUM_PIXELS, RATIO_TABLES, RESOLUTIONS, check_resolution
from opensora_core.data.stable_hash import key_hashes, splitmix64
from opensora_core.errors import ConfigError

# --- the rule, one sample at a time ----------------------------------------------------------------

KEEP_DRAW = 1  # the keep_prob draw of a (resolution, t) bucket
T_DRAW = 2  # the t_prob draw of a (resolution, t) entry
OPEN_SHARE = Fraction(4, 5)  # a resolution is open to samples with at least this share of its pixels

# draw(resolution, t, purpose) -> the sample's uniform number in [0, 1) for that choice
Draw = Callable[[str, int, int], float]


def bucket_of_sample(
    num_frames: int, height: int, width: int, cfg: BucketConfig, frame_interval: int, draw: Draw
) -> BucketKey | None:
    """The bucket of one sample (T frames, T = 1 an image), step by step as spec/buckets.md states it.

    Returns None when no resolution keeps the sample this epoch. `sample_draws` gives the draws
    `assign_buckets` makes, so both sort every sample alike.
    """
    for rb in cfg.resolutions:  # 1. most pixels first, ties in table order
        if height * width < OPEN_SHARE * rb.num_pixels:  # 2. too few pixels for this resolution
            continue
        if num_frames == 1:  # 3. an image: its `1` entry, kept with that entry's keep_prob
            entry = rb.image
        else:  # 4. a video: the longest t it has more than t x frame_interval frames for
            entry = next(
                (
                    e
                    for e in rb.videos  # largest first
                    if num_frames > e.num_frames * frame_interval
                    and (e.t_prob >= 1.0 or draw(rb.resolution, e.num_frames, T_DRAW) < e.t_prob)
                ),
                None,
            )
        if entry is None or not draw(rb.resolution, entry.num_frames, KEEP_DRAW) < entry.keep_prob:
            continue  # no t, or not kept: next resolution
        # 6. the ratio key closest to H / W (ties: the earlier key)
        ratio = min(RATIO_TABLES[rb.resolution], key=lambda key: abs(float(key) - height / width))
        return BucketKey.from_names(rb.resolution, entry.num_frames, ratio)
    return None  # 5. sits out this epoch


def sample_draws(sample_key: str, seed: int, epoch: int) -> Draw:
    """The draws of one sample (keyed by its path) for (seed, epoch), as `assign_buckets` makes them."""
    stream = sample_streams([sample_key], seed, epoch)

    def draw(resolution: str, t: int, purpose: int) -> float:
        return float(_uniform(stream, RESOLUTIONS.index(resolution), t, purpose)[0])

    return draw


_ROOT_KEY = "bucket_config"


@dataclass(frozen=True)
class FrameBucket:
    """One `num_frames: (keep_prob, batch_size)` or `num_frames: ((keep_prob, t_prob), batch_size)` entry."""

    num_frames: int
    keep_prob: float
    batch_size: int | None
    # Chance that a long-enough video takes this length rather than trying the next shorter one.
    t_prob: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.keep_prob > 0


@dataclass(frozen=True)
class ResolutionBuckets:
    """The frame buckets of one resolution name."""

    resolution: str
    image: FrameBucket | None  # the `1` entry
    videos: tuple[FrameBucket, ...]  # num_frames > 1, largest first (the order they are tried in)

    @property
    def num_pixels(self) -> int:
        return NUM_PIXELS[self.resolution]


@dataclass(frozen=True, order=True)
class BucketKey:
    """A bucket: resolution name, frame count and aspect-ratio key; orders by table position."""

    resolution_index: int
    num_frames: int
    aspect_index: int

    @property
    def resolution(self) -> str:
        return RESOLUTIONS[self.resolution_index]

    @property
    def aspect_ratio(self) -> str:
        return list(RATIO_TABLES[self.resolution])[self.aspect_index]

    @property
    def size(self) -> tuple[int, int]:
        """Target (height, width)."""
        return RATIO_TABLES[self.resolution][self.aspect_ratio]

    @property
    def id(self) -> str:
        """Human-readable id, e.g. "240p-16-0.56"."""
        return f"{self.resolution}-{self.num_frames}-{self.aspect_ratio}"

    @classmethod
    def from_names(cls, resolution: str, num_frames: int, aspect_ratio: str) -> BucketKey:
        table = RATIO_TABLES[check_resolution(resolution)]
        if aspect_ratio not in table:
            raise ConfigError(
                f"aspect ratio {aspect_ratio!r} is not in the {resolution!r} table; valid: {', '.join(table)}"
            )
        return cls(RESOLUTIONS.index(resolution), int(num_frames), list(table).index(aspect_ratio))


@dataclass(frozen=True)
class BucketConfig:
    """A validated `bucket_config`; `resolutions` are in walk order (most pixels first, ties in table order)."""

    resolutions: tuple[ResolutionBuckets, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[Any, Any]) -> BucketConfig:
        """Parse and check an Open-Sora `bucket_config` dict; errors name the key path.

        Frame keys must be integers; strings of digits are accepted too because command-line
        overrides (`--cfg-options bucket_config.240p.16=...`) produce them.
        """
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(
                f"{_ROOT_KEY}: expected a non-empty dict such as "
                '{"240p": {16: (1.0, 8)}}, got ' + repr(raw)
            )
        parsed: list[ResolutionBuckets] = []
        for name, frames in raw.items():
            path = f"{_ROOT_KEY}[{_fmt_key(name)}]"
            if not isinstance(name, str) or name not in NUM_PIXELS:
                raise ConfigError(f"{path}: unknown resolution name; valid names: {', '.join(RESOLUTIONS)}")
            if not isinstance(frames, Mapping) or not frames:
                raise ConfigError(
                    f"{path}: expected a non-empty dict {{num_frames: (keep_prob, batch_size)}}, got {frames!r}"
                )
            entries: dict[int, FrameBucket] = {}
            for t_key, value in frames.items():
                t = _frame_key(t_key, f"{path}[{_fmt_key(t_key)}]")
                entries[t] = _frame_bucket(t, value, f"{path}[{t}]")
            videos = tuple(sorted((e for t, e in entries.items() if t != 1), key=lambda e: -e.num_frames))
            parsed.append(ResolutionBuckets(name, entries.get(1), videos))
        if not any(e.enabled for rb in parsed for e in _entries(rb)):
            raise ConfigError(f"{_ROOT_KEY}: every bucket has keep_prob 0, so no sample would be kept")
        # Stable sort keeps table order among equal pixel counts (2880 before 4k).
        parsed.sort(key=lambda rb: (-rb.num_pixels, RESOLUTIONS.index(rb.resolution)))
        return cls(tuple(parsed))

    def to_dict(self) -> dict[str, dict[int, tuple[Any, int | None]]]:
        """The config back in Open-Sora's dict form (walk order, frames largest first)."""
        out: dict[str, dict[int, tuple[Any, int | None]]] = {}
        for rb in self.resolutions:
            out[rb.resolution] = {
                e.num_frames: ((e.keep_prob, e.t_prob) if e.t_prob != 1.0 else e.keep_prob, e.batch_size)
                for e in _entries(rb)
            }
        return out

    def batch_size(self, resolution: str, num_frames: int) -> int | None:
        """Batch size of the bucket, None when it is disabled or not configured."""
        for rb in self.resolutions:
            if rb.resolution == resolution:
                for e in _entries(rb):
                    if e.num_frames == num_frames:
                        return e.batch_size if e.enabled else None
        return None

    def batch_sizes(self) -> dict[tuple[str, int], int]:
        """(resolution, num_frames) -> batch size for every enabled bucket."""
        return {
            (rb.resolution, e.num_frames): int(e.batch_size)  # type: ignore[arg-type]
            for rb in self.resolutions
            for e in _entries(rb)
            if e.enabled
        }


def _entries(rb: ResolutionBuckets) -> Iterable[FrameBucket]:
    yield from rb.videos
    if rb.image is not None:
        yield rb.image


def _fmt_key(key: Any) -> str:
    return f'"{key}"' if isinstance(key, str) else repr(key)


def _frame_key(key: Any, path: str) -> int:
    if isinstance(key, bool):
        pass
    elif isinstance(key, int | np.integer) and key >= 1:
        return int(key)
    elif isinstance(key, str) and key.isdigit() and int(key) >= 1:
        return int(key)
    raise ConfigError(f"{path}: num_frames keys must be positive integers (1 for images), got {key!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _frame_bucket(t: int, value: Any, path: str) -> FrameBucket:
    shape = "expected (keep_prob, batch_size) or ((keep_prob, t_prob), batch_size)"
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ConfigError(f"{path}: {shape}, got {value!r}")
    probs, batch_size = value
    if _is_number(probs):
        keep_prob, t_prob = float(probs), 1.0
    elif isinstance(probs, tuple | list) and len(probs) == 2 and all(_is_number(p) for p in probs):
        keep_prob, t_prob = float(probs[0]), float(probs[1])
    else:
        raise ConfigError(f"{path}: {shape}, got {value!r}")
    if not 0.0 <= keep_prob <= 1.0:
        raise ConfigError(f"{path}: keep_prob {keep_prob} must be within [0, 1]")
    if not 0.0 <= t_prob <= 1.0:
        raise ConfigError(f"{path}: t_prob {t_prob} must be within [0, 1]")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer)
    ):
        raise ConfigError(f"{path}: batch_size must be a positive integer or None, got {batch_size!r}")
    if keep_prob > 0 and (batch_size is None or batch_size < 1):
        raise ConfigError(
            f"{path}: keep_prob {keep_prob} keeps samples, so batch_size must be a positive integer "
            f"(got {batch_size!r}); use (0.0, None) to disable the bucket"
        )
    return FrameBucket(t, keep_prob, None if batch_size is None else int(batch_size), t_prob)


@dataclass(frozen=True)
class BucketAssignment:
    """Per-sample bucket columns; -1 / None mark samples that sit out this epoch."""

    resolution_index: np.ndarray  # int16, index into aspect.RESOLUTIONS
    num_frames: np.ndarray  # int32: bucket frame count t
    aspect_index: np.ndarray  # int16, index into the resolution's ratio table
    height: np.ndarray  # int32: target height
    width: np.ndarray  # int32: target width

    @classmethod
    def from_indices(
        cls, resolution_index: np.ndarray, num_frames: np.ndarray, aspect_index: np.ndarray
    ) -> BucketAssignment:
        """Rebuild an assignment from its three index columns (target sizes looked up in the tables)."""
        res = np.asarray(resolution_index, dtype=np.int16)
        ar = np.asarray(aspect_index, dtype=np.int16)
        kept = res >= 0
        flat = _RATIO_KEY_BASE[np.maximum(res, 0)] + np.maximum(ar, 0).astype(np.int32)
        height = np.where(kept, _RATIO_SIZES[flat, 0], -1).astype(np.int32)
        width = np.where(kept, _RATIO_SIZES[flat, 1], -1).astype(np.int32)
        return cls(res, np.asarray(num_frames, dtype=np.int32), ar, height, width)

    @cached_property
    def resolution(self) -> np.ndarray:
        """Resolution names (object array, None where not kept)."""
        return np.asarray(self.resolution_column().to_numpy(zero_copy_only=False), dtype=object)

    @cached_property
    def aspect_ratio(self) -> np.ndarray:
        """Aspect-ratio keys (object array, None where not kept)."""
        return np.asarray(self.aspect_ratio_column().to_numpy(zero_copy_only=False), dtype=object)

    def resolution_column(self) -> pa.StringArray:
        """Resolution names as an Arrow column, null where not kept; built without Python objects."""
        index = pa.array(self.resolution_index.astype(np.int32), mask=~self.kept)
        return pa.array(RESOLUTIONS, type=pa.string()).take(index)

    def aspect_ratio_column(self) -> pa.StringArray:
        """Aspect-ratio keys as an Arrow column, null where not kept."""
        index = _RATIO_KEY_BASE[np.maximum(self.resolution_index, 0)] + self.aspect_index.astype(np.int32)
        return _RATIO_KEYS.take(pa.array(index, type=pa.int32(), mask=~self.kept))

    @property
    def kept(self) -> np.ndarray:
        return self.resolution_index >= 0

    def __len__(self) -> int:
        return len(self.resolution_index)

    def key(self, row: int) -> BucketKey | None:
        if self.resolution_index[row] < 0:
            return None
        return BucketKey(
            int(self.resolution_index[row]), int(self.num_frames[row]), int(self.aspect_index[row])
        )


def assign_table(
    table: pa.Table, cfg: BucketConfig, frame_interval: int, seed: int, epoch: int
) -> BucketAssignment:
    """`assign_buckets` on a metadata table's num_frames, height, width and path columns."""
    return assign_buckets(
        table["num_frames"].to_numpy(zero_copy_only=False),
        table["height"].to_numpy(zero_copy_only=False),
        table["width"].to_numpy(zero_copy_only=False),
        table["path"],
        cfg,
        frame_interval,
        seed,
        epoch,
    )


# Every resolution's ratio keys in one flat column, so per-sample names are a single `take`.
_RATIO_KEY_BASE = np.cumsum([0, *(len(RATIO_TABLES[r]) for r in RESOLUTIONS)])[:-1].astype(np.int32)
_RATIO_KEYS = pa.array([k for r in RESOLUTIONS for k in RATIO_TABLES[r]], type=pa.string())
_RATIO_SIZES = np.array([size for r in RESOLUTIONS for size in RATIO_TABLES[r].values()], dtype=np.int32)


# --- deterministic draws -------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def sample_streams(
    sample_keys: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray, seed: int, epoch: int
) -> np.ndarray:
    """One uint64 per sample: hash of its key mixed with (seed, epoch); every draw derives from it."""
    rows = key_hashes(sample_keys)
    run = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    run = splitmix64(run ^ np.array([epoch & _MASK64], dtype=np.uint64))
    return splitmix64(rows ^ run)


def _uniform(streams: np.ndarray, resolution_index: int, t: np.ndarray | int, purpose: int) -> np.ndarray:
    """Uniform [0, 1) draws keyed by (stream, resolution, t, purpose)."""
    t = np.asarray(t, dtype=np.int64).astype(np.uint64)
    code = (np.uint64(resolution_index + 1) << np.uint64(40)) ^ (t << np.uint64(4)) ^ np.uint64(purpose)
    bits = splitmix64(streams ^ splitmix64(code))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --- assignment ----------------------------------------------------------------------------------

_AR_CHUNK = 1 << 16  # rows per closest-ratio block: bounds the rows x ratios distance matrix


def assign_buckets(
    num_frames: Sequence[int] | np.ndarray,
    height: Sequence[int] | np.ndarray,
    width: Sequence[int] | np.ndarray,
    sample_keys: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray,
    cfg: BucketConfig,
    frame_interval: int,
    seed: int,
    epoch: int,
) -> BucketAssignment:
    """Sort samples into buckets following spec/buckets.md steps 1-8 (T == 1 means an image).

    `sample_keys` (the paths) key the draws; a `t_prob` on a `1` entry plays no part, since images
    do not look for a frame count. Returns -1 / None for samples that sit out this epoch.
    """
    frames = np.asarray(num_frames, dtype=np.int64)
    h = np.asarray(height, dtype=np.int64)
    w = np.asarray(width, dtype=np.int64)
    n = len(frames)
    if not (len(h) == len(w) == len(sample_keys) == n):
        raise ValueError("num_frames, height, width and sample_keys must have the same length")
    if frame_interval < 1:
        raise ConfigError(f"frame_interval: must be a positive integer, got {frame_interval!r}")
    streams = sample_streams(sample_keys, seed, epoch)

    res_out = np.full(n, -1, dtype=np.int16)
    t_out = np.full(n, -1, dtype=np.int32)
    ar_out = np.full(n, -1, dtype=np.int16)
    pending = np.ones(n, dtype=bool)
    area5 = 5 * h * w  # H*W >= 0.8*pixels, in integers so the threshold is exact
    is_image = frames == 1

    for rb in cfg.resolutions:
        r = RESOLUTIONS.index(rb.resolution)
        open_rows = pending & (area5 >= 4 * rb.num_pixels)
        kept_rows: list[np.ndarray] = []
        kept_t: list[np.ndarray] = []

        if rb.image is not None:
            rows = np.flatnonzero(open_rows & is_image)
            keep = _uniform(streams[rows], r, 1, KEEP_DRAW) < rb.image.keep_prob
            kept_rows.append(rows[keep])
            kept_t.append(np.ones(int(keep.sum()), dtype=np.int32))

        if rb.videos:
            rows = np.flatnonzero(open_rows & ~is_image)
            chosen = np.full(len(rows), -1, dtype=np.int64)
            keep_prob = np.zeros(len(rows), dtype=np.float64)
            for entry in rb.videos:  # largest first: the first long-enough entry wins
                fits = (chosen < 0) & (frames[rows] > entry.num_frames * frame_interval)
                if entry.t_prob < 1.0:
                    fits &= _uniform(streams[rows], r, entry.num_frames, T_DRAW) < entry.t_prob
                chosen[fits] = entry.num_frames
                keep_prob[fits] = entry.keep_prob
            has_t = chosen > 0
            keep = np.zeros(len(rows), dtype=bool)
            keep[has_t] = _uniform(streams[rows[has_t]], r, chosen[has_t], KEEP_DRAW) < keep_prob[has_t]
            kept_rows.append(rows[keep])
            kept_t.append(chosen[keep].astype(np.int32))

        rows = np.concatenate(kept_rows) if kept_rows else np.empty(0, dtype=np.int64)
        if len(rows) == 0:
            continue
        res_out[rows] = r
        t_out[rows] = np.concatenate(kept_t)
        pending[rows] = False
        table = RATIO_TABLES[rb.resolution]
        ratio_values = np.array([float(k) for k in table], dtype=np.float64)
        for start in range(0, len(rows), _AR_CHUNK):
            block = rows[start : start + _AR_CHUNK]
            ar = h[block] / w[block]
            # argmin returns the first minimum: ties go to the earlier key, as in the table order.
            j = np.abs(ratio_values[None, :] - ar[:, None]).argmin(axis=1)
            ar_out[block] = j

    return BucketAssignment.from_indices(res_out, t_out, ar_out)  # target sizes from the tables
