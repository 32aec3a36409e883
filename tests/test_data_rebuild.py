"""Scheduled rebuilds: when the current snapshot is stale, and readers of an old snapshot during a switch."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opensora_core.data import bucket_build
from opensora_core.data.bucket import BucketConfig
from opensora_core.data.bucket_build import build_snapshot
from opensora_core.data.bucket_report import REPORT_PLOT_NAME, aspect_ratio_counts, bucket_count_grid
from opensora_core.data.fingerprint import read_metadata_fingerprint
from opensora_core.data.manifest import MANIFEST_NAME, bucket_config_hash
from opensora_core.data.sampler import BucketBatchSampler
from opensora_core.data.snapshot import CURRENT_NAME, open_snapshot
from opensora_core.data.snapshot_check import check_snapshot
from opensora_core.errors import ConfigError

CFG = BucketConfig.from_dict({"240p": {1: (1.0, 4), 16: (1.0, 2)}, "144p": {1: (1.0, 8), 16: (1.0, 4)}})
HASH = bucket_config_hash(CFG, 1)


def metadata(n=80, seed=0):
    rng = np.random.default_rng(seed)
    is_image = rng.random(n) < 0.3
    return pa.table(
        {
            "path": [f"/data/{i:03d}.{'jpg' if img else 'mp4'}" for i, img in enumerate(is_image)],
            "text": [f"caption {i}" for i in range(n)],
            "num_frames": np.where(is_image, 1, rng.integers(20, 100, n)),
            "height": rng.choice([144, 240, 360], n),
            "width": rng.choice([256, 426, 640], n),
            "file_size": rng.integers(1_000, 100_000, n),
            "mtime_ns": rng.integers(1, 10**18, n),
        }
    )


@pytest.fixture(autouse=True)
def assign_without_ray(monkeypatch):
    """The build's Ray Data step is tested in test_data_snapshot; here it runs in-process."""

    def assign_locally(keys, cfg, frame_interval, seed, epoch, *args):
        return bucket_build.bucket_indices(keys, cfg, frame_interval, seed, epoch)

    monkeypatch.setattr(bucket_build, "_assign_in_ray", assign_locally)


def build(meta_path, root, *, seed=5, epoch=0, cfg=CFG):
    return build_snapshot(
        meta_path, root, cfg, 1, seed, epoch, config_hash=bucket_config_hash(cfg, 1), progress=False
    )


@pytest.fixture
def built(tmp_path):
    meta_path = tmp_path / "meta.parquet"
    pq.write_table(metadata(), meta_path)
    info = build(meta_path, tmp_path / "buckets")
    return tmp_path, meta_path, info


def test_metadata_fingerprint_on_disk_matches_the_manifest(built):
    _, meta_path, info = built
    assert read_metadata_fingerprint(meta_path) == info.manifest.metadata_fingerprint


def test_unchanged_metadata_and_config_need_no_rebuild(built):
    base, meta_path, info = built
    check = check_snapshot(base / "buckets", meta_path, HASH, seed=5, epoch=0)
    assert check.is_current
    assert check.changes == ()
    assert check.current.snapshot_id == info.manifest.snapshot_id


def test_a_current_snapshot_in_the_old_layout_needs_a_rebuild(built):
    base, meta_path, info = built
    (info.path / MANIFEST_NAME).rename(
        info.path / "manifest.json"
    )  # as builds before `_manifest.json` left it
    check = check_snapshot(base / "buckets", meta_path, HASH, seed=5, epoch=0)
    assert check.current is None
    assert check.changes == (f"no current snapshot under {base / 'buckets'}",)
    rebuilt = build(meta_path, base / "buckets")
    assert open_snapshot(base / "buckets").path == rebuilt.path != info.path


def test_row_order_does_not_count_as_a_change(built):
    base, meta_path, _ = built
    table = pq.read_table(meta_path)
    pq.write_table(table.take(np.arange(table.num_rows)[::-1]), meta_path)
    assert check_snapshot(base / "buckets", meta_path, HASH, seed=5, epoch=0).is_current


def test_a_changed_mtime_needs_a_rebuild(built):
    base, meta_path, info = built
    table = pq.read_table(meta_path)
    mtimes = table["mtime_ns"].to_numpy().copy()
    mtimes[3] += 1
    pq.write_table(
        table.set_column(table.schema.get_field_index("mtime_ns"), "mtime_ns", pa.array(mtimes)), meta_path
    )
    check = check_snapshot(base / "buckets", meta_path, HASH, seed=5, epoch=0)
    assert not check.is_current
    assert check.changes == (
        f"metadata_fingerprint {info.manifest.metadata_fingerprint} -> {check.metadata_fingerprint}",
    )


