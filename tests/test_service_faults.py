"""Service faults (issue 7): Prefect retries what is transient and fails clearly on a user's error; a
real MLflow server or Prefect server that restarts mid-run costs neither the training nor its records.

The e2e modules' shared stack (tests/conftest.py) on spare ports with its own state dir: its MLflow
server, Prefect server and process worker (training here runs on the session's local Ray, not its head).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import load_local_services

from opensora_core import tracking

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs/opensora-v1-2/train/demo.py")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="services.py reads /proc"),
]


services = load_local_services()


def quiet(*_args) -> None:
    pass


def restart(settings, name: str) -> None:
    """Stop one service of the stack and start it again on the same port with the same state."""
    services.stop_service(settings, name)
    services._start(settings, name, quiet)
    services._wait_healthy(settings, name)


@pytest.fixture(scope="module")
def stack(service_stack):
    """The session's shared stack (tests/conftest.py), up; its worker polls for runs every 2 s. The tests
    that stop its MLflow or Prefect server start it again on the same port with the same state."""
    service_stack.ensure_up()
    return service_stack.settings


@pytest.fixture(scope="module")
def prefect_api(stack):
    """Flows run in this process report to the stack's Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield stack


def task_runs_of(flow_run_id) -> list[tuple[str, int, str]]:
    """(task name, attempts, final state) of each task run of a flow run, by name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((r.name.rsplit("-", 1)[0], r.run_count, r.state.type.value) for r in runs)


# ---------------------------------------------------------------- Prefect retries


def test_a_transient_failure_is_retried_and_the_flow_completes(prefect_api, monkeypatch, service_ports):
    """The error MLflow's client raises while its server restarts (here: nothing listens on the port)."""
    from mlflow import MlflowClient
    from prefect import flow, task

    from tasks.stages import RETRYABLE

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # its own retries would take minutes
    restarting = f"http://127.0.0.1:{service_ports(1)[0]}"
    errors: list[Exception] = []

    @task(**RETRYABLE)
    def log_to_mlflow() -> str:
        if not errors:
            try:
                MlflowClient(tracking_uri=restarting).search_experiments()
            except Exception as err:
                errors.append(err)
                raise
        return "logged"

    @flow
    def one_stage() -> str:
        return log_to_mlflow.with_options(retry_delay_seconds=0)()

    state = one_stage(return_state=True)

    assert state.is_completed(), state.message
    assert state.result() == "logged"
    assert [type(err).__name__ for err in errors] == ["MlflowException"]
    assert task_runs_of(state.state_details.flow_run_id) == [("log_to_mlflow", 2, "COMPLETED")]


def test_a_users_error_in_a_stage_is_not_retried_and_is_the_flows_one_line_failure(
    prefect_api, tmp_path, monkeypatch
):
    from flows.pipeline import train_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    no_media = tmp_path / "no-media"
    no_media.mkdir()

    state = train_pipeline(
        config=DEMO_CONFIG,
        data_path=str(no_media),
        cfg_options=[f"outputs={tmp_path / 'outputs'}"],
        return_state=True,
    )

    assert state.is_failed()
    errors = tmp_path / "outputs" / "meta" / "meta.errors.parquet"
    assert state.message == (
        "Flow run encountered an exception: ConfigError: "
        f"dataset.data_path={str(no_media)!r}: no readable media found (see {errors})"
    )
    assert task_runs_of(state.state_details.flow_run_id) == [("scan", 1, "FAILED")]


# ---------------------------------------------------------------- MLflow down


def test_the_pipeline_does_not_start_while_mlflow_is_down(prefect_api, tmp_path, monkeypatch, service_ports):
    from flows.pipeline import train_pipeline

    down = f"http://127.0.0.1:{service_ports(1)[0]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setattr(tracking, "SERVER_WAIT_S", 2.0)  # 30 s in use: long enough for a restart

    state = train_pipeline(
        config=DEMO_CONFIG, data_path=str(tmp_path), cfg_options=[f"outputs={tmp_path}"], return_state=True
    )

    assert state.message == (
        "Flow run encountered an exception: TrackingServerDown: "
        f"MLFLOW_TRACKING_URI={down}: no MLflow server answered within 2 s ([Errno 111] Connection refused); "
        "start it (infra/local/up) or unset MLFLOW_TRACKING_URI to run without tracking"
    )
    assert task_runs_of(state.state_details.flow_run_id) == []  # nothing scanned, no worker launched


def test_records_a_server_never_took_are_reported_once_without_holding_training_up(
    monkeypatch, caplog, service_ports
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{service_ports(1)[0]}")
    run_log = tracking.TrainingLog("run-of-a-lost-server", retry_every_s=0.2)

    start = time.monotonic()
    for step in range(1, 21):
        run_log.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step=step)
    run_log.set_tags({"checkpoint.latest": "/outputs/epoch0-global_step20"})
    queued_in = time.monotonic() - start
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        run_log.close(catch_up_s=1.0)
    closed_in = time.monotonic() - start

    assert queued_in < 0.5
    assert closed_in < 3.0
    assert [r.getMessage() for r in caplog.records if r.name == tracking.__name__] == [
        "MLflow: 40 metric values (steps 1-20) and 1 tags of run run-of-a-lost-server were not logged: "
        "[Errno 111] Connection refused"
    ]


