"""Time the real train step on synthetic inputs of one bucket's shape, on one rank or on a worker group.

`plan` and `search-bs` measure with it: the run's models (the config's model, VAE and text encoder), dtype,
gradient checkpointing, EMA and mask generator, under DeepSpeed with the config's plugin. In a plain
process it makes a one-rank process group of its own (so ZeRO runs as stage 1 at most, as
`parallel.deepspeed_config` says for one rank). Inside a process group (the Ray Train worker group of
`train.trial_workers`) every rank builds the step as training does: ZeRO over all ranks, `sp_size`
consecutive ranks one sequence-parallel group (the model's tokens split across them), the EMA on rank 0;
every rank then takes part in every trial, and a trial's numbers are agreed on by all ranks (the slowest
rank's step time, the largest peak, fits only where it fits on every rank), so all ranks make the same
search decisions. A trial's micro-batch is random video of the bucket's exact (T, H, W) and random captions, which the
text encoder pads to its fixed length: the latent and caption shapes of a real batch, no data needed.

Memory: on CUDA the peak allocated memory of the trial (torch.cuda.max_memory_allocated); an out-of-memory
error is caught, the trial marked as not fitting and the engine rebuilt before the next one. On CPU the peak
resident set size of this process during the trial, sampled every 5 ms from /proc/self/statm (torch's CPU
allocator keeps no peak statistics and tracemalloc does not see its tensors); a `memory_budget` makes
trials whose peak exceeds it not fit. On CPU trials run on one torch thread, as each Ray Train worker does
(it is given one CPU).

Clock: wall time by default. `clock="cpu"` (the search on one CPU rank) times a step by this process's CPU
time instead: on a machine that other work shares, wall time counts the waits for a core as well (on
this project's 2-core machine under a load of 20 to 60 one step's wall time varied 3 to 10 fold), while a
one-thread step's CPU time is the work itself, what its wall time is on a CPU of its own. A process's CPU
time says nothing of a step that waits on a GPU or on other ranks, so every other trial keeps wall time.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opensora_core.train.job import TrainJob
from opensora_core.train.step import diffusion_loss, encode_batch

GIB = 1024**3


@dataclass(frozen=True)
class Trial:
    """One batch size of one bucket shape, measured."""

    num_frames: int
    height: int
    width: int
    batch_size: int
    fits: bool
    step_s: float | None  # median of `step_times`; None when it did not fit
    peak_gib: float  # peak memory seen (at the failure, for one that did not fit)
    tokens: int  # latent tokens per sample (T' x H'/p x W'/p)
    error: str = ""
    step_times: tuple[float, ...] = ()  # each timed step, in order (rank 0's)
    repeat: int = 0  # 0: the search's trial; 1: its re-measure (search_bs.fit_bucket)
    world_size: int = 1  # ranks that took the step together
    sp_size: int = 1  # ranks each sample's tokens were split across
    clock: str = "wall"  # or "cpu": this process's CPU time (see the module's docstring)
    wall_s: float | None = None  # median wall time of the timed steps, whatever `clock` is

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_times", tuple(self.step_times))  # a list when read back from JSON

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.tokens / self.step_s if self.step_s else 0.0


class StepTrials:
    """The run's train step, built once; `measure` times it at one bucket shape and batch size."""

    def __init__(
        self, job: TrainJob, *, memory_budget_gib: float | None = None, warmup_steps: int = 1,
        active_steps: int = 3, clock: str = "wall",
    ) -> None:  # fmt: skip
        self.job = job
        self.memory_budget_gib = memory_budget_gib
        self.warmup_steps, self.active_steps = warmup_steps, active_steps
        self.on_gpu = torch.cuda.is_available()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        )
        self._workdir = tempfile.TemporaryDirectory(prefix="opensora-trial-")
        self._env = {name: os.environ.get(name) for name in _RANK_ENV}
        self._own_group = _one_rank_group(Path(self._workdir.name), self.on_gpu)
        self.layout = _layout(job.settings.sp_size)
        # CPU time only where it is the step's whole cost: one CPU rank (no GPU, no other rank to wait for)
        self.clock = "cpu" if clock == "cpu" and not self.on_gpu and self.layout.world_size == 1 else "wall"
        self._now = time.process_time if self.clock == "cpu" else time.perf_counter
        self._parts: _Parts | None = None

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.on_gpu else f"cpu ({os.cpu_count()} cores)"

    def measure(self, num_frames: int, height: int, width: int, batch_size: int, repeat: int = 0) -> Trial:
        """warmup + active steps at this shape; the median time of the active ones and the peak memory.

        Each active step is timed on its own and the median taken: on a shared machine one step that
        another process slowed would otherwise move the mean, and with it the search's choice."""
        parts = self._parts = self._parts or _build_parts(self.job, self.device, self.layout)
        threads = torch.get_num_threads()
        if not self.on_gpu:
            torch.set_num_threads(1)
        peak = _PeakMemory(self.device)
        tokens, error, times, walls = 0, "", [], []
        try:
            with peak:
                # the same batch and seeds on every rank: an SP group's ranks share a batch, as in training
                batch = _synthetic_batch(batch_size, num_frames, height, width, self.job.settings.seed)
                for i in range(self.warmup_steps + self.active_steps):
                    _sync(self.device)
                    start, wall_start = self._now(), time.perf_counter()
                    tokens = parts.step(batch, seed=i)
                    _sync(self.device)
                    if i >= self.warmup_steps:
                        times.append(self._now() - start)
                        walls.append(time.perf_counter() - wall_start)
                    if self._agree_max(float(self._over_budget(peak.gib())))[0]:  # all ranks stop together
                        error = f"peak {peak.gib():.2f} GiB over the budget of {self.memory_budget_gib} GiB"
                        break
        except torch.cuda.OutOfMemoryError as err:
            error = f"CUDA out of memory: {str(err).splitlines()[0]}"
            self._drop_parts()  # the optimizer may hold half a step's gradients: rebuilt for the next trial
        finally:
            torch.set_num_threads(threads)
        ok = bool(times) and not error
        failed, step_s, wall_s, peak_gib = self._agree_max(
            float(not ok), statistics.median(times) if ok else 0.0, statistics.median(walls) if ok else 0.0,
            peak.gib(),
        )  # fmt: skip
        if failed and not error:
            error = "did not fit on another rank"
        return Trial(
            num_frames, height, width, batch_size, fits=not failed, step_s=None if failed else step_s,
            peak_gib=round(peak_gib, 4), tokens=tokens, error=error,
            step_times=() if failed else tuple(round(t, 6) for t in times), repeat=repeat,
            world_size=self.layout.world_size, sp_size=parts.sp_size, clock=self.clock,
            wall_s=None if failed else round(wall_s, 6),
        )  # fmt: skip

    def _agree_max(self, *values: float) -> list[float]:
        """Each value's largest over the ranks (the values themselves on one rank)."""
        if self.layout.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        """Latent tokens per sample of this shape, from the VAE's latent size and the model's patch size."""
        parts = self._parts = self._parts or _build_parts(self.job, self.device, self.layout)
        return parts.tokens(parts.vae.get_latent_size((num_frames, height, width)))

    def _over_budget(self, peak_gib: float) -> bool:
        return self.memory_budget_gib is not None and peak_gib > self.memory_budget_gib

    def _drop_parts(self) -> None:
        self._parts = None
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Free the models and, when the trials made it, the one-rank process group: a caller that trains
        or measures again in this process (a test session, a notebook) starts from a clean slate."""
        self._drop_parts()
        if self._own_group:
            import deepspeed

            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's clone of the world group
            self._own_group = False
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._workdir.cleanup()


@dataclass
class _Parts:
    """The models, engine and scheduler of the train step."""

    job: TrainJob
    device: torch.device
    dtype: torch.dtype
    text_encoder: Any
    vae: torch.nn.Module
    engine: Any
    ema: torch.nn.Module | None  # rank 0's, as in training
    scheduler: Any
    mask_generator: Any
    sp_size: int  # the SP group the model runs split across (1: not sequence parallel)

    def step(self, batch: dict[str, Any], seed: int) -> int:
        """One micro-batch and optimizer step, as the training loop takes it; the latent tokens per sample."""
        from opensora_core.train.ema import update_ema

        torch.manual_seed(seed)
        latents, model_args, mask = encode_batch(
            batch, self.vae, self.text_encoder, device=self.device, dtype=self.dtype,
            mask_generator=self.mask_generator, rng=random.Random(seed),
        )  # fmt: skip
        loss = diffusion_loss(self.engine, self.scheduler, latents, model_args, mask)
        self.engine.backward(loss)
        self.engine.step()
        if self.ema is not None:
            update_ema(self.ema, self.engine.module, decay=self.job.settings.ema_decay)
        return self.tokens(latents.shape[2:])

    def tokens(self, latent_size: Any) -> int:
        t, h, w = latent_size
        pt, ph, pw = getattr(self.engine.module, "patch_size", (1, 1, 1))
        return -(-t // pt) * -(-h // ph) * -(-w // pw)


def _layout(sp_size: int) -> Any:
    """Where this process sits in the process group (one rank, or a rank of the worker group)."""
    import torch.distributed as dist

    from opensora_core.parallel.layout import parallel_layout

    return parallel_layout(dist.get_rank(), dist.get_world_size(), sp_size)


def _build_parts(job: TrainJob, device: torch.device, layout: Any) -> _Parts:
    import deepspeed

    from opensora_core.parallel.deepspeed_config import deepspeed_config
    from opensora_core.parallel.sequence import apply_sequence_parallel, new_sequence_parallel_groups
    from opensora_core.schedulers import build_scheduler
    from opensora_core.train.ema import create_ema
    from opensora_core.train.loop import TORCH_DTYPES, _build_models
    from opensora_core.train.mask import MaskGenerator

    s = job.settings
    on_gpu = device.type == "cuda"
    dtype = TORCH_DTYPES[s.dtype]
    if not on_gpu and dtype == torch.float16:
        dtype = torch.float32  # as the training loop does
    text_encoder, vae, model = _build_models(job, device, dtype)
    ema = create_ema(model) if layout.rank == 0 else None
    sp_size = 1
    if layout.sp_size > 1:  # after the EMA copy, as training does
        sp_group, _ = new_sequence_parallel_groups(layout)
        sp_size = apply_sequence_parallel(model, sp_group).size
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=s.lr,
        weight_decay=s.weight_decay,
        eps=s.adam_eps,
    )
    config = deepspeed_config(
        s.plugin, s.dtype, s.grad_clip, micro_batch_size=1, grad_accum=1, sp_size=layout.sp_size,
        on_gpu=on_gpu, world_size=layout.world_size,
    )  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    mask_generator = MaskGenerator(job.mask_ratios) if job.mask_ratios else None
    return _Parts(job, device, dtype, text_encoder, vae, engine, ema, build_scheduler(dict(job.scheduler)),
                  mask_generator, sp_size)  # fmt: skip


_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def _one_rank_group(workdir: Path, on_gpu: bool) -> bool:
    """A one-rank process group through a file store (no port), adopted by DeepSpeed; whether it made one
    (a caller inside a process group of its own keeps that)."""
    import deepspeed
    import torch.distributed as dist

    from opensora_core.parallel.deepspeed_config import skip_cpu_shm_kernel

    for name, value in zip(_RANK_ENV, ("0", "0", "1"), strict=True):
        os.environ.setdefault(name, value)
    backend = "nccl" if on_gpu else "gloo"
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(workdir / "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if not on_gpu:
        skip_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    return created


def _synthetic_batch(batch_size: int, num_frames: int, height: int, width: int, seed: int) -> dict[str, Any]:
    """Random clips in [-1, 1] and captions, with the size conditioning a real batch of this bucket has."""
    generator = torch.Generator().manual_seed(seed)
    n = batch_size
    return {
        "video": torch.rand(n, 3, num_frames, height, width, generator=generator) * 2 - 1,
        "text": [f"a synthetic clip, number {i}" for i in range(n)],
        "num_frames": torch.full((n,), num_frames),
        "height": torch.full((n,), height),
        "width": torch.full((n,), width),
        "ar": torch.full((n,), height / width),
        "fps": torch.full((n,), 24),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory while the block runs: CUDA's allocator statistics, or this process's sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes())

    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return max(self._peak, _rss_bytes()) / GIB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
