"""Choosing the training path from what the Ray cluster offers."""

from __future__ import annotations

import pytest

from opensora_core.errors import ConfigError

# own_ray: a Ray with two (declared) GPUs, and one that connect_ray itself starts.
pytestmark = pytest.mark.own_ray


@pytest.fixture
def ray_with_two_gpus():
    import ray

    ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_cluster_with_a_gpu_per_worker_trains_on_gpus(ray_with_two_gpus):
    from opensora_core.parallel.launch import cluster_has_gpus

    assert cluster_has_gpus(2) is True
    assert cluster_has_gpus(1) is True


def test_a_cluster_with_too_few_gpus_is_an_error_not_a_silent_cpu_run(ray_with_two_gpus):
    from opensora_core.parallel.launch import cluster_has_gpus

    with pytest.raises(ConfigError, match=r"^num_train_workers=4: the Ray cluster offers 2 GPU\(s\).*<= 2$"):
        cluster_has_gpus(4)


def test_a_ray_started_for_a_command_runs_its_workers_at_normal_priority(monkeypatch):
    """Ray's default worker niceness (15) lets its own daemons preempt the training workers."""
    import os

    import ray

    from opensora_core.parallel.launch import connect_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect_ray(None)
    try:
        niceness = ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert niceness == 0
