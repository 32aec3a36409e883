"""`opensora search-bs`: per-bucket batch sizes that fit the device and give every bucket about the same step time.

Open-Sora's semantics (scripts/misc/search_bs.py, v1.2): each `bucket_config` entry is a search range,
written either as v1.2's `(guess_bs, variance)` (batch sizes max(guess - variance, 1) .. guess + variance;
variance 0 is not searched and keeps guess) or as v1.1's benchmark.py form `(keep_prob, bs)` (searched in
batch_size_start .. batch_size_end - 1), `(keep_prob, (max,))`, `(keep_prob, (min, max))` or
`(keep_prob, (min, max, step))` (min .. max - 1), `(0.0, None)` = not used. With `base = (resolution,
num_frames)` the base bucket's largest batch size that fits is searched first and its step time is the
reference; `base_step_time` (seconds) gives the reference directly. Every other bucket gets, by binary
search, the batch size whose step time is closest below the reference. A bucket that does not fit at its
smallest batch size is written as `(0.0, None)`, with a warning.

Measurement noise: a trial's step time is the median of its timed steps (`step_trial`; on one CPU rank
this process's CPU time, which other work on the machine does not inflate), and the binary
search's choice is then settled on a second measurement: the chosen batch size and the next larger one are
timed again and the faster of each one's two step times decides which of them is closest below (the base
bucket is timed again too, and the faster of its two is the reference). On a shared machine one trial that
other work slowed would otherwise fix a batch size one or more steps away from the closest below.

Each trial is the real train step (`train.step_trial`). Trials are appended to a results file beside the
output (`FITTED.trials.jsonl`); a search started again replays them instead of measuring again, so a crash
costs only the trial it interrupted. `plan` reads the same file for its step times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensora_core.data.aspect import RATIO_TABLES, RESOLUTIONS, get_num_frames
from opensora_core.errors import ConfigError
from opensora_core.train.step_trial import Trial

log = logging.getLogger(__name__)

RESULTS_SUFFIX = ".trials.jsonl"


@dataclass(frozen=True)
class SearchBucket:
    """One bucket_config entry as a search: the candidate batch sizes, smallest first."""

    resolution: str
    num_frames: int
    keep_prob: float  # written back with the fitted batch size (1.0 for v1.2's (guess, variance) form)
    candidates: tuple[int, ...]  # empty: not used; one: kept as it is, not measured

    @property
    def name(self) -> str:
        return f"{self.resolution}-{self.num_frames}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W) measured: the resolution's largest frame, so the batch size fits every aspect ratio."""
        h, w = max(RATIO_TABLES[self.resolution].values(), key=lambda hw: (hw[0] * hw[1], hw[1]))
        return self.num_frames, h, w


@dataclass(frozen=True)
class Fitted:
    """A bucket's search result."""

    bucket: SearchBucket
    batch_size: int | None  # None: does not fit (or not used)
    trial: Trial | None  # the chosen trial; None when not measured
    trials: tuple[Trial, ...]  # every trial of this bucket

    def entry(self) -> tuple[float, int | None]:
        """The fitted bucket_config entry."""
        if self.batch_size is None:
            return (0.0, None)
        return (self.bucket.keep_prob, self.batch_size)


def results_path_of(output: str | Path) -> Path:
    """The results file of a search whose fitted config is `output`."""
    output = Path(output)
    return output.with_name(output.stem + RESULTS_SUFFIX)


