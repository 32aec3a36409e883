"""MLflow records of a pipeline: one parent run per pipeline, a child run per stage.

Runs are addressed by id through `MlflowClient` (no active-run global state), so a stage
running in another process (a Ray worker, a Prefect task) can log to the run it was handed.
The tracking server comes from MLFLOW_TRACKING_URI; credentials, if any, from the environment.
A run starts only once the server answers; during training records are queued (`TrainingLog`) so
a server that restarts never stalls or fails a step, and what never reached it is reported once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from opensora_core.errors import OpenSoraError, first_line

log = logging.getLogger(__name__)

EXPERIMENT = "opensora"
MAX_PARAM_VALUE = 6000  # MLflow 3 limit on a param's value length
# How long starting or ending a run waits for a tracking server that does not answer (a restart
# takes 5-40 s); MLflow's own client would retry for ~4 minutes instead.
SERVER_WAIT_S = 30.0
# How long the end of training waits for queued records to reach a server that is away.
CATCH_UP_S = 120.0
# How often MLflow's system-metrics monitor samples and logs (its default, 10 s, leaves a short run with
# one point or none; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still overrides this).
SYSTEM_METRICS_EVERY_S = 5.0
# How long the end of training waits for that monitor to stop (it may be inside a request to a server
# that is away, which MLflow's client retries for minutes).
SYSTEM_METRICS_STOP_S = 10.0
# How often the training logger asks a server that did not answer again.
RETRY_EVERY_S = 2.0
# The training logger sends at most once per this many seconds: records of several logged steps share
# one request (a request costs about the same for 10 records as for 30, and its CPU time is taken
# from the training thread while it holds the GIL).
SEND_EVERY_S = 1.0
_BATCH_METRICS, _BATCH_TAGS = 900, 100  # within MLflow's log_batch limits (1000 items, 100 tags)


class TrackingServerDown(OpenSoraError):
    """MLFLOW_TRACKING_URI names a server that does not answer."""


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


def code_commit() -> str:
    """The full git commit of the code that runs, with "-dirty" when tracked files differ from it;
    "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty else commit or "unknown"


def config_hash(config_text: str) -> str:
    """A short stable hash of a config as resolved (after `_base_` and overrides): equal hashes, equal runs."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


def lineage_tags(
    *,
    config_hash: str,
    code_commit: str,
    bucket_snapshot: str | None = None,
    metadata_fingerprint: str | None = None,
    bucket_config_hash: str | None = None,
    feature_snapshot: str | None = None,
) -> dict[str, str]:
    """The data and code a run trained on, as `lineage.*` tags (the ones it has: a run on synthetic clips
    has no snapshot); the same tags go on the model version registered from its checkpoint."""
    values = {
        "bucket_snapshot": bucket_snapshot,
        "feature_snapshot": feature_snapshot,
        "metadata_fingerprint": metadata_fingerprint,
        "bucket_config_hash": bucket_config_hash,
        "config_hash": config_hash,
        "code_commit": code_commit,
    }
    return {f"lineage.{key}": str(value) for key, value in values.items() if value}


def start_run(
    run_name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    """Create a run (a child run when `parent_run_id` is given) and return its id. A server that does not
    answer is waited for up to SERVER_WAIT_S, then reported as TrackingServerDown."""
    wait_for_server()
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


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log metrics at `step`, stamped now (training uses `TrainingLog.log_metrics`, which never waits)."""
    _client().log_batch(run_id, metrics=_metrics(metrics, step))


class _MetricValue(NamedTuple):
    """One metric value as MLflow's Metric takes it, kept as plain data so that queueing one imports
    nothing (the first `import mlflow` takes seconds)."""

    key: str
    value: float
    timestamp: int  # ms since the epoch
    step: int


def _metric_values(metrics: Mapping[str, float], step: int) -> list[_MetricValue]:
    """`metrics` at `step`, stamped now."""
    now = int(time.time() * 1000)
    return [_MetricValue(k, float(v), now, step) for k, v in metrics.items()]


