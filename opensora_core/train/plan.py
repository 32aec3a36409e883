"""`opensora plan`: what a training run will do with a bucket snapshot, and what it will cost, before it starts.

Per bucket the samples, batch size, full batches per data-parallel rank and latent tokens per sample; steps
per epoch (the pre-flight check's arithmetic, `train.preflight`); and time per epoch and GPU-hours for
`epochs` / `max_steps` from measured step times. Step times come from `search-bs` results when the config
has them (the results file beside it, or `--step-times`), else from a short measurement of the real train
step at each bucket's shape and batch size on this machine (`train.step_trial`).

The estimate: a rank's epoch is its share of every bucket's batches, each taking that bucket's step time;
with `grad_accum` a step takes that many micro-batches. It leaves out data loading, the wait of the ranks
for the slowest one in each step, logging and checkpoints, so it is a lower bound when those matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core.data.manifest import BucketStats
from opensora_core.train.preflight import StepPlan, training_plan
from opensora_core.train.step_trial import Trial

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketCost:
    """One bucket of the plan."""

    bucket: BucketStats
    batches_per_rank: float  # this bucket's full batches / data-parallel ranks
    tokens: int  # latent tokens per sample
    step_s: float  # one micro-batch at this bucket's batch size
    source: str  # "search-bs" or "measured"


@dataclass(frozen=True)
class TrainingPlan:
    """A run's plan on one snapshot; times are seconds on `device`."""

    snapshot: str
    steps: StepPlan
    buckets: tuple[BucketCost, ...]
    num_workers: int
    epochs: int
    max_steps: int | None
    device: str

    @property
    def epoch_s(self) -> float:
        """One epoch's step time on a rank: its micro-batches of each bucket, in proportion to the buckets'
        batches (the remainder that does not fill a round of ranks or a step is dropped)."""
        total = self.steps.full_batches
        if not total:
            return 0.0
        used = self.steps.steps_per_epoch * self.steps.grad_accum * self.steps.dp_size / total
        return sum(c.batches_per_rank * c.step_s for c in self.buckets) * used

    @property
    def step_s(self) -> float:
        return self.epoch_s / self.steps.steps_per_epoch if self.steps.steps_per_epoch else 0.0

    @property
    def total_steps(self) -> int:
        steps = self.epochs * self.steps.steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    @property
    def total_s(self) -> float:
        return self.total_steps * self.step_s

    @property
    def gpu_hours(self) -> float:
        """Device-hours over all training workers (one accelerator each)."""
        return self.total_s * self.num_workers / 3600

    def metrics(self) -> dict[str, float]:
        """The plan's numbers as MLflow metrics."""
        out = {
            "plan/steps_per_epoch": float(self.steps.steps_per_epoch),
            "plan/epoch_s": self.epoch_s,
            "plan/step_s": self.step_s,
            "plan/total_steps": float(self.total_steps),
            "plan/total_s": self.total_s,
            "plan/gpu_hours": self.gpu_hours,
            "plan/starved_buckets": float(len(self.steps.never_full())),
        }
        for c in self.buckets:
            out[f"plan/batches_per_rank/{c.bucket.key.id}"] = c.batches_per_rank
            out[f"plan/step_s/{c.bucket.key.id}"] = c.step_s
        return out


def make_plan(
    cfg: Any,
    *,
    snapshot_dir: str | Path,
    num_workers: int | None = None,
    step_times: str | Path | None = None,
    warmup_steps: int = 1,
    active_steps: int = 3,
    on_workers: bool = False,
    ray_address: str | None = None,
) -> TrainingPlan:
    """The plan of validated training config `cfg` on `snapshot_dir` with `num_workers` workers (default:
    num_train_workers). `step_times`: a search-bs results file (default: the one beside the config, if any).

    Step times not in the results file are measured in this process, or with `on_workers`, a `ray_address`
    or sp_size > 1 on a Ray Train worker group shaped as training's (`train.trial_workers`)."""
    from opensora_core.data.snapshot import open_snapshot
    from opensora_core.train.search_bs import load_trials, pooled_step_times, results_path_of

    s = cfg.training
    num_workers = num_workers or s.num_train_workers
    snapshot = open_snapshot(snapshot_dir)
    steps = training_plan(snapshot, s, num_workers=num_workers)  # without the validation split
    searched = {}
    path = Path(step_times) if step_times else results_path_of(cfg.path)
    if path.is_file():
        searched = pooled_step_times(load_trials(path))
        log.info("step times from %s (%d trials)", path, len(searched))
    todo = [b for b in steps.buckets if _key(b) not in searched]
    timed = [b for b in todo if b.count >= b.batch_size]
    starved = [b for b in todo if b.count < b.batch_size]  # never trained on: nothing to time
    device = "from search-bs results"
    measured: dict[tuple[int, int, int, int], Trial] = {}
    tokens: dict[tuple[int, int, int, int], int] = {}
    if todo:
        workers = on_workers or ray_address is not None or s.sp_size > 1
        run = _measure_on_workers if workers else _measure_here
        trials, counts, device = run(
            cfg, str(snapshot.path), timed, starved, warmup_steps, active_steps, num_workers, ray_address
        )
        measured = {_key(b): t for b, t in zip(timed, trials, strict=True)}
        tokens = {_key(b): n for b, n in zip(starved, counts, strict=True)}
    costs = []
    for b in steps.buckets:
        key = _key(b)
        if key in searched:
            trial = searched[key]
            costs.append(BucketCost(b, _batches(b, steps), trial.tokens, trial.step_s, "search-bs"))
        elif key in tokens:
            costs.append(BucketCost(b, 0.0, tokens[key], 0.0, "starved, not timed"))
        else:
            trial = measured[key]
            if not trial.fits:
                log.warning(
                    "bucket %s at batch size %d does not fit: %s", b.key.id, b.batch_size, trial.error
                )
            costs.append(BucketCost(b, _batches(b, steps), trial.tokens, trial.step_s or 0.0, "measured"))
    return TrainingPlan(str(snapshot.path), steps, tuple(costs), num_workers, s.epochs, s.max_steps, device)