def search_buckets(raw: Any, *, batch_size_start: int = 2, batch_size_end: int = 256) -> list[SearchBucket]:
    """The search ranges of a bucket_config in either form; errors name the key and the valid values."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError('bucket_config: expected a dict such as {"240p": {51: (20, 5)}}')
    buckets = []
    for resolution, frames in raw.items():
        key = f'bucket_config["{resolution}"]'
        if resolution not in RATIO_TABLES:
            raise ConfigError(f"{key}: unknown resolution; valid names: {', '.join(RESOLUTIONS)}")
        if not isinstance(frames, Mapping) or not frames:
            raise ConfigError(f"{key}: expected a dict {{num_frames: (guess_bs, variance)}}, got {frames!r}")
        for t_key, value in frames.items():
            try:
                t = get_num_frames(t_key)
            except ConfigError as err:
                raise ConfigError(f"{key}[{t_key!r}]: {err}") from None
            candidates, keep = _candidates(value, f"{key}[{t}]", batch_size_start, batch_size_end)
            buckets.append(SearchBucket(resolution, t, keep, candidates))
    return buckets


def _candidates(value: Any, key: str, start: int, end: int) -> tuple[tuple[int, ...], float]:
    forms = "(guess_bs, variance), (keep_prob, bs), (keep_prob, (max,)), (keep_prob, (min, max[, step])) or (0.0, None)"
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ConfigError(f"{key}: expected {forms}, got {value!r}")
    first, second = value
    if second is None or first == 0:
        return (), 0.0
    if isinstance(second, tuple | list):  # v1.1: (keep_prob, (max,)), (keep_prob, (min, max[, step]))
        bounds = [int(v) for v in second]
        if not 1 <= len(bounds) <= 3:
            raise ConfigError(f"{key}: expected {forms}, got {value!r}")
        lo, hi, step = (start, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
        return tuple(range(max(lo, 1), hi, step)), float(first)
    if isinstance(first, float) and isinstance(second, int):  # v1.1: (keep_prob, bs), bs not a bound
        return tuple(range(max(start, 1), end)), first
    if isinstance(first, int) and isinstance(second, int) and first >= 1 and second >= 0:  # v1.2
        return tuple(range(max(first - second, 1), first + second + 1)), 1.0
    raise ConfigError(f"{key}: expected {forms}, got {value!r}")


def base_bucket(cfg: Mapping[str, Any], buckets: Sequence[SearchBucket]) -> SearchBucket | None:
    """The bucket `base` names (None with `base_step_time`); one line naming the valid ones otherwise."""
    searched = [b for b in buckets if b.candidates]
    if cfg.get("base_step_time") is not None:
        return None
    if not searched:
        raise ConfigError("bucket_config: no bucket has a batch size to search; every entry is (0.0, None)")
    valid = ", ".join(f'("{b.resolution}", {b.num_frames})' for b in searched)
    base = cfg.get("base")
    if base is None:
        raise ConfigError(
            f"base: missing; set base = (resolution, num_frames), one of {valid}, or base_step_time"
        )
    try:
        resolution, frames = base
        frames = get_num_frames(frames)
    except (TypeError, ValueError, ConfigError):
        raise ConfigError(f"base={base!r}: expected (resolution, num_frames), one of {valid}") from None
    for b in searched:
        if (b.resolution, b.num_frames) == (resolution, frames):
            return b
    raise ConfigError(f"base={base!r}: not a searched bucket of bucket_config; valid: {valid}")


class TrialLog:
    """The results file: a settings line, then one JSON line per trial; replayed when the search restarts."""

    def __init__(self, path: Path, settings: Mapping[str, Any]) -> None:
        self.path = path
        self.fingerprint = hashlib.sha256(
            json.dumps(settings, sort_keys=True, default=str).encode()
        ).hexdigest()
        self.trials: dict[tuple[int, ...], Trial] = {}
        if path.is_file():
            lines = path.read_text().splitlines()
            head = json.loads(lines[0]) if lines else {}
            if head.get("fingerprint") != self.fingerprint:
                raise ConfigError(
                    f"{path}: results of a search with other settings (model, dtype, plugin, steps or device); "
                    "remove it or write to another --output"
                )
            for t in _trials(lines[1:]):
                self.trials[_key(t)] = t
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({"fingerprint": self.fingerprint, "settings": settings}, default=str) + "\n"
            )

    def get(self, shape: tuple[int, int, int], batch_size: int, repeat: int) -> Trial | None:
        return self.trials.get((*shape, batch_size, repeat))

    def add(self, trial: Trial) -> None:
        self.trials[_key(trial)] = trial
        with self.path.open("a") as f:
            f.write(json.dumps(dataclasses.asdict(trial)) + "\n")


def _key(t: Trial) -> tuple[int, ...]:
    return (t.num_frames, t.height, t.width, t.batch_size, t.repeat)


def load_trials(path: str | Path) -> list[Trial]:
    """The trials of a results file."""
    return list(_trials(Path(path).read_text().splitlines()[1:]))


def pooled(trials: Sequence[Trial]) -> Trial:
    """Trials of one shape and batch size as one: the fastest of their step times (other work on the machine
    only ever slows a trial down, so the faster measurement is the nearer one), all their timed steps, the
    largest peak; it fits only if each of them did."""
    first = trials[0]
    fits = all(t.fits for t in trials)
    times = tuple(x for t in trials for x in t.step_times) if fits else ()
    step_s = min(t.step_s for t in trials) if fits else None
    return dataclasses.replace(
        first, fits=fits, step_s=step_s, peak_gib=max(t.peak_gib for t in trials), step_times=times,
        error=next((t.error for t in trials if t.error), ""), repeat=max(t.repeat for t in trials),
    )  # fmt: skip


def pooled_step_times(trials: Sequence[Trial]) -> dict[tuple[int, int, int, int], Trial]:
    """(T, H, W, batch size) -> the pooled trial of every measurement of it that fits (what `plan` reads)."""
    groups: dict[tuple[int, int, int, int], list[Trial]] = {}
    for t in trials:
        if t.fits:
            groups.setdefault((t.num_frames, t.height, t.width, t.batch_size), []).append(t)
    return {key: pooled(group) for key, group in groups.items()}


def _trials(lines: Sequence[str]) -> list[Trial]:
    out = []
    for line in lines:
        try:
            out.append(Trial(**json.loads(line)))
        except (ValueError, TypeError):  # a line cut short by a crash
            continue
    return out


Measure = Callable[[SearchBucket, int, int], Trial]  # (bucket, batch size, repeat)


def fit_bucket(bucket: SearchBucket, measure: Measure, ref_step_s: float | None) -> Fitted:
    """Binary search over the bucket's candidates: the largest that fits (no reference), else the one whose
    step time is closest below `ref_step_s`; the smallest that fits when every one is slower. The choice is
    then settled on a second measurement (`_settle`)."""
    cands = bucket.candidates
    trials: list[Trial] = []
    best: int | None = None  # index into cands
    lo, hi = 0, len(cands) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = measure(bucket, cands[mid], 0)
        trials.append(trial)
        if not trial.fits:
            hi = mid - 1
        elif ref_step_s is None or trial.step_s < ref_step_s:
            best = mid if best is None else max(best, mid)
            lo = mid + 1
        else:
            hi = mid - 1
    if best is None:
        fitting = [cands.index(t.batch_size) for t in trials if t.fits]
        best = min(fitting) if fitting else None
    if best is None:
        log.warning(
            "bucket %s does not fit at batch size %d (%s): set to (0.0, None)",
            bucket.name, cands[0], trials[-1].error if trials else "not measured",
        )  # fmt: skip
        return Fitted(bucket, None, None, tuple(trials))
    chosen = _settle(bucket, measure, ref_step_s, best, trials)
    if not chosen.fits:
        log.warning(
            "bucket %s: batch size %d does not fit when measured again (%s): set to (0.0, None)",
            bucket.name, chosen.batch_size, chosen.error,
        )  # fmt: skip
        return Fitted(bucket, None, None, tuple(trials))
    if ref_step_s is not None and chosen.step_s >= ref_step_s:
        log.warning(
            "bucket %s: even batch size %d takes %.3f s, over the base's %.3f s",
            bucket.name, chosen.batch_size, chosen.step_s, ref_step_s,
        )  # fmt: skip
    return Fitted(bucket, chosen.batch_size, chosen, tuple(trials))


def _settle(
    bucket: SearchBucket, measure: Measure, ref: float | None, index: int, trials: list[Trial]
) -> Trial:
    """The pooled trial of the batch size that a second measurement confirms (appending what it measures
    to `trials`). Without a reference: the chosen one timed again (the base's step time becomes the faster
    of both, `pooled`). With one: the chosen and the next larger candidate timed again; one step up while the next is
    below the reference, one step down while the chosen is not, at most two moves (a search whose first
    measurement was right costs two extra trials)."""
    cands = bucket.candidates
    seen: dict[int, Trial] = {}

    def both(i: int) -> Trial:
        if i not in seen:
            runs = [measure(bucket, cands[i], repeat) for repeat in (0, 1)]
            trials.extend(t for t in runs if t not in trials)
            seen[i] = pooled(runs)
        return seen[i]

    if ref is None:
        settled = both(index)
        return settled if settled.fits else next(t for t in trials if t.batch_size == cands[index])
    for _ in range(2):
        here, up = both(index), index + 1
        if here.fits and up < len(cands) and both(up).fits and both(up).step_s < ref:
            index = up
        elif (not here.fits or here.step_s >= ref) and index > 0:
            index -= 1
        else:
            break
    return both(index)


Fit = Callable[[SearchBucket, float | None], Fitted]


def run_search(
    buckets: Sequence[SearchBucket], base: SearchBucket | None, base_step_time: float | None, fit: Fit
) -> tuple[list[Fitted], float]:
    """Fit the base bucket first (its step time is the reference), then the others; (results, reference).

    `fit(bucket, reference)` is `fit_bucket` with the measurement bound."""
    results = []
    ref = base_step_time
    if base is not None:
        fitted = fit(base, None)
        if fitted.trial is None:
            raise ConfigError(
                f"base={base.name}: does not fit at batch size {base.candidates[0]}; pick another base"
            )
        ref = fitted.trial.step_s
        results.append(fitted)
    for b in buckets:
        if b is base:
            continue
        if not b.candidates:
            results.append(Fitted(b, None, None, ()))
        elif len(b.candidates) == 1:
            results.append(Fitted(b, b.candidates[0], None, ()))
        else:
            results.append(fit(b, ref))
    return results, float(ref)


# --- the command ----------------------------------------------------------------------------------------


def search_config(path: str | Path, cfg_options: Sequence[str] | None = None) -> tuple[Any, Any]:
    """(the config validated for training with its search entries set aside, the raw config).

    The search entries are no training bucket_config (`(475, 0)` is no keep_prob), so the training parts are
    validated with a stand-in of one batch per bucket.
    """
    from opensora_core.config import apply_args, read_config, validate_config

    raw = read_config(path)
    apply_args(raw, {"cfg_options": cfg_options} if cfg_options else {}, training=True)
    buckets = search_buckets(raw.get("bucket_config"))
    stand_in = raw.copy()
    stand_in.bucket_config = _entries_dict([(b, (1.0, 1)) for b in buckets])
    return validate_config(stand_in, mode="train", path=str(path)), raw


def _entries_dict(entries: Sequence[tuple[SearchBucket, tuple[float, int | None]]]) -> dict:
    out: dict[str, dict[int, tuple[float, int | None]]] = {}
    for b, entry in entries:
        out.setdefault(b.resolution, {})[b.num_frames] = entry
    return out


def fitted_config_text(
    input_path: str | Path, output: Path, results: Sequence[Fitted], ref: float, device: str
) -> str:
    """A config that inherits the input and replaces its bucket_config with the fitted one."""
    base = os.path.relpath(Path(input_path).resolve(), output.resolve().parent)
    fitted = _entries_dict([(r.bucket, r.entry()) for r in results])
    lines = [
        f"# Written by `opensora search-bs {input_path}` on {device}: batch sizes whose step time is closest below",
        f"# {ref:.4f} s, the base bucket's. Each value is (keep_prob, batch_size); (0.0, None) = not used.",
        f"_base_ = [{json.dumps(base)}]",
        "",
        "bucket_config = {",
        '    "_delete_": True,  # replaces the search ranges of the base config',
    ]
    for resolution, frames in fitted.items():
        lines.append(
            f"    {json.dumps(resolution)}: {{{', '.join(f'{t}: {e!r}' for t, e in frames.items())}}},"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def search_table(results: Sequence[Fitted], ref: float) -> Any:
    from rich.table import Table

    table = Table(title=f"batch-size search (reference step time {ref:.4f} s)")
    for name in ("bucket", "shape", "batch size", "step s", "peak GiB", "tokens/s", "trials"):
        table.add_column(name, justify="left" if name in ("bucket", "shape") else "right")
    for r in results:
        t = r.trial
        shape = "x".join(map(str, r.bucket.shape))
        if t is None:
            table.add_row(r.bucket.name, shape, str(r.batch_size), "-", "-", "-", str(len(r.trials)))
        else:
            table.add_row(r.bucket.name, shape, str(t.batch_size), f"{t.step_s:.4f}", f"{t.peak_gib:.3f}",
                          f"{t.tokens_per_s:.0f}", str(len(r.trials)))  # fmt: skip
    return table


def write_search_plot(results: Sequence[Fitted], ref: float, path: Path) -> Path:
    """Step time against batch size for every measured bucket, the reference as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in results:
        fits = sorted((t for t in r.trials if t.fits), key=lambda t: t.batch_size)
        if fits:
            ax.plot([t.batch_size for t in fits], [t.step_s for t in fits], marker="o", label=r.bucket.name)
    ax.axhline(ref, color="black", linestyle="--", label="reference")
    ax.set_xlabel("batch size")
    ax.set_ylabel("step time (s)")
    ax.set_title("batch-size search trials")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


