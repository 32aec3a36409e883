"""Shared test helpers."""

from __future__ import annotations

import importlib.util
import random
import socket
import sys
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


def load_local_services():
    """infra/local/services.py (a script, not a package module), loaded once per test session."""
    name = "local_services"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "infra" / "local" / "services.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


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
