"""Benchmark: samples/s of the bucket snapshot loader next to the training step rate at demo shapes.

The demo data and tiny random weights of configs/opensora-v1-2/train/demo.py are generated into a
temporary folder (as `opensora demo-data` writes them) and scanned, its rows repeated
`--repeat` times (same files, so a full epoch is long enough to time), bucketed into a snapshot,
and read one epoch through the training loader (VariableVideoTextDataset + BucketBatchSampler in
a DataLoader with 2 workers, decoding and resizing). The trainer's rate is the demo model's
step (VAE encode, T5 encode, STDiT3 forward and backward, AdamW) on batches from that loader.
`ratio` = training seconds per sample / loader seconds per sample: above 1 the trainer does not
wait for data. Both are measured alone; in training they share the same CPU cores.
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

import pyarrow.parquet as pq
import torch

from opensora_core.config import load_config
from opensora_core.data.batches import SnapshotBatches
from opensora_core.data.demo_data import make_demo_data, repeated_metadata
from opensora_core.data.scan import scan
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.stages import build_buckets
from opensora_core.train import absolute_paths
from opensora_core.train.step import CONDITION_KEYS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/opensora-v1-2/train/demo.py"


def loader_rate(batches: SnapshotBatches) -> tuple[float, int, float]:
    """(seconds for one epoch, samples, seconds to the first batch)."""
    start = time.perf_counter()
    first, samples = None, 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - start
        if batch is not None:
            samples += batch["video"].shape[0]
    return time.perf_counter() - start, samples, first or 0.0


def train_rate(cfg: dict, batches: list[dict]) -> tuple[float, int]:
    """(seconds, samples) for one training step per batch, after a warm-up step."""
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
    scheduler = build_scheduler(dict(cfg["scheduler"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.get("lr", 1e-4)))

    def step(batch: dict) -> int:
        with torch.no_grad():
            x = vae.encode(batch["video"].float())
            model_args = text_encoder.encode(list(batch["text"]))
        model_args.update({k: batch[k].float() for k in CONDITION_KEYS if k in batch})
        loss = scheduler.training_losses(model, x, model_args)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return x.shape[0]

    step(batches[0])
    start = time.perf_counter()
    samples = sum(step(b) for b in batches)
    return time.perf_counter() - start, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=12, help="copies of the demo rows in the snapshot")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--train-steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        demo = make_demo_data(work / "demo_data")
        tiny = create_tiny_pretrained(work / "demo_data" / "pretrained")
        weights = {"vae.from_pretrained": str(tiny.vae), "text_encoder.from_pretrained": str(tiny.t5)}
        vcfg = load_config(
            CONFIG, {}, cfg_options={"dataset.data_path": str(demo.root), **weights}, mode="train"
        )
        result = scan(demo.root, work / "demo.parquet", progress=False)
        meta = repeated_metadata(pq.read_table(result.metadata_path), args.repeat)
        pq.write_table(meta, work / "meta.parquet")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        info = build_buckets(vcfg, work / "meta.parquet", work / "buckets")
        ray.shutdown()

        cfg = absolute_paths(vcfg.raw.to_dict())
        batches = SnapshotBatches(
            str(info.path),
            cfg["dataset"],
            rank=0,
            world_size=1,
            seed=vcfg.training.seed,
            num_workers=args.workers,
        )
        loader_s, loader_samples, first_batch_s = loader_rate(batches)

        batches.num_workers = 0
        collected = []
        for batch in batches:
            if batch is not None:
                collected.append(batch)
            if len(collected) == args.train_steps:
                break
        train_s, train_samples = train_rate(cfg, collected)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    loader_sps, train_sps = loader_samples / loader_s, train_samples / train_s
    print(
        json.dumps(
            {
                "bench": "loader",
                "ratio": round(loader_sps / train_sps, 2),
                "loader_workers": args.workers,
                "loader_samples": loader_samples,
                "loader_epoch_s": round(loader_s, 2),
                "loader_first_batch_s": round(first_batch_s, 2),
                "loader_samples_per_s": round(loader_sps, 2),
                "train_steps": len(collected),
                "train_samples": train_samples,
                "train_s": round(train_s, 2),
                "train_samples_per_s": round(train_sps, 2),
                "train_steps_per_s": round(len(collected) / train_s, 2),
                "snapshot_buckets": len(info.manifest.buckets),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
