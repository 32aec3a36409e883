"""probe(): header facts of each supported format, and a ProbeError with a short reason for bad input."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from opensora_core.data.demo_data import write_video
from opensora_core.data.probe import MediaInfo, ProbeError, probe
from opensora_core.errors import MediaError


def frames(t: int = 10, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims WIDTHxHEIGHT (valid CRCs, no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def reason_of(path: Path) -> str:
    with pytest.raises(ProbeError) as info:
        probe(path)
    return info.value.reason


@pytest.mark.parametrize(
    ("ext", "codec"),
    [("mp4", "h264"), ("mov", "h264"), ("mkv", "h264"), ("webm", "vp9"), ("avi", "h264")],
)
def test_probe_reads_video_header(tmp_path: Path, ext: str, codec: str) -> None:
    path = tmp_path / f"clip.{ext}"
    write_video(path, frames(t=10, h=48, w=64), fps=25)
    info = probe(path)
    assert (info.num_frames, info.height, info.width) == (10, 48, 64)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(0.4, abs=0.01)
    assert info.codec == codec
    assert info.is_image is False
    assert info.file_size == path.stat().st_size
    assert info.mtime_ns == path.stat().st_mtime_ns


def test_probe_counts_frames_of_matroska_from_duration_and_fps(tmp_path: Path) -> None:
    # Matroska stores no frame count: 30 frames at 30 fps must come back as 30 from duration * fps.
    path = tmp_path / "clip.mkv"
    write_video(path, frames(t=30, h=32, w=32), fps=30)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert probe(path).num_frames == 30


def test_probe_reads_portrait_aspect_ratio_and_resolution(tmp_path: Path) -> None:
    path = tmp_path / "portrait.mp4"
    write_video(path, frames(t=4, h=64, w=32), fps=24)
    info = probe(path)
    assert info.aspect_ratio == 2.0
    assert info.resolution == 64 * 32


@pytest.mark.parametrize(("ext", "fmt"), [("png", "png"), ("jpg", "jpeg"), ("webp", "webp"), ("bmp", "bmp")])
def test_probe_reads_image_header(tmp_path: Path, ext: str, fmt: str) -> None:
    path = tmp_path / f"still.{ext}"
    Image.fromarray(frames(t=1, h=30, w=40)[0]).save(path)
    info = probe(path)
    assert (info.num_frames, info.height, info.width) == (1, 30, 40)
    assert info.is_image is True
    assert info.fps is None and info.duration is None
    assert info.codec == fmt


def test_png_named_mp4_is_probed_as_the_image_it_is(tmp_path: Path) -> None:
    path = tmp_path / "liar.mp4"
    Image.fromarray(frames(t=1, h=20, w=30)[0]).save(path, format="PNG")
    info = probe(path)
    assert info.is_image is True
    assert info.codec == "png"
    assert (info.height, info.width, info.num_frames) == (20, 30, 1)


def test_mp4_named_jpg_is_probed_as_the_video_it_is(tmp_path: Path) -> None:
    real = tmp_path / "real.mp4"
    write_video(real, frames(t=6, h=16, w=16), fps=24)
    path = tmp_path / "liar.jpg"
    path.write_bytes(real.read_bytes())
    info = probe(path)
    assert info.is_image is False
    assert info.num_frames == 6


def test_zero_byte_file_is_an_empty_file_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    assert reason_of(path) == "empty file: 0 bytes"


def test_text_file_with_unknown_extension_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "notes.xyz"
    path.write_text("hello")
    assert reason_of(path).startswith("unsupported type: extension '.xyz'")


def test_text_file_named_mp4_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video at all\n" * 20)
    assert reason_of(path).startswith("corrupt:")


def test_truncated_mp4_is_corrupt(tmp_path: Path) -> None:
    full = tmp_path / "full.mp4"
    write_video(full, frames(t=10, h=48, w=64), fps=25)
    path = tmp_path / "cut.mp4"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert reason_of(path).startswith("corrupt:")


def test_truncated_png_is_corrupt(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(frames(t=1, h=64, w=64)[0]).save(full)
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert reason_of(path).startswith("corrupt:")


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "song.mp4"
    write_audio_only(path)
    assert reason_of(path) == "no video stream: streams: audio"


def test_absurd_image_dimensions_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_with_header(100_000, 100_000))
    assert reason_of(path).startswith("bad dimensions:")


def test_image_wider_than_the_limit_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "strip.png"
    path.write_bytes(png_with_header(20_000, 2))
    assert reason_of(path) == "bad dimensions: 20000x2; valid sides are 1..16384"


def test_broken_symlink_is_reported_with_its_target(tmp_path: Path) -> None:
    path = tmp_path / "link.mp4"
    path.symlink_to(tmp_path / "gone.mp4")
    assert reason_of(path) == f"broken symlink: points to missing {tmp_path / 'gone.mp4'}"


def test_directory_named_like_a_video_is_not_a_file(tmp_path: Path) -> None:
    path = tmp_path / "folder.mp4"
    path.mkdir()
    assert reason_of(path) == "not a file: is a directory"


def test_missing_file_is_reported(tmp_path: Path) -> None:
    assert reason_of(tmp_path / "nowhere.mp4") == "missing: file not found"


def test_probe_error_is_a_media_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(MediaError, match=r"empty\.png: empty file"):
        probe(path)


def reason_as_nobody(path: Path) -> str:
    """Probe in a forked child; as root the child first drops to nobody, since root reads any file."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                probe(path)
                message = "no error"
            except ProbeError as exc:
                message = exc.reason
            os.write(write_end, message.encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


def test_unreadable_file_is_a_permission_error() -> None:
    folder = Path(tempfile.mkdtemp(prefix="probe-perm-"))
    path = folder / "locked.png"
    try:
        folder.chmod(0o755)  # the unprivileged child must reach the file, then fail to open it
        Image.fromarray(frames(t=1, h=8, w=8)[0]).save(path)
        path.chmod(0o000)
        assert reason_as_nobody(path) == "permission denied: Permission denied"
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_media_info_is_a_plain_value() -> None:
    info = MediaInfo("a.mp4", 10, 240, 426, 24.0, 0.41, "h264", "mp4", False, 1, 2)
    assert info.aspect_ratio == pytest.approx(240 / 426)
    assert info.resolution == 240 * 426
