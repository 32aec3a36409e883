"""The DeepSpeed config dict for an Open-Sora `plugin` / `dtype` / `grad_clip` choice."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from opensora_core.errors import ConfigError

# Open-Sora's ColossalAI plugin names -> the DeepSpeed ZeRO stage that does the same job.
PLUGINS: dict[str, int] = {
    "ddp": 0,
    "zero1": 1,
    "zero2": 2,
    "zero2-seq": 2,  # ZeRO-2 over the data-parallel group plus Ulysses sequence parallelism
}
DTYPES = ("fp32", "fp16", "bf16")

# DeepSpeed prints throughput every N steps; our loop logs to MLflow itself.
_NEVER = 10**12


def check_plugin(plugin: str, sp_size: int = 1) -> str:
    """`plugin` if it is one of PLUGINS and fits `sp_size` (only zero2-seq runs sequence parallelism)."""
    if plugin not in PLUGINS:
        raise ConfigError(f"plugin={plugin!r} is unknown; valid plugins: {', '.join(PLUGINS)}")
    if plugin == "zero2-seq" and sp_size < 2:
        raise ConfigError(
            f"sp_size={sp_size}: plugin='zero2-seq' needs sp_size >= 2 (use plugin='zero2' for 1)"
        )
    if plugin != "zero2-seq" and sp_size != 1:
        raise ConfigError(
            f"sp_size={sp_size}: sequence parallelism needs plugin='zero2-seq' (plugin is {plugin!r})"
        )
    return plugin


def deepspeed_config(
    plugin: str,
    dtype: str,
    grad_clip: float,
    micro_batch_size: int,
    grad_accum: int = 1,
    *,
    sp_size: int = 1,
    on_gpu: bool = False,
    world_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for `deepspeed.initialize(config=...)`.

    `micro_batch_size` is bookkeeping for DeepSpeed (buckets have their own batch sizes, the loop
    feeds whatever the sampler yields). fp16 on a CPU falls back to fp32 with one warning.

    `world_size` is the number of ranks ZeRO shards over, when known. On a single rank ZeRO-2 runs as
    stage 1 (see `zero_stage`).
    """
    check_plugin(plugin, sp_size)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown; valid values: {', '.join(DTYPES)}")
    if grad_clip < 0:
        raise ConfigError(f"grad_clip={grad_clip}: must be >= 0 (0 turns clipping off)")
    if micro_batch_size < 1 or grad_accum < 1:
        raise ConfigError(f"micro_batch_size={micro_batch_size}, grad_accum={grad_accum}: both must be >= 1")

    if dtype == "fp16" and not on_gpu:
        warnings.warn(
            "dtype='fp16': DeepSpeed's fp16 loss scaling needs a CUDA device; training in fp32 on the CPU "
            "(set dtype='bf16' or 'fp32' to silence this)",
            stacklevel=2,
        )
        dtype = "fp32"

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage(plugin, world_size)},
        "bf16": {"enabled": dtype == "bf16"},
        # initial scale 2**16 as Open-Sora's plugin; loss_scale 0 = dynamic scaling
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if config["zero_optimization"]["stage"] > 0:
        # Contiguous gradient buffers and overlapped reduction pay off with CUDA streams; on a CPU they only
        # add a copy of every gradient per step.
        config["zero_optimization"].update(contiguous_gradients=on_gpu, overlap_comm=on_gpu)
    if plugin == "zero2-seq":
        config["sequence_parallel_size"] = sp_size
    return config


def zero_stage(plugin: str, world_size: int | None = None) -> int:
    """The ZeRO stage DeepSpeed runs for `plugin` on `world_size` ranks.

    Stage 2 differs from stage 1 only in splitting the gradients across the data-parallel ranks, which
    it does from a hook on every parameter during the backward pass. A single rank has nothing to split,
    so there stage 2 is run as stage 1: the same optimizer (DeepSpeedZeroOptimizer), the same memory and
    the same checkpoint layout, without the hooks (about a tenth of a small model's step on a CPU).
    A checkpoint of either stage loads into the other.
    """
    stage = PLUGINS[plugin]
    return 1 if stage == 2 and world_size == 1 else stage


def skip_cpu_shm_kernel() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (~1 min) on start-up.

    Only tensor-parallel inference uses it (`inference_all_reduce`); training talks through gloo,
    so the compile is skipped. Newer DeepSpeed versions without the hook are left alone.
    """
    # not `import deepspeed.comm.torch`: that name resolves to the torch package re-exported there
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def ignore_deepspeeds_all_gather_deprecation() -> None:
    """torch 2.13 deprecates `torch.distributed.all_gather_into_tensor`; DeepSpeed's comm backend
    (`deepspeed/comm/torch.py`, `get_all_gather_function`) still calls it for every ZeRO all-gather. We
    call neither ourselves, so the warning is only this one, ignored by its message until DeepSpeed
    moves to `all_gather_single`."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )
