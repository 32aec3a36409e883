"""End-to-end check of infra/local/{up,status,down}: real Ray, MLflow and Prefect on spare ports."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import load_local_services

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "infra" / "local"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="services.py reads /proc"),
]


services = load_local_services()


def _run(script: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LOCAL / script)], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _client_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_"))}
    env.update(services.read_client_env(settings.state_dir))
    return env


def _is_alive(pid: int) -> bool:
    return services._proc_info(pid) is not None  # zombies count as gone


@pytest.fixture(scope="module")
def stack(service_stack):
    """The session's shared stack (tests/conftest.py), up: (settings, environment, what `up` printed)."""
    service_stack.ensure_up()
    return service_stack.settings, service_stack.env, service_stack.up_output


def test_up_prints_urls_token_command_and_env_file(stack):
    settings, _, out = stack
    assert settings.prefect_url in out
    assert settings.mlflow_url in out
    assert settings.ray_dashboard_url in out
    assert "ray get-auth-token" in out
    assert f"source {settings.state_dir / 'env.sh'}" in out


def test_health_endpoints_answer(stack):
    settings, _, _ = stack
    assert _get(f"{settings.mlflow_url}/health") == (200, "OK")
    assert _get(f"{settings.prefect_url}/api/health") == (200, "true")
    # gcs_healthz answers 503 when the GCS misses its health-check deadline, which a starved CPU can
    # cause once; a GCS that is down keeps answering 503.
    codes = [_get(f"{settings.ray_dashboard_url}/api/gcs_healthz")[0] for _ in range(3)]
    assert 200 in codes, codes


def test_ray_dashboard_requires_the_token(stack):
    settings, _, _ = stack
    token = settings.ray_token_path.read_text().strip()
    mode = json.loads(_get(f"{settings.ray_dashboard_url}/api/authentication_mode")[1])
    assert mode == {"authentication_mode": "token"}
    assert _get(f"{settings.ray_dashboard_url}/api/version")[0] == 401
    assert _get(f"{settings.ray_dashboard_url}/api/version", {"Authorization": "Bearer wrong"})[0] == 403
    assert _get(f"{settings.ray_dashboard_url}/api/version", {"Authorization": f"Bearer {token}"})[0] == 200


def test_env_file_exports_what_clients_need(stack):
    settings, _, _ = stack
    text = settings.env_file.read_text()
    assert f"export RAY_ADDRESS=127.0.0.1:{settings.ray_port}" in text
    assert "export RAY_AUTH_MODE=token" in text
    assert f"export RAY_AUTH_TOKEN_PATH={settings.ray_token_path}" in text
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{settings.mlflow_port}" in text
    assert f"export PREFECT_API_URL=http://127.0.0.1:{settings.prefect_port}/api" in text


