"""Start, stop and inspect the local Ray head, MLflow server, Prefect server and Prefect worker.

Standard library only: it runs with the repository's venv python but must work before the
project package is installed. Entry points: infra/local/{up,down,status}; see README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from hashlib import sha1
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"

# Started in this order by `up`, stopped in reverse by `down`.
SERVICE_NAMES = ("ray", "mlflow", "prefect-server", "prefect-worker")

# Env var carried by every process we start: lets `down` tell our processes from a
# reused PID or from Ray clusters that someone else started.
MARKER_VAR = "OPENSORA_LOCAL_SERVICE"

# Ray puts Unix sockets under <temp-dir>/session_<timestamp>_<pid>/sockets/...; AF_UNIX paths
# are limited to 107 bytes, so a deep state folder gets a short Ray temp dir under /tmp.
_RAY_TEMP_DIR_MAX_LEN = 40

# Variables that would point our children at some other cluster, token or server.
_FOREIGN_CLIENT_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_PROFILE",
)


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    """Where the state lives and which host/ports the services use."""

    state_dir: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    ray_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_client_port: int = 10001
    ray_agent_port: int = 52365
    ray_num_cpus: int = 1
    mlflow_workers: int = 1
    pool: str = "local-process"
    start_timeout_s: float = 180.0

    @property
    def client_host(self) -> str:
        # A wildcard bind address is not something a client can connect to.
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost")

    @property
    def ray_temp_dir(self) -> Path:
        inside = self.state_dir / "ray"
        if len(str(inside)) <= _RAY_TEMP_DIR_MAX_LEN:
            return inside
        return Path("/tmp") / f"opensora-ray-{sha1(str(self.state_dir).encode()).hexdigest()[:10]}"

    @property
    def ray_token_path(self) -> Path:
        return self.state_dir / "ray_auth_token"

    @property
    def ray_address(self) -> str:
        return f"{self.client_host}:{self.ray_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{self.client_host}:{self.ray_dashboard_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.client_host}:{self.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{self.client_host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env.sh"

    def pid_file(self, name: str) -> Path:
        return self.state_dir / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def port_of(self, name: str) -> int:
        return {
            "ray": self.ray_port,
            "mlflow": self.mlflow_port,
            "prefect-server": self.prefect_port,
        }[name]

    def url_of(self, name: str) -> str:
        return {
            "ray": self.ray_dashboard_url,
            "mlflow": self.mlflow_url,
            "prefect-server": self.prefect_url,
            "prefect-worker": f"{self.prefect_url}/work-pools/work-pool/{self.pool}",
        }[name]

    def listening_ports(self) -> list[int]:
        """The fixed ports our services listen on (Ray picks its other ports at random)."""
        return [
            self.ray_port,
            self.ray_dashboard_port,
            self.ray_client_port,
            self.ray_agent_port,
            self.mlflow_port,
            self.prefect_port,
        ]


_ENV_KEYS = {
    "host": ("OPENSORA_BIND_HOST", str),
    "prefect_port": ("OPENSORA_PREFECT_PORT", int),
    "mlflow_port": ("OPENSORA_MLFLOW_PORT", int),
    "ray_port": ("OPENSORA_RAY_PORT", int),
    "ray_dashboard_port": ("OPENSORA_RAY_DASHBOARD_PORT", int),
    "ray_client_port": ("OPENSORA_RAY_CLIENT_PORT", int),
    "ray_agent_port": ("OPENSORA_RAY_AGENT_PORT", int),
    "ray_num_cpus": ("OPENSORA_RAY_NUM_CPUS", int),
    "mlflow_workers": ("OPENSORA_MLFLOW_WORKERS", int),
    "pool": ("OPENSORA_PREFECT_POOL", str),
    "start_timeout_s": ("OPENSORA_START_TIMEOUT", float),
}


def settings_from_env(environ: dict[str, str] | None = None) -> Settings:
    """Settings from OPENSORA_* variables, defaulting to <repo>/.state and the standard ports."""
    env = dict(os.environ if environ is None else environ)
    state_dir = Path(env.get("OPENSORA_STATE_DIR") or REPO_ROOT / ".state").expanduser().resolve()
    values: dict[str, object] = {"ray_num_cpus": os.cpu_count() or 1}
    for field, (var, kind) in _ENV_KEYS.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            values[field] = kind(raw)
        except ValueError:
            raise ServiceError(f"{var}={raw!r}: expected {kind.__name__}") from None
    return Settings(state_dir=state_dir, **values)


def _saved_settings_file(state_dir: Path) -> Path:
    return state_dir / "settings.json"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings of the services running in the state dir if any, else from the environment.

    `status` and `down` use this so that they find the ports `up` used even when the
    OPENSORA_*_PORT variables are no longer set in the calling shell.
    """
    fresh = settings_from_env(environ)
    saved = _saved_settings_file(fresh.state_dir)
    if not saved.exists():
        return fresh
    data = json.loads(saved.read_text())
    data["state_dir"] = fresh.state_dir
    return Settings(**data)