def test_an_added_file_needs_a_rebuild(built):
    base, meta_path, _ = built
    pq.write_table(metadata(n=81), meta_path)
    check = check_snapshot(base / "buckets", meta_path, HASH, seed=5, epoch=0)
    assert [c.split()[0] for c in check.changes] == ["metadata_fingerprint"]


def test_a_changed_bucket_config_needs_a_rebuild(built):
    base, meta_path, _ = built
    other = BucketConfig.from_dict({"240p": {1: (1.0, 4), 16: (1.0, 3)}, "144p": {1: (1.0, 8), 16: (1.0, 4)}})
    new_hash = bucket_config_hash(other, 1)
    check = check_snapshot(base / "buckets", meta_path, new_hash, seed=5, epoch=0)
    assert check.changes == (f"config_hash {HASH} -> {new_hash}",)
    frame_interval_hash = bucket_config_hash(CFG, 2)
    assert not check_snapshot(base / "buckets", meta_path, frame_interval_hash, seed=5, epoch=0).is_current


def test_another_seed_or_epoch_needs_a_rebuild(built):
    base, meta_path, _ = built
    check = check_snapshot(base / "buckets", meta_path, HASH, seed=6, epoch=1)
    assert check.changes == ("seed 5 -> 6", "epoch 0 -> 1")


def test_no_current_snapshot_needs_a_build(tmp_path):
    meta_path = tmp_path / "meta.parquet"
    pq.write_table(metadata(), meta_path)
    check = check_snapshot(tmp_path / "buckets", meta_path, HASH, seed=5, epoch=0)
    assert check.current is None
    assert check.changes == (f"no current snapshot under {tmp_path / 'buckets'}",)


def test_unreadable_metadata_is_a_config_error(tmp_path):
    (tmp_path / "meta.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="meta.parquet"):
        check_snapshot(tmp_path / "buckets", tmp_path / "meta.parquet", HASH, seed=5, epoch=0)


def test_reader_keeps_its_snapshot_while_a_rebuild_switches_current(built):
    base, meta_path, info = built
    root = base / "buckets"
    reader = open_snapshot(root)  # opened before the rebuild; shards are read lazily, after it
    old_paths = set(pq.read_table(meta_path)["path"].to_pylist())

    pq.write_table(
        metadata(n=120, seed=1).set_column(0, "path", pa.array([f"/new/{i}.mp4" for i in range(120)])),
        meta_path,
    )
    rebuilt = build(meta_path, root)
    assert (root / CURRENT_NAME).read_text().strip() == rebuilt.path.name != info.path.name

    rows = reader.full_table()
    assert reader.path == info.path
    assert rows.num_rows == 80
    assert set(rows["path"].to_pylist()) == old_paths
    sampler = BucketBatchSampler(reader, shuffle=False)
    sampled = {rows["path"][int(s.split("-")[0])].as_py() for batch in sampler for s in batch}
    assert sampled <= old_paths
    assert open_snapshot(root).manifest.num_samples == 120


def test_every_snapshot_has_a_report_plot(built):
    _, _, info = built
    png = (info.path / REPORT_PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000


def test_report_grid_counts_samples_per_resolution_and_frames(built):
    _, _, info = built
    manifest = info.manifest
    resolutions, frames, counts, batches = bucket_count_grid(manifest)
    assert resolutions == ["144p", "240p"]
    assert frames == [1, 16]
    for r, res in enumerate(resolutions):
        for f, t in enumerate(frames):
            stats = [b for b in manifest.buckets if b.resolution == res and b.num_frames == t]
            assert counts[r, f] == sum(b.count for b in stats)
            assert batches[r, f] == sum(b.num_batches for b in stats)
    assert counts.sum() == manifest.num_kept == 80


def test_report_histogram_counts_samples_per_aspect_ratio(built):
    _, _, info = built
    ratios = aspect_ratio_counts(info.manifest)
    assert sum(ratios.values()) == 80
    assert list(ratios) == sorted(ratios)
    expected = {}
    for b in info.manifest.buckets:
        expected[float(b.aspect_ratio)] = expected.get(float(b.aspect_ratio), 0) + b.count
    assert ratios == expected