def _metrics(metrics: Mapping[str, float], step: int) -> list:
    from mlflow.entities import Metric

    return [Metric(*m) for m in _metric_values(metrics, step)]


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
    """Mark the run ended. The stage's work is done (or its own error is what matters), so a tracking
    server that stays away is reported, not raised; the run then shows RUNNING in MLflow."""
    try:
        wait_for_server()
        _client().set_terminated(run_id, status=status)
    except Exception as err:
        log.warning("MLflow: run %s could not be marked %s: %s", run_id, status, first_line(err, limit=300))


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


def server_problem(timeout_s: float = 3.0) -> str | None:
    """Why the tracking server at MLFLOW_TRACKING_URI does not answer its health check, or None when it
    does (or when the URI is a local store, which has no server to lose)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError as err:
        return f"GET /health -> {err.code}"
    except OSError as err:  # refused, reset, timed out, unknown host
        return str(getattr(err, "reason", None) or err)


def wait_for_server(timeout_s: float | None = None) -> None:
    """Return once the tracking server answers; after `timeout_s` (SERVER_WAIT_S) raise TrackingServerDown."""
    timeout_s = SERVER_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while (problem := server_problem()) is not None:
        if time.monotonic() >= deadline:
            uri = os.environ["MLFLOW_TRACKING_URI"]
            raise TrackingServerDown(
                f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered within {timeout_s:.0f} s ({problem}); "
                "start it (infra/local/up) or unset MLFLOW_TRACKING_URI to run without tracking"
            )
        time.sleep(1.0)


# Why the training logger keeps its own queue and thread instead of MLflow's asynchronous logging
# (`log_batch(..., synchronous=False)`, MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS, checked against MLflow
# 3.17's mlflow/utils/async_logging/async_logging_queue.py and utils/request_utils.py):
# - MLflow sends each queued batch once, retrying only inside the HTTP request (urllib3, exponential
#   backoff, MLFLOW_HTTP_REQUEST_MAX_RETRIES=7: about 4 minutes, at most 10 retries); when those give up
#   the batch is dropped with an ERROR line. An outage longer than that loses records, and records of a
#   shorter one arrive only at the next backoff (up to 2 minutes after the server is back). Here records
#   stay queued until the server answers, asked again every RETRY_EVERY_S.
# - MLflow's queue registers an atexit hook that waits for every batch, retries included, and its
#   flush() has no timeout: a worker ending while the server is away hangs for minutes (measured: an
#   exit still waiting after 25 s). `close` here waits at most CATCH_UP_S and reports what is left in
#   one warning line, instead of one ERROR per batch.
# - With MLflow's buffering, sending without waiting (`send_now`, before a checkpoint) is only possible
#   through flush(), which blocks; without buffering every logged step is its own request.
# What MLflow does give is used: MlflowClient.log_batch for each request, its refusal error codes.


class TrainingLog:
    """The training loop's MLflow records: queued here and sent by a background thread, so a step never
    waits on the tracking server, nor fails because of it.

    Records that arrive within `send_every_s` (SEND_EVERY_S) of each other go in one request. While the
    server does not answer, records wait and the thread asks again every RETRY_EVERY_S; once
    it answers they all go, in batches. A batch the server answers with a refusal (an invalid name) is
    dropped with one warning rather than sent again forever. `close` waits up to `catch_up_s` for the
    queue to empty and reports what never arrived in one warning.
    """

    def __init__(
        self,
        run_id: str,
        *,
        tags: Mapping[str, str] | None = None,
        retry_every_s: float | None = None,
        send_every_s: float | None = None,
    ) -> None:
        self.run_id = run_id
        self._retry_every_s = RETRY_EVERY_S if retry_every_s is None else retry_every_s
        self._send_every_s = SEND_EVERY_S if send_every_s is None else send_every_s
        self._metrics: list[_MetricValue] = []  # oldest first; removed only once sent
        self._tags: dict[str, str] = {k: str(v) for k, v in (tags or {}).items()}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()  # close() waits for the queue to empty
        self._hurry = threading.Event()  # send what is queued without waiting for more
        self._given_up = threading.Event()  # close() stopped waiting
        self._problem: str | None = None  # why the last attempt failed
        self._thread = threading.Thread(
            target=self._send_until_closed, name="mlflow-training-log", daemon=True
        )
        if self._tags:
            # Sent now when the server answers: this also opens the tracking store (seconds with a SQLite
            # store), which would otherwise compete with the first steps.
            if not self._send_batch():
                self._wake.set()  # the thread takes them over
        self._thread.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        with self._lock:
            self._metrics.extend(_metric_values(metrics, step))
        self._wake.set()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags; they go at once (they are rare: a new bucket, a checkpoint), with what is queued."""
        with self._lock:
            self._tags.update({k: str(v) for k, v in tags.items()})
        self.send_now()

    def send_now(self) -> None:
        """Send what is queued without waiting `send_every_s` for more (the loop calls it before saving a
        checkpoint, so a run that dies while saving still has its metrics up to there). Never waits."""
        self._hurry.set()
        self._wake.set()

    def close(self, catch_up_s: float | None = None) -> None:
        """Send what is queued, waiting up to `catch_up_s` (CATCH_UP_S) for an absent server; what is
        left then is reported once and dropped."""
        self._closing.set()
        self._hurry.set()
        self._wake.set()
        self._thread.join(CATCH_UP_S if catch_up_s is None else catch_up_s)
        self._given_up.set()
        with self._lock:
            metrics, tags = self._metrics, self._tags
            self._metrics, self._tags = [], {}
        if metrics or tags:
            steps = sorted({m.step for m in metrics})
            span = f" (steps {steps[0]}-{steps[-1]})" if steps else ""
            log.warning(
                "MLflow: %d metric values%s and %d tags of run %s were not logged: %s",
                len(metrics), span, len(tags), self.run_id,
                self._problem or "the tracking server did not take them in time",
            )  # fmt: skip

    def _send_until_closed(self) -> None:
        while not self._given_up.is_set():
            self._wake.wait()
            self._hurry.wait(self._send_every_s)  # what the next steps log joins this request
            if not self._closing.is_set():
                self._hurry.clear()
            self._wake.clear()
            while self._has_pending() and not self._given_up.is_set():
                if not self._send_batch():
                    self._given_up.wait(self._retry_every_s)  # the server is away: ask again later
            if self._closing.is_set() and not self._has_pending():
                return

    def _has_pending(self) -> bool:
        with self._lock:
            return bool(self._metrics or self._tags)

    def _send_batch(self) -> bool:
        """Send the oldest queued records; False (and why, in `_problem`) when the server did not take them."""
        self._problem = server_problem()
        if self._problem is not None:
            return False
        from mlflow.entities import Metric, RunTag

        with self._lock:
            metrics = self._metrics[:_BATCH_METRICS]
            tags = list(self._tags.items())[:_BATCH_TAGS]
        try:
            _client().log_batch(
                self.run_id, metrics=[Metric(*m) for m in metrics], tags=[RunTag(k, v) for k, v in tags]
            )
        except Exception as err:  # the server went away mid-request, or refused the batch
            self._problem = first_line(err, limit=300)
            if getattr(err, "error_code", None) != "INVALID_PARAMETER_VALUE":
                return False
            # The server answered and refused these records: sending them again would block the queue.
            log.warning(
                "MLflow: %d records of run %s refused: %s",
                len(metrics) + len(tags),
                self.run_id,
                self._problem,
            )
        with self._lock:
            del self._metrics[: len(metrics)]  # new records only ever go to the end
            for key, value in tags:
                if self._tags.get(key) == value:  # unless set again meanwhile
                    del self._tags[key]
        return True


