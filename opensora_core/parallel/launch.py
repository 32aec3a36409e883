"""Start a training function on Ray Train workers (gloo on CPU, NCCL on GPU) and wait for it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Environment the workers need from the caller: where MLflow lives and its credentials. They travel
# inside the loop's (pickled) arguments, not as `runtime_env` env_vars, which Ray shows in its state API,
# its dashboard and runtime_env_agent.log.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "OPENSORA_CACHE",  # where checkpoints fetched from shared storage go (opensora_core.storage)
)
_FORWARDED_ENV_KEY = "_forwarded_env"
_JOB_KEY = "job"  # Ray Train hands its workers a dict: the job travels under this key


def connect_ray(ray_address: str | None = None) -> None:
    """Join the Ray cluster at `ray_address` (else RAY_ADDRESS), or start a local one.

    Ray's logs and what its workers print reach this process and go where the CLI routes them
    (opensora_core.console: the command's log file, and its console only with `--verbose`).
    """
    import ray

    from opensora_core import console

    if ray.is_initialized():
        return
    console.open_log()  # from here on there are internals to keep
    console.route_ray_loggers()
    # "local" rather than None: None would also join any cluster found under /tmp/ray
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # A Ray started for this command exists for its workers: they run at normal priority, not at
        # Ray's default niceness 15, under which Ray's own daemons (dashboard agent, raylet, GCS)
        # preempt them; that cost a training worker ~5% of its steps on a 2-core machine.
        ray.init(address=address, log_to_driver=True, _system_config={"worker_niceness": 0})
    else:
        ray.init(address=address, log_to_driver=True)
    console.route_ray_worker_output()
    log.info("Ray: %s", "started a local instance" if address == "local" else f"connected to {address}")


def cluster_has_gpus(num_workers: int) -> bool:
    """Whether the connected Ray cluster offers a GPU for each of `num_workers` workers.

    A cluster with some GPUs but too few is an error rather than a silent CPU run: usually its GPU
    nodes have not joined yet, or num_train_workers counts more GPUs than the cluster has.
    """
    import ray

    from opensora_core.errors import ConfigError

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if 0 < gpus < num_workers:
        raise ConfigError(
            f"num_train_workers={num_workers}: the Ray cluster offers {gpus} GPU(s), one per worker is needed; "
            f"wait until its GPU nodes have joined (`ray status`) or set num_train_workers <= {gpus}"
        )
    log.info(
        "training on %s",
        f"{num_workers} GPU worker(s), NCCL" if gpus else "CPU workers, gloo (no GPU in the cluster)",
    )
    return gpus >= num_workers


def run_training(
    train_loop: Callable[[Any], None],
    job: Any,
    *,
    num_workers: int,
    use_gpu: bool,
    ray_address: str | None,
    storage_path: str,
    run_name: str,
    max_failures: int = 0,
) -> Any:
    """Run `train_loop(job)` on `num_workers` Ray Train workers; returns the `ray.train.Result`.

    `job` is any picklable value (the training loop's is an `opensora_core.train.job.TrainJob`).
    After a worker failure Ray restarts the workers (up to `max_failures` times) and the loop
    resumes from the latest reported checkpoint. An error a user can act on (`OpenSoraError`: a bad
    config key, a missing checkpoint) raised in a worker is re-raised here as itself rather than
    wrapped by Ray.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray(ray_address)
    env = {}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # otherwise DeepSpeed probes for CUDA and may pick it on a mixed node
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    trainer = TorchTrainer(
        _with_forwarded_env(train_loop),
        train_loop_config={_JOB_KEY: job, _FORWARDED_ENV_KEY: forwarded},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        return trainer.fit()
    except Exception as err:
        user_error = worker_user_error(err)
        if user_error is not None:
            raise user_error from None
        raise


def _with_forwarded_env(train_loop: Callable[[Any], None]) -> Callable[[dict[str, Any]], None]:
    """`train_loop(job)` run after the caller's forwarded variables are set in the worker's environment."""

    def run(config: dict[str, Any]) -> None:
        os.environ.update(config[_FORWARDED_ENV_KEY])
        train_loop(config[_JOB_KEY])

    return run


def worker_user_error(err: BaseException) -> BaseException | None:
    """The first `OpenSoraError` (lowest rank) behind a Ray Train failure, if there is one."""
    from opensora_core.errors import OpenSoraError

    failures = getattr(err, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        seen: set[int] = set()
        current: BaseException | None = failure
        while current is not None and id(current) not in seen:
            if isinstance(current, OpenSoraError):
                return current
            seen.add(id(current))
            current = getattr(current, "cause", None) or current.__cause__
    return None


def dashboard_url() -> str | None:
    """The Ray dashboard of the cluster this process is connected to, for a person to open:
    RAY_API_SERVER_ADDRESS when set (the address `ray job` uses, which infra/local exports), else the one
    Ray reports (`ray.init().address_info["webui_url"]`); None when not connected and nothing is set."""
    import ray

    url = os.environ.get("RAY_API_SERVER_ADDRESS")
    if not url and ray.is_initialized():
        url = ray.init(ignore_reinit_error=True).address_info.get("webui_url")
    if not url:
        return None
    return url if "://" in url else f"http://{url}"
