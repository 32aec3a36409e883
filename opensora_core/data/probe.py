"""Read one media file's header (an MP4/MOV's index or PyAV for video, Pillow for images) into a MediaInfo.

The file type is decided by its content, not its extension, so a PNG named `.mp4` is recorded as
the image it is. Images have no frame rate or duration: `fps` and `duration` are None for them
(the dataset applies Open-Sora's IMG_FPS = 120 when it loads an image).
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from opensora_core.data.mp4_header import MP4_CONTAINER, read_mp4_video
from opensora_core.errors import MediaError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS

# Past 16K on a side no training resolution makes sense and headers that claim it are broken.
MAX_SIDE = 16384
# A frame rate outside this range is a broken header, not a real clip.
MAX_FPS = 1000.0

# Short error kinds; the errors table stores "<kind>: <detail>" so a summary can group by kind.
EMPTY = "empty file"
UNSUPPORTED = "unsupported type"
CORRUPT = "corrupt"
NO_VIDEO = "no video stream"
BAD_DIMENSIONS = "bad dimensions"
PERMISSION = "permission denied"
BROKEN_LINK = "broken symlink"
NOT_A_FILE = "not a file"
MISSING = "missing"


class ProbeError(MediaError):
    """A file that cannot be probed; `kind` is one of the short kinds above, `detail` says more."""

    def __init__(self, path: Path | str, kind: str, detail: str) -> None:
        self.path = str(path)
        self.kind = kind
        self.detail = detail
        super().__init__(f"{path}: {self.reason}")

    @property
    def reason(self) -> str:
        """The text recorded in the errors table: kind and detail, without the path."""
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class MediaInfo:
    """What the header of one media file says; `container` is the real format found by content."""

    path: str
    num_frames: int
    height: int
    width: int
    fps: float | None
    duration: float | None
    codec: str
    container: str
    is_image: bool
    file_size: int
    mtime_ns: int

    @property
    def aspect_ratio(self) -> float:
        return self.height / self.width

    @property
    def resolution(self) -> int:
        return self.height * self.width


def sniff_kind(head: bytes) -> str | None:
    """Return "image" or "video" from a file's first bytes, or None when the magic is unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska / WebM
        return "video"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "video"
    if head.startswith(b"BM") and len(head) >= 14:
        return "image"
    return None


def probe(path: Path) -> MediaInfo:
    """Read the header of one video or image; raise ProbeError (a MediaError) when it is unusable."""
    path = Path(path)
    st = _stat_regular_file(path)
    head = _read_head(path)
    suffix = path.suffix.lower()
    kind = sniff_kind(head)
    if kind is None:
        if suffix not in MEDIA_EXTENSIONS:
            raise ProbeError(
                path,
                UNSUPPORTED,
                f"extension {suffix or '(none)'!r} is not media; valid: {', '.join(MEDIA_EXTENSIONS)}",
            )
        # Containers without a fixed magic (or exotic ones) still get a chance with the decoder the
        # extension names.
        kind = "image" if suffix in IMAGE_EXTENSIONS else "video"
    try:
        if kind == "image":
            return _probe_image(path, st)
        return _probe_video(path, st)
    except ProbeError:
        raise
    except PermissionError as exc:
        raise ProbeError(path, PERMISSION, str(exc.strerror or exc)) from None
    except Exception as exc:  # a library error of any kind means the content cannot be read
        raise ProbeError(path, CORRUPT, _short(exc)) from None