def _save_settings(settings: Settings) -> None:
    data = asdict(settings)
    data["state_dir"] = str(settings.state_dir)
    _saved_settings_file(settings.state_dir).write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------- client environment


def client_env(settings: Settings) -> dict[str, str]:
    """Variables a client (ray.init, ray job submit, MLflow, Prefect) needs to reach our services."""
    env = {
        "RAY_ADDRESS": settings.ray_address,
        "RAY_API_SERVER_ADDRESS": settings.ray_dashboard_url,
        # Connecting to an explicit address never turns token auth on by itself in Ray.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(settings.ray_token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        "PREFECT_API_URL": settings.prefect_api_url,
    }
    if settings.loopback_only:
        # On Linux Ray rewrites 127.0.0.1 to the host's outward IP (and binds its gRPC servers
        # to every interface); this switch keeps the node address and listeners on loopback.
        # Every process of the cluster and every client must agree on it.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _write_env_file(settings: Settings) -> None:
    lines = [
        "# Written by infra/local/up: `source` it to reach the local Ray, MLflow and Prefect.",
        "# RAY_AUTH_TOKEN would take precedence over RAY_AUTH_TOKEN_PATH, so drop a stale one.",
        "unset RAY_AUTH_TOKEN",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in client_env(settings).items()]
    settings.env_file.write_text("\n".join(lines) + "\n")
    (settings.state_dir / "env.json").write_text(json.dumps(client_env(settings), indent=2) + "\n")


def read_client_env(state_dir: Path) -> dict[str, str]:
    """The client variables written by the last `up` into <state>/env.json."""
    return json.loads((state_dir / "env.json").read_text())


