"""The `buckets` flow: rescan the data and rebuild the bucket snapshot only when something changed.

Deployed as `buckets/rebuild` on a cron schedule (prefect.yaml). The rescan is incremental (only
new or changed files are probed); a new snapshot is built when the metadata fingerprint or the
bucket settings differ from the manifest `ROOT/CURRENT` names, otherwise the run records
"unchanged" (log, and an MLflow tag and metric when MLFLOW_TRACKING_URI is set) and exits.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from opensora_core import tracking
from opensora_core.config import load_config
from tasks.buckets import check_bucket_snapshot
from tasks.stages import build_buckets, scan_media

DEFAULT_CONFIG = "configs/opensora-v1-2/train/demo.py"
UNCHANGED = "unchanged"
REBUILT = "rebuilt"


@flow(name="buckets", log_prints=True)
def rebuild_buckets(
    config: str = DEFAULT_CONFIG,
    data_path: str | None = None,
    cfg_options: list[str] | None = None,
    force: bool = False,
) -> dict:
    """Rescan `data_path` (default: the config's) and rebuild the bucket snapshot if it is out of date."""
    logger = get_run_logger()
    overrides = {"data_path": data_path} if data_path else {}
    load_config(config, overrides, cfg_options=cfg_options, mode="train")  # fail fast on a bad config
    parent = None
    if tracking.tracking_enabled():
        parent = tracking.start_run(
            f"buckets-{flow_run.get_name() or 'local'}",
            tags={"stage": "buckets", "prefect_flow_run_id": str(flow_run.get_id()), "config": config},
        )
    try:
        meta = scan_media(config, overrides, cfg_options, parent)
        check = check_bucket_snapshot(config, overrides, cfg_options, meta)
        if check["is_current"] and not force:
            status, snapshot, reason = UNCHANGED, check["snapshot"], ""
            logger.info("bucket snapshot %s: %s, nothing to build", check["snapshot_id"], UNCHANGED)
        else:
            reason = "forced" if check["is_current"] else "; ".join(check["changes"])
            snapshot = build_buckets(config, overrides, cfg_options, meta, parent)
            status = REBUILT
            logger.info("bucket snapshot rebuilt (%s): %s", reason, snapshot)
    except BaseException:
        if parent:
            tracking.end_run(parent, "FAILED")
        raise
    if parent:
        tracking.set_tags(parent, {"bucket_rebuild": status, "bucket_rebuild_reason": reason or "-"})
        if status == UNCHANGED:
            tracking.set_tags(parent, {"bucket_snapshot": check["snapshot_id"]})
        tracking.log_metrics(parent, {"bucket_snapshot_rebuilt": float(status == REBUILT)}, step=0)
        tracking.end_run(parent)
    return {
        "status": status,
        "snapshot": snapshot,
        "metadata": meta,
        "reason": reason,
        "mlflow_run_id": parent,
    }


if __name__ == "__main__":
    rebuild_buckets(config=os.environ.get("OPENSORA_CONFIG", DEFAULT_CONFIG))
