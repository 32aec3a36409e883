"""Generate a small, deterministic set of captioned synthetic clips and images for the CPU demo and tests.

Coloured shapes move over gradients (numpy), encoded with PyAV; every file has a sidecar `.txt`
caption, `captions.csv` lists them Open-Sora style (path,text), and `videos/broken.mp4` is corrupt
on purpose so a scan always has one error to report.
"""

from __future__ import annotations

import csv
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# (name, height, width, num_frames, fps, container): 240p/360p/480p classes, landscape, portrait and
# square, 20 to 120 frames at 24/25/30 fps.
CLIP_SPECS: tuple[tuple[str, int, int, int, int, str], ...] = (
    ("clip_240p_landscape", 240, 426, 48, 24, "mp4"),
    ("clip_240p_portrait", 426, 240, 32, 30, "mp4"),
    ("clip_240p_4x3", 240, 320, 72, 24, "mp4"),
    ("clip_144p_long", 144, 256, 96, 30, "mp4"),
    ("clip_360p_landscape", 360, 640, 51, 25, "mp4"),
    ("clip_360p_portrait", 640, 360, 24, 24, "mp4"),
    ("clip_360p_3x4", 480, 360, 40, 25, "mov"),
    ("clip_480p_short", 480, 854, 20, 30, "mp4"),
    ("clip_square_long", 320, 320, 120, 30, "mp4"),
    ("clip_square_mkv", 256, 256, 64, 25, "mkv"),
)
# (name, height, width, extension)
IMAGE_SPECS: tuple[tuple[str, int, int, str], ...] = (
    ("image_360p_landscape", 360, 640, "png"),
    ("image_480p_landscape", 480, 854, "jpg"),
    ("image_square", 320, 320, "png"),
    ("image_360p_portrait", 640, 360, "jpg"),
)
CORRUPT_NAME = "broken.mp4"

# x264's CPU features. With all it detects on a recent x86 CPU (AVX2, AVX-512, cache-line variants) its
# output depends on memory left by earlier work: a second encode in one process can give other bytes.
# Up to SSE2 it gives exactly the bytes of its plain C code, at about the speed of the full set; other
# machines get the plain C code itself. Either way the bytes depend on the frames only.
X264_ASM = "MMX2,SSE,SSE2" if platform.machine().lower() in ("x86_64", "amd64") else "0"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 50),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("square", "circle")
MOTIONS = ("drifts left", "drifts right", "moves up", "moves down", "grows", "shrinks")


@dataclass(frozen=True)
class DemoItem:
    """One generated media file and what a scan should find in it (fps is None for images)."""

    path: Path
    text: str
    height: int
    width: int
    num_frames: int
    fps: float | None
    is_image: bool


@dataclass(frozen=True)
class DemoData:
    """The generated folder: readable items, the one corrupt file, and the Open-Sora style CSV."""

    root: Path
    items: tuple[DemoItem, ...]
    corrupt: Path
    captions_csv: Path

    @property
    def videos(self) -> tuple[DemoItem, ...]:
        return tuple(i for i in self.items if not i.is_image)

    @property
    def images(self) -> tuple[DemoItem, ...]:
        return tuple(i for i in self.items if i.is_image)

    @property
    def media_paths(self) -> tuple[Path, ...]:
        """Every media file written, the corrupt one included."""
        return tuple(i.path for i in self.items) + (self.corrupt,)


