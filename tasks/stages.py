"""Prefect tasks around the pipeline stages; each reloads the config so a task is self-contained.

What a person opens the flow run for is on its page as artifacts: the bucket report and the training
plan as tables, the MLflow runs and the Ray dashboard as links.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from opensora_core import stages, tracking
from opensora_core.config import ValidatedConfig, load_config
from opensora_core.errors import OpenSoraError


def stage_config(config: str, overrides: dict | None, cfg_options: list[str] | None) -> ValidatedConfig:
    return load_config(config, overrides or {}, cfg_options=cfg_options, mode="train")


def is_transient(task, task_run, state) -> bool:
    """Retry unless the failure is the user's to fix (a config, media or checkpoint error).

    Prefect calls this with the Failed state it made of the task's exception: `state.data` is the
    exception (`state.result()` would not raise it when called from an async context).
    """
    return not isinstance(state.data, OpenSoraError)


# Transient failures (a service restarting, a Ray worker lost) are retried; user errors are not.
RETRYABLE = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": is_transient}


@task(name="scan", cache_policy=NO_CACHE, **RETRYABLE)
def scan_media(
    config: str, overrides: dict | None, cfg_options: list[str] | None, parent_run_id: str | None
) -> str:
    """Probe the dataset's media headers into the metadata table; returns its path."""
    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    with tracking.stage_run("scan", parent_run_id=parent_run_id) as run_id:
        meta, result = stages.scan_stage(cfg, progress=False)
        if result is not None:
            logger.info("scan: %s", result.summary())
            if run_id:
                tracking.log_metrics(
                    run_id, {"files_ok": result.n_ok, "files_error": result.n_errors}, step=0
                )
                tracking.log_artifact(run_id, result.errors_path, artifact_path="metadata")
        if run_id:
            tracking.log_artifact(run_id, meta, artifact_path="metadata")
    return str(meta)


@task(name="bucket", cache_policy=NO_CACHE, **RETRYABLE)
def build_buckets(
    config: str, overrides: dict | None, cfg_options: list[str] | None, meta: str, parent_run_id: str | None
) -> str:
    """Bucket-assign the metadata with Ray Data into a new snapshot; returns the snapshot directory."""
    from opensora_core.data.bucket_report import REPORT_PLOT_NAME, format_report, report_rows, report_summary
    from opensora_core.data.manifest import MANIFEST_NAME

    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    with tracking.stage_run("bucket", parent_run_id=parent_run_id) as run_id:
        info = stages.build_buckets(cfg, Path(meta))
        logger.info("bucket snapshot %s\n%s", info.path, format_report(info.manifest))
        manifest = info.manifest
        create_table_artifact(
            report_rows(manifest),
            key="bucket-report",
            description=f"Bucket snapshot `{manifest.snapshot_id}`: {report_summary(manifest)}",
        )
        if run_id:
            tracking.set_tags(run_id, {"bucket_snapshot": manifest.snapshot_id})
            tracking.log_metrics(
                run_id,
                {
                    "samples": manifest.num_samples,
                    "samples_kept": manifest.num_kept,
                    "buckets": len(manifest.buckets),
                    "batches": manifest.num_batches,
                },
                step=manifest.epoch,
            )
            # Logged without the snapshot's leading underscores, which only keep them out of Parquet
            # readers; a copy, also because the snapshot may sit on shared storage (a URI).
            with tempfile.TemporaryDirectory() as local:
                for name, logged_as in ((MANIFEST_NAME, "manifest.json"), (REPORT_PLOT_NAME, "report.png")):
                    copy = Path(local) / logged_as
                    copy.write_bytes((info.path / name).read_bytes())
                    tracking.log_artifact(run_id, copy, artifact_path="buckets")
        if parent_run_id:
            tracking.set_tags(parent_run_id, {"bucket_snapshot": manifest.snapshot_id})
    return str(info.path)


@task(name="plan", cache_policy=NO_CACHE, **RETRYABLE)
def plan_training(
    config: str,
    overrides: dict | None,
    cfg_options: list[str] | None,
    snapshot: str,
    parent_run_id: str | None,
) -> dict:
    """Before training: the run's plan on the snapshot (refused here when it gives no full step), to MLflow."""
    from opensora_core.train.plan import format_plan, log_plan, make_plan, plan_rows, plan_table
    from opensora_core.train.preflight import check_step_plan

    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    with tracking.stage_run("plan", parent_run_id=parent_run_id) as run_id:
        plan = make_plan(cfg, snapshot_dir=snapshot)
        logger.info("training plan\n%s", format_plan(plan))
        create_table_artifact(plan_rows(plan), key="training-plan", description=plan_table(plan).caption)
        if run_id:
            log_plan(run_id, plan)
        check_step_plan(plan.steps, snapshot)
    return {
        "steps_per_epoch": plan.steps.steps_per_epoch,
        "epoch_s": plan.epoch_s,
        "gpu_hours": plan.gpu_hours,
    }


