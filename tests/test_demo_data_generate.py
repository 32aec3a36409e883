"""make_demo_data(): the declared mix of clips and images, captions, the CSV, determinism, and its scan."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from opensora_core.data import demo_data
from opensora_core.data.demo_data import CLIP_SPECS, IMAGE_SPECS, DemoData, make_demo_data, write_video
from opensora_core.data.scan import errors_path_for, scan


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    return make_demo_data(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def scanned(demo: DemoData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = tmp_path_factory.mktemp("scan") / "meta.parquet"
    scan(demo.root, meta, workers=2, progress=False)
    return meta


def test_demo_has_ten_clips_four_images_and_one_corrupt_file(demo: DemoData) -> None:
    assert len(demo.videos) == len(CLIP_SPECS) == 10
    assert len(demo.images) == len(IMAGE_SPECS) == 4
    assert demo.corrupt.name == "broken.mp4"
    assert all(p.is_file() for p in demo.media_paths)
    assert len(demo.media_paths) == 15


def test_demo_covers_240p_360p_480p_portrait_landscape_and_square(demo: DemoData) -> None:
    sizes = {(v.height, v.width) for v in demo.videos}
    assert {(240, 426), (426, 240), (360, 640), (640, 360), (480, 854), (320, 320)} <= sizes
    assert any(v.height > v.width for v in demo.videos)
    assert any(v.height < v.width for v in demo.videos)
    assert any(v.height == v.width for v in demo.videos)


def test_demo_clips_span_20_to_120_frames_at_24_25_30_fps(demo: DemoData) -> None:
    assert min(v.num_frames for v in demo.videos) == 20
    assert max(v.num_frames for v in demo.videos) == 120
    assert {v.fps for v in demo.videos} == {24.0, 25.0, 30.0}


def test_demo_images_are_png_and_jpg(demo: DemoData) -> None:
    assert {i.path.suffix for i in demo.images} == {".png", ".jpg"}


def test_every_demo_file_has_a_sidecar_caption(demo: DemoData) -> None:
    for item in demo.items:
        assert item.path.with_suffix(".txt").read_text().strip() == item.text
    assert demo.corrupt.with_suffix(".txt").is_file()


def test_demo_captions_describe_a_shape_and_a_gradient(demo: DemoData) -> None:
    text = demo.videos[0].text
    assert text.split()[0] in ("a", "an")
    assert text.endswith("gradient")
    assert any(shape in text for shape in ("square", "circle"))


def test_captions_csv_lists_every_media_file_with_relative_paths(demo: DemoData) -> None:
    with open(demo.captions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "text"]
    listed = {demo.root / r["path"] for r in rows}
    assert listed == set(demo.media_paths)
    assert not any(Path(r["path"]).is_absolute() for r in rows)


def test_demo_scan_records_the_corrupt_file_as_the_only_error(scanned: Path, demo: DemoData) -> None:
    errors = pq.read_table(errors_path_for(scanned)).to_pylist()
    assert [e["path"] for e in errors] == [str(demo.corrupt)]
    assert errors[0]["error"].startswith("corrupt:")


def test_demo_scan_finds_the_declared_shapes_lengths_and_rates(scanned: Path, demo: DemoData) -> None:
    rows = {r["path"]: r for r in pq.read_table(scanned).to_pylist()}
    assert len(rows) == 14
    for item in demo.items:
        row = rows[str(item.path)]
        assert (row["height"], row["width"], row["num_frames"], row["is_image"]) == (
            item.height,
            item.width,
            item.num_frames,
            item.is_image,
        )
        assert row["fps"] == item.fps
        assert row["text"] == item.text


def test_demo_scan_through_captions_csv_matches_the_folder_scan(
    scanned: Path, demo: DemoData, tmp_path: Path
) -> None:
    meta = tmp_path / "csv.parquet"
    result = scan(demo.captions_csv, meta, progress=False)
    assert (result.n_ok, result.n_errors) == (14, 1)
    assert pq.read_table(meta).equals(pq.read_table(scanned))


def test_same_seed_writes_identical_bytes(demo: DemoData, tmp_path: Path) -> None:
    again = make_demo_data(tmp_path / "again", seed=0)
    for first, second in zip(demo.media_paths, again.media_paths, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
    assert demo.captions_csv.read_text() == again.captions_csv.read_text()


def test_a_clip_encoded_again_in_the_same_process_has_the_same_bytes(tmp_path: Path) -> None:
    # The first demo clip's frames: with all of x264's CPU features, encodes of them after the first one
    # in a process came out different here (3 different files in 5).
    rng = np.random.default_rng(0)
    frames = demo_data._render_clip(demo_data._random_scene(rng), 240, 426, 24, rng)
    assert frames.shape == (24, 240, 426, 3)
    written = []
    for attempt in range(5):
        path = tmp_path / f"again{attempt}.mp4"
        write_video(path, frames, 24)
        written.append(path.read_bytes())
    assert [len(b) for b in written] == [len(written[0])] * 5
    assert written[1:] == written[:1] * 4


def header_times(path: Path) -> dict[str, list[tuple[int, int]]]:
    """(creation_time, modification_time) of every mvhd, tkhd and mdhd box of an MP4/MOV, by box type."""
    data = path.read_bytes()
    found: dict[str, list[tuple[int, int]]] = {"mvhd": [], "tkhd": [], "mdhd": []}

    def walk(start: int, end: int) -> None:
        while start + 8 <= end:
            size, kind = struct.unpack(">I4s", data[start : start + 8])
            name = kind.decode("latin-1")
            if name in ("moov", "trak", "mdia"):
                walk(start + 8, start + size)
            elif name in found:
                version = data[start + 8]
                layout = ">QQ" if version == 1 else ">II"
                found[name].append(struct.unpack_from(layout, data, start + 12))
            start += size

    walk(0, len(data))
    return found


def test_mp4_and_mov_headers_carry_no_wall_clock(demo: DemoData) -> None:
    # FFmpeg writes the wall clock there only when creation_time is set; a date would change the bytes.
    movies = [v.path for v in demo.videos if v.path.suffix in (".mp4", ".mov")]
    assert len(movies) == 9
    for path in movies:
        times = header_times(path)
        assert times == {"mvhd": [(0, 0)], "tkhd": [(0, 0)], "mdhd": [(0, 0)]}, path.name


def test_demo_data_is_a_few_megabytes_at_most(demo: DemoData) -> None:
    total = sum(p.stat().st_size for p in demo.root.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024