@pytest.fixture(scope="module")
def local_ray(shared_ray, tmp_path_factory):
    """The session's local Ray (tests/conftest.py), not the stack's head, and tiny weights."""
    from opensora_core.models.tiny_random import create_tiny_pretrained

    shared_ray.ensure(trains=True)
    root = tmp_path_factory.mktemp("outage")
    return {"root": root, "pretrained": create_tiny_pretrained(root / "pretrained")}


def test_training_goes_on_while_mlflow_restarts_and_its_records_catch_up(stack, local_ray, monkeypatch):
    """MLflow stops after step 2 and comes back (same port, same database) once step 6 is saved:
    steps 3-6 run without it, and afterwards the run holds every step and checkpoint."""
    from mlflow import MlflowClient
    from test_train_distributed import tiny_config

    from opensora_core.parallel.launch import run_training
    from opensora_core.train import new_experiment_dir
    from opensora_core.train.job import train_job

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    root = local_ray["root"]
    markers = root / "markers"
    markers.mkdir()

    def train_loop_around_an_outage(job):
        # runs in the Ray worker: pauses once for the test to stop MLflow, then never waits on it
        import time

        from opensora_core.train import loop

        save = loop.save_checkpoint

        def save_and_signal(*args, **kwargs):
            saved = save(*args, **kwargs)
            step = kwargs["states"].global_step
            (markers / f"saved{step}").touch()
            while step == 2 and not (markers / "mlflow-stopped").exists():
                time.sleep(0.05)
            return saved

        loop.save_checkpoint = save_and_signal
        loop.train_loop_per_worker(job)

    cfg = tiny_config(local_ray["pretrained"], max_steps=8)
    exp_dir = new_experiment_dir(root / "runs", cfg.model.type)
    job = train_job(cfg, snapshot_dir=None, output_dir=str(exp_dir), mlflow_run_id=run_id)
    outage: dict[str, float] = {}

    def stop_then_restart_mlflow() -> None:
        wait_for(markers / "saved2")
        deadline = time.monotonic() + 60  # steps 1-2 are in before the server goes
        while len(client.get_metric_history(run_id, "loss")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        services.stop_service(stack, "mlflow")
        outage["stopped"] = time.time()
        (markers / "mlflow-stopped").touch()
        wait_for(markers / "saved6")
        services._start(stack, "mlflow", quiet)
        services._wait_healthy(stack, "mlflow")
        outage["back"] = time.time()

    operator = threading.Thread(target=stop_then_restart_mlflow)
    operator.start()
    try:
        result = run_training(
            train_loop_around_an_outage,
            job,
            num_workers=1,
            use_gpu=False,
            ray_address=None,
            storage_path=str(exp_dir.parent),
            run_name=exp_dir.name,
        )
    finally:
        operator.join(timeout=300)

    assert result.error is None
    saved = sorted(p.name for p in exp_dir.iterdir() if p.name.startswith(("epoch", ".tmp")))
    assert saved == [
        "epoch0-global_step2",
        "epoch0-global_step4",
        "epoch0-global_step6",
        "epoch1-global_step8",
    ]
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 9))  # each step once: nothing lost, nothing twice
    while_down = {m.step for m in loss if outage["stopped"] <= m.timestamp / 1000 <= outage["back"]}
    assert {3, 4, 5, 6} <= while_down
    tags = client.get_run(run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("checkpoint.")} == {
        "checkpoint.latest": str(exp_dir / "epoch1-global_step8"),
        **{f"checkpoint.global_step{p[-1]}": str(exp_dir / p) for p in saved},
    }


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout:.0f} s"
        time.sleep(0.1)


# ---------------------------------------------------------------- Prefect server down

STEPS_FLOW = """
import time
from pathlib import Path

from prefect import flow, task


@task
def step(i: int, markers: str) -> int:
    with open(Path(markers) / "steps.log", "a") as log:
        log.write(f"{i}\\n")
    Path(markers, f"step{i}.started").touch()
    time.sleep(3)
    return i


@flow
def steps(markers: str) -> int:
    return sum(step(i, markers) for i in range(4))
"""


def test_a_flow_run_on_the_worker_completes_across_a_prefect_server_restart(prefect_api, tmp_path):
    """The server stops while task 1 runs; tasks 1-3 change state while it is away or starting again."""
    from prefect import flow, get_client
    from prefect.deployments import run_deployment

    source, markers = tmp_path / "source", tmp_path / "markers"
    source.mkdir()
    markers.mkdir()
    (source / "steps_flow.py").write_text(STEPS_FLOW)
    flow.from_source(source=str(source), entrypoint="steps_flow.py:steps").deploy(
        name="restart", work_pool_name=prefect_api.pool, print_next_steps=False
    )
    run = run_deployment(name="steps/restart", parameters={"markers": str(markers)}, timeout=0)

    wait_for(markers / "step1.started", timeout=120)
    restart(prefect_api, "prefect-server")
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while not (final := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"flow run still {final.state.type.value}"
            time.sleep(1)

    assert final.state.type.value == "COMPLETED", final.state.message
    assert (markers / "steps.log").read_text() == "0\n1\n2\n3\n"  # each task ran once
    assert task_runs_of(run.id) == [("step", 1, "COMPLETED")] * 4