def tracking_enabled() -> bool:
    """Stages log to MLflow only when a tracking server is configured."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def run_url(run_id: str) -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        return None
    import mlflow

    from opensora_core.config.credentials import redact_url

    run = mlflow.MlflowClient().get_run(run_id)
    return f"{redact_url(uri).rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def start_system_metrics(run_id: str, *, node_id: str | None = None) -> Any:
    """Start MLflow's own system-metrics monitor on `run_id`: `system/` CPU, memory, disk and network
    metrics, and GPU utilisation and memory when nvidia-ml-py finds a GPU (`system/<node_id>/...` when
    given). It runs in a thread of this process until `stop_system_metrics` or the run ends.

    The monitor `mlflow.start_run(log_system_metrics=True)` starts, used on its own: runs here are
    addressed by id, and making the run this process's active run would have it end the run too.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_EVERY_S, node_id=node_id)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any, timeout_s: float | None = None) -> None:
    """Stop the monitor, then log one last sample: the time since its last one (MLflow's `finish` drops
    what it sampled since it last logged, which for a run shorter than the interval is everything).
    Waits at most `timeout_s` (SYSTEM_METRICS_STOP_S): `finish` joins a thread that may be retrying a
    request to a server that is away."""

    def finish() -> None:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()

    stopper = threading.Thread(target=finish, name="mlflow-system-metrics-stop", daemon=True)
    stopper.start()
    stopper.join(SYSTEM_METRICS_STOP_S if timeout_s is None else timeout_s)


