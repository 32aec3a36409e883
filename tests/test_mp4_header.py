"""The MP4/MOV index reader gives exactly PyAV's MediaInfo, and hands PyAV every file it cannot answer."""

from __future__ import annotations

import os
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from opensora_core.data import probe as probe_module
from opensora_core.data.mp4_header import read_mp4_video
from opensora_core.data.probe import probe_outcome

HEVC = "libx265" if "libx265" in av.codecs_available else None


def encode(
    path: Path,
    codec: str,
    height: int,
    width: int,
    num_frames: int,
    rate: int | Fraction,
    *,
    audio: bool = False,
    movflags: str | None = None,
) -> Path:
    """Noise frames (so every frame costs bytes), optionally with an AAC track, muxed by FFmpeg."""
    options = {"movflags": movflags} if movflags else {}
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if codec == "libx265":
            video.options = {"x265-params": "log-level=error"}
        sound = container.add_stream("aac", rate=16000) if audio else None
        for _ in range(num_frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            if sound is not None:
                samples = av.AudioFrame.from_ndarray(
                    np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
                )
                samples.sample_rate = 16000
                container.mux(sound.encode(samples))
        container.mux(video.encode())
        if sound is not None:
            container.mux(sound.encode())
    return path


def by_pyav(path: Path, monkeypatch: pytest.MonkeyPatch):
    """probe_outcome with the index reader switched off: (MediaInfo, None) or (None, reason)."""
    with monkeypatch.context() as m:
        m.setattr(probe_module, "_probe_mp4_index", lambda path, st: None)
        return probe_outcome(str(path))[1:]


def by_index(path: Path):
    return probe_outcome(str(path))[1:]


def uses_index(path: Path) -> bool:
    return read_mp4_video(path, os.path.getsize(path)) is not None


def patch_box(path: Path, kind: bytes, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field at `offset` bytes into the payload of the first `kind` box."""
    data = bytearray(path.read_bytes())
    at = data.index(kind, data.index(b"moov")) + 4 + offset  # past ftyp, whose brands may name it
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


GRID = [
    # codec, container, height, width, frames, rate, audio, movflags
    ("libx264", "mp4", 48, 64, 10, 24, False, None),
    ("libx264", "mov", 48, 64, 10, 25, False, None),
    ("libx264", "mp4", 90, 160, 12, Fraction(30000, 1001), False, "faststart"),
    ("libx264", "mp4", 64, 30, 7, 60, True, None),  # portrait, cropped SPS (30 = 2 MBs - 2)
    ("libx264", "mov", 144, 256, 1, 24, False, "faststart"),
    ("libx264", "mp4", 48, 64, 9, 30, True, "faststart"),
    ("mpeg4", "mp4", 48, 64, 10, 25, False, None),
    ("mpeg4", "mov", 90, 160, 8, Fraction(30000, 1001), True, None),
    ("mpeg4", "mp4", 64, 30, 1, 60, False, "faststart"),
    ("mpeg4", "mov", 48, 64, 11, 24, False, "faststart"),
]
if HEVC:
    GRID += [
        ("libx265", "mp4", 48, 64, 10, 24, False, None),
        ("libx265", "mov", 90, 160, 6, Fraction(30000, 1001), True, "faststart"),
    ]


@pytest.mark.parametrize(("codec", "ext", "height", "width", "frames", "rate", "audio", "movflags"), GRID)
def test_index_reader_gives_the_media_info_pyav_gives(
    tmp_path: Path, monkeypatch, codec, ext, height, width, frames, rate, audio, movflags
) -> None:
    path = encode(
        tmp_path / f"clip.{ext}", codec, height, width, frames, rate, audio=audio, movflags=movflags
    )
    assert uses_index(path)
    info, reason = by_index(path)
    assert reason is None
    assert info == by_pyav(path, monkeypatch)[0]
    assert (info.num_frames, info.height, info.width, info.is_image) == (frames, height, width, False)
    assert info.container == "mov,mp4,m4a,3gp,3g2,mj2"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "moov_last": encode(root / "moov_last.mp4", "libx264", 48, 64, 20, 24, audio=True),
        "moov_first": encode(root / "moov_first.mp4", "mpeg4", 48, 64, 20, 24, movflags="faststart"),
    }


@pytest.mark.parametrize("name", ["moov_last", "moov_first"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95, -1])
def test_truncated_copy_gets_pyavs_outcome(
    clips, tmp_path: Path, monkeypatch, name: str, keep: float
) -> None:
    data = clips[name].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) - 1 if keep == -1 else int(len(data) * keep)])
    assert not uses_index(path)  # the index points past the end (or is gone): PyAV decides
    assert by_index(path) == by_pyav(path, monkeypatch)


def test_truncated_faststart_copy_is_the_truncated_error(clips, tmp_path: Path) -> None:
    data = clips["moov_first"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: data.index(b"mdat") + (len(data) - data.index(b"mdat")) // 2])
    assert (
        by_index(path)[1]
        == "corrupt: truncated: the header declares 20 frames, the data ends before the last"
    )


def test_fragmented_mp4_falls_back_to_pyav(tmp_path: Path, monkeypatch) -> None:
    path = encode(tmp_path / "frag.mp4", "libx264", 48, 64, 12, 24, movflags="frag_keyframe+empty_moov")
    assert not uses_index(path)
    assert by_index(path) == by_pyav(path, monkeypatch)


def test_audio_only_mp4_falls_back_to_pyavs_no_video_error(tmp_path: Path) -> None:
    path = tmp_path / "song.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 16000
        container.mux([*stream.encode(samples), *stream.encode()])
    assert not uses_index(path)
    assert by_index(path) == (None, "no video stream: streams: audio")


def test_codec_outside_the_table_falls_back_to_pyav(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "frames.mov"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 32, 3), np.uint8), format="rgb24")
        container.mux([*stream.encode(frame), *stream.encode()])
    assert not uses_index(path)
    assert by_index(path)[0].codec == "png"
    assert by_index(path) == by_pyav(path, monkeypatch)


def test_sample_entry_size_that_disagrees_with_the_sps_falls_back(tmp_path: Path, monkeypatch) -> None:
    path = encode(tmp_path / "clip.mp4", "libx264", 48, 64, 6, 24)
    patch_box(path, b"avc1", 24, ">H", 80)  # the sample entry now says 80 wide; the SPS says 64
    assert not uses_index(path)
    assert by_index(path) == by_pyav(path, monkeypatch)
    assert by_index(path)[0].width == 64


@pytest.mark.parametrize("segment_ms", [100, 5000])
def test_edit_shorter_or_longer_than_the_media_gives_pyavs_duration(
    tmp_path: Path, monkeypatch, segment_ms: int
) -> None:
    path = encode(tmp_path / "clip.mp4", "libx264", 48, 64, 24, 24)  # 1 s, with an elst (B-frames)
    data = path.read_bytes()
    assert data[data.index(b"elst") + 4] == 0  # version 0: 32-bit segment duration at payload + 8
    (movie_scale,) = struct.unpack_from(">I", data, data.index(b"mvhd") + 4 + 12)
    patch_box(path, b"elst", 8, ">I", segment_ms * movie_scale // 1000)
    assert uses_index(path)
    info = by_index(path)[0]
    assert info == by_pyav(path, monkeypatch)[0]
    assert info.duration == pytest.approx(min(segment_ms / 1000, 1.0), abs=0.002)


def test_two_edits_fall_back_to_pyav(tmp_path: Path, monkeypatch) -> None:
    path = encode(tmp_path / "clip.mp4", "libx264", 48, 64, 12, 24)
    patch_box(path, b"elst", 4, ">I", 2)  # entry count 2: the second entry is read from the next box
    assert not uses_index(path)
    assert by_index(path) == by_pyav(path, monkeypatch)


def test_media_header_shorter_than_the_samples_gives_pyavs_duration(tmp_path: Path, monkeypatch) -> None:
    path = encode(tmp_path / "clip.mp4", "mpeg4", 48, 64, 24, 24)  # no edit list
    data = path.read_bytes()
    assert data[data.index(b"mdhd") + 4] == 0  # version 0: 32-bit duration at payload + 16
    (timescale,) = struct.unpack_from(">I", data, data.index(b"mdhd") + 4 + 12)
    patch_box(path, b"mdhd", 16, ">I", timescale // 2)
    info = by_index(path)[0]
    assert uses_index(path)
    assert info == by_pyav(path, monkeypatch)[0]
    assert info.duration == 0.5


def test_png_named_mp4_never_reaches_the_index_reader(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "liar.mp4"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")
    assert not uses_index(path)


def test_scan_reads_mp4_indexes_without_starting_workers(tmp_path: Path, monkeypatch) -> None:
    from opensora_core.data import scan as scan_module

    root = tmp_path / "media"
    root.mkdir()
    first = encode(root / "c00.mp4", "libx264", 48, 64, 6, 24)
    for i in range(1, scan_module.INLINE_BELOW + 4):
        (root / f"c{i:02d}.mp4").write_bytes(first.read_bytes())

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(scan_module, "_probe_in_pool", no_pool)
    result = scan_module.scan(root, tmp_path / "meta.parquet", workers=2, progress=False)
    assert (result.n_ok, result.n_errors) == (scan_module.INLINE_BELOW + 4, 0)


def test_scan_table_is_the_same_with_and_without_the_index_reader(tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    from opensora_core.data.scan import errors_path_for, scan

    root = tmp_path / "media"
    root.mkdir()
    encode(root / "a.mp4", "libx264", 48, 64, 10, 24, audio=True)
    encode(root / "b.mov", "mpeg4", 64, 30, 5, Fraction(30000, 1001))
    encode(root / "c.mkv", "libx264", 48, 64, 4, 25)
    encode(root / "d.mp4", "libx264", 48, 64, 8, 24, movflags="frag_keyframe+empty_moov")
    data = (root / "a.mp4").read_bytes()
    (root / "e.mp4").write_bytes(data[: len(data) // 2])
    fast = scan(root, tmp_path / "fast.parquet", workers=1, progress=False)
    monkeypatch.setattr(probe_module, "_probe_mp4_index", lambda path, st: None)
    slow = scan(root, tmp_path / "slow.parquet", workers=1, progress=False)
    assert (fast.n_ok, fast.n_errors) == (slow.n_ok, slow.n_errors) == (4, 1)
    assert pq.read_table(tmp_path / "fast.parquet").equals(pq.read_table(tmp_path / "slow.parquet"))
    assert pq.read_table(errors_path_for(tmp_path / "fast.parquet")).equals(
        pq.read_table(errors_path_for(tmp_path / "slow.parquet"))
    )