@dataclass(frozen=True)
class SearchResult:
    output: Path
    results_file: Path
    results: list[Fitted]
    reference_step_s: float
    device: str
    wall_s: float
    mlflow_run_id: str | None = None  # the `search-bs` run, when MLflow is configured


def search_batch_sizes(
    config: str | Path,
    *,
    output: str | Path | None = None,
    memory_budget_gib: float | None = None,
    cfg_options: Sequence[str] | None = None,
    warmup_steps: int = 1,
    active_steps: int = 3,
    batch_size_start: int = 2,
    batch_size_end: int = 256,
    progress: bool = True,
    num_workers: int | None = None,
    ray_address: str | None = None,
) -> SearchResult:
    """Search, write the fitted config and its results file, log to MLflow when it is configured.

    The trials run in this process, or with `num_workers` or `ray_address` given, or a config with
    sp_size > 1, on a Ray Train worker group shaped as training's (`train.trial_workers`): `num_workers`
    workers (default: the config's num_train_workers)."""
    import time

    from opensora_core.train.job import train_job
    from opensora_core.train.trial_workers import TrialSettings

    start = time.perf_counter()
    cfg, raw = search_config(config, cfg_options)
    buckets = search_buckets(
        raw.bucket_config, batch_size_start=batch_size_start, batch_size_end=batch_size_end
    )
    base = base_bucket(raw, buckets)  # bad input fails here, before anything is written
    base_step_time = raw.get("base_step_time")
    output = Path(output) if output else Path(cfg.training.outputs) / "search_bs" / f"{Path(config).stem}.py"
    job = train_job(cfg, snapshot_dir=None, output_dir=str(output.parent))
    how = TrialSettings(memory_budget_gib, warmup_steps, active_steps)
    sp_size = job.settings.sp_size
    on_workers = num_workers is not None or ray_address is not None or sp_size > 1
    if on_workers:
        from opensora_core.parallel.layout import check_sp_size
        from opensora_core.train.trial_workers import worker_device

        num_workers = num_workers or job.settings.num_train_workers
        check_sp_size(sp_size, num_workers)
        device, use_gpu = worker_device(num_workers, ray_address)
        clock = "wall"
    else:
        from opensora_core.train.step_trial import StepTrials

        trials = StepTrials(
            job, memory_budget_gib=memory_budget_gib, warmup_steps=warmup_steps, active_steps=active_steps,
            clock="cpu",
        )  # fmt: skip
        device, clock = trials.device_name, trials.clock
    settings = {
        "model": job.model, "vae": job.vae, "text_encoder": job.text_encoder, "scheduler": job.scheduler,
        "mask_ratios": job.mask_ratios, "dtype": job.settings.dtype, "plugin": job.settings.plugin,
        "grad_checkpoint": job.settings.grad_checkpoint, "warmup_steps": warmup_steps,
        "active_steps": active_steps, "memory_budget_gib": memory_budget_gib, "device": device,
        "num_workers": num_workers or 1, "sp_size": sp_size, "clock": clock,
    }  # fmt: skip
    trial_log = TrialLog(results_path_of(output).resolve(), settings)
    if on_workers:
        results, ref = _search_on_workers(
            job, buckets, base, base_step_time, trial_log, settings, how, num_workers=num_workers,
            use_gpu=use_gpu, ray_address=ray_address, storage_dir=output.parent,
        )  # fmt: skip
    else:
        try:
            results, ref = _search_here(buckets, base, base_step_time, trial_log, trials, progress)
        finally:
            trials.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(fitted_config_text(config, output, results, ref, device))
    result = SearchResult(output, trial_log.path, results, ref, device, time.perf_counter() - start)
    return dataclasses.replace(result, mlflow_run_id=_log_to_mlflow(result))