# ---------------------------------------------------------------- checkpoints as model versions

CHECKPOINT_REFERENCE = "checkpoint.json"


def registered_model_name(config_path: str | Path | None, model_type: str) -> str:
    """The registered model a run's checkpoints become versions of: `opensora-<config name>` (the config
    file's stem), else `opensora-<model type>`; characters MLflow's UI would mangle become "-"."""
    named = config_path and not str(config_path).startswith("<")  # "<config>": built in memory
    base = Path(config_path).stem if named else model_type
    return "opensora-" + re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-")


def model_source(checkpoint: str, run_id: str) -> str:
    """The model version's `source`: the checkpoint's own URI when it is on shared storage (`s3://...`;
    the tracking server stores it as given), else the run's reference to it (`runs:/<id>/checkpoints/<name>`,
    a small JSON naming the path): MLflow's server refuses a local path outside the run's artifacts."""
    from opensora_core.storage import is_uri

    if is_uri(checkpoint) and not checkpoint.startswith("file:"):
        return checkpoint
    return f"runs:/{run_id}/checkpoints/{Path(checkpoint).name}"


def checkpoint_reference(checkpoint: str, global_step: int, files: Mapping[str, int]) -> dict[str, Any]:
    """What `checkpoints/<name>/checkpoint.json` holds: where the checkpoint is and what is in it (file ->
    bytes), so a model version's source names it without a copy of its bytes."""
    return {"uri": checkpoint, "global_step": global_step, "files": dict(sorted(files.items()))}


def register_checkpoint(
    run_id: str,
    checkpoint: str,
    *,
    global_step: int,
    files: Mapping[str, int],
    model_name: str,
    tags: Mapping[str, str],
) -> tuple[str, str]:
    """Register `checkpoint` as a new version of `model_name` (created on first use) made by `run_id`,
    with `tags` (the run's lineage) and its location; returns (name, version). The run gets the reference
    file under `checkpoints/<name>/` and a `registered_model` tag naming the version."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.create_registered_model(
            model_name, description="Open-Sora checkpoints registered by `opensora train` runs"
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    name = Path(checkpoint).name
    with tempfile.TemporaryDirectory() as local:
        path = Path(local) / CHECKPOINT_REFERENCE
        path.write_text(json.dumps(checkpoint_reference(checkpoint, global_step, files), indent=2) + "\n")
        client.log_artifact(run_id, str(path), artifact_path=f"checkpoints/{name}")
    version_tags = {**tags, "checkpoint_uri": checkpoint, "global_step": str(global_step)}
    source = model_source(checkpoint, run_id)
    try:
        version = client.create_model_version(model_name, source, run_id=run_id, tags=version_tags)
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE" or source.startswith("runs:/"):
            raise
        # a URI scheme this server will not point at (hdfs:// without its allow-list): the reference
        log.info(
            "MLflow refused %s as a model version source (%s); registering the run's reference", source, err
        )
        source = f"runs:/{run_id}/checkpoints/{name}"
        version = client.create_model_version(model_name, source, run_id=run_id, tags=version_tags)
    set_tags(run_id, {"registered_model": f"{model_name}/{version.version}"})
    return model_name, str(version.version)
