"""scan(): folder and CSV input, sidecar captions, errors table, incremental rescan, parallel probing."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from opensora_core.data.demo_data import write_video
from opensora_core.data.scan import INLINE_BELOW, METADATA_COLUMNS, errors_path_for, scan
from opensora_core.errors import ConfigError


def frames(t: int = 8, h: int = 32, w: int = 48) -> np.ndarray:
    return np.random.default_rng(t * h * w).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def save_image(path: Path, h: int = 24, w: int = 40, fmt: str | None = None) -> None:
    Image.fromarray(frames(1, h, w)[0]).save(path, format=fmt)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims WIDTHxHEIGHT (valid CRCs, no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rows_by_name(meta: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(meta).to_pylist()}


def errors_by_name(meta: Path) -> dict[str, str]:
    return {Path(r["path"]).name: r["error"] for r in pq.read_table(errors_path_for(meta)).to_pylist()}


def run_scan(input: Path, output: Path, **kwargs):
    return scan(input, output, progress=False, **kwargs)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """a.mp4 with caption, sub/b.png with caption, c.mkv without one, plus a README that is not media."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    write_video(root / "a.mp4", frames(8, 32, 48), fps=24)
    (root / "a.txt").write_text("a cat jumps\n")
    save_image(root / "sub" / "b.png", 24, 40)
    (root / "sub" / "b.txt").write_text("a quiet lake")
    write_video(root / "c.mkv", frames(6, 48, 32), fps=30)
    (root / "README.md").write_text("not media")
    return root


