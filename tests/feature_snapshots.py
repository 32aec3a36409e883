"""Test helpers: a bucket snapshot of grey clips written without Ray, and a feature snapshot of it
encoded in-process with the tiny VAE and T5 and written with opensora_core.features.store's writers
(what `opensora precompute` makes, without waiting for it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import grey_clip

from opensora_core.data.bucket import BucketConfig
from opensora_core.data.bucket_build import bucket_columns
from opensora_core.data.dataset import VariableVideoTextDataset
from opensora_core.data.manifest import MANIFEST_NAME, BucketStats, Manifest, bucket_config_to_json
from opensora_core.data.snapshot import CURRENT_NAME, Snapshot, open_snapshot
from opensora_core.features import store
from opensora_core.features.fingerprint import encoder_fingerprint
from opensora_core.models.registry import build_text_encoder, build_vae

BUCKETS = {"144p": {2: (1.0, 2)}}  # clips of 2 frames at 144 x 256, two to a batch


def grey_media(root: Path, n: int) -> pa.Table:
    """`n` grey 144 x 256 clips of 12 frames and their metadata table."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [grey_clip(root / f"clip{i}.mp4", 12, height=144, width=256) for i in range(n)]
    return pa.table(
        {
            "path": [str(p) for p in paths],
            "text": [f"a grey square moves left {i}" for i in range(n)],
            "num_frames": [12] * n,
            "height": [144] * n,
            "width": [256] * n,
            "fps": [24.0] * n,
            "is_image": [False] * n,
        }
    )


