"""Bucket snapshots: built with Ray Data, written atomically, reproducible byte for byte."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opensora_core.data import bucket_build
from opensora_core.data.bucket import BucketConfig, assign_buckets
from opensora_core.data.bucket_build import build_snapshot
from opensora_core.data.bucket_report import REPORT_PLOT_NAME, format_report
from opensora_core.data.manifest import MANIFEST_NAME, bucket_config_hash
from opensora_core.data.snapshot import BUCKET_COLUMNS, CURRENT_NAME, open_snapshot
from opensora_core.errors import ConfigError

ray = pytest.importorskip("ray")

CFG = BucketConfig.from_dict(
    {
        "240p": {1: (0.5, 8), 16: (1.0, 4), 51: ((0.5, 0.5), 2), 102: (0.0, None)},
        "144p": {1: (1.0, 16), 16: (0.5, 8)},
    }
)
FRAME_INTERVAL = 2


def metadata_table(n=600, seed=0):
    rng = np.random.default_rng(seed)
    is_image = rng.random(n) < 0.3
    height = rng.integers(60, 1200, n)
    width = rng.integers(60, 1200, n)
    return pa.table(
        {
            "path": [f"/data/clip_{i:04d}.{'jpg' if img else 'mp4'}" for i, img in enumerate(is_image)],
            "text": [f"caption {i}" for i in range(n)],
            "num_frames": np.where(is_image, 1, rng.integers(2, 300, n)),
            "height": height,
            "width": width,
            "fps": np.where(is_image, 0.0, 24.0),
            "aspect_ratio": height / width,
            "resolution": height * width,
            "duration": rng.random(n) * 10,
            "codec": ["h264"] * n,
            "file_size": rng.integers(1_000, 1_000_000, n),
            "mtime_ns": rng.integers(1, 10**18, n),
            "is_image": is_image,
        }
    )


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    """The session's local Ray (tests/conftest.py)."""
    shared_ray.ensure()


@pytest.fixture(scope="module")
def built(local_ray, tmp_path_factory):
    base = tmp_path_factory.mktemp("snap")
    meta = metadata_table()
    pq.write_table(meta, base / "meta.parquet")
    info = build_snapshot(
        base / "meta.parquet", base / "snapshots", CFG, FRAME_INTERVAL, 7, 0,
        config_hash=bucket_config_hash(CFG, FRAME_INTERVAL), num_blocks=1, progress=False,
    )  # fmt: skip
    return base, meta, info


def test_current_names_the_new_snapshot(built):
    base, _, info = built
    assert (base / "snapshots" / CURRENT_NAME).read_text().strip() == info.path.name
    assert open_snapshot(base / "snapshots").path == info.path


def test_no_temporary_files_left_behind(built):
    base, _, _ = built
    assert [p.name for p in (base / "snapshots").iterdir() if p.name.startswith(".")] == []


def test_manifest_counts_match_direct_assignment(built):
    _, meta, info = built
    a = assign_buckets(
        meta["num_frames"].to_numpy(), meta["height"].to_numpy(), meta["width"].to_numpy(),
        meta["path"].to_pylist(), CFG, FRAME_INTERVAL, 7, 0,
    )  # fmt: skip
    expected = {}
    for i in np.flatnonzero(a.kept):
        key = (a.resolution[i], int(a.num_frames[i]), a.aspect_ratio[i])
        expected[key] = expected.get(key, 0) + 1
    m = info.manifest
    assert {(b.resolution, b.num_frames, b.aspect_ratio): b.count for b in m.buckets} == expected
    assert m.num_samples == 600
    assert m.num_kept == int(a.kept.sum())
    assert m.seed == 7 and m.epoch == 0 and m.frame_interval == FRAME_INTERVAL