@task(name="precompute", cache_policy=NO_CACHE, **RETRYABLE)
def precompute_features(
    config: str,
    overrides: dict | None,
    cfg_options: list[str] | None,
    snapshot: str,
    parent_run_id: str | None,
) -> str:
    """Encode the snapshot's kept samples into a feature snapshot (incremental); returns its directory."""
    from opensora_core.features.store import ERRORS_NAME, MANIFEST_NAME

    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    with tracking.stage_run("precompute", parent_run_id=parent_run_id) as run_id:
        info = stages.precompute_stage(cfg, snapshot=snapshot, progress=False)
        manifest = info.manifest
        logger.info(
            "feature snapshot %s: %d rows encoded, %d reused, %d clips left out",
            info.path,
            manifest.num_encoded,
            manifest.num_reused,
            manifest.num_errors,
        )
        lineage = {"feature_snapshot": manifest.feature_id, "bucket_snapshot": manifest.bucket_snapshot_id}
        if run_id:
            tracking.set_tags(run_id, lineage)
            tracking.log_metrics(
                run_id,
                {
                    "samples": manifest.num_samples,
                    "rows_encoded": manifest.num_encoded,
                    "rows_reused": manifest.num_reused,
                    "clips_failed": manifest.num_errors,
                },
                step=0,
            )
            with tempfile.TemporaryDirectory() as local:  # logged without the leading underscores
                for name, logged_as in ((MANIFEST_NAME, "manifest.json"), (ERRORS_NAME, "errors.parquet")):
                    if (info.path / name).is_file():
                        copy = Path(local) / logged_as
                        copy.write_bytes((info.path / name).read_bytes())
                        tracking.log_artifact(run_id, copy, artifact_path="features")
        if parent_run_id:
            tracking.set_tags(parent_run_id, {"feature_snapshot": manifest.feature_id})
    return str(info.path)


@task(name="train", cache_policy=NO_CACHE)
def train_model(
    config: str,
    overrides: dict | None,
    cfg_options: list[str] | None,
    snapshot: str | None,
    parent_run_id: str | None,
    features: str | None = None,
) -> dict:
    """Train on Ray Train (workers on the cluster at RAY_ADDRESS); returns the last checkpoint.

    With `features` (a feature snapshot directory) the workers read stored latents and captions.
    """
    from opensora_core.parallel.launch import dashboard_url

    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    with tracking.stage_run("train", parent_run_id=parent_run_id) as run_id:
        if run_id:
            tracking.log_config(run_id, cfg.raw.to_dict(), config)
            link_artifact(tracking.run_url(run_id), "mlflow-train-run", "MLflow training run")
        # the cluster the workers run on: linked before training when known, so it can be watched there
        dashboard = dashboard_url()
        link_artifact(dashboard, "ray-dashboard", "Ray dashboard")
        result = stages.run_training(
            cfg,
            snapshot=snapshot,
            features=features,
            mlflow_run_id=run_id,
            ray_address=os.environ.get("RAY_ADDRESS"),
        )
        if dashboard is None:  # known once training has connected to Ray
            link_artifact(dashboard_url(), "ray-dashboard", "Ray dashboard")
        logger.info(
            "trained to global step %s, loss %.4f: %s",
            result.global_step,
            result.final_loss,
            result.checkpoint,
        )
    return {
        "checkpoint": result.checkpoint,
        "global_step": result.global_step,
        "exp_dir": result.exp_dir,
        "train_run_id": run_id,
    }


def link_artifact(url: str | None, key: str, text: str) -> None:
    """A link on the flow run's page (and, by `key`, on Prefect's Artifacts page); none without a URL."""
    if url:
        create_link_artifact(url, link_text=text, key=key, description=f"{text} of this flow run")


@task(name="evaluate", cache_policy=NO_CACHE, **RETRYABLE)
def evaluate_checkpoint(
    config: str,
    overrides: dict | None,
    cfg_options: list[str] | None,
    checkpoint: str,
    parent_run_id: str | None,
    train_run_id: str | None = None,
    snapshot: str | None = None,
) -> list[str]:
    """Sample the config's eval prompts from a checkpoint, or from every checkpoint of a run directory.

    Samples and sampling time go to the evaluate child run and, when given, to the training run
    under each checkpoint's step, so runs compare side by side in the MLflow UI. With a validation split
    (val_fraction of `snapshot`, or val_data_path) the eval loss per bucket goes there too.
    """
    from opensora_core.sample.eval_loss import eval_loss_checkpoints, has_validation
    from opensora_core.sample.evaluate import evaluate_checkpoints, find_checkpoints

    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    first = find_checkpoints(checkpoint)[0]
    with tracking.stage_run("evaluate", parent_run_id=parent_run_id) as run_id:
        runs = [r for r in (run_id, train_run_id) if r]
        results = evaluate_checkpoints(
            cfg, checkpoint, first.parent / "eval", mlflow_run_ids=runs, progress=False
        )
        for result in results:
            logger.info(
                "step %d: %d samples in %.1fs",
                result.global_step,
                len(result.samples),
                result.sampling_seconds,
            )
        if has_validation(cfg):
            for loss in eval_loss_checkpoints(  # on a worker group shaped as training's
                config, checkpoint, snapshot_dir=snapshot, cfg_options=cfg_options, mlflow_run_ids=runs,
                num_workers=cfg.training.num_train_workers, ray_address=os.environ.get("RAY_ADDRESS"),
                progress=False,
            ):  # fmt: skip
                logger.info("step %d: eval loss %.5f %s", loss.global_step, loss.mean, loss.per_bucket)
    return [path for result in results for path in result.samples]