def _search_here(
    buckets: Sequence[SearchBucket], base: SearchBucket | None, base_step_time: float | None,
    trial_log: TrialLog, trials: Any, progress: bool,
) -> tuple[list[Fitted], float]:  # fmt: skip
    """The search in this process, with a progress bar naming the trial being measured."""
    with _progress(progress, sum(1 for b in buckets if len(b.candidates) > 1)) as bar:

        def measure(bucket: SearchBucket, batch_size: int, repeat: int) -> Trial:
            done = trial_log.get(bucket.shape, batch_size, repeat)
            if done is not None:
                return done
            bar.describe(f"{bucket.name} batch size {batch_size}" + (" (again)" if repeat else ""))
            trial = trials.measure(*bucket.shape, batch_size, repeat)
            trial_log.add(trial)
            return trial

        def fit(bucket: SearchBucket, ref: float | None) -> Fitted:
            fitted = fit_bucket(bucket, measure, ref)
            bar.advance()
            return fitted

        return run_search(buckets, base, base_step_time, fit)


def _search_on_workers(
    job: Any, buckets: Sequence[SearchBucket], base: SearchBucket | None, base_step_time: float | None,
    trial_log: TrialLog, settings: Mapping[str, Any], how: Any, *, num_workers: int, use_gpu: bool,
    ray_address: str | None, storage_dir: Path,
) -> tuple[list[Fitted], float]:  # fmt: skip
    """The search on the worker group (which writes every trial to the results file), then replayed here
    from that file: the same trials give the same decisions."""
    from opensora_core.train.trial_workers import SearchJob, run_on_workers, search_per_worker

    search_job = SearchJob(
        job, tuple(buckets), base, base_step_time, str(trial_log.path), dict(settings),
        tuple(trial_log.trials.values()), how,
    )  # fmt: skip
    run_on_workers(
        search_per_worker, search_job, num_workers=num_workers, use_gpu=use_gpu, ray_address=ray_address,
        storage_dir=storage_dir, run_name="search_bs",
    )  # fmt: skip
    measured = TrialLog(trial_log.path, settings)

    def replay(bucket: SearchBucket, batch_size: int, repeat: int) -> Trial:
        trial = measured.get(bucket.shape, batch_size, repeat)
        if trial is None:
            raise RuntimeError(
                f"{trial_log.path}: the workers did not record {bucket.name} batch size {batch_size}"
            )
        return trial

    return run_search(buckets, base, base_step_time, lambda b, ref: fit_bucket(b, replay, ref))