def test_up_twice_is_a_noop(stack):
    settings, env, _ = stack
    pids = {name: settings.pid_file(name).read_text() for name in services.SERVICE_NAMES}
    result = _run("up", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("already running") == len(services.SERVICE_NAMES)
    assert {name: settings.pid_file(name).read_text() for name in services.SERVICE_NAMES} == pids


def test_status_reports_every_service_running_and_healthy(stack):
    _, env, _ = stack
    result = _run("status", env)
    assert result.returncode == 0, result.stdout + result.stderr
    by_name = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name in services.SERVICE_NAMES:
        assert " running " in by_name[name]
        assert "health=ok" in by_name[name]


def test_ray_client_with_token_env_runs_a_task(stack):
    settings, _, _ = stack
    code = f"""
        import ray
        ray.init(address={settings.ray_address!r}, log_to_driver=False)
        print("answer", ray.get(ray.remote(lambda x: x * 2).remote(21)))
        ray.shutdown()
    """
    result = subprocess.run(
        [str(VENV_PYTHON), "-c", textwrap.dedent(code)],
        env=_client_env(settings),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "answer 42" in result.stdout, result.stderr[-3000:]


def test_mlflow_logs_metric_and_artifact_through_the_server(stack, tmp_path):
    from mlflow import MlflowClient

    settings, _, _ = stack
    client = MlflowClient(tracking_uri=settings.mlflow_url)
    experiment_id = client.create_experiment("services-e2e")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.25, step=3)
    upload = tmp_path / "note.txt"
    upload.write_text("through the server")
    client.log_artifact(run.info.run_id, str(upload))

    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.value, m.step) for m in history] == [(0.25, 3)]
    fetched = Path(client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back")))
    assert fetched.read_text() == "through the server"
    stored = list((settings.state_dir / "mlflow" / "artifacts").rglob("note.txt"))
    assert len(stored) == 1


def test_prefect_pool_exists_and_worker_is_registered(stack):
    from prefect.client.orchestration import PrefectClient

    settings, _, _ = stack

    async def read():
        async with PrefectClient(api=settings.prefect_api_url) as client:
            pool = await client.read_work_pool(settings.pool)
            workers = await client.read_workers_for_work_pool(settings.pool)
            return pool, workers

    pool, workers = asyncio.run(read())
    assert pool.type == "process"
    assert [(w.name, w.status.value) for w in workers] == [(services._worker_name(settings), "ONLINE")]


def test_flow_run_on_the_worker_reaches_ray_and_mlflow(stack, tmp_path):
    settings, _, _ = stack
    (tmp_path / "probe_flow.py").write_text(
        textwrap.dedent(
            """
            import json, sys
            import mlflow, ray
            from prefect import flow

            @flow
            def probe(out: str) -> None:
                ray.init(log_to_driver=False)
                doubled = ray.get(ray.remote(lambda x: x * 2).remote(21))
                ray.shutdown()
                with mlflow.start_run() as run:
                    mlflow.log_metric("doubled", doubled)
                with open(out, "w") as f:
                    json.dump({"doubled": doubled, "run_id": run.info.run_id, "python": sys.executable}, f)
            """
        )
    )
    out = tmp_path / "out.json"
    code = f"""
        from prefect import flow
        from prefect.deployments import run_deployment
        flow.from_source(source={str(tmp_path)!r}, entrypoint="probe_flow.py:probe").deploy(
            name="probe", work_pool_name={settings.pool!r}, print_next_steps=False
        )
        run = run_deployment(name="probe/probe", parameters={{"out": {str(out)!r}}}, timeout=300)
        print("state", run.state.type.value)
    """
    result = subprocess.run(
        [str(VENV_PYTHON), "-c", textwrap.dedent(code)],
        env=_client_env(settings),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd=tmp_path,
    )
    assert "state COMPLETED" in result.stdout, (result.stdout + result.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert data["doubled"] == 42
    assert data["python"].startswith(str(REPO / ".venv" / "bin"))
    from mlflow import MlflowClient

    metrics = MlflowClient(tracking_uri=settings.mlflow_url).get_run(data["run_id"]).data.metrics
    assert metrics == {"doubled": 42.0}


def test_every_service_process_listens_on_loopback_only(stack):
    import psutil

    settings, _, _ = stack
    listening = {}
    for name in services.SERVICE_NAMES:
        leader = int(settings.pid_file(name).read_text())
        for pid in services._session_members(leader):
            try:
                connections = psutil.Process(pid).net_connections(kind="inet")
            except psutil.Error:  # gone meanwhile
                continue
            for conn in connections:
                if conn.status == psutil.CONN_LISTEN:
                    listening[(name, pid, conn.laddr.port)] = conn.laddr.ip
    assert len({port for (_, _, port) in listening}) >= 4  # at least the four configured service ports

    def is_loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 counts

    assert {key: ip for key, ip in listening.items() if not is_loopback(ip)} == {}


def test_down_stops_every_process_and_frees_the_ports(stack):
    # Runs last in this module: it takes the shared stack down (a later module's fixture brings it up again).
    settings, env, _ = stack
    leaders = [int(settings.pid_file(name).read_text()) for name in services.SERVICE_NAMES]
    every_pid = {pid for leader in leaders for pid in services._session_members(leader)}
    assert len(every_pid) > len(leaders)  # Ray alone spawns a dozen processes

    result = _run("down", env)

    assert result.returncode == 0, result.stderr
    assert [pid for pid in every_pid if _is_alive(pid)] == []
    assert [name for name in services.SERVICE_NAMES if settings.pid_file(name).exists()] == []
    for port in settings.listening_ports():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # raises if anything still listens there
