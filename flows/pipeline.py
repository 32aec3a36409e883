"""The `train` flow: scan → bucket → (precompute) → plan → train → evaluate, one MLflow parent run with a
child per stage. Precompute runs when the config trains from features (`load_video_features` /
`load_text_features`): it encodes only what changed since the current feature snapshot. The plan
refuses data that gives no full step before any training worker starts."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_client, get_run_logger
from prefect.runtime import flow_run

from opensora_core import tracking
from opensora_core.config import load_config
from opensora_core.features.settings import feature_settings
from tasks.stages import (
    build_buckets,
    evaluate_checkpoint,
    link_artifact,
    plan_training,
    precompute_features,
    scan_media,
    train_model,
)

DEFAULT_CONFIG = "configs/opensora-v1-2/train/stage1.py"


def run_name() -> str:
    """The flow run's name as it starts: the config's (e.g. `demo`); `name_after_snapshot` adds the
    bucket snapshot's id once it is built."""
    return Path(flow_run.parameters.get("config") or DEFAULT_CONFIG).stem


def name_after_snapshot(snapshot: str) -> None:
    """Rename the running flow run `<config>@<snapshot id>`, so the runs list says what each trained on."""
    flow_run_id = flow_run.get_id()
    if flow_run_id is None:  # called outside a flow run
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, name=f"{run_name()}@{Path(snapshot).name}")


@flow(name="train", flow_run_name=run_name, log_prints=True)
def train_pipeline(
    config: str = DEFAULT_CONFIG,
    data_path: str | None = None,
    cfg_options: list[str] | None = None,
) -> dict:
    """Run the whole pipeline on `config` (paths relative to the repository root)."""
    logger = get_run_logger()
    overrides = {"data_path": data_path} if data_path else {}
    cfg = load_config(config, overrides, cfg_options=cfg_options, mode="train")  # fail fast on a bad config
    parent = None
    if tracking.tracking_enabled():
        parent = tracking.start_run(
            f"pipeline-{flow_run.get_name() or 'local'}",
            tags={"stage": "pipeline", "prefect_flow_run_id": str(flow_run.get_id()), "config": config},
        )
        tracking.log_config(parent, cfg.raw.to_dict(), config)
        logger.info("MLflow run: %s", tracking.run_url(parent) or parent)
        link_artifact(tracking.run_url(parent), "mlflow-pipeline-run", "MLflow pipeline run")
    try:
        meta = snapshot = features = None
        if cfg.dataset.type != "BatchFeatureDataset":  # Open-Sora's stage1_feat.py: stored features only
            meta = scan_media(config, overrides, cfg_options, parent)
            snapshot = build_buckets(config, overrides, cfg_options, meta, parent)
            name_after_snapshot(snapshot)
            if feature_settings(cfg.raw).enabled:
                features = precompute_features(config, overrides, cfg_options, snapshot, parent)
            plan_training(config, overrides, cfg_options, snapshot, parent)  # refuses data with no full step
        trained = train_model(config, overrides, cfg_options, snapshot, parent, features)
        # Every checkpoint the run wrote, logged to the training run under its step.
        samples = evaluate_checkpoint(
            config,
            overrides,
            cfg_options,
            trained["exp_dir"] or trained["checkpoint"],
            parent,
            trained["train_run_id"],
            snapshot,
        )
    except BaseException:
        if parent:
            tracking.end_run(parent, "FAILED")
        raise
    if parent:
        tracking.set_tags(parent, {"checkpoint": trained["checkpoint"]})
        tracking.end_run(parent)
    summary = {
        **trained,
        "metadata": meta,
        "snapshot": snapshot,
        "features": features,
        "samples": samples,
        "mlflow_run_id": parent,
    }
    logger.info("pipeline done: %s", summary)
    return summary


if __name__ == "__main__":
    train_pipeline(config=os.environ.get("OPENSORA_CONFIG", DEFAULT_CONFIG))