def _key(b: BucketStats) -> tuple[int, int, int, int]:
    return (b.num_frames, b.height, b.width, b.batch_size)


def _measure_here(
    cfg: Any, snapshot: str, timed: list[BucketStats], starved: list[BucketStats], warmup_steps: int,
    active_steps: int, _num_workers: int, _ray_address: str | None,
) -> tuple[list[Trial], list[int], str]:  # fmt: skip
    """(a trial of each timed bucket, tokens per sample of each starved one, the device) in this process."""
    from opensora_core.train.job import train_job
    from opensora_core.train.step_trial import StepTrials

    trials = StepTrials(
        train_job(cfg, snapshot_dir=snapshot, output_dir="."),
        warmup_steps=warmup_steps,
        active_steps=active_steps,
    )
    try:
        measured = [trials.measure(*_key(b)) for b in timed]
        counts = [trials.tokens(b.num_frames, b.height, b.width) for b in starved]
        return measured, counts, trials.device_name
    finally:
        trials.close()


def _measure_on_workers(
    cfg: Any, snapshot: str, timed: list[BucketStats], starved: list[BucketStats], warmup_steps: int,
    active_steps: int, num_workers: int, ray_address: str | None,
) -> tuple[list[Trial], list[int], str]:  # fmt: skip
    """The same on a Ray Train worker group of `num_workers` (Ray's run state under the run's outputs)."""
    from opensora_core.train.job import train_job
    from opensora_core.train.trial_workers import TrialSettings, measure_on_workers

    job = train_job(cfg, snapshot_dir=snapshot, output_dir=str(Path(cfg.training.outputs).resolve()))
    return measure_on_workers(
        job, [_key(b) for b in timed], [(b.num_frames, b.height, b.width) for b in starved],
        TrialSettings(None, warmup_steps, active_steps), num_workers=num_workers, ray_address=ray_address,
        storage_dir=Path(cfg.training.outputs),
    )  # fmt: skip


def _batches(b: BucketStats, steps: StepPlan) -> float:
    return (b.count // b.batch_size) / steps.dp_size


def plan_table(plan: TrainingPlan) -> Any:
    """The plan as a rich Table."""
    from rich.table import Table

    steps = plan.steps
    table = Table(
        title=f"training plan: {plan.snapshot}",
        caption=(
            f"{plan.num_workers} workers ({steps.dp_size} data-parallel), grad_accum {steps.grad_accum}: "
            f"{steps.steps_per_epoch} steps per epoch, {_duration(plan.epoch_s)} per epoch; "
            f"{plan.total_steps} steps ({'max_steps' if plan.max_steps is not None else 'epochs'} "
            f"{plan.max_steps if plan.max_steps is not None else plan.epochs}) in {_duration(plan.total_s)}, "
            f"{plan.gpu_hours:.3g} GPU-hours; step times on {plan.device}"
        ),
    )
    for name in (
        "bucket",
        "size",
        "samples",
        "batch size",
        "batches/rank",
        "tokens/sample",
        "step s",
        "from",
    ):
        table.add_column(name, justify="left" if name in ("bucket", "size", "from") else "right")
    for c in plan.buckets:
        b = c.bucket
        starved = b.count < b.batch_size
        table.add_row(
            b.key.id + (" (starved)" if starved else ""), f"{b.num_frames}x{b.height}x{b.width}", str(b.count),
            str(b.batch_size), f"{c.batches_per_rank:.2f}", str(c.tokens), f"{c.step_s:.3f}", c.source,
            style="red" if starved else None,
        )  # fmt: skip
    return table


def plan_rows(plan: TrainingPlan) -> list[dict[str, str | int | float]]:
    """The plan's table (the columns of `plan_table`) as one dict per bucket, for table views such as a
    Prefect table artifact."""
    return [
        {"bucket": c.bucket.key.id, "size": f"{c.bucket.num_frames}x{c.bucket.height}x{c.bucket.width}",
         "samples": c.bucket.count, "batch size": c.bucket.batch_size,
         "batches/rank": round(c.batches_per_rank, 2), "tokens/sample": c.tokens,
         "step s": round(c.step_s, 3), "from": c.source}
        for c in plan.buckets
    ]  # fmt: skip


def format_plan(plan: TrainingPlan, width: int = 140) -> str:
    """The plan table as plain text (for logs and the MLflow artifact)."""
    from opensora_core.train.search_bs import render_text

    return render_text(plan_table(plan), width)


def log_plan(run_id: str, plan: TrainingPlan) -> None:
    """The plan's metrics and its table (plan/plan.txt) to an MLflow run."""
    import tempfile

    from opensora_core import tracking

    tracking.log_metrics(run_id, plan.metrics(), step=0)
    tracking.set_tags(run_id, {"plan.starved": ",".join(b.key.id for b in plan.steps.never_full()) or "none"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.txt"
        path.write_text(format_plan(plan))
        tracking.log_artifact(run_id, path, artifact_path="plan")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
