"""MLflow records of a pipeline: one parent run per pipeline, a child run per stage.

Runs are addressed by id through `MlflowClient` (no active-run global state), so a stage
running in another process (a Ray worker, a Prefect task) can log to the run it was handed.
The tracking server comes from MLFLOW_TRACKING_URI; credentials, if any, from the environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "opensora"
MAX_PARAM_VALUE = 6000  # MLflow 3 limit on a param's value length


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"depth": 2}} -> {"model.depth": "2"}; dict keys such as bucket ints become strings."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = repr(value) if not isinstance(value, str) else value
            flat[name] = text[:MAX_PARAM_VALUE]
    return flat


def _client():
    import mlflow

    return mlflow.MlflowClient()


def experiment_id(name: str = EXPERIMENT) -> str:
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def code_version() -> str:
    """The git commit of the code that runs, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(
    run_name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """Create a run (a child run when `parent_run_id` is given) and return its id."""
    all_tags = {"code_version": code_version(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = _client().create_run(experiment_id(), run_name=run_name, tags=all_tags)
    return run.info.run_id


def log_params(run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    client = _client()
    items = [Param(k[:250], v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def log_config(run_id: str, cfg: Mapping[str, Any], config_path: str | Path | None = None) -> None:
    """Flattened config as params, the config file (and its resolved form) as artifacts."""
    log_params(run_id, flatten_config(cfg))
    client = _client()
    if config_path is not None and Path(config_path).is_file():
        client.log_artifact(run_id, str(config_path), artifact_path="config")


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, *, wait: bool = True) -> None:
    """Log metrics at `step`, stamped now. `wait=False` queues them for MLflow's background logger, so a
    training step never waits on the tracking server (or its retries while it restarts); `flush` at the end."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client().log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()], synchronous=wait
    )


def flush() -> None:
    """Wait for metrics queued with `wait=False`; a tracking server that stays down is reported, not raised."""
    import mlflow

    try:
        mlflow.flush_async_logging()
    except Exception as err:  # the run's results are on disk; losing some metric points must not fail it
        log.warning("MLflow: queued metrics could not all be logged: %s", str(err).splitlines()[0][:300])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    _client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = _client()
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)


@contextmanager
def stage_run(
    stage: str, *, parent_run_id: str | None, tags: Mapping[str, str] | None = None
) -> Iterator[str | None]:
    """A child run for one stage, ended FAILED if the stage raises. Yields None when MLflow is off."""
    if not tracking_enabled():
        yield None
        return
    run_id = start_run(stage, parent_run_id=parent_run_id, tags={"stage": stage, **(tags or {})})
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id, "FINISHED")


def tracking_enabled() -> bool:
    """Stages log to MLflow only when a tracking server is configured."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def run_url(run_id: str) -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        return None
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
