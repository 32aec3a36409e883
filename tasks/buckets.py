"""Prefect task of the scheduled bucket rebuild: is the current snapshot still up to date?"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opensora_core import stages
from tasks.stages import RETRYABLE, stage_config


@task(name="check-buckets", cache_policy=NO_CACHE, **RETRYABLE)
def check_bucket_snapshot(
    config: str, overrides: dict | None, cfg_options: list[str] | None, meta: str
) -> dict:
    """Compare the metadata and bucket settings with `ROOT/CURRENT`; returns the decision as a dict."""
    logger = get_run_logger()
    cfg = stage_config(config, overrides, cfg_options)
    check = stages.check_buckets(cfg, Path(meta))
    current = check.current
    if check.is_current:
        logger.info("bucket snapshot %s is up to date with %s", current.snapshot_id, meta)
    else:
        logger.info("bucket snapshot needs a rebuild: %s", "; ".join(check.changes))
    return {
        "is_current": check.is_current,
        "changes": list(check.changes),
        "snapshot_id": current.snapshot_id if current else None,
        "snapshot": str(check.root / current.snapshot_id) if current else None,
        "metadata_fingerprint": check.metadata_fingerprint,
        "config_hash": check.config_hash,
    }
