"""The training logger's queue against a local MLflow store (no server)."""

from __future__ import annotations

import logging
import time


def test_records_the_store_refuses_are_reported_and_do_not_block_the_ones_after(
    tmp_path, monkeypatch, caplog
):
    import mlflow

    from opensora_core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run("refused")
    log = tracking.TrainingLog(run_id, retry_every_s=0.05)
    log.set_tags({"bad tag name!?": "x"})  # MLflow refuses this name (INVALID_PARAMETER_VALUE)
    log.log_metrics({"loss": 0.5}, step=1)  # sent in the same batch: dropped with it
    deadline = time.monotonic() + 30
    while log._has_pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    log.set_tags({"checkpoint": "/ckpt/epoch0-global_step1"})
    log.log_metrics({"loss": 0.25}, step=2)
    with caplog.at_level(logging.WARNING, logger="opensora_core.tracking"):
        log.close(catch_up_s=30)

    run = mlflow.MlflowClient().get_run(run_id)
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert run.data.tags["checkpoint"] == "/ckpt/epoch0-global_step1"
    assert [(m.step, m.value) for m in history] == [(2, 0.25)]
    refused = [r.message for r in caplog.records if "refused" in r.message]
    assert len(refused) == 1 and f"2 records of run {run_id} refused" in refused[0]
    assert not [r for r in caplog.records if "were not logged" in r.message]


def test_records_logged_close_together_share_one_request_and_send_now_skips_the_wait(tmp_path, monkeypatch):
    import mlflow

    from opensora_core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run("coalesced")
    log = tracking.TrainingLog(run_id, send_every_s=60)
    requests, send = [], log._send_batch
    monkeypatch.setattr(log, "_send_batch", lambda: requests.append(1) or send())
    for step in range(1, 6):
        log.log_metrics({"loss": 1.0 / step}, step=step)
    time.sleep(0.5)
    assert requests == [] and mlflow.MlflowClient().get_metric_history(run_id, "loss") == []

    log.send_now()  # as before a checkpoint is saved
    deadline = time.monotonic() + 30
    while log._has_pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert requests == [1]
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    log.close(catch_up_s=10)
