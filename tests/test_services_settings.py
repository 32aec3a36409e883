"""Fast checks of infra/local/services.py that start no service: settings, env file, safety rules."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import load_local_services

REPO = Path(__file__).resolve().parents[1]


services = load_local_services()


@pytest.fixture
def short_state_dir():
    with tempfile.TemporaryDirectory(prefix="osst-", dir="/tmp") as path:
        yield Path(path)


def test_defaults_are_repo_state_dir_loopback_and_standard_ports():
    settings = services.settings_from_env({})
    assert settings.state_dir == REPO / ".state"
    assert settings.host == "127.0.0.1"
    assert (settings.prefect_port, settings.mlflow_port) == (4200, 5000)
    assert (settings.ray_port, settings.ray_dashboard_port) == (6379, 8265)
    assert settings.pool == "local-process"


def test_env_overrides_state_dir_and_ports(tmp_path):
    settings = services.settings_from_env(
        {"OPENSORA_STATE_DIR": str(tmp_path), "OPENSORA_MLFLOW_PORT": "5999", "OPENSORA_RAY_PORT": "7000"}
    )
    assert settings.state_dir == tmp_path
    assert (settings.mlflow_port, settings.ray_port, settings.prefect_port) == (5999, 7000, 4200)


def test_non_integer_port_is_rejected_naming_the_variable():
    with pytest.raises(services.ServiceError, match="OPENSORA_PREFECT_PORT='abc': expected int"):
        services.settings_from_env({"OPENSORA_PREFECT_PORT": "abc"})


def test_deep_state_dir_gets_a_short_ray_temp_dir():
    deep = services.settings_from_env({"OPENSORA_STATE_DIR": "/tmp/" + "d" * 80})
    shallow = services.settings_from_env({"OPENSORA_STATE_DIR": "/tmp/s"})
    assert str(deep.ray_temp_dir).startswith("/tmp/opensora-ray-")
    assert len(str(deep.ray_temp_dir)) <= 40
    assert shallow.ray_temp_dir == Path("/tmp/s/ray")


def test_client_env_points_at_local_services_with_token_auth():
    settings = services.settings_from_env({"OPENSORA_STATE_DIR": "/tmp/s", "OPENSORA_RAY_PORT": "7000"})
    env = services.client_env(settings)
    assert env["RAY_ADDRESS"] == "127.0.0.1:7000"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == "/tmp/s/ray_auth_token"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


_OTHER_PORT_VARS = (
    "OPENSORA_PREFECT_PORT",
    "OPENSORA_RAY_PORT",
    "OPENSORA_RAY_DASHBOARD_PORT",
    "OPENSORA_RAY_CLIENT_PORT",
    "OPENSORA_RAY_AGENT_PORT",
)


def _unused_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def test_up_refuses_a_busy_port_before_starting_anything(short_state_dir):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        settings = services.settings_from_env(
            {
                "OPENSORA_STATE_DIR": str(short_state_dir),
                "OPENSORA_MLFLOW_PORT": str(busy),
                **{var: str(port) for var, port in zip(_OTHER_PORT_VARS, _unused_ports(5), strict=True)},
            }
        )
        with pytest.raises(services.ServiceError, match=f"port {busy} .*OPENSORA_MLFLOW_PORT"):
            services.up(settings, echo=lambda line: None)
    assert list((short_state_dir / "pids").iterdir()) == []


def test_down_never_kills_a_process_it_did_not_start(short_state_dir):
    # A stale pid file whose PID now belongs to someone else's session leader.
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        settings = services.settings_from_env({"OPENSORA_STATE_DIR": str(short_state_dir)})
        settings.pid_file("mlflow").parent.mkdir(parents=True)
        settings.pid_file("mlflow").write_text(f"{stranger.pid}\n")
        lines: list[str] = []

        services.down(settings, echo=lines.append)

        assert stranger.poll() is None
        assert "mlflow: not running" in lines
        assert not settings.pid_file("mlflow").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_status_without_services_reports_each_one_stopped(short_state_dir):
    settings = services.settings_from_env({"OPENSORA_STATE_DIR": str(short_state_dir)})
    rows = services.status(settings)
    assert [(row.name, row.running, row.pid) for row in rows] == [
        ("ray", False, None),
        ("mlflow", False, None),
        ("prefect-server", False, None),
        ("prefect-worker", False, None),
    ]
