"""The per-bucket loss of logged steps (opensora_core.train.metrics), without a process group."""

from __future__ import annotations

import pytest


def test_buckets_of_one_resolution_and_length_share_a_loss_series_weighted_by_micro_batch():
    from opensora_core.train.metrics import bucket_loss_means

    groups = ["144p-17", "144p-17", "240p-1", "360p-51"]
    # 144p-17 at two aspect ratios: 3 micro-batches (loss sum 0.9) and 1 (0.5); 360p-51 not trained
    means = bucket_loss_means([0.9, 0.5, 0.2, 0.0], [3.0, 1.0, 1.0, 0.0], groups)
    assert means == pytest.approx({"loss/144p-17": 1.4 / 4, "loss/240p-1": 0.2})


def test_a_logged_step_reports_samples_and_tokens_per_second_and_the_window_starts_again():
    import torch

    from opensora_core.train.metrics import StepMetrics, StepTotals

    metrics = StepMetrics(torch.device("cpu"), {"144p-17-0.56": "144p-17"}, world_size=1, sp_size=1)
    metrics.add_micro_batch("144p-17-0.56", torch.tensor(0.5), 1.0)
    metrics.add(torch.tensor(0.5, dtype=torch.float64))
    totals = StepTotals(
        loss=0.5, window_loss=0.5, samples=4, tokens=4096, skipped=0, bucket_losses={"loss/144p-17": 0.5}
    )
    logged = metrics.logged(totals, lr=1e-4, grad_norm=None, step_time=2.0, epoch=0, global_step=1)
    assert logged["samples_per_s"] == 2.0 and logged["tokens_per_s"] == 2048.0
    assert logged["loss/144p-17"] == 0.5
    assert "bucket" not in logged  # no bucket index series
    assert metrics.window_steps == 0 and not metrics.bucket_window.any()
