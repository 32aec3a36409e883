"""The `evaluate` flow: sample a config's eval prompts from any checkpoint directory."""

from __future__ import annotations

from prefect import flow

from opensora_core import tracking
from tasks.stages import evaluate_checkpoint


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: str, checkpoint: str, cfg_options: list[str] | None = None) -> list[str]:
    """`checkpoint`: one checkpoint directory, or a run directory to evaluate every checkpoint in it."""
    parent = (
        tracking.start_run("evaluate", tags={"checkpoint": checkpoint})
        if tracking.tracking_enabled()
        else None
    )
    try:
        samples = evaluate_checkpoint(config, {}, cfg_options, checkpoint, parent)
    except BaseException:
        if parent:
            tracking.end_run(parent, "FAILED")
        raise
    if parent:
        tracking.end_run(parent)
    return samples
