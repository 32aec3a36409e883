"""Benchmark: `opensora precompute` against a single-process loop, the bytes a feature row takes, and a
training step from raw video against one from stored features, at the demo config's sizes.

The demo data and tiny random weights of configs/opensora-v1-2/train/demo.py are generated into a
temporary folder and scanned, its rows repeated `--repeat` times (same files, other captions), and
bucketed. Then, in this one run:

- `encode_ratio` = samples/s of the Ray Data precompute (read tasks + encoder actor pool) ÷ samples/s
  of `encode_in_process`, the same reading and encoding of the same samples with the same models, one
  group after another in this process. Both write their snapshot; each starts from an empty root.
- `bytes_per_sample`: latents and captions as stored (caption tokens without padding) next to what a
  caption padded to model_max_length would take, plus the shard bytes per row on disk (zstd).
- `ratio` = seconds per training step from raw video (VAE encode + text encode + model step) ÷ seconds per
  step from stored features (read the rows + model step), same model, same batches; the per-sample
  seconds of decode (what DataLoader workers do), VAE encode and text encode are reported beside it.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from opensora_core.config import load_config
from opensora_core.data.batches import SnapshotBatches
from opensora_core.data.demo_data import make_demo_data, repeated_metadata
from opensora_core.data.scan import scan
from opensora_core.features.precompute import build_features
from opensora_core.features.store import FeatureSnapshot, open_features
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.stages import build_buckets
from opensora_core.train import absolute_paths
from opensora_core.train.step import CONDITION_KEYS, diffusion_loss, encode_batch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/opensora-v1-2/train/demo.py"


# --- encode_ratio -----------------------------------------------------------------------------------


def encode_rates(cfg, snapshot: Path, work: Path) -> dict[str, Any]:
    """Samples/s of the Ray Data stage and of the single-process loop over the same samples."""
    start = time.perf_counter()
    ray_info = build_features(cfg, snapshot, work / "features-ray", progress=False)
    ray_s = time.perf_counter() - start
    start = time.perf_counter()
    local_info = build_features(cfg, snapshot, work / "features-local", progress=False, num_actors=0)
    local_s = time.perf_counter() - start
    n = ray_info.manifest.num_encoded
    assert n == local_info.manifest.num_encoded
    return {
        "encode_ratio": round(local_s / ray_s, 2),
        "encode_samples": n,
        "encode_ray_s": round(ray_s, 2),
        "encode_ray_samples_per_s": round(n / ray_s, 2),
        "encode_single_process_s": round(local_s, 2),
        "encode_single_process_samples_per_s": round(n / local_s, 2),
        "path": ray_info.path,
        "stored_bytes": ray_info.stored_bytes(),
    }


# --- bytes_per_sample ---------------------------------------------------------------------------------


def bytes_per_sample(features: FeatureSnapshot, stored_bytes: int) -> dict[str, Any]:
    """Mean bytes per row of latents and of captions (stored and padded), and of the shards on disk."""
    m = features.manifest
    itemsize = 4 if m.dtype == "fp32" else 2
    latent, tokens, rows = 0, 0, 0
    for bucket in m.buckets:
        per_row = int(np.prod(bucket.latent_shape)) * itemsize if bucket.latent_shape else 0
        for file in bucket.files:
            lengths = pq.read_table(features.path / file, columns=["text_len"])["text_len"].to_numpy()
            latent += per_row * len(lengths)
            tokens += int(lengths.sum())
            rows += len(lengths)
    dim, max_len = m.text_encoder.output_dim, m.text_encoder.model_max_length
    return {
        "bytes_per_sample": {
            "latent": round(latent / rows),
            "caption": round(tokens * dim * itemsize / rows),
            "caption_padded": max_len * dim * itemsize,
            "mean_caption_tokens": round(tokens / rows, 2),
            "model_max_length": max_len,
            "on_disk": round(stored_bytes / rows),
            "dtype": m.dtype,
        }
    }


# --- ratio: a training step from raw video vs from features --------------------------------------------


def _parts(cfg: dict[str, Any]):
    from opensora_core.models.registry import build_model, build_text_encoder, build_vae
    from opensora_core.schedulers import build_scheduler

    torch.manual_seed(0)
    text_encoder = build_text_encoder(dict(cfg["text_encoder"]))
    vae = build_vae(dict(cfg["vae"])).eval().requires_grad_(False)
    model = build_model(
        dict(cfg["model"]),
        in_channels=vae.out_channels,
        caption_channels=text_encoder.output_dim,
        model_max_length=text_encoder.model_max_length,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.get("lr", 1e-4)))
    return vae, text_encoder, model, build_scheduler(dict(cfg["scheduler"])), optimizer


def _optimize(model, scheduler, optimizer, latents, model_args) -> None:
    loss = diffusion_loss(model, scheduler, latents, model_args)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _feature_batch(features: FeatureSnapshot, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The stored latents and padded captions of a batch's samples, batched as encode_batch gives them."""
    rows = [features.sample(int(i)) for i in batch["index"]]
    latents = torch.stack([r["latent"] for r in rows]).float()
    model_args = {
        "y": torch.stack([r["y"] for r in rows]).float(),
        "mask": torch.stack([r["mask"] for r in rows]),
    }
    model_args.update({k: batch[k].float() for k in CONDITION_KEYS if k in batch})
    return latents, model_args