def _ensure_ray_token(settings: Settings) -> None:
    # Reused across restarts so a browser's dashboard cookie stays valid.
    path = settings.ray_token_path
    if path.exists() and path.read_text().strip():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _child_env(settings: Settings, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_CLIENT_VARS}
    env.update(client_env(settings))
    env[MARKER_VAR] = f"{name}@{settings.state_dir}"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["PYTHONUNBUFFERED"] = "1"
    env["PREFECT_HOME"] = str(settings.state_dir / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if name == "mlflow":
        # MLflow's GenAI job runner (seven huey consumers, ~1 GB) has no use in this
        # pipeline; set the variable to true before `up` to keep it.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if name == "prefect-worker":
        # Flow runs are children of the worker: they import flows/, tasks/ and
        # opensora_core from this checkout with this venv's interpreter.
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{old}" if old else str(REPO_ROOT)
    return env


# ---------------------------------------------------------------- commands per service


def _command(settings: Settings, name: str) -> list[str]:
    bin_ = VENV_BIN
    if name == "ray":
        return [
            str(bin_ / "ray"), "start", "--head", "--block",
            "--node-ip-address", settings.client_host,
            "--port", str(settings.ray_port),
            "--dashboard-host", settings.host,
            "--dashboard-port", str(settings.ray_dashboard_port),
            "--ray-client-server-port", str(settings.ray_client_port),
            "--dashboard-agent-listen-port", str(settings.ray_agent_port),
            "--num-cpus", str(settings.ray_num_cpus),
            "--temp-dir", str(settings.ray_temp_dir),
            "--disable-usage-stats",
        ]  # fmt: skip
    if name == "mlflow":
        mlflow_dir = settings.state_dir / "mlflow"
        return [
            str(bin_ / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(mlflow_dir / "artifacts"),
            "--serve-artifacts",
            "--host", settings.host,
            "--port", str(settings.mlflow_port),
            "--workers", str(settings.mlflow_workers),
        ]  # fmt: skip
    if name == "prefect-server":
        return [
            str(bin_ / "prefect"), "server", "start",
            "--host", settings.host,
            "--port", str(settings.prefect_port),
            "--analytics-off",
        ]  # fmt: skip
    if name == "prefect-worker":
        return [
            str(bin_ / "prefect"), "worker", "start",
            "--pool", settings.pool,
            "--type", "process",
            "--name", _worker_name(settings),
            "--install-policy", "never",
        ]  # fmt: skip
    raise ValueError(f"unknown service {name!r}; expected one of {SERVICE_NAMES}")


def _worker_name(settings: Settings) -> str:
    return f"{settings.pool}-worker-{socket.gethostname()}"


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int


def _proc_info(pid: int) -> ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return ProcInfo(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), sid=int(fields[3]))


def _session_members(sid: int) -> list[int]:
    """Every live process in session `sid`: the leader we started and all its descendants.

    Ray's workers get their own process group but stay in the session, so the session,
    not the group, is what covers everything a service spawned.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _proc_info(int(entry.name))
            if info is not None and info.sid == sid:
                members.append(info.pid)
    return members


def _has_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return f"{MARKER_VAR}={marker}".encode() in environ.split(b"\0")


def _read_pid(settings: Settings, name: str) -> int | None:
    try:
        return int(settings.pid_file(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _our_processes(settings: Settings, name: str) -> list[int]:
    """Live processes of service `name` started by `up` from this state dir, leader first."""
    pid = _read_pid(settings, name)
    if pid is None:
        return []
    members = sorted(_session_members(pid), key=lambda p: p != pid)
    marker = f"{name}@{settings.state_dir}"
    # A recycled PID cannot be a session id while our processes still use it, but once
    # they are all gone it could be someone else's: trust the session only if a member
    # still carries our marker (some Ray processes overwrite their environ block).
    if not any(_has_marker(p, marker) for p in members):
        return []
    return members


def _leader_alive(settings: Settings, name: str) -> int | None:
    members = _our_processes(settings, name)
    pid = _read_pid(settings, name)
    return pid if members and members[0] == pid else None


def _spawn(settings: Settings, name: str) -> int:
    log = settings.log_file(name)
    cmd = _command(settings, name)
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        # start_new_session = setsid: the service owns a session we can stop as a whole,
        # has no controlling terminal (so no SIGHUP when the shell closes, as with nohup),
        # and is not stopped by a Ctrl-C aimed at `up`.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_child_env(settings, name),
            cwd=settings.state_dir,
            start_new_session=True,
        )
    settings.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        _reap_children()
        alive = [p for p in alive if _proc_info(p) is not None]
    return alive


def _reap_children() -> None:
    # Services started by this very process (tests, `up` then `down` in one run) become
    # zombies when they exit until we wait() for them.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_service(settings: Settings, name: str, grace_s: float = 30.0) -> bool:
    """Stop every process of one service; True if something was running."""
    pid = _read_pid(settings, name)
    members = _our_processes(settings, name)
    if pid is not None and members:
        if members[0] == pid:
            # The leader first: `ray start --block`, uvicorn and the worker shut their own
            # children down cleanly on SIGTERM.
            _signal_all([pid], signal.SIGTERM)
            _wait_gone([pid], grace_s)
        rest = _session_members(pid)
        _signal_all(rest, signal.SIGTERM)
        _wait_gone(rest, 10.0)
        _signal_all(_session_members(pid), signal.SIGKILL)
        left = _wait_gone(_session_members(pid), 10.0)
        if left:
            raise ServiceError(f"{name}: processes {left} survived SIGKILL")
    settings.pid_file(name).unlink(missing_ok=True)
    return bool(members)


# ---------------------------------------------------------------- health


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


def _http_get(url: str, headers: dict[str, str] | None = None, timeout_s: float = 3.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _http_post_json(url: str, body: dict, timeout_s: float = 5.0) -> tuple[int, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def check_health(settings: Settings, name: str) -> Health:
    """Ask one service's health endpoint; never raises."""
    try:
        if name == "ray":
            return _ray_health(settings)
        if name == "mlflow":
            code, body = _http_get(f"{settings.mlflow_url}/health")
            return Health(code == 200, f"GET /health -> {code} {body.strip()[:40]}")
        if name == "prefect-server":
            code, body = _http_get(f"{settings.prefect_api_url}/health")
            return Health(code == 200, f"GET /api/health -> {code} {body.strip()[:40]}")
        if name == "prefect-worker":
            return _worker_health(settings)
    except (OSError, ValueError) as error:
        return Health(False, f"{type(error).__name__}: {error}")
    raise ValueError(f"unknown service {name!r}; expected one of {SERVICE_NAMES}")


def _ray_health(settings: Settings) -> Health:
    code, body = _http_get(f"{settings.ray_dashboard_url}/api/gcs_healthz")
    if code != 200:
        return Health(False, f"GET /api/gcs_healthz -> {code} {body.strip()[:60]}")
    _, mode_body = _http_get(f"{settings.ray_dashboard_url}/api/authentication_mode")
    mode = json.loads(mode_body).get("authentication_mode", "unknown")
    if mode != "token":
        return Health(False, f"GCS healthy but dashboard auth mode is {mode!r}, expected 'token'")
    token = settings.ray_token_path.read_text().strip()
    code, _ = _http_get(f"{settings.ray_dashboard_url}/api/version", {"Authorization": f"Bearer {token}"})
    if code != 200:
        return Health(False, f"GET /api/version with our token -> {code}")
    return Health(True, "GCS healthy, token auth on")


def _worker_health(settings: Settings) -> Health:
    code, workers = _http_post_json(
        f"{settings.prefect_api_url}/work_pools/{settings.pool}/workers/filter", {}
    )
    if code != 200:
        return Health(False, f"listing workers of pool {settings.pool!r} -> {code}")
    name = _worker_name(settings)
    for worker in workers:
        if worker.get("name") == name:
            status = worker.get("status", "?")
            return Health(status == "ONLINE", f"worker {name!r} {status} in pool {settings.pool!r}")
    return Health(False, f"worker {name!r} not registered in pool {settings.pool!r}")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def _wait_healthy(settings: Settings, name: str) -> None:
    deadline = time.monotonic() + settings.start_timeout_s
    health = Health(False, "not checked yet")
    while time.monotonic() < deadline:
        if _leader_alive(settings, name) is None:
            raise ServiceError(
                f"{name} exited during start-up; last lines of {settings.log_file(name)}:\n"
                f"{_log_tail(settings.log_file(name))}"
            )
        health = check_health(settings, name)
        if health.ok:
            return
        time.sleep(1.0)
    raise ServiceError(
        f"{name} not healthy after {settings.start_timeout_s:.0f}s (OPENSORA_START_TIMEOUT): "
        f"{health.detail}; last lines of {settings.log_file(name)}:\n{_log_tail(settings.log_file(name))}"
    )


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


_PORT_VARS = {
    "ray_port": "OPENSORA_RAY_PORT",
    "ray_dashboard_port": "OPENSORA_RAY_DASHBOARD_PORT",
    "ray_client_port": "OPENSORA_RAY_CLIENT_PORT",
    "ray_agent_port": "OPENSORA_RAY_AGENT_PORT",
    "mlflow_port": "OPENSORA_MLFLOW_PORT",
    "prefect_port": "OPENSORA_PREFECT_PORT",
}
_PORTS_OF = {
    "ray": ("ray_port", "ray_dashboard_port", "ray_client_port", "ray_agent_port"),
    "mlflow": ("mlflow_port",),
    "prefect-server": ("prefect_port",),
    "prefect-worker": (),
}


def _check_ports_free(settings: Settings, name: str) -> None:
    for field in _PORTS_OF[name]:
        port = getattr(settings, field)
        if _port_in_use(settings.client_host, port):
            raise ServiceError(
                f"{name}: port {port} on {settings.client_host} is already in use by another "
                f"process; stop it or choose another port with {_PORT_VARS[field]}"
            )


# ---------------------------------------------------------------- work pool


def _ensure_work_pool(settings: Settings) -> None:
    # One request, not a health poll: a server that just became healthy can be slow to answer on a
    # loaded machine, so it gets the same patience as the CLI call below rather than the poll's 3 s.
    try:
        code, _ = _http_get(f"{settings.prefect_api_url}/work_pools/{settings.pool}", timeout_s=60.0)
    except OSError as error:
        raise ServiceError(f"prefect-server: GET work pool {settings.pool!r} failed: {error}") from error
    if code == 200:
        return
    if code != 404:
        raise ServiceError(f"prefect-server: GET work pool {settings.pool!r} -> {code}")
    cmd = [str(VENV_BIN / "prefect"), "work-pool", "create", settings.pool, "--type", "process"]
    env = _child_env(settings, "prefect-cli")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ServiceError(
            f"prefect: creating work pool {settings.pool!r} failed ({shlex.join(cmd)}):\n"
            f"{result.stdout}{result.stderr}"
        )


# ---------------------------------------------------------------- up / down / status


def up(settings: Settings, echo=print) -> None:
    """Start whatever is not already running and healthy, then print how to reach it all."""
    _check_running_settings_match(settings)
    for sub in ("pids", "logs", "mlflow/artifacts", "prefect"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    settings.state_dir.chmod(0o700)
    settings.ray_temp_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ray_token(settings)
    _save_settings(settings)
    _write_env_file(settings)

    servers = ("ray", "mlflow", "prefect-server")
    to_start = [name for name in servers if not _is_up(settings, name, echo)]
    for name in to_start:
        # Leftovers of a crashed leader would hold the ports: clear them first. All ports
        # are checked before anything starts, so a clash leaves nothing half-started.
        stop_service(settings, name)
        _check_ports_free(settings, name)

    started: list[str] = []
    try:
        # The three servers are independent: start them together, then wait for each.
        for name in to_start:
            _start(settings, name, echo)
            started.append(name)
        for name in servers:
            _wait_healthy(settings, name)
        _ensure_work_pool(settings)
        if not _is_up(settings, "prefect-worker", echo):
            stop_service(settings, "prefect-worker")
            _start(settings, "prefect-worker", echo)
            started.append("prefect-worker")
        _wait_healthy(settings, "prefect-worker")
    except (ServiceError, KeyboardInterrupt):
        # Stop what this call started rather than leave it half-up.
        for name in reversed(started):
            stop_service(settings, name)
        raise
    _print_summary(settings, echo)


def _check_running_settings_match(settings: Settings) -> None:
    saved_file = _saved_settings_file(settings.state_dir)
    if not saved_file.exists():
        return
    running = load_settings({**os.environ, "OPENSORA_STATE_DIR": str(settings.state_dir)})
    if _address_key(running) == _address_key(settings):
        return
    if any(_our_processes(running, name) for name in SERVICE_NAMES):
        raise ServiceError(
            f"services in {settings.state_dir} are running with other host/ports ({saved_file}); "
            "run infra/local/down first, or use the same OPENSORA_* variables"
        )


def _address_key(settings: Settings) -> tuple:
    return (settings.host, *settings.listening_ports(), settings.pool)


def _is_up(settings: Settings, name: str, echo) -> bool:
    pid = _leader_alive(settings, name)
    if pid is not None:
        echo(f"{name}: already running (pid {pid})")
    return pid is not None


def _start(settings: Settings, name: str, echo) -> None:
    pid = _spawn(settings, name)
    echo(f"{name}: started (pid {pid}), log {settings.log_file(name)}")


def _print_summary(settings: Settings, echo) -> None:
    echo("")
    echo(f"Prefect UI      {settings.prefect_url}   (work pool {settings.pool!r}, one process worker)")
    echo(f"MLflow UI       {settings.mlflow_url}")
    echo(f"Ray dashboard   {settings.ray_dashboard_url}   (GCS {settings.ray_address}, token auth on)")
    echo("")
    echo("The Ray dashboard asks for a token; print it with")
    echo(f"    RAY_AUTH_TOKEN_PATH={settings.ray_token_path} {VENV_BIN / 'ray'} get-auth-token")
    echo("and paste it into the dashboard's login prompt (it is then kept in a cookie).")
    echo("Clients (ray.init, ray job submit, MLflow, Prefect CLI) get everything they need from")
    echo(f"    source {settings.env_file}")
    echo(f"Stop everything with {REPO_ROOT / 'infra/local/down'}")


def down(settings: Settings, echo=print) -> None:
    """Stop exactly the processes `up` started from this state dir, newest service first."""
    for name in reversed(SERVICE_NAMES):
        start = time.monotonic()
        if stop_service(settings, name):
            echo(f"{name}: stopped ({time.monotonic() - start:.1f}s)")
        else:
            echo(f"{name}: not running")


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    url: str
    health: Health


def status(settings: Settings) -> list[ServiceStatus]:
    """One entry per service: whether our process is alive and what its health check says."""
    rows = []
    for name in SERVICE_NAMES:
        pid = _leader_alive(settings, name)
        health = check_health(settings, name) if pid is not None else Health(False, "-")
        rows.append(ServiceStatus(name, pid is not None, pid, settings.url_of(name), health))
    return rows


def _format_status(rows: list[ServiceStatus]) -> str:
    lines = []
    for row in rows:
        state = "running" if row.running else "stopped"
        pid = str(row.pid) if row.pid is not None else "-"
        health = ("ok: " if row.health.ok else "FAIL: ") + row.health.detail if row.running else "-"
        lines.append(f"{row.name:<15} {state:<8} pid={pid:<8} {row.url:<55} health={health}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(settings_from_env())
        elif args.command == "down":
            down(load_settings())
        elif args.command == "status":
            settings = load_settings()
            rows = status(settings)
            print(_format_status(rows))
            print(f"state {settings.state_dir}; clients: source {settings.env_file}")
            return 0 if all(r.running and r.health.ok for r in rows) else 1
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