def write_bucket_snapshot(meta: pa.Table, root: Path, snapshot_id: str = "b1", seed: int = 42) -> Snapshot:
    """A bucket snapshot as build_snapshot lays it out (one shard per bucket), drawn in-process."""
    cfg = BucketConfig.from_dict(BUCKETS)
    full = bucket_columns(meta, cfg, 1, seed, 0)
    full = full.take(pa.array(np.argsort(full["__bucket_order"].to_numpy(), kind="stable")))
    full = full.drop_columns(["__bucket_order"])
    kept = full.filter(full["bucket_res"].is_valid())
    directory = root / snapshot_id
    buckets = []
    for key in sorted(
        {
            (r, f, a)
            for r, f, a in zip(
                *(kept[c].to_pylist() for c in ("bucket_res", "bucket_frames", "bucket_ar")), strict=True
            )
        }
    ):
        rows = kept.filter(
            pa.compute.and_(
                pa.compute.equal(kept["bucket_res"], key[0]), pa.compute.equal(kept["bucket_ar"], key[2])
            )
        )
        name = f"{key[0]}-{key[1]}-{key[2]}/part-00000.parquet"
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, directory / name)
        h, w = rows["bucket_height"][0].as_py(), rows["bucket_width"][0].as_py()
        bs = cfg.batch_sizes()[(key[0], key[1])]
        buckets.append(
            BucketStats(key[0], key[1], key[2], h, w, rows.num_rows, bs, rows.num_rows // bs, (name,))
        )
    manifest = Manifest(
        snapshot_id=snapshot_id, created_at="", config_hash="", metadata_fingerprint="", metadata_path="",
        seed=seed, epoch=0, frame_interval=1, bucket_config=bucket_config_to_json(cfg),
        num_samples=meta.num_rows, num_kept=kept.num_rows, buckets=tuple(buckets),
    )  # fmt: skip
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    (root / CURRENT_NAME).write_text(f"{snapshot_id}\n")
    return open_snapshot(root)


def encoder_sections(pretrained, max_length: int = 8) -> tuple[dict, dict]:
    vae = dict(type="VideoAutoencoderKL", from_pretrained=str(pretrained.vae), local_files_only=True)
    t5 = dict(
        type="t5", from_pretrained=str(pretrained.t5), model_max_length=max_length, local_files_only=True
    )
    return vae, t5


def write_feature_snapshot(
    root: Path,
    snapshot: Snapshot,
    vae_section: dict,
    t5_section: dict,
    *,
    views: int = 1,
    failed: tuple[int, ...] = (),
    feature_id: str = "f1",
    seed: int = 7,
) -> store.FeatureSnapshot:
    """Encode every kept row of `snapshot` (`views` crops each, view v decoded as epoch v) except the
    `failed` rows, which go to the errors table; publish it as `root/CURRENT`."""
    vae, t5 = build_vae(vae_section).eval(), build_text_encoder(t5_section)
    dataset = VariableVideoTextDataset(snapshot, seed=seed)
    table = snapshot.table()
    directory = root / feature_id
    buckets, errors = [], []
    for bucket in snapshot.manifest.buckets:
        rows, latents, captions = [], [], []
        first = sum(b.count for b in snapshot.manifest.buckets[: snapshot.manifest.buckets.index(bucket)])
        for sample in range(first, first + bucket.count):
            if sample in failed:
                errors.append(
                    {"path": table["path"][sample].as_py(), "bucket": bucket.key.id, "error": "bad clip"}
                )
                continue
            for view in range(views):
                dataset.set_epoch(view)
                item = dataset[f"{sample}-{bucket.num_frames}-{bucket.height}-{bucket.width}"]
                with torch.no_grad():
                    torch.manual_seed(seed * 1000 + sample * views + view)
                    latents.append(vae.encode(item["video"][None])[0])
                    encoded = t5.encode([item["text"]])
                length = int(encoded["mask"][0].sum())
                captions.append(store.to_storage(encoded["y"][0, 0, :length], "fp32"))
                rows.append((sample, view, item))
        shard = pa.table(
            {
                "sample": [s for s, _, _ in rows],
                "path": [i["path"] for _, _, i in rows],
                "text": [i["text"] for _, _, i in rows],
                "view": [v for _, v, _ in rows],
                "reuse_key": [f"{s}-{v}" for s, v, _ in rows],
                "num_frames": [i["num_frames"] for _, _, i in rows],
                "height": [i["height"] for _, _, i in rows],
                "width": [i["width"] for _, _, i in rows],
                "fps": [float(i["fps"]) for _, _, i in rows],
                "ar": [i["ar"] for _, _, i in rows],
                "latent": store.latent_array(store.to_storage(torch.stack(latents), "fp32")),
                "text_len": [len(c) for c in captions],
                "text_embedding": store.embedding_array(captions, "fp32"),
            },
            schema=store.feature_schema("fp32", tuple(latents[0].shape), captions[0].shape[1]),
        )
        name = f"{bucket.key.id}/part-00000.parquet"
        store.write_shard(shard, directory / name)
        buckets.append(
            store.FeatureBucket(bucket.key.id, bucket.num_frames, bucket.height, bucket.width,
                                tuple(latents[0].shape), len(rows) // views, (name,))
        )  # fmt: skip
    with torch.no_grad():
        empty = t5.encode([""])
    store.write_empty_caption(
        directory, store.to_storage(empty["y"][0, 0, : int(empty["mask"].sum())], "fp32"), "fp32"
    )
    store.write_errors(directory, errors)
    manifest = store.FeatureManifest(
        feature_id=feature_id, created_at="", bucket_snapshot_id=snapshot.manifest.snapshot_id,
        bucket_snapshot_path=str(snapshot.path), dtype="fp32", transform_name="resize_crop",
        frame_interval=1, seed=seed, views=views, video_features=True, text_features=True,
        vae=store.EncoderInfo(vae_section, encoder_fingerprint(vae_section), vae.out_channels),
        text_encoder=store.EncoderInfo(
            t5_section, encoder_fingerprint(t5_section), t5.output_dim, model_max_length=t5.model_max_length
        ),
        buckets=tuple(buckets), num_samples=table.num_rows, num_encoded=sum(b.count for b in buckets) * views,
        num_reused=0, num_errors=len(errors),
    )  # fmt: skip
    (directory / store.MANIFEST_NAME).write_text(manifest.to_json())
    (root / store.CURRENT_NAME).write_text(f"{feature_id}\n")
    return store.open_features(root)