class _Bar:
    """A rich progress bar over the searched buckets naming the trial being measured (or nothing)."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)
        log.info("search-bs: measuring %s", text)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from opensora_core.console import progress_console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=progress_console()) as progress:  # on stderr: stdout has the table
        yield _Bar(progress, progress.add_task("search-bs", total=total))


def _log_to_mlflow(result: SearchResult) -> str | None:
    """The table, the plot, the fitted config and per-bucket metrics to a `search-bs` run; its id."""
    import tempfile

    from opensora_core import tracking

    if not tracking.tracking_enabled():
        return None
    with tracking.stage_run("search-bs", parent_run_id=None) as run_id:
        metrics = {"search_bs/reference_step_s": result.reference_step_s, "search_bs/wall_s": result.wall_s}
        for r in result.results:
            if r.trial is not None:
                metrics[f"search_bs/batch_size/{r.bucket.name}"] = float(r.trial.batch_size)
                metrics[f"search_bs/step_s/{r.bucket.name}"] = r.trial.step_s
                metrics[f"search_bs/peak_gib/{r.bucket.name}"] = r.trial.peak_gib
        tracking.log_metrics(run_id, metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "search_bs.txt"
            table.write_text(render_text(search_table(result.results, result.reference_step_s)))
            plot = write_search_plot(result.results, result.reference_step_s, Path(tmp) / "search_bs.png")
            for path in (table, plot, result.output, result.results_file):
                tracking.log_artifact(run_id, path, artifact_path="search_bs")
    return run_id


def render_text(table: Any, width: int = 140) -> str:
    """A rich renderable as plain text."""
    import io

    from rich.console import Console

    console = Console(width=width, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()