@dataclass(frozen=True)
class _Scene:
    shape: str
    colour: str
    background: tuple[str, str]
    motion: str

    def caption(self, still: bool) -> str:
        bg = f"{_article(self.background[0])} {self.background[0]} to {self.background[1]} gradient"
        thing = f"{_article(self.colour)} {self.colour} {self.shape}"
        if still:
            return f"{thing} rests on {bg}"
        return f"{thing} {self.motion} over {bg}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_demo_data(out_dir: Path, *, seed: int = 0) -> DemoData:
    """Write the demo clips, images, captions and corrupt file under OUT_DIR; same seed, same bytes."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items: list[DemoItem] = []

    for name, height, width, num_frames, fps, ext in CLIP_SPECS:
        scene = _random_scene(rng)
        path = out_dir / "videos" / f"{name}.{ext}"
        write_video(path, _render_clip(scene, height, width, num_frames, rng), fps)
        items.append(DemoItem(path, scene.caption(still=False), height, width, num_frames, float(fps), False))

    for name, height, width, ext in IMAGE_SPECS:
        scene = _random_scene(rng)
        path = out_dir / "images" / f"{name}.{ext}"
        _write_image(path, _render_clip(scene, height, width, 1, rng)[0])
        items.append(DemoItem(path, scene.caption(still=True), height, width, 1, None, True))

    # Looks like the start of an MP4 (so it is probed as one) followed by noise: a cut-off download.
    corrupt = out_dir / "videos" / CORRUPT_NAME
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypisom" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    corrupt_text = "a clip that was cut off while downloading"

    for item in items:
        item.path.with_suffix(".txt").write_text(item.text + "\n", encoding="utf-8")
    corrupt.with_suffix(".txt").write_text(corrupt_text + "\n", encoding="utf-8")

    captions_csv = out_dir / "captions.csv"
    with open(captions_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        for item in items:
            writer.writerow([item.path.relative_to(out_dir).as_posix(), item.text])
        writer.writerow([corrupt.relative_to(out_dir).as_posix(), corrupt_text])

    return DemoData(root=out_dir, items=tuple(items), corrupt=corrupt, captions_csv=captions_csv)


def _random_scene(rng: np.random.Generator) -> _Scene:
    names = list(COLOURS)
    colour, bg_a, bg_b = (names[i] for i in rng.choice(len(names), size=3, replace=False))
    return _Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour,
        background=(bg_a, bg_b),
        motion=MOTIONS[rng.integers(len(MOTIONS))],
    )


def _render_clip(
    scene: _Scene, height: int, width: int, num_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """Frames as uint8 (T, H, W, 3): a fixed gradient, a shape moving as the caption says, light noise."""
    a = np.array(COLOURS[scene.background[0]], np.float32)
    b = np.array(COLOURS[scene.background[1]], np.float32)
    vertical = height >= width
    ramp = np.linspace(0.0, 1.0, height if vertical else width, dtype=np.float32)
    ramp = ramp[:, None] if vertical else ramp[None, :]
    background = (a + (b - a) * ramp[..., None]) * np.ones((height, width, 1), np.float32)
    colour = np.array(COLOURS[scene.colour], np.float32)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(height, width)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        s = t / max(1, num_frames - 1)  # 0 → 1 across the clip
        cy, cx, r = height / 2, width / 2, side * 0.15
        if scene.motion == "drifts left":
            cx = width * (0.75 - 0.5 * s)
        elif scene.motion == "drifts right":
            cx = width * (0.25 + 0.5 * s)
        elif scene.motion == "moves up":
            cy = height * (0.75 - 0.5 * s)
        elif scene.motion == "moves down":
            cy = height * (0.25 + 0.5 * s)
        elif scene.motion == "grows":
            r = side * (0.08 + 0.17 * s)
        else:  # shrinks
            r = side * (0.25 - 0.17 * s)
        if scene.shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        frame = background.copy()
        frame[mask] = colour
        # A little grain so the encoder has texture to code, as real footage would.
        frame += rng.normal(0.0, 2.0, size=(height, width, 1)).astype(np.float32)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def video_codec_for(path: Path) -> str:
    """The encoder PyAV has for this container: VP9/VP8 for WebM, else H.264 (libx264) or MPEG-4 part 2."""
    import av

    available = av.codecs_available
    if Path(path).suffix.lower() == ".webm":
        return "libvpx-vp9" if "libvpx-vp9" in available else "libvpx"
    return "libx264" if "libx264" in available else "mpeg4"


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 RGB frames (T, H, W, 3; H and W even) to PATH, the container taken from its extension."""
    import av

    codec = video_codec_for(path)
    _, height, width, _ = frames.shape
    # bitexact: no random Matroska UIDs and no library version strings, so the bytes depend on the seed only.
    # No creation_time is set, so MP4/MOV headers hold 0 there (1904-01-01), never the wall clock.
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One encoder thread keeps the bytes identical from run to run.
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "28", "x264-params": f"asm={X264_ASM}"}
        else:
            stream.codec_context.bit_rate = 400_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_image(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(pixels)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=90)
    else:
        image.save(path)


def repeated_metadata(meta: pa.Table, repeat: int) -> pa.Table:
    """`repeat` copies of a scanned metadata table, the same files with other captions ("... take i"):
    more samples for the benchmarks without more media."""
    copies = []
    for i in range(repeat):
        text = pc.binary_join_element_wise(meta["text"], pa.scalar(f"take {i}"), " ")
        copies.append(meta.set_column(meta.schema.get_field_index("text"), "text", text))
    return pa.concat_tables(copies)
