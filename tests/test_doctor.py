"""`opensora doctor`: environment report and service reachability."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from opensora_core.cli import main as cli_main
from opensora_core.doctor import service_checks


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_doctor_reports_the_cpu_paths_and_exits_zero_without_services(capsys, monkeypatch):
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch SDPA" in out  # no flash-attn on this CPU machine
    assert "torch.nn.LayerNorm" in out
    assert "backend gloo" in out
    assert "PyAV" in out
    assert "RAY_ADDRESS unset" in out
    assert out.strip().endswith("0 problem(s)")


def test_unreachable_service_is_a_problem_with_its_address(capsys, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli_main(["doctor"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if "mlflow" in line)
    assert line.startswith("BAD") and f"127.0.0.1:{port}" in line and "unreachable" in line


@pytest.fixture
def health_server():
    """An HTTP server on a free port answering 200 on any `/health` path, 404 elsewhere; yields its port."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path.endswith("/health") else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_reachable_services_are_ok(health_server):
    port = health_server
    checks = {
        c.name: c
        for c in service_checks(
            {
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
                "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "RAY_ADDRESS": f"127.0.0.1:{port}",
            }
        )
    }
    assert all(c.ok for c in checks.values()), checks
    assert checks["prefect"].detail.endswith("HTTP 200")
    assert checks["ray cluster"].detail.endswith("port open")


def test_a_server_named_with_a_password_is_reached_without_printing_it(health_server, capsys, monkeypatch):
    port = health_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:hunter2@127.0.0.1:{port}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    cli_main(["doctor"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if " mlflow " in line)
    assert line.startswith("ok") and f"http://***@127.0.0.1:{port}: HTTP 200" in line
    assert "hunter2" not in out and "alice" not in out


def test_ray_address_auto_is_checked_against_the_cluster_running_here(shared_ray, capsys, monkeypatch):
    shared_ray.ensure()  # the session's local Ray (tests/conftest.py) is the cluster running here
    checks = service_checks({"RAY_ADDRESS": "auto"})
    ray_check = next(c for c in checks if c.name == "ray cluster")
    assert ray_check.ok and ray_check.detail.startswith("RAY_ADDRESS=auto joins ")
    assert ray_check.detail.endswith(": port open")
