"""`search-bs` and `plan` trials on a Ray Train worker group shaped as training's.

Training runs on `num_train_workers` Ray Train workers (one CPU, or one GPU, each: `parallel.launch`), with
ZeRO over all of them and `sp_size` consecutive ranks per sequence-parallel group. A step time measured in
the driver process on one rank has none of that: no gradient all-reduce, no all-to-all around attention,
every token of a sample on one device, and the driver's machine rather than a training node. So with a
Ray address, a number of workers, or `sp_size` > 1, the trials run on such a worker group instead
(`step_trial.StepTrials` inside a process group; every rank takes every trial and all agree on its
numbers).

The search runs on every rank alike (the same agreed trials give the same decisions); rank 0 appends each
trial to the results file (so the output folder must be one every worker reaches, as training's outputs
are), and the driver then replays the search from that file. `plan`'s trials come back in rank 0's report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core.train.job import TrainJob
from opensora_core.train.step_trial import Trial

log = logging.getLogger(__name__)

TRIALS_NAME = "trials.json"  # what rank 0 reports to the driver (plan)


@dataclass(frozen=True)
class TrialSettings:
    """How each trial is measured."""

    memory_budget_gib: float | None
    warmup_steps: int
    active_steps: int


@dataclass(frozen=True)
class SearchJob:
    """What every rank of a search is given: plain data, pickled to each worker."""

    train_job: TrainJob
    buckets: tuple[Any, ...]  # search_bs.SearchBucket
    base: Any  # the base SearchBucket, or None with base_step_time
    base_step_time: float | None
    results_file: str  # absolute
    settings: Mapping[str, Any]  # the results file's settings (its fingerprint)
    done: tuple[Trial, ...]  # trials of an earlier, interrupted search
    trial_settings: TrialSettings


@dataclass(frozen=True)
class MeasureJob:
    """`plan`'s trials: (T, H, W, batch size) each, and the shapes (T, H, W) whose tokens it counts."""

    train_job: TrainJob
    shapes: tuple[tuple[int, int, int, int], ...]
    token_shapes: tuple[tuple[int, int, int], ...]
    trial_settings: TrialSettings


def worker_device(num_workers: int, ray_address: str | None) -> tuple[str, bool]:
    """(what the trials run on, in words; whether on GPUs), after joining the Ray cluster."""
    from opensora_core.parallel.launch import cluster_has_gpus, connect_ray

    connect_ray(ray_address)
    use_gpu = cluster_has_gpus(num_workers)
    return f"{num_workers} Ray Train worker(s), one {'GPU' if use_gpu else 'CPU'} each", use_gpu


def _trials(job: TrainJob, settings: TrialSettings) -> Any:
    from opensora_core.train.step_trial import StepTrials

    return StepTrials(
        job, memory_budget_gib=settings.memory_budget_gib, warmup_steps=settings.warmup_steps,
        active_steps=settings.active_steps,
    )  # fmt: skip


def search_per_worker(job: SearchJob) -> None:
    """Every rank runs the whole search, taking part in each trial; rank 0 records the trials."""
    import torch.distributed as dist

    from opensora_core.console import log_to_stderr
    from opensora_core.train.search_bs import TrialLog, fit_bucket, run_search

    log_to_stderr()
    rank = dist.get_rank()
    done = {_key(t): t for t in job.done}
    results = TrialLog(Path(job.results_file), job.settings) if rank == 0 else None
    trials = _trials(job.train_job, job.trial_settings)

    def measure(bucket: Any, batch_size: int, repeat: int) -> Trial:
        key = (*bucket.shape, batch_size, repeat)
        if key not in done:
            if rank == 0:
                log.info(
                    "search-bs: measuring %s batch size %d%s", bucket.name, batch_size, " (again)" * repeat
                )
            done[key] = trials.measure(*bucket.shape, batch_size, repeat)
            if results is not None:
                results.add(done[key])
        return done[key]

    try:
        run_search(job.buckets, job.base, job.base_step_time, lambda b, ref: fit_bucket(b, measure, ref))
    finally:
        trials.close()


def measure_per_worker(job: MeasureJob) -> None:
    """Every rank takes each of the plan's trials; rank 0 reports them."""
    import ray.train
    import torch.distributed as dist

    from opensora_core.console import log_to_stderr

    log_to_stderr()
    trials = _trials(job.train_job, job.trial_settings)
    try:
        measured = [dataclasses.asdict(trials.measure(*shape)) for shape in job.shapes]
        tokens = [trials.tokens(*shape) for shape in job.token_shapes]
    finally:
        trials.close()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if dist.get_rank() == 0:
            (Path(tmp) / TRIALS_NAME).write_text(json.dumps({"trials": measured, "tokens": tokens}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"trials": len(measured)}, checkpoint=checkpoint)  # every rank: a barrier


def run_on_workers(
    fn: Callable[[Any], None], job: Any, *, num_workers: int, use_gpu: bool, ray_address: str | None,
    storage_dir: Path, run_name: str,
) -> Any:  # fmt: skip
    """`fn(job)` on the worker group; the `ray.train.Result`. Ray's run state goes to a temporary folder in
    `storage_dir`, removed after (absolute: Ray Train reads a relative storage path as a URI)."""
    from opensora_core.parallel.launch import run_training

    storage_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=storage_dir.resolve(), prefix=".ray-") as tmp:
        result = run_training(
            fn, job, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address, storage_path=tmp,
            run_name=run_name,
        )  # fmt: skip
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            return None
        with result.checkpoint.as_directory() as reported:
            return json.loads((Path(reported) / TRIALS_NAME).read_text())


def measure_on_workers(
    train_job: TrainJob, shapes: Sequence[tuple[int, int, int, int]],
    token_shapes: Sequence[tuple[int, int, int]], settings: TrialSettings, *, num_workers: int,
    ray_address: str | None, storage_dir: Path,
) -> tuple[list[Trial], list[int], str]:  # fmt: skip
    """`plan`'s trials on the worker group: (the trials, the tokens per sample of `token_shapes`, what they
    ran on)."""
    from opensora_core.parallel.layout import check_sp_size

    check_sp_size(train_job.settings.sp_size, num_workers)
    device, use_gpu = worker_device(num_workers, ray_address)
    job = MeasureJob(train_job, tuple(shapes), tuple(token_shapes), settings)
    reported = run_on_workers(
        measure_per_worker, job, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address,
        storage_dir=storage_dir, run_name="plan_trials",
    )  # fmt: skip
    return [Trial(**t) for t in reported["trials"]], reported["tokens"], device


def _key(t: Trial) -> tuple[int, ...]:
    return (t.num_frames, t.height, t.width, t.batch_size, t.repeat)
