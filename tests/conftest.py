"""Shared test helpers."""

from __future__ import annotations

import random
import socket

import pytest

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
