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


def test_lineage_tags_name_each_input_under_one_prefix_and_leave_out_what_the_run_lacks():
    from opensora_core import tracking

    tags = tracking.lineage_tags(
        config_hash="c0ffee", code_commit="abc123-dirty", bucket_snapshot="20260101T000000Z-1a2b",
        metadata_fingerprint="f00d", bucket_config_hash="beef",
    )  # fmt: skip
    assert tags == {
        "lineage.bucket_snapshot": "20260101T000000Z-1a2b",
        "lineage.metadata_fingerprint": "f00d",
        "lineage.bucket_config_hash": "beef",
        "lineage.config_hash": "c0ffee",
        "lineage.code_commit": "abc123-dirty",
    }  # no feature snapshot: the run read raw video
    synthetic = tracking.lineage_tags(config_hash="c0ffee", code_commit="abc123", feature_snapshot="feat-1")
    assert synthetic == {
        "lineage.feature_snapshot": "feat-1",
        "lineage.config_hash": "c0ffee",
        "lineage.code_commit": "abc123",
    }


def test_config_hash_is_stable_and_follows_every_character_of_the_resolved_config():
    from opensora_core.tracking import config_hash

    text = 'model = dict(type="STDiT3-XL/2", depth=2)\n'
    assert config_hash(text) == config_hash(str(text))
    assert config_hash(text) != config_hash(text.replace("depth=2", "depth=3"))
    assert len(config_hash(text)) == 16 and int(config_hash(text), 16) >= 0


def test_code_commit_names_this_checkout_s_head():
    import subprocess
    from pathlib import Path

    from opensora_core.tracking import code_commit

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    assert code_commit().removesuffix("-dirty") == (head or "unknown")


def test_a_model_version_points_at_shared_storage_itself_and_at_the_run_s_reference_for_a_local_path():
    from opensora_core.tracking import checkpoint_reference, model_source, registered_model_name

    assert model_source("s3://bucket/runs/000-STDiT3-XL-2/epoch1-global_step8", "r1") == (
        "s3://bucket/runs/000-STDiT3-XL-2/epoch1-global_step8"
    )
    # MLflow's server refuses a local path (or file://) outside the run's artifacts as a version source
    local = "/data/outputs/000-STDiT3-XL-2/epoch1-global_step8"
    assert model_source(local, "r1") == "runs:/r1/checkpoints/epoch1-global_step8"
    assert model_source("file://" + local, "r1") == "runs:/r1/checkpoints/epoch1-global_step8"
    assert checkpoint_reference(local, 8, {"model.safetensors": 10, "config.py": 3}) == {
        "uri": local,
        "global_step": 8,
        "files": {"config.py": 3, "model.safetensors": 10},
    }
    assert registered_model_name("configs/opensora-v1-2/train/demo.py", "STDiT3-XL/2") == "opensora-demo"
    assert registered_model_name("<config>", "STDiT3-XL/2") == "opensora-STDiT3-XL-2"