def test_manifest_records_batch_sizes_and_batches(built):
    _, _, info = built
    for b in info.manifest.buckets:
        assert b.batch_size == CFG.batch_size(b.resolution, b.num_frames)
        assert b.num_batches == b.count // b.batch_size
    assert info.manifest.num_batches == sum(b.count // b.batch_size for b in info.manifest.buckets)


def test_manifest_round_trips_and_restores_bucket_config(built):
    _, _, info = built
    text = (info.path / MANIFEST_NAME).read_text()
    assert json.loads(text)["config_hash"] == bucket_config_hash(CFG, FRAME_INTERVAL)
    assert open_snapshot(info.path).manifest == info.manifest
    assert info.manifest.bucket_cfg() == CFG


def test_shards_sit_in_one_folder_per_bucket_named_by_its_id(built):
    _, _, info = built
    b = info.manifest.buckets[0]
    assert b.files == (f"{b.resolution}-{b.num_frames}-{b.aspect_ratio}/part-00000.parquet",)
    shard = pq.read_table(info.path / b.files[0])
    assert set(shard["bucket_ar"].to_pylist()) == {b.aspect_ratio}
    assert shard.num_rows == b.count
    assert info.manifest.sitting_out_files == ("sitting_out/part-00000.parquet",)


def test_side_files_start_with_an_underscore_so_parquet_readers_skip_them(built):
    _, _, info = built
    assert sorted(p.name for p in info.path.iterdir() if p.is_file()) == sorted(
        [MANIFEST_NAME, REPORT_PLOT_NAME]
    )
    assert MANIFEST_NAME.startswith("_") and REPORT_PLOT_NAME.startswith("_")


def test_pandas_reads_a_snapshot_directory_as_one_parquet_dataset(built):
    import pandas as pd

    _, meta, info = built
    frame = pd.read_parquet(info.path)
    assert len(frame) == meta.num_rows == 600
    assert list(frame.columns) == meta.column_names + list(BUCKET_COLUMNS)
    assert sorted(frame["path"]) == sorted(meta["path"].to_pylist())
    assert int(frame["bucket_res"].notna().sum()) == info.manifest.num_kept


def test_pyarrow_dataset_reads_a_snapshot_directory_with_or_without_hive_discovery(built):
    import pyarrow.dataset as pads

    _, meta, info = built
    expected = open_snapshot(info.path).full_table().sort_by("path")
    for partitioning in (None, "hive"):  # Ray Data's read_parquet discovers hive folders
        dataset = pads.dataset(info.path, format="parquet", partitioning=partitioning)
        assert dataset.schema.names == meta.column_names + list(BUCKET_COLUMNS)
        assert dataset.count_rows() == 600
        assert dataset.to_table().sort_by("path").equals(expected)


def old_layout_copy(info, tmp_path):
    """The snapshot as builds before the side files were renamed wrote it (`manifest.json` beside the shards)."""
    root = tmp_path / "old"
    old = root / info.path.name
    shutil.copytree(info.path, old)
    (old / MANIFEST_NAME).rename(old / "manifest.json")
    (root / CURRENT_NAME).write_text(old.name + "\n")
    return root, old


def test_an_old_layout_snapshot_is_refused_in_one_line_saying_to_rebuild(built, tmp_path):
    _, _, info = built
    root, old = old_layout_copy(info, tmp_path)
    for target in (old, root):
        with pytest.raises(ConfigError) as raised:
            open_snapshot(target)
        assert str(raised.value) == (
            f"bucket snapshot {str(old)!r} has the old layout (manifest.json among its shards); "
            "build it again with `opensora bucket`"
        )


def test_table_keeps_metadata_columns_and_adds_bucket_columns(built):
    _, meta, info = built
    table = open_snapshot(info.path).table()
    assert table.column_names == meta.column_names + list(BUCKET_COLUMNS)
    assert table.num_rows == info.manifest.num_kept
    assert table["bucket_res"].null_count == 0


def test_full_table_ends_with_rows_sitting_out(built):
    _, meta, info = built
    snap = open_snapshot(info.path)
    full = snap.full_table()
    assert full.num_rows == meta.num_rows
    rest = full.slice(info.manifest.num_kept)
    assert rest.num_rows == info.manifest.num_sitting_out > 0
    assert rest["bucket_height"].null_count == rest.num_rows
    assert full.slice(0, info.manifest.num_kept).equals(snap.table())


def test_rows_keep_their_metadata_values(built):
    _, meta, info = built
    full = open_snapshot(info.path).full_table()
    by_path = dict(zip(meta["path"].to_pylist(), meta["text"].to_pylist(), strict=True))
    assert all(
        by_path[p] == t for p, t in zip(full["path"].to_pylist(), full["text"].to_pylist(), strict=True)
    )


def test_format_report_lists_buckets_and_totals(built):
    _, _, info = built
    report = format_report(info.manifest)
    b = info.manifest.buckets[0]
    assert f"{b.height}x{b.width}" in report
    assert f"{info.manifest.num_kept} of 600 samples kept in {len(info.manifest.buckets)} buckets" in report


def shard_bytes(info):
    files = [f for b in info.manifest.buckets for f in b.files] + list(info.manifest.sitting_out_files)
    return {f: (info.path / f).read_bytes() for f in files}


def test_shards_byte_identical_whatever_the_blocks(built, tmp_path):
    _, meta, info = built
    # Same rows, shuffled and split over three files, read as four blocks by two workers.
    order = np.random.default_rng(1).permutation(meta.num_rows)
    shuffled = meta.take(order)
    (tmp_path / "meta").mkdir()
    for i, (lo, hi) in enumerate([(0, 100), (100, 450), (450, 600)]):
        pq.write_table(shuffled.slice(lo, hi - lo), tmp_path / "meta" / f"part{i}.parquet")
    again = build_snapshot(
        tmp_path / "meta", tmp_path / "snapshots", CFG, FRAME_INTERVAL, 7, 0,
        config_hash=info.manifest.config_hash, num_blocks=4, num_workers=2, progress=False,
    )  # fmt: skip
    assert shard_bytes(again) == shard_bytes(info)
    assert again.manifest.metadata_fingerprint == info.manifest.metadata_fingerprint


def test_failed_build_keeps_current_and_leaves_no_temp_dir(built, monkeypatch):
    base, _, info = built
    root = base / "snapshots"
    before = sorted(p.name for p in root.iterdir())

    def broken(*args):
        raise OSError("disk full")

    def assign_locally(keys, cfg, frame_interval, seed, epoch, *args):
        return bucket_build.bucket_indices(keys, cfg, frame_interval, seed, epoch)

    monkeypatch.setattr(bucket_build, "_assign_in_ray", assign_locally)  # the failure is in writing
    monkeypatch.setattr(bucket_build, "_write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        build_snapshot(
            base / "meta.parquet", root, CFG, FRAME_INTERVAL, 7, 1, config_hash="x", progress=False
        )
    assert sorted(p.name for p in root.iterdir()) == before
    assert open_snapshot(root).path == info.path


def test_new_epoch_switches_current_and_keeps_old_snapshot(built, tmp_path):
    base, _, info = built
    root = tmp_path / "snapshots"
    shutil.copytree(base / "snapshots", root)
    second = build_snapshot(
        base / "meta.parquet", root, CFG, FRAME_INTERVAL, 7, 1, config_hash="h", progress=False
    )
    assert second.path.name != info.path.name
    assert open_snapshot(root).manifest.epoch == 1
    assert open_snapshot(root / info.path.name).manifest.epoch == 0


def test_metadata_without_required_columns_is_a_config_error(tmp_path):
    pq.write_table(pa.table({"path": ["a.mp4"], "text": ["x"]}), tmp_path / "meta.parquet")
    with pytest.raises(ConfigError, match="missing columns num_frames, height, width"):
        build_snapshot(
            tmp_path / "meta.parquet", tmp_path / "s", CFG, 1, 0, 0, config_hash="x", progress=False
        )


def test_open_snapshot_without_current_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="build one with `opensora bucket`"):
        open_snapshot(tmp_path)
