"""Read training clips: `num_frames` frames `frame_interval` apart from a random start (decord, PyAV
fallback), or an image as one frame. Every decoding failure becomes a MediaError naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opensora_core.data.probe import IMAGE_EXTENSIONS
from opensora_core.errors import MediaError

log = logging.getLogger(__name__)

DEFAULT_FPS = 24.0  # used when a container does not say its frame rate
IMG_FPS = 120  # the fps condition Open-Sora gives images


@dataclass(frozen=True)
class Clip:
    """Decoded frames (uint8, [T, H, W, C] RGB), the source frame rate and which frames were taken."""

    frames: np.ndarray
    fps: float
    indices: np.ndarray


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def temporal_crop_indices(
    total: int, num_frames: int, frame_interval: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of `num_frames` frames spread evenly over a window of num_frames*frame_interval frames
    that starts at a random frame (the window is cut short at the end of a short video)."""
    window = num_frames * frame_interval
    last_start = max(0, total - window - 1)
    begin = int(rng.integers(0, last_start + 1))
    end = min(begin + window, total)
    if end - begin < num_frames:
        raise ValueError(f"has {total} frames, needs at least {num_frames}")
    return np.linspace(begin, end - 1, num_frames, dtype=np.int64)


def read_image(path: str | Path) -> np.ndarray:
    """An image as one RGB frame, uint8 [1, H, W, 3]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))[None]
    except Exception as err:  # PIL raises many types for unreadable files
        raise MediaError(f"{path}: cannot read image: {type(err).__name__}: {err}") from None


def read_clip(
    path: str | Path,
    num_frames: int,
    frame_interval: int,
    rng: np.random.Generator,
    *,
    backend: str = "auto",
) -> Clip:
    """Read a clip of `num_frames` frames; `backend` is "auto" (decord, then PyAV), "decord" or "av"."""
    path = str(path)
    if backend not in ("auto", "decord", "av"):
        raise ValueError(f"backend {backend!r}: expected auto, decord or av")
    if backend in ("auto", "decord"):
        try:
            return _read_decord(path, num_frames, frame_interval, rng)
        except MediaError:
            raise
        except Exception as err:
            if backend == "decord":
                raise MediaError(
                    f"{path}: cannot decode video with decord: {type(err).__name__}: {err}"
                ) from None
            log.debug("decord failed on %s (%s); trying PyAV", path, err)
    try:
        return _read_av(path, num_frames, frame_interval, rng)
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"{path}: cannot decode video: {type(err).__name__}: {err}") from None


def _crop_or_fail(path: str, total: int, num_frames: int, frame_interval: int, rng: np.random.Generator):
    try:
        return temporal_crop_indices(total, num_frames, frame_interval, rng)
    except ValueError as err:
        raise MediaError(f"{path}: video too short: {err}") from None


def _read_decord(path: str, num_frames: int, frame_interval: int, rng: np.random.Generator) -> Clip:
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    fps = float(reader.get_avg_fps() or DEFAULT_FPS)
    indices = _crop_or_fail(path, len(reader), num_frames, frame_interval, rng)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return Clip(frames, fps, indices)


def _read_av(path: str, num_frames: int, frame_interval: int, rng: np.random.Generator) -> Clip:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else DEFAULT_FPS
        # Container frame counts can be missing or wrong, so decode everything up to the last
        # frame needed when the count is known, and the whole stream otherwise.
        declared = int(stream.frames or 0)
        if declared > 0:
            indices = _crop_or_fail(path, declared, num_frames, frame_interval, rng)
            wanted = set(indices.tolist())
            picked: dict[int, np.ndarray] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    picked[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
            if len(picked) == len(wanted):
                return Clip(np.stack([picked[i] for i in indices.tolist()]), fps, indices)
        container.seek(0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise MediaError(f"{path}: no decodable video frames")
    indices = _crop_or_fail(path, len(frames), num_frames, frame_interval, rng)
    return Clip(np.stack([frames[i] for i in indices.tolist()]), fps, indices)