def _stat_regular_file(path: Path) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ProbeError(path, BROKEN_LINK, f"points to missing {os.readlink(path)}") from None
        raise ProbeError(path, MISSING, "file not found") from None
    except PermissionError as exc:
        raise ProbeError(path, PERMISSION, str(exc.strerror or exc)) from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, ...
        raise ProbeError(path, NOT_A_FILE, _short(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ProbeError(
            path, NOT_A_FILE, "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        )
    if st.st_size == 0:
        raise ProbeError(path, EMPTY, "0 bytes")
    return st


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except PermissionError as exc:
        raise ProbeError(path, PERMISSION, str(exc.strerror or exc)) from None
    except OSError as exc:
        raise ProbeError(path, CORRUPT, _short(exc)) from None


def _probe_image(path: Path, st: os.stat_result) -> MediaInfo:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: dimensions are checked below
        try:
            with Image.open(path) as im:
                width, height = im.size
                fmt = (im.format or "unknown").lower()
                _check_dimensions(path, height, width)
                # verify() walks the chunks (CRCs for PNG) without decoding: catches truncation cheaply.
                im.verify()
        except Image.DecompressionBombError as exc:
            raise ProbeError(path, BAD_DIMENSIONS, _short(exc)) from None
    return MediaInfo(
        path=str(path),
        num_frames=1,
        height=height,
        width=width,
        fps=None,
        duration=None,
        codec=fmt,
        container=fmt,
        is_image=True,
        file_size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


def _probe_video(path: Path, st: os.stat_result) -> MediaInfo:
    # Most corpora are MP4/MOV: their index gives the same answer as PyAV at a tenth of a millisecond.
    return _probe_mp4_index(path, st) or _probe_video_with_pyav(path, st)


def _probe_mp4_index(path: Path, st: os.stat_result) -> MediaInfo | None:
    """The MediaInfo PyAV would give, read from an MP4/MOV index; None where PyAV must decide."""
    video = read_mp4_video(path, st.st_size)
    if video is None or not (0 < video.fps <= MAX_FPS):
        return None
    if not (0 < video.height <= MAX_SIDE and 0 < video.width <= MAX_SIDE):
        return None  # PyAV's path words the error
    return MediaInfo(
        path=str(path),
        num_frames=video.num_frames,
        height=video.height,
        width=video.width,
        fps=video.fps,
        duration=video.duration,
        codec=video.codec,
        container=MP4_CONTAINER,
        is_image=False,
        file_size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


def _probe_video_with_pyav(path: Path, st: os.stat_result) -> MediaInfo:
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        stream = next((s for s in container.streams if s.type == "video"), None)
        if stream is None:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ProbeError(path, NO_VIDEO, f"streams: {', '.join(kinds)}")
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        _check_dimensions(path, height, width)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        if fps is not None and not (0 < fps <= MAX_FPS):
            fps = None
        duration = _duration_seconds(stream, container)
        num_frames = int(stream.frames or 0)
        if num_frames <= 0 and duration and fps:
            # Matroska/WebM do not store a frame count; duration * fps is exact for constant-rate clips.
            num_frames = round(duration * fps)
        # Reading the first packet is cheap and catches containers whose index points past the end.
        first = next((p for p in container.demux(stream) if p.size), None)
        if first is None:
            raise ProbeError(path, CORRUPT, "video stream holds no data")
        if num_frames <= 0:
            num_frames = 1 + sum(1 for p in container.demux(stream) if p.size)
        elif not _last_frame_is_there(container, stream):
            raise ProbeError(
                path,
                CORRUPT,
                f"truncated: the header declares {num_frames} frames, the data ends before the last",
            )
        if fps is None and duration:
            fps = num_frames / duration
        if fps is None:
            raise ProbeError(path, CORRUPT, "no frame rate in the header")
        if duration is None:
            duration = num_frames / fps
        codec = ctx.name or "unknown"
        fmt = container.format.name
    return MediaInfo(
        path=str(path),
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        duration=duration,
        codec=codec,
        container=fmt,
        is_image=False,
        file_size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


def _last_frame_is_there(container, stream) -> bool:
    """Whether the packet of the stream's last frame can be read. A copy cut short keeps a header (and an
    mp4 index) that promises frames its data no longer holds; seeking to the last one costs one packet."""
    import av

    if not stream.duration:  # Matroska/WebM: no per-stream end to seek to (read time copes with those)
        return True
    try:
        container.seek(
            (stream.start_time or 0) + stream.duration, stream=stream, backward=True, any_frame=True
        )
    except av.FFmpegError:  # a container that cannot seek says nothing about its data
        return True
    return next((p for p in container.demux(stream) if p.size), None) is not None


def _duration_seconds(stream, container) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # container duration is in AV_TIME_BASE (microseconds)
    return None


def _check_dimensions(path: Path, height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height > MAX_SIDE or width > MAX_SIDE:
        raise ProbeError(path, BAD_DIMENSIONS, f"{width}x{height}; valid sides are 1..{MAX_SIDE}")


def _short(exc: BaseException) -> str:
    """First line of a library message, without the file name that PyAV appends (the row has it)."""
    strerror = getattr(exc, "strerror", None)  # OSError and PyAV's FFmpegError: message without errno
    text = strerror if isinstance(strerror, str) and strerror else str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    filename = getattr(exc, "filename", None)
    if filename:
        text = text.replace(f": {filename!r}", "").replace(f": '{filename}'", "")
    return text[:200]


ProbeOutcome = tuple[str, MediaInfo | None, str | None]


def probe_outcome(path: str) -> ProbeOutcome:
    """(path, info, None) or (path, None, reason); never raises, so one bad file cannot stop a chunk."""
    try:
        return path, probe(Path(path)), None
    except ProbeError as exc:
        return path, None, exc.reason
    except Exception as exc:  # probe() should not let these out; a scan must survive it if it does
        return path, None, f"{CORRUPT}: {type(exc).__name__}: {exc}"


def mp4_index_outcome(path: str) -> ProbeOutcome | None:
    """probe_outcome's answer for an MP4/MOV that its index answers, else None (PyAV or Pillow must
    read it). Pure Python, so it cannot crash its process: a scan runs it in its own."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    info = _probe_mp4_index(Path(path), st) if stat.S_ISREG(st.st_mode) else None
    return None if info is None else (path, info, None)


def probe_chunk(paths: list[str], marker_dir: str) -> list[ProbeOutcome]:
    """Probe `paths` in a worker process, leaving a marker that names the file in progress.

    It lives here, beside `probe`, so a worker process imports only this light module (and PyAV),
    not the scan's pyarrow / rich machinery.
    """
    # The marker names the file this worker is on, so a file that kills the process can be found.
    marker = os.path.join(marker_dir, str(os.getpid()))
    outcomes = []
    for p in paths:
        with open(marker, "wb") as f:
            f.write(os.fsencode(p))
        outcomes.append(probe_outcome(p))
    os.unlink(marker)
    return outcomes
