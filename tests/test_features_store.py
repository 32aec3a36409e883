"""The feature snapshot format: tensors and unpadded captions round-trip through Parquet, exactly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.features.store import (
    CURRENT_NAME,
    MANIFEST_NAME,
    EncoderInfo,
    FeatureBucket,
    FeatureManifest,
    embedding_array,
    feature_schema,
    latent_array,
    open_features,
    to_storage,
    write_empty_caption,
    write_errors,
    write_shard,
)


def _manifest(dtype: str, views: int, files: tuple[str, ...]) -> FeatureManifest:
    return FeatureManifest(
        feature_id="f1",
        created_at="2026-12-07T00:00:00+00:00",
        bucket_snapshot_id="b1",
        bucket_snapshot_path="/snap/b1",
        dtype=dtype,
        transform_name="resize_crop",
        frame_interval=1,
        seed=7,
        views=views,
        video_features=True,
        text_features=True,
        vae=EncoderInfo({"type": "X"}, "vfp", 4),
        text_encoder=EncoderInfo({"type": "t5"}, "tfp", 8, model_max_length=6),
        buckets=(FeatureBucket("144p-5-1.00", 5, 144, 144, (4, 2, 18, 18), 3, files),),
        num_samples=3,
        num_encoded=3 * views,
        num_reused=0,
        num_errors=1,
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_round_trip_with_views_and_unpadded_captions(tmp_path, dtype):
    views, shape, dim = 2, (4, 2, 18, 18), 8
    gen = torch.Generator().manual_seed(0)
    samples = [10, 11, 12]
    rows = [(s, v) for s in samples for v in range(views)]
    latents = torch.randn(len(rows), *shape, generator=gen)
    lengths = [1, 3, 6, 2, 5, 4]
    captions = [torch.randn(n, dim, generator=gen) for n in lengths]
    schema = feature_schema(dtype, shape, dim)
    table = pa.table(
        {
            "sample": [s for s, _ in rows],
            "path": [f"/v/{s}.mp4" for s, _ in rows],
            "text": [f"caption {s}" for s, _ in rows],
            "view": [v for _, v in rows],
            "reuse_key": [f"k{s}-{v}" for s, v in rows],
            "num_frames": [5] * len(rows),
            "height": [144] * len(rows),
            "width": [144] * len(rows),
            "fps": [24.0] * len(rows),
            "ar": [1.0] * len(rows),
            "latent": latent_array(to_storage(latents, dtype)),
            "text_len": lengths,
            "text_embedding": embedding_array([to_storage(c, dtype) for c in captions], dtype),
        },
        schema=schema,
    )
    root = tmp_path / "features"
    snap = root / "f1"
    write_shard(table, snap / "144p-5-1.00" / "part-00000.parquet")
    write_empty_caption(snap, to_storage(torch.ones(1, dim), dtype), dtype)
    write_errors(snap, [{"path": "/v/bad.mp4", "bucket": "144p-5-1.00", "error": "cannot decode"}])
    (snap / MANIFEST_NAME).write_text(_manifest(dtype, views, ("144p-5-1.00/part-00000.parquet",)).to_json())
    (root / CURRENT_NAME).write_text("f1\n")

    features = open_features(root)
    assert features.manifest == _manifest(dtype, views, ("144p-5-1.00/part-00000.parquet",))
    assert features.samples.tolist() == samples
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for i, (s, v) in enumerate(rows):
        got = features.sample(s, v)
        assert got["latent"].dtype == expected_dtype
        assert torch.equal(got["latent"], latents[i].to(expected_dtype))
        assert got["y"].shape == (1, 6, dim)  # padded back to model_max_length
        assert got["mask"].tolist() == [1] * lengths[i] + [0] * (6 - lengths[i])
        assert torch.equal(got["y"][0, : lengths[i]], captions[i].to(expected_dtype))
        assert got["path"] == f"/v/{s}.mp4" and got["num_frames"] == 5
    assert not features.has(13) and features.has(12, 1)
    with pytest.raises(KeyError, match="sample 13"):
        features.sample(13)
    y, mask = features.empty_caption()
    assert mask.tolist() == [1, 0, 0, 0, 0, 0]
    assert features.errors()["path"].to_pylist() == ["/v/bad.mp4"]
    # a plain Parquet dataset: the side files are skipped, every row is read
    assert pads.dataset(str(snap), format="parquet").count_rows() == len(rows)


def test_unknown_format_version_is_one_line(tmp_path):
    snap = tmp_path / "f1"
    snap.mkdir()
    data = json.loads(_manifest("fp32", 1, ()).to_json())
    data["format_version"] = 99
    (snap / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="format version 99"):
        open_features(snap)
    with pytest.raises(ConfigError, match="opensora precompute"):
        open_features(tmp_path / "nothing")


def test_row_groups_stay_small(tmp_path):
    schema = feature_schema("fp32", (4, 15, 30, 53), 4096)
    from opensora_core.features.store import rows_per_group

    assert 1 <= rows_per_group(schema, 300) <= 16
    assert np.prod((4, 15, 30, 53)) * 4 * rows_per_group(schema, 1) <= 16 << 20