def step_time_ratio(
    cfg: dict[str, Any], snapshot: Path, features: FeatureSnapshot, steps: int
) -> dict[str, Any]:
    """Seconds per training step from raw video ÷ from stored features, on the same batches."""
    batches_iter = SnapshotBatches(str(snapshot), cfg["dataset"], rank=0, world_size=1, seed=0, num_workers=0)
    batches, decode_s = [], 0.0
    it = iter(batches_iter)
    while len(batches) < steps + 1:
        start = time.perf_counter()
        batch = next(it)
        decode_s += time.perf_counter() - start
        if batch is not None:
            batches.append(batch)
    vae, text_encoder, model, scheduler, optimizer = _parts(cfg)
    vae_s = text_s = raw_s = feat_s = 0.0
    samples = 0
    device, dtype = torch.device("cpu"), torch.float32
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        with torch.no_grad():
            vae.encode(batch["video"].float())
        t1 = time.perf_counter()
        text_encoder.encode(list(batch["text"]))
        t2 = time.perf_counter()
        latents, model_args, _ = encode_batch(batch, vae, text_encoder, device=device, dtype=dtype)
        _optimize(model, scheduler, optimizer, latents, model_args)
        t4 = time.perf_counter()
        latents, model_args = _feature_batch(features, batch)
        _optimize(model, scheduler, optimizer, latents, model_args)
        t5 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        vae_s, text_s, samples = vae_s + (t1 - t0), text_s + (t2 - t1), samples + batch["video"].shape[0]
        raw_s, feat_s = raw_s + (t4 - t2), feat_s + (t5 - t4)  # encode_batch + optimizer step; read + step
    n = len(batches) - 1
    return {
        "ratio": round(raw_s / feat_s, 2),
        "step_s_from_video": round(raw_s / n, 4),
        "step_s_from_features": round(feat_s / n, 4),
        "train_steps": n,
        "per_sample_s": {
            "decode": round(decode_s / sum(b["video"].shape[0] for b in batches), 4),
            "vae_encode": round(vae_s / samples, 4),
            "text_encode": round(text_s / samples, 4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6, help="copies of the demo rows in the snapshot")
    parser.add_argument("--train-steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        demo = make_demo_data(work / "demo_data")
        tiny = create_tiny_pretrained(work / "demo_data" / "pretrained")
        weights = {"vae.from_pretrained": str(tiny.vae), "text_encoder.from_pretrained": str(tiny.t5)}
        options = {"dataset.data_path": str(demo.root), "outputs": str(work / "outputs"), **weights}
        vcfg = load_config(CONFIG, {}, cfg_options=options, mode="train")
        result = scan(demo.root, work / "demo.parquet", progress=False)
        pq.write_table(
            repeated_metadata(pq.read_table(result.metadata_path), args.repeat), work / "meta.parquet"
        )
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        snapshot = build_buckets(vcfg, work / "meta.parquet", work / "buckets").path
        encode = encode_rates(vcfg, snapshot, work)
        ray.shutdown()
        features = open_features(encode.pop("path"))
        sizes = bytes_per_sample(features, encode.pop("stored_bytes"))
        steps = step_time_ratio(absolute_paths(vcfg.raw.to_dict()), snapshot, features, args.train_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"bench": "precompute", **steps, **encode, **sizes, "cpus": os.cpu_count()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