def test_metadata_table_has_exactly_the_contract_columns(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    assert tuple(pq.read_table(meta).column_names) == METADATA_COLUMNS
    assert METADATA_COLUMNS == (
        "path", "text", "num_frames", "height", "width", "fps", "aspect_ratio",
        "resolution", "duration", "codec", "file_size", "mtime_ns", "is_image",
    )  # fmt: skip


def test_errors_table_has_path_and_error_columns(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    assert pq.read_table(tmp_path / "meta.errors.parquet").column_names == ["path", "error"]


def test_rows_hold_header_values(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    a = rows_by_name(meta)["a.mp4"]
    assert (a["num_frames"], a["height"], a["width"], a["fps"]) == (8, 32, 48, 24.0)
    assert a["aspect_ratio"] == pytest.approx(32 / 48)
    assert a["resolution"] == 32 * 48
    assert a["duration"] == pytest.approx(8 / 24, abs=0.01)
    assert a["codec"] == "h264"
    assert a["is_image"] is False
    assert a["file_size"] == (media / "a.mp4").stat().st_size
    assert a["mtime_ns"] == (media / "a.mp4").stat().st_mtime_ns


def test_image_row_has_one_frame_and_no_fps(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    b = rows_by_name(meta)["b.png"]
    assert (b["num_frames"], b["height"], b["width"], b["is_image"]) == (1, 24, 40, True)
    assert b["fps"] is None and b["duration"] is None


def test_paths_are_absolute_and_subfolders_are_walked(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    paths = sorted(r["path"] for r in pq.read_table(meta).to_pylist())
    assert paths == [str(media / "a.mp4"), str(media / "c.mkv"), str(media / "sub" / "b.png")]


def test_sidecar_txt_becomes_the_caption(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    rows = rows_by_name(meta)
    assert rows["a.mp4"]["text"] == "a cat jumps"
    assert rows["b.png"]["text"] == "a quiet lake"


def test_missing_caption_gives_empty_text_and_is_counted(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    result = run_scan(media, meta)
    assert rows_by_name(meta)["c.mkv"]["text"] == ""
    assert result.n_missing_caption == 1


def test_non_media_files_are_skipped_not_errors(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    result = run_scan(media, meta)
    assert result.n_skipped == 1
    assert result.n_errors == 0


def test_every_bad_input_lands_in_the_errors_table(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "empty.mp4").touch()
    (root / "notes.mp4").write_text("plain text, not a video\n" * 10)
    write_video(tmp_path / "full.mp4", frames(10, 32, 48), fps=25)
    (root / "cut.mp4").write_bytes((tmp_path / "full.mp4").read_bytes()[:300])
    with av.open(str(root / "song.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    (root / "huge.png").write_bytes(png_with_header(100_000, 100_000))
    (root / "link.mp4").symlink_to(root / "gone.mp4")
    (root / "dir.mp4").mkdir()
    save_image(root / "good.png")

    meta = tmp_path / "meta.parquet"
    result = run_scan(root, meta)

    kinds = {name: error.split(":")[0] for name, error in errors_by_name(meta).items()}
    assert kinds == {
        "empty.mp4": "empty file",
        "notes.mp4": "corrupt",
        "cut.mp4": "corrupt",
        "song.mp4": "no video stream",
        "huge.png": "bad dimensions",
        "link.mp4": "broken symlink",
    }
    assert list(rows_by_name(meta)) == ["good.png"]
    assert result.errors_by_reason == {
        "empty file": 1,
        "corrupt": 2,
        "no video stream": 1,
        "bad dimensions": 1,
        "broken symlink": 1,
    }


def test_png_named_mp4_is_recorded_as_an_image(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    save_image(root / "liar.mp4", 20, 30, fmt="PNG")
    meta = tmp_path / "meta.parquet"
    run_scan(root, meta)
    row = rows_by_name(meta)["liar.mp4"]
    assert (row["is_image"], row["codec"], row["num_frames"]) == (True, "png", 1)


def test_non_utf8_file_name_is_recorded_as_an_error(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    save_image(root / "fine.png")
    bad = os.fsencode(root) + b"/caf\xe9.png"
    with open(bad, "wb") as f:
        f.write((root / "fine.png").read_bytes())
    meta = tmp_path / "meta.parquet"
    result = run_scan(root, meta)
    assert list(rows_by_name(meta)) == ["fine.png"]
    assert errors_by_name(meta) == {"caf\\xe9.png": "bad name: file name is not valid UTF-8; rename the file"}
    assert result.n_errors == 1


def test_non_utf8_caption_is_decoded_with_replacement(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    save_image(root / "x.png")
    (root / "x.txt").write_bytes(b"caf\xe9 au lait")
    meta = tmp_path / "meta.parquet"
    run_scan(root, meta)
    assert rows_by_name(meta)["x.png"]["text"] == "caf\ufffd au lait"


def scan_as_nobody(root: Path, meta: Path) -> None:
    """Run scan in a forked child that, under root, drops to nobody (root can read any file)."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            scan(root, meta, workers=1, progress=False)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_unreadable_file_and_folder_land_in_the_errors_table() -> None:
    base = Path(tempfile.mkdtemp(prefix="scan-perm-"))
    root, out, locked_dir = base / "media", base / "out", base / "media" / "locked"
    try:
        base.chmod(0o755)
        locked_dir.mkdir(parents=True)
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        save_image(root / "open.png")
        save_image(root / "locked.png")
        save_image(locked_dir / "inside.png")
        (root / "locked.png").chmod(0o000)
        locked_dir.chmod(0o000)
        meta = out / "meta.parquet"
        scan_as_nobody(root, meta)
        assert list(rows_by_name(meta)) == ["open.png"]
        errors = errors_by_name(meta)
        assert errors["locked.png"] == "permission denied: Permission denied"
        assert errors["locked"].startswith("permission denied: cannot list folder")
    finally:
        locked_dir.chmod(0o755)
        for p in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
            p.rmdir() if p.is_dir() else p.unlink()
        base.rmdir()


def test_csv_paths_resolve_against_the_csv_folder(media: Path, tmp_path: Path) -> None:
    csv = media / "list.csv"
    csv.write_text('path,text\na.mp4,from the csv\nsub/b.png,"a lake, at dawn"\n')
    meta = tmp_path / "meta.parquet"
    result = run_scan(csv, meta)
    rows = rows_by_name(meta)
    assert rows["a.mp4"]["path"] == str(media / "a.mp4")
    assert rows["a.mp4"]["text"] == "from the csv"
    assert rows["b.png"]["text"] == "a lake, at dawn"
    assert result.n_ok == 2


def test_csv_duplicate_paths_are_deduplicated_with_a_warning(
    media: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = media / "list.csv"
    csv.write_text(f"path,text\na.mp4,first\n{media / 'a.mp4'},second\n./a.mp4,third\n")
    meta = tmp_path / "meta.parquet"
    with caplog.at_level(logging.WARNING, logger="opensora_core.data.scan"):
        result = run_scan(csv, meta)
    assert rows_by_name(meta)["a.mp4"]["text"] == "first"
    assert result.n_ok == 1 and result.n_duplicates == 2
    assert "2 duplicate paths ignored" in caplog.text


def test_csv_listing_a_missing_or_unsupported_file_records_errors(media: Path, tmp_path: Path) -> None:
    (media / "notes.xyz").write_text("hello")
    csv = media / "list.csv"
    csv.write_text("path,text\na.mp4,x\nnowhere.mp4,y\nnotes.xyz,z\n")
    meta = tmp_path / "meta.parquet"
    run_scan(csv, meta)
    errors = errors_by_name(meta)
    assert errors["nowhere.mp4"] == "missing: file not found"
    assert errors["notes.xyz"].startswith("unsupported type: extension '.xyz' is not media")


def test_csv_without_text_column_gives_empty_captions(media: Path, tmp_path: Path) -> None:
    csv = media / "list.csv"
    csv.write_text("path\na.mp4\n")
    meta = tmp_path / "meta.parquet"
    result = run_scan(csv, meta)
    assert rows_by_name(meta)["a.mp4"]["text"] == ""
    assert result.n_missing_caption == 1


def test_csv_without_path_column_is_a_config_error(media: Path, tmp_path: Path) -> None:
    csv = media / "list.csv"
    csv.write_text("file,text\na.mp4,x\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        run_scan(csv, tmp_path / "meta.parquet")


def test_input_that_is_neither_folder_nor_table_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a folder"):
        run_scan(tmp_path / "missing", tmp_path / "meta.parquet")


def test_rescan_reprobes_only_the_touched_file(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    first = run_scan(media, meta)
    assert (first.n_reprobed, first.n_reused) == (3, 0)
    st = (media / "a.mp4").stat()
    os.utime(media / "a.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = run_scan(media, meta)
    assert (second.n_reprobed, second.n_reused, second.n_ok) == (1, 2, 3)
    assert rows_by_name(meta)["a.mp4"]["mtime_ns"] == st.st_mtime_ns + 1_000_000_000


def test_rescan_of_unchanged_folder_probes_nothing(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    again = run_scan(media, meta)
    assert (again.n_reprobed, again.n_reused) == (0, 3)


def test_rescan_drops_rows_of_deleted_files(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    (media / "c.mkv").unlink()
    result = run_scan(media, meta)
    assert sorted(rows_by_name(meta)) == ["a.mp4", "b.png"]
    assert result.n_dropped == 1


def test_rescan_reads_new_content_of_a_replaced_file(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    write_video(media / "a.mp4", frames(12, 64, 48), fps=25)
    run_scan(media, meta)
    a = rows_by_name(meta)["a.mp4"]
    assert (a["num_frames"], a["height"], a["width"], a["fps"]) == (12, 64, 48, 25.0)


def test_rescan_picks_up_an_edited_caption_without_reprobing(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    (media / "a.txt").write_text("a dog jumps")
    result = run_scan(media, meta)
    assert rows_by_name(meta)["a.mp4"]["text"] == "a dog jumps"
    assert result.n_reprobed == 0


def test_rescan_moves_a_file_that_became_corrupt_to_the_errors_table(media: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    (media / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(100))
    run_scan(media, meta)
    assert "a.mp4" not in rows_by_name(meta)
    assert errors_by_name(meta)["a.mp4"].startswith("corrupt:")


def test_scan_leaves_no_temporary_files(media: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_scan(media, out / "meta.parquet")
    assert sorted(p.name for p in out.iterdir()) == ["meta.errors.parquet", "meta.parquet"]


def test_errors_table_sits_beside_the_output() -> None:
    assert errors_path_for(Path("/d/train.parquet")) == Path("/d/train.errors.parquet")
    assert errors_path_for(Path("/d/train")) == Path("/d/train.errors.parquet")


def test_process_pool_gives_the_same_tables_as_inline(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(INLINE_BELOW + 2):
        save_image(root / f"img{i:02d}.png", 16 + 2 * i, 20)
    write_video(root / "v.mp4", frames(5, 16, 16), fps=24)
    (root / "bad.mp4").write_text("nope")
    pooled = run_scan(root, tmp_path / "pool.parquet", workers=2)
    inline = run_scan(root, tmp_path / "inline.parquet", workers=1)
    assert pooled.n_reprobed == INLINE_BELOW + 4
    assert pq.read_table(tmp_path / "pool.parquet").equals(pq.read_table(tmp_path / "inline.parquet"))
    assert errors_by_name(tmp_path / "pool.parquet") == errors_by_name(tmp_path / "inline.parquet")
    assert (inline.n_ok, inline.n_errors) == (INLINE_BELOW + 3, 1)


def test_summary_is_printed_and_returned(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (media / "empty.mp4").touch()
    result = run_scan(media, tmp_path / "meta.parquet")
    printed = capsys.readouterr().out
    assert result.summary() in printed
    assert "3 ok, 1 errors" in printed
    assert "errors by reason: empty file x1" in printed


CRASHING_PROBE = """
import os
import opensora_core.data.probe as probe_module

real_probe = probe_module.probe


def probe(path):
    if "crashme" in str(path):
        os._exit(3)  # what a segfaulting decoder looks like to the pool
    return real_probe(path)


probe_module.probe = probe
"""


def test_file_that_kills_its_worker_is_recorded_and_the_rest_are_probed(tmp_path: Path) -> None:
    # sitecustomize patches probe() in every process of a fresh interpreter, pool workers included.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_PROBE)
    root = tmp_path / "media"
    root.mkdir()
    for i in range(INLINE_BELOW + 2):
        save_image(root / f"img{i:02d}.png")
    save_image(root / "crashme.png")
    meta = tmp_path / "meta.parquet"
    repo = Path(__file__).resolve().parents[1]
    code = "import sys; from opensora_core.data.scan import scan; scan(sys.argv[1], sys.argv[2], workers=2, progress=False)"
    done = subprocess.run(
        [sys.executable, "-c", code, str(root), str(meta)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo)])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(rows_by_name(meta)) == INLINE_BELOW + 2
    assert errors_by_name(meta) == {"crashme.png": "corrupt: the decoder crashed while reading the header"}
