"""Shared test helpers, and the session's expensive parts: one local Ray (`shared_ray`) and one
infra/local service stack (`service_stack`) for the e2e modules."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Files the tests compare against (reference outputs, released state-dict layouts); tests/data/README.md
# says where each came from.
DATA = Path(__file__).resolve().parent / "data"

# Ports for test service stacks: below the kernel's ephemeral range (32768+), where Ray's raylet, GCS
# and workers take ports as they start, and above Ray's worker ports (10002-19999). A port picked
# from the ephemeral range can be taken by one of Ray's processes before the service that was meant
# to bind it starts.
SERVICE_PORTS = range(20000, 32000)


def free_service_ports(count: int) -> list[int]:
    """`count` distinct ports in SERVICE_PORTS that nothing listens on now."""
    found: list[int] = []
    for port in random.sample(SERVICE_PORTS, len(SERVICE_PORTS)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"fewer than {count} free ports in {SERVICE_PORTS}")


@pytest.fixture(scope="session")
def service_ports():
    """The port picker, for module-scoped service stacks."""
    return free_service_ports


# ---------------------------------------------------------------- one local Ray for the session

# Variables a Ray's processes would inherit from this process at start-up: the shared Ray starts without
# them, and each test that trains sets its own (the training launcher forwards MLflow's and
# OPENSORA_CACHE to the workers itself, opensora_core.parallel.launch.FORWARDED_ENV).
_NOT_INHERITED = ("RAY_ADDRESS", "MLFLOW_", "PREFECT_API_URL", "OPENSORA_CACHE")


class SharedRay:
    """One local Ray (2 CPUs, no dashboard) for every test that needs a Ray but no particular one.

    Each `ray.init` costs 5-10 s on 2 cores; the suite had eleven. Tests that need a Ray of their own are
    marked `own_ray` (they say why): `stop()` runs before them and they are collected last.

    A module that trains (Ray Train) gets a Ray that no other module trained on: on a Ray that had run
    another module's trainings, a new run's TrainController was seen to wait for its workers for ever.
    """

    def __init__(self) -> None:
        self.starts = 0
        self.trained = False  # whether a module has trained on the running one

    def ensure(self, *, trains: bool = False) -> None:
        """Start the shared Ray unless this process is connected to one (or, for a module that `trains`,
        unless the running one has served another module's training)."""
        import ray

        if trains and self.trained:
            self.stop()
        self.trained = self.trained or trains
        if ray.is_initialized():
            return
        with pytest.MonkeyPatch.context() as mp:
            for name in list(os.environ):
                if name.startswith(_NOT_INHERITED):
                    mp.delenv(name)
            # "local": a new Ray for this process, never a cluster found under /tmp/ray; workers at normal
            # priority, as a command's local Ray runs them (connect_ray)
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                _system_config={"worker_niceness": 0},
            )
        self.starts += 1

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.trained = False


_SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def shared_ray():
    """The session's local Ray, started on first use; module fixtures call `.ensure()` again."""
    _SHARED_RAY.ensure()
    yield _SHARED_RAY
    _SHARED_RAY.stop()


@pytest.fixture(autouse=True)
def _own_ray_first_stops_the_shared_one(request):
    if request.node.get_closest_marker("own_ray") is not None:
        _SHARED_RAY.stop()


def pytest_collection_modifyitems(items):
    """The modules on the shared service stack run together (so it is up for them alone), then the tests
    with a Ray of their own (so the shared Ray starts once). A stable sort by module: the order within a
    module, and so its module-scoped fixtures, stay as collected; no test depends on this order."""
    for item in items:
        # a Ray or the service stack takes more than a few seconds to start: not for `make test-fast`
        if {"shared_ray", "service_stack"} & set(item.fixturenames) or item.get_closest_marker("own_ray"):
            item.add_marker(pytest.mark.slow)
    _STACK_MODULES.update(item.module for item in items if "service_stack" in item.fixturenames)
    items.sort(
        key=lambda item: (item.get_closest_marker("own_ray") is not None, item.module in _STACK_MODULES)
    )


def pytest_runtest_teardown(item, nextitem):
    """Take the shared service stack down once the next test is in no module that uses it (a later one
    would start it again), rather than leave its four services idling on the CPUs until the session ends."""
    if _SERVICE_STACK is not None and (nextitem is None or nextitem.module not in _STACK_MODULES):
        _SERVICE_STACK.down()


def load_local_services():
    """infra/local/services.py (a script, not a package module), loaded once per test session."""
    name = "local_services"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "infra" / "local" / "services.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------- one service stack for the e2e modules

LOCAL = REPO / "infra" / "local"


