"""Clip reading (decord, PyAV fallback, images) and the resize/crop/normalise transforms."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import grey_clip
from PIL import Image

from opensora_core.data import video_io
from opensora_core.data.transforms import apply_transform, resize_crop
from opensora_core.data.video_io import read_clip, read_image, temporal_crop_indices
from opensora_core.errors import ConfigError, MediaError


def write_image(path: Path, height: int = 40, width: int = 30, value: int = 200) -> Path:
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)
    return path


# Mean grey level of each decoded frame of grey_clip's clip (the codec shifts the levels a little).
DECODED_LEVELS: list[float] = []


def frame_numbers(frames: np.ndarray) -> list[int]:
    """Which source frame each decoded frame is: the one whose grey level is nearest."""
    levels = np.array(DECODED_LEVELS)
    return [int(np.abs(levels - f.mean()).argmin()) for f in frames]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    import av

    path = grey_clip(tmp_path_factory.mktemp("media") / "clip.mp4")
    with av.open(str(path)) as container:
        DECODED_LEVELS[:] = [f.to_ndarray(format="rgb24").mean() for f in container.decode(video=0)]
    assert len(DECODED_LEVELS) == 30 and np.all(np.diff(DECODED_LEVELS) > 2)
    return path


def test_crop_indices_are_spread_over_the_window():
    rng = np.random.default_rng(0)
    idx = temporal_crop_indices(100, 4, 3, rng)
    assert np.diff(idx).tolist() == [3, 4, 4]  # linspace over 12 frames
    assert 0 <= idx[0] and idx[-1] < 100


def test_crop_window_starts_anywhere_it_fits():
    starts = {int(temporal_crop_indices(20, 4, 2, np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == set(range(0, 12))  # last start = 20 - 8 - 1


def test_crop_of_short_video_uses_what_there_is():
    assert temporal_crop_indices(6, 4, 3, np.random.default_rng(0)).tolist() == [0, 1, 3, 5]


def test_crop_of_too_short_video_is_an_error():
    with pytest.raises(ValueError, match="has 3 frames, needs at least 4"):
        temporal_crop_indices(3, 4, 1, np.random.default_rng(0))


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_read_clip_takes_frames_interval_apart(video, backend):
    clip = read_clip(video, 5, 2, np.random.default_rng(3), backend=backend)
    assert clip.frames.shape == (5, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(24.0)
    assert frame_numbers(clip.frames) == clip.indices.tolist()
    assert np.diff(clip.indices).tolist() == [2, 2, 2, 3]


def test_read_clip_falls_back_to_pyav(video, monkeypatch):
    def broken(*args):
        raise RuntimeError("decord cannot open this")

    monkeypatch.setattr(video_io, "_read_decord", broken)
    clip = read_clip(video, 4, 1, np.random.default_rng(0))
    assert frame_numbers(clip.frames) == clip.indices.tolist()


def test_corrupt_video_raises_media_error_naming_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(MediaError, match="broken.mp4"):
        read_clip(bad, 4, 1, np.random.default_rng(0))


def test_too_short_video_raises_media_error(video):
    with pytest.raises(MediaError, match="clip.mp4: video too short"):
        read_clip(video, 40, 1, np.random.default_rng(0))


def test_read_image_gives_one_frame(tmp_path):
    frames = read_image(write_image(tmp_path / "a.png"))
    assert frames.shape == (1, 40, 30, 3)
    assert int(frames[0, 0, 0, 0]) == 200


def test_unreadable_image_raises_media_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(MediaError, match="bad.png: cannot read image"):
        read_image(bad)


def test_resize_crop_covers_then_crops_the_middle():
    # Columns hold their own index: after halving, the middle 50 columns of 100 remain.
    video = torch.arange(200, dtype=torch.float32).repeat(1, 1, 100, 1)  # [1, 1, 100, 200]
    out = resize_crop(video, (50, 50))
    assert out.shape == (1, 1, 50, 50)
    assert out[0, 0, 0, 0].item() == pytest.approx(51.0, abs=1.0)
    assert out[0, 0, 0, -1].item() == pytest.approx(149.0, abs=1.0)


def test_resize_crop_upscales_small_frames():
    assert resize_crop(torch.zeros(2, 3, 10, 20), (30, 40)).shape == (2, 3, 30, 40)


def test_apply_transform_gives_cthw_in_minus_one_to_one():
    frames = np.zeros((3, 20, 30, 3), dtype=np.uint8)
    frames[..., 0] = 255
    out = apply_transform(frames, (16, 16), "center")
    assert out.shape == (3, 3, 16, 16)
    assert out[0].min().item() == pytest.approx(1.0) and out[1].max().item() == pytest.approx(-1.0)


def test_center_transform_needs_a_square():
    with pytest.raises(ConfigError, match="use 'resize_crop'"):
        apply_transform(np.zeros((1, 8, 8, 3), dtype=np.uint8), (8, 16), "center")


def test_unknown_transform_lists_valid_names():
    with pytest.raises(ConfigError, match="valid: resize_crop, center"):
        apply_transform(np.zeros((1, 8, 8, 3), dtype=np.uint8), (8, 8), "random_crop")