class ServiceStack:
    """One `infra/local/up` stack (Ray head, MLflow, Prefect server and worker) on spare ports with its own
    state dir, shared by the e2e modules: `up` takes about a minute on 2 cores, `down` as long again.

    A test may stop or restart one of its services (the fault tests do, and restore it); `ensure_up()`
    (run by each module's fixture) brings back whatever is not running, as `up` does twice in a row.
    """

    def __init__(self, ports: list[int]) -> None:
        # A short path under /tmp keeps Ray's Unix socket paths inside the AF_UNIX limit.
        self.state_dir = Path(tempfile.mkdtemp(prefix="ostack-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSORA_")}
        env.update(
            OPENSORA_STATE_DIR=str(self.state_dir),
            OPENSORA_PREFECT_PORT=str(ports[0]),
            OPENSORA_MLFLOW_PORT=str(ports[1]),
            OPENSORA_RAY_PORT=str(ports[2]),
            OPENSORA_RAY_DASHBOARD_PORT=str(ports[3]),
            OPENSORA_RAY_CLIENT_PORT=str(ports[4]),
            OPENSORA_RAY_AGENT_PORT=str(ports[5]),
            # The worker polls for flow runs every 2 s, not 10: each run on it starts up to 8 s sooner.
            PREFECT_WORKER_QUERY_SECONDS="2",
        )
        self.env = env
        self.settings = load_local_services().settings_from_env(env)
        self.up_output = ""

    def is_up(self) -> bool:
        services = load_local_services()
        return all(services._leader_alive(self.settings, name) for name in services.SERVICE_NAMES)

    def ensure_up(self) -> None:
        if self.is_up():
            return
        up = subprocess.run([str(LOCAL / "up")], env=self.env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"infra/local/up failed:\n{up.stdout}\n{up.stderr}"
        self.up_output = up.stdout

    def down(self) -> None:
        if any(self.settings.pid_file(name).exists() for name in load_local_services().SERVICE_NAMES):
            subprocess.run([str(LOCAL / "down")], env=self.env, capture_output=True, text=True, timeout=300)


_SERVICE_STACK: ServiceStack | None = None
_STACK_MODULES: set = set()  # modules with a test on the shared stack (pytest_collection_modifyitems)


@pytest.fixture(scope="session")
def service_stack():
    """The e2e modules' shared stack, up; its state dir is removed at the end of the session."""
    global _SERVICE_STACK
    _SERVICE_STACK = ServiceStack(free_service_ports(6))
    try:
        _SERVICE_STACK.ensure_up()
        yield _SERVICE_STACK
    finally:
        _SERVICE_STACK.down()
        shutil.rmtree(_SERVICE_STACK.state_dir, ignore_errors=True)
        _SERVICE_STACK = None


GREY_LEVEL = 7  # frame i of a grey clip has level i * GREY_LEVEL, so the frames read can be identified


def grey_clip(
    path: Path,
    num_frames: int = 30,
    *,
    height: int = 48,
    width: int = 64,
    fps: int = 24,
    faststart: bool = False,
) -> Path:
    """An mpeg4 clip whose frame i is uniformly grey at level i * GREY_LEVEL; `faststart` puts the index first."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(num_frames):
            frame = np.full((height, width, 3), i * GREY_LEVEL, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------- the configs under configs/

# Open-Sora's batch-size search and eval-loss configs hold no training bucket_config (their entries are
# search ranges or `(None, batch_size)`): each loads through its own command's loader.
SEARCH_CONFIGS = {
    Path("configs/opensora-v1-2/misc/bs.py"),
    Path("configs/opensora-v1-1/train/benchmark.py"),
    Path("configs/legacy/v1.1.0/opensora-v1-1/train/benchmark.py"),
}
EVAL_LOSS_CONFIGS = {Path("configs/opensora-v1-2/misc/eval_loss.py")}
# Open-Sora's feature-extraction config names no scheduler: it loads as `opensora precompute` loads it.
PRECOMPUTE_CONFIGS = {Path("configs/opensora-v1-2/misc/extract.py")}


def load_repository_config(config: Path):
    """A config under configs/ (`config` relative to the repository), validated as its command loads it."""
    if config in SEARCH_CONFIGS:
        from opensora_core.train.search_bs import search_config

        return search_config(REPO / config)[0]
    if config in EVAL_LOSS_CONFIGS:
        from opensora_core.sample.eval_loss import eval_config

        cfg, buckets = eval_config(REPO / config)
        assert buckets
        return cfg
    from opensora_core.config import load_config

    return load_config(REPO / config, needs_scheduler=config not in PRECOMPUTE_CONFIGS)
