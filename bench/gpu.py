"""Every GPU path of the project in one unattended run: kernels, training throughput, encoders, fit.

    python bench/gpu.py              # a CUDA machine (H100/H200 class): about 5-8 minutes
    python bench/gpu.py --dry-run    # the same code at tiny sizes on the CPU, under a minute

Weights are random and nothing is downloaded. Parts:
  paths     process group (NCCL, 1 rank), which attention kernel runs (flash-attn or torch SDPA's
            flash kernel), apex fused LayerNorm, bf16, DeepSpeed ZeRO-2 with overlap_comm, a
            pinned-memory DataLoader; the losses of a few steps agree between fast path and fallback
  train     STDiT3-XL/2 training step at Open-Sora's shapes (16x256x256, 51x240p), bf16, with and
            without gradient checkpointing: tokens/s/GPU, MFU (FLOPs from torch's flop counter against
            the device's bf16 peak), peak memory, step time
  encoders  OpenSoraVAE_V1_2 encode/decode and T5-XXL encode samples/s; rflow sampling s/video at
            51x240p, 30 steps, classifier-free guidance
  fit       the largest batch size that fits at 51x240p with the real step (out-of-memory caught)

A part that fails records its error and the others still run; a part that needs a missing package
(diffusers, deepspeed, flash-attn, apex) says so and is skipped. The JSON line printed at the end is
also written to --out (default: $OUT/gpu.json when $OUT is set, else bench_gpu.json), and rewritten
after every part, so a run cut short still leaves what it measured. Only torch, transformers and
the project's models, schedulers, train step (`train/step.py`) and DeepSpeed config are imported, so it runs where Ray, Prefect,
MLflow and mmengine are absent (bench/gpu_wheels.sh fetches the small optional wheels).
The "ratio" of this benchmark is the fast path's step time over the fallback's (fp32, math
attention) on the same model and inputs: above 1 means the GPU path is faster.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a plain checkout

from opensora_core.models.registry import T5_XXL_CONFIG, build_model  # noqa: E402
from opensora_core.models.text_encoder import LearnedNullCaption  # noqa: E402
from opensora_core.sample.sampling_loop import sample_latents  # noqa: E402
from opensora_core.schedulers.rflow import RFlow  # noqa: E402
from opensora_core.train.step import diffusion_loss  # noqa: E402

log = logging.getLogger("bench.gpu")

# Published dense bf16 peaks (no sparsity), FLOP/s: NVIDIA's data sheets for the SXM parts.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
# Open-Sora's report for STDiT on H800 at 16-64 x 512 frames, the anchor to compare with.
ANCHOR = "Open-Sora reports 23-25k tokens/s/GPU for STDiT at 16-64 x 512 on H800"
PARTS = ("paths", "train", "encoders", "fit")


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the real sizes, or tiny ones for the CPU dry run."""

    model: dict[str, Any]
    caption_channels: int
    text_len: int
    # shape name -> (frames, height, width) in pixels, and the training micro-batch size there
    shapes: dict[str, tuple[int, int, int]]
    train_batch: dict[str, int]
    t5: dict[str, Any]
    check_model: dict[str, Any]  # the smaller model of the fast-path-vs-fallback check
    check_shape: str
    warmup: int = 2
    steps: int = 6
    check_steps: int = 3
    sampling_steps: int = 30
    vae_batch: int = 1
    t5_batch: int = 8
    caption_tokens: int = 120  # real tokens per caption; the rest is padding up to text_len
    fit_shape: str = "51x240p"
    fit_max_batch: int = 512
    fit_budget_s: float = 150.0


REAL = Sizes(
    model=dict(type="STDiT3-XL/2", enable_flash_attn=True, enable_layernorm_kernel=True),
    caption_channels=4096,
    text_len=300,
    shapes={"16x256x256": (16, 256, 256), "51x240p": (51, 240, 426)},
    train_batch={"16x256x256": 8, "51x240p": 2},
    t5=T5_XXL_CONFIG,
    check_model=dict(type="STDiT3-XL/2", depth=4, enable_flash_attn=True, enable_layernorm_kernel=True),
    check_shape="16x256x256",
)
DRY = Sizes(
    model=dict(type="STDiT3-XL/2", hidden_size=64, depth=2, num_heads=4, enable_flash_attn=True,
               enable_layernorm_kernel=True),
    caption_channels=32,
    text_len=16,
    shapes={"16x256x256": (4, 32, 32), "51x240p": (5, 24, 40)},
    train_batch={"16x256x256": 2, "51x240p": 1},
    t5=dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu"),
    check_model=dict(type="STDiT3-XL/2", hidden_size=64, depth=1, num_heads=4, enable_flash_attn=True,
                     enable_layernorm_kernel=True),
    check_shape="16x256x256",
    warmup=1,
    steps=2,
    check_steps=2,
    sampling_steps=3,
    t5_batch=2,
    caption_tokens=8,
    fit_max_batch=4,
    fit_budget_s=10.0,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Environment: device, optional packages, timing
# ----------------------------------------------------------------------------------------------


def has(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # present in sys.modules without a spec (e.g. set to None to block it)
        return False


def missing(package: str, what: str) -> dict[str, Any]:
    return {"skipped": f"{package} is not installed: {what} not measured"}


def device_facts(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"device": "cpu", "device_name": "cpu", "bf16_peak_flops": None}
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)
    props = torch.cuda.get_device_properties(device)
    return {
        "device": "cuda",
        "device_name": name,
        "device_memory_gib": round(props.total_memory / 2**30, 1),
        "bf16_peak_flops": peak,
        "bf16_peak_source": "NVIDIA data sheet, dense bf16 (SXM)" if peak else "unknown device: no MFU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def free_device_memory() -> None:
    """What the last part left on the GPU goes back before the next (a DeepSpeed engine holds cycles)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@contextmanager
def captured_logs(name: str = "opensora_core"):
    """The project's log lines during the block (which kernel path each model chose)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname}: {record.getMessage()}")

    handler = Keep(logging.INFO)
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ----------------------------------------------------------------------------------------------
# Inputs and the training step
# ----------------------------------------------------------------------------------------------


def latent_shape(pixels: tuple[int, int, int], vae: Any | None) -> tuple[int, int, int]:
    """Latent (T, H, W) through the v1.2 VAE: its own rule when it is built, else the same arithmetic
    (8x spatial, rounded down; 17-frame chunks of 5 latent frames, a remainder r gives ceil(r / 4))."""
    if vae is not None:
        return tuple(vae.get_latent_size(list(pixels)))
    t, h, w = pixels
    return 5 * (t // 17) + math.ceil((t % 17) / 4), h // 8, w // 8


def tokens_per_sample(latent: tuple[int, int, int], patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    return math.prod(math.ceil(n / p) for n, p in zip(latent, patch, strict=True))


def model_inputs(
    sizes: Sizes,
    pixels: tuple[int, int, int],
    batch: int,
    device: torch.device,
    vae: Any | None = None,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random latents and caption features of one bucket's exact shapes, plus STDiT3's conditioning."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t, h, w = latent_shape(pixels, vae)
    x = torch.randn(batch, 4, t, h, w, generator=gen)
    y = torch.randn(batch, 1, sizes.text_len, sizes.caption_channels, generator=gen)
    mask = torch.zeros(batch, sizes.text_len, dtype=torch.long)
    mask[:, : min(sizes.caption_tokens, sizes.text_len)] = 1
    frames, height, width = pixels
    args = {
        "y": y,
        "mask": mask,
        "num_frames": torch.full((batch,), float(frames)),
        "height": torch.full((batch,), float(height)),
        "width": torch.full((batch,), float(width)),
        "ar": torch.full((batch,), height / width),
        "fps": torch.full((batch,), 24.0),
    }
    return x.to(device), {k: v.to(device) for k, v in args.items()}  # fmt: skip


def new_model(spec: dict[str, Any], sizes: Sizes, device: torch.device, *, grad_checkpoint: bool = False):
    model = build_model(
        dict(spec), in_channels=4, caption_channels=sizes.caption_channels, model_max_length=sizes.text_len
    )
    model.grad_checkpointing = grad_checkpoint
    return model.to(device).train()


class Trainer:
    """One training step as the pipeline runs it: DeepSpeed (bf16 params, fp32 master weights, ZeRO)
    when DeepSpeed is importable, else torch autocast bf16 with fp32 AdamW."""

    def __init__(
        self, model: torch.nn.Module, *, dtype: str, device: torch.device, micro_batch: int,
        use_deepspeed: bool, zero: dict[str, Any] | None = None, lr: float = 1e-4,
    ):  # fmt: skip
        self.device = device
        self.scheduler = RFlow(use_timestep_transform=True, sample_method="logit-normal")
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
            fused=device.type == "cuda",
        )  # fmt: skip
        self.autocast = dtype == "bf16" and not use_deepspeed
        if use_deepspeed:
            import deepspeed

            from opensora_core.parallel.deepspeed_config import deepspeed_config

            if device.type == "cpu":
                from opensora_core.parallel.deepspeed_config import skip_cpu_shm_kernel

                skip_cpu_shm_kernel()
            deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)

            config = deepspeed_config(
                "zero2", dtype, 1.0, micro_batch_size=micro_batch, on_gpu=device.type == "cuda", world_size=1
            )
            config["zero_optimization"].update(zero or {})
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config, dist_init_required=False
            )
            self.module = self.engine.module
            self.impl = (
                f"deepspeed {deepspeed.__version__} ZeRO-{config['zero_optimization']['stage']} {dtype}"
            )
        else:
            self.engine, self.optimizer, self.module = None, optimizer, model
            self.impl = "torch autocast bf16 + AdamW (fp32 weights)" if self.autocast else f"torch {dtype}"

    def loss(self, x: torch.Tensor, args: dict[str, Any], seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model = self.engine if self.engine is not None else self.module
        dtype = next(self.module.parameters()).dtype
        x = x.to(dtype)
        args = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in args.items()}
        context = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with context:
            return diffusion_loss(model, self.scheduler, x, args)

    def step(self, x: torch.Tensor, args: dict[str, Any], seed: int = 0) -> float:
        loss = self.loss(x, args, seed)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def timed_steps(self, x, args, warmup: int, steps: int) -> dict[str, Any]:
        reset_peak(self.device)
        for i in range(warmup):
            self.step(x, args, seed=i)
        sync(self.device)
        start = time.perf_counter()
        losses = [self.step(x, args, seed=warmup + i) for i in range(steps)]
        sync(self.device)
        step_s = (time.perf_counter() - start) / steps
        return {"step_s": round(step_s, 4), "peak_memory_gib": peak_gib(self.device),
                "loss": [round(float(v), 5) for v in losses]}  # fmt: skip


def step_flops(trainer: Trainer, spec: dict[str, Any], sizes: Sizes, x: torch.Tensor, args: dict) -> int:
    """FLOPs of one forward + backward without recomputation (model FLOPs, as MFU counts them), by
    torch's flop counter, on a second model of the same spec and dtype: FLOPs don't depend on the
    weights, and the optimizer's gradient hooks on the trained one see nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = next(trainer.module.parameters()).dtype
    module = new_model(spec, sizes, x.device).to(dtype)
    args = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in args.items()}
    context = torch.autocast(trainer.device.type, dtype=torch.bfloat16) if trainer.autocast else nullcontext()
    with FlopCounterMode(display=False) as counter, context:
        diffusion_loss(module, trainer.scheduler, x.to(dtype), args).backward()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Part 1: paths
# ----------------------------------------------------------------------------------------------


def process_group(device: torch.device, workdir: Path) -> dict[str, Any]:
    """A 1-rank group of our own (NCCL on CUDA, gloo on CPU) through a file store: no port needed."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        store = dist.FileStore(str(workdir / "pg_store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    value = torch.full((4,), 3.0, device=device)
    dist.all_reduce(value)
    out = {"backend": dist.get_backend(), "all_reduce_ok": bool(torch.all(value == 3.0))}
    if backend == "nccl":
        out["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def attention_kernels(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Which kernels one bf16 forward of the model launches (profiler names), and the model's own log."""
    from torch.profiler import ProfilerActivity, profile

    with captured_logs() as lines:
        model = new_model(sizes.check_model, sizes, device).to(torch.bfloat16)
    x, args = model_inputs(sizes, sizes.shapes[sizes.check_shape], 1, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model(x.bfloat16(), torch.full((1,), 500.0, device=device), **{
            k: (v.bfloat16() if v.is_floating_point() else v) for k, v in args.items()})  # fmt: skip
    calls = {e.key: e.count for e in prof.key_averages()}
    # self-attention has no key mask (flash-capable); cross-attention to the caption has one
    attention = {
        n: c for n, c in calls.items() if any(s in n.lower() for s in ("flash", "fmha", "attention"))
    }
    if any(n.startswith("flash_attn::") or "flash_attn_func" in n for n in attention):
        implementation = "flash-attn"
    elif any("scaled_dot_product_flash" in n for n in attention):
        implementation = "torch SDPA flash kernel"
    elif any("efficient" in n or "cudnn" in n for n in attention):
        implementation = "torch SDPA memory-efficient / cuDNN kernel"
    else:
        implementation = "torch SDPA math"
    apex = any("apex" in line and "not available" not in line for line in lines)
    return {
        "attention_impl": implementation,
        "attention_calls": dict(sorted(attention.items())[:16]),
        "flash_attn_installed": has("flash_attn"),
        "layernorm_impl": "apex FusedLayerNorm" if apex else "torch.nn.LayerNorm",
        "apex_installed": has("apex"),
        "model_log": lines,
    }


def fast_vs_fallback(sizes: Sizes, device: torch.device, use_deepspeed: bool) -> dict[str, Any]:
    """The same model, inputs and seeds through the fallback (fp32, SDPA math kernel) and the fast path
    (bf16 autocast with flash kernels; DeepSpeed ZeRO-2 bf16 with overlap_comm / contiguous
    gradients): losses finite and equal within bf16 tolerance, and the step time of each."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    base = new_model(sizes.check_model, sizes, device)
    state = copy.deepcopy(base.state_dict())
    x, args = model_inputs(sizes, sizes.shapes[sizes.check_shape], 2, device, seed=1)
    runs: dict[str, Any] = {}

    def run(name: str, dtype: str, deepspeed: bool, kernel: Any, zero: dict | None = None) -> None:
        model = new_model(sizes.check_model, sizes, device)
        model.load_state_dict(state)
        trainer = Trainer(
            model, dtype=dtype, device=device, micro_batch=2, use_deepspeed=deepspeed, zero=zero
        )
        with sdpa_kernel(kernel) if kernel is not None else nullcontext():
            result = trainer.timed_steps(x, args, warmup=0, steps=sizes.check_steps)
        runs[name] = {"impl": trainer.impl, **result}

    run("fallback_fp32_math", "fp32", False, SDPBackend.MATH)
    run("fast_bf16", "bf16", False, None)
    if use_deepspeed:
        zero2 = {
            "stage": 2,
            "overlap_comm": device.type == "cuda",
            "contiguous_gradients": device.type == "cuda",
        }
        run("deepspeed_zero2_bf16", "bf16", True, None, zero=zero2)
    reference = runs["fallback_fp32_math"]["loss"]
    for result in runs.values():
        result["finite"] = all(math.isfinite(v) for v in result["loss"])
        result["max_rel_diff_vs_fallback"] = round(
            max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(result["loss"], reference, strict=True)), 5
        )
    tolerance = 3e-2  # bf16 keeps 8 bits of mantissa; a few steps of AdamW stay within this
    return {
        "runs": runs,
        "tolerance_rel": tolerance,
        "losses_agree": all(r["finite"] and r["max_rel_diff_vs_fallback"] <= tolerance for r in runs.values()),
        "speedup_fast_vs_fallback": round(runs["fallback_fp32_math"]["step_s"] / runs["fast_bf16"]["step_s"], 3),
    }  # fmt: skip


def pinned_loader(device: torch.device) -> dict[str, Any]:
    """A DataLoader with pin_memory: batches arrive pinned and copy to the device without blocking."""
    if device.type != "cuda":
        return {"skipped": "pinned memory needs CUDA"}
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(64, 3, 16, 128, 128))
    times = {}
    for pinned in (False, True):
        loader = DataLoader(data, batch_size=8, num_workers=2, pin_memory=pinned)
        sync(device)
        start = time.perf_counter()
        for (batch,) in loader:
            is_pinned = batch.is_pinned()
            batch.to(device, non_blocking=pinned)
        sync(device)
        times["pinned" if pinned else "pageable"] = round(time.perf_counter() - start, 4)
        if pinned:
            times["batches_pinned"] = is_pinned
    return times


def part_paths(sizes: Sizes, device: torch.device, use_deepspeed: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in (
        ("kernels", lambda: attention_kernels(sizes, device)),
        ("fast_vs_fallback", lambda: fast_vs_fallback(sizes, device, use_deepspeed)),
        ("pinned_dataloader", lambda: pinned_loader(device)),
    ):
        out[name] = guarded(fn)
    if not use_deepspeed:
        out["deepspeed"] = missing("deepspeed", "ZeRO-2 with overlap_comm")
    return out


# ----------------------------------------------------------------------------------------------
# Part 2: training throughput
# ----------------------------------------------------------------------------------------------


def part_train(sizes: Sizes, device: torch.device, peak: float | None, use_deepspeed: bool, vae: Any) -> dict:
    out: dict[str, Any] = {"model": sizes.model["type"], "anchor": ANCHOR}
    model = new_model(sizes.model, sizes, device)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, dtype="bf16", device=device, micro_batch=1, use_deepspeed=use_deepspeed)
    out["impl"] = trainer.impl
    for shape, pixels in sizes.shapes.items():
        batch = sizes.train_batch[shape]
        x, args = model_inputs(sizes, pixels, batch, device, vae)
        tokens = tokens_per_sample(tuple(x.shape[2:])) * batch
        entry: dict[str, Any] = {"pixels": list(pixels), "latent": list(x.shape[1:]), "batch_size": batch,
                                 "tokens_per_step": tokens}  # fmt: skip
        flops = guarded(lambda x=x, args=args: step_flops(trainer, sizes.model, sizes, x, args))
        entry["flops_per_step"] = flops
        for checkpointing in (False, True):
            trainer.module.grad_checkpointing = checkpointing

            def measure(x=x, args=args, tokens=tokens, flops=flops):
                result = trainer.timed_steps(x, args, sizes.warmup, sizes.steps)
                result["tokens_per_s_per_gpu"] = round(tokens / result["step_s"], 1)
                if isinstance(flops, int) and peak:
                    result["mfu"] = round(flops / result["step_s"] / peak, 4)
                return result

            entry["grad_checkpoint" if checkpointing else "no_grad_checkpoint"] = guarded(measure)
        out[shape] = entry
    return out


# ----------------------------------------------------------------------------------------------
# Part 3: encoders and sampling
# ----------------------------------------------------------------------------------------------


def build_vae(sizes: Sizes, device: torch.device, workdir: Path, dry_run: bool):
    """OpenSoraVAE_V1_2 (SDXL image VAE + temporal VAE), random weights; tiny weights from disk when dry."""
    from opensora_core.models.registry import build_vae as build

    if dry_run:
        from opensora_core.models.tiny_random import create_tiny_pretrained

        tiny = create_tiny_pretrained(workdir / "tiny")
        vae = build(dict(type="OpenSoraVAE_V1_2", from_pretrained=str(tiny.vae_v1_2), micro_frame_size=17,
                         micro_batch_size=4))  # fmt: skip
    else:
        vae = build(dict(type="OpenSoraVAE_V1_2", micro_frame_size=17, micro_batch_size=4))
    return vae.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def vae_speed(vae: Any, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    out = {}
    for shape, pixels in sizes.shapes.items():
        video = torch.randn(sizes.vae_batch, 3, *pixels, device=device, dtype=torch.bfloat16)

        def measure(video=video, frames=pixels[0]):
            reset_peak(device)
            with torch.no_grad():
                z = vae.encode(video)  # warm-up, then timed
                sync(device)
                start = time.perf_counter()
                z = vae.encode(video)
                sync(device)
                encode_s = time.perf_counter() - start
                vae.decode(z, num_frames=frames)
                sync(device)
                start = time.perf_counter()
                vae.decode(z, num_frames=frames)
                sync(device)
                decode_s = time.perf_counter() - start
            return {"latent": list(z.shape[1:]), "encode_samples_per_s": round(sizes.vae_batch / encode_s, 3),
                    "decode_samples_per_s": round(sizes.vae_batch / decode_s, 3),
                    "peak_memory_gib": peak_gib(device)}  # fmt: skip

        out[shape] = guarded(measure)
    return out


class RandomTokenT5(LearnedNullCaption):
    """T5 encoder at the released architecture with random weights on random token ids (no tokenizer
    download): the compute of encoding captions of `caption_tokens` tokens padded to `text_len`."""

    def __init__(self, config: dict[str, Any], sizes: Sizes, device: torch.device):
        from transformers import T5Config, T5EncoderModel

        with torch.device(device):
            self.model = T5EncoderModel._from_config(T5Config(**config), dtype=torch.bfloat16)
        self.model.eval().requires_grad_(False)
        self.sizes, self.device = sizes, device
        self.output_dim = config["d_model"]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        n, length = len(texts), self.sizes.text_len
        ids = torch.randint(0, self.model.config.vocab_size, (n, length), device=self.device)
        mask = torch.zeros(n, length, dtype=torch.long, device=self.device)
        mask[:, : min(self.sizes.caption_tokens, length)] = 1
        y = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return {"y": y[:, None], "mask": mask}


def t5_speed(t5: RandomTokenT5, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    prompts = ["a prompt"] * sizes.t5_batch
    t5.encode(prompts)
    sync(device)
    start = time.perf_counter()
    for _ in range(3):
        t5.encode(prompts)
    sync(device)
    seconds = (time.perf_counter() - start) / 3
    return {"batch": sizes.t5_batch, "text_len": sizes.text_len, "caption_tokens": sizes.caption_tokens,
            "encode_samples_per_s": round(sizes.t5_batch / seconds, 2),
            "parameters": sum(p.numel() for p in t5.model.parameters())}  # fmt: skip


def sampling_speed(sizes: Sizes, device: torch.device, t5: RandomTokenT5, vae: Any) -> dict[str, Any]:
    """rflow with CFG at 51x240p as `opensora sample` runs it: text encoding, denoising, VAE decode."""
    model = new_model(sizes.model, sizes, device).to(torch.bfloat16).eval()
    t5.y_embedder = model.y_embedder
    pixels = sizes.shapes["51x240p"]
    scheduler = RFlow(num_sampling_steps=sizes.sampling_steps, cfg_scale=7.0, use_timestep_transform=True)
    x, args = model_inputs(sizes, pixels, 1, device, vae)
    extra = {k: v.bfloat16() for k, v in args.items() if k in ("num_frames", "height", "width", "fps")}
    reset_peak(device)

    def one_video() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        z = sample_latents(model, t5, scheduler, x.bfloat16(), ["a prompt"], model_args=extra, progress=False)
        sync(device)
        denoise = time.perf_counter() - start
        if vae is not None:
            with torch.no_grad():
                vae.decode(z.to(torch.bfloat16), num_frames=pixels[0])
            sync(device)
        return denoise, time.perf_counter() - start

    one_video()  # warm-up
    denoise_s, total_s = one_video()
    return {"steps": sizes.sampling_steps, "cfg": True, "latent": list(x.shape[1:]),
            "s_per_video_denoise": round(denoise_s, 3),
            "s_per_video_with_decode": round(total_s, 3) if vae is not None else None,
            "peak_memory_gib": peak_gib(device)}  # fmt: skip


def part_encoders(sizes: Sizes, device: torch.device, vae: Any, vae_error: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {"vae": vae_error or guarded(lambda: vae_speed(vae, sizes, device))}
    t5 = guarded(lambda: RandomTokenT5(sizes.t5, sizes, device))
    if isinstance(t5, dict):
        out["t5"] = t5
        return out
    out["t5"] = guarded(lambda: t5_speed(t5, sizes, device))
    out["sampling"] = guarded(lambda: sampling_speed(sizes, device, t5, vae))
    return out


# ----------------------------------------------------------------------------------------------
# Part 4: fit
# ----------------------------------------------------------------------------------------------


def part_fit(sizes: Sizes, device: torch.device, use_deepspeed: bool, vae: Any) -> dict[str, Any]:
    """Largest micro-batch at `fit_shape` with gradient checkpointing (as Open-Sora's v1.2 stages
    train): doubling until out of memory, then bisecting, one real step per trial. After an
    out-of-memory error the model and optimizer are built again: a step cut short can leave
    DeepSpeed's gradient buckets half filled."""
    pixels = sizes.shapes[sizes.fit_shape]
    deadline = time.perf_counter() + sizes.fit_budget_s
    trials: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    def trainer() -> Trainer:
        if "trainer" not in state:
            model = new_model(sizes.model, sizes, device, grad_checkpoint=True)
            state["trainer"] = Trainer(model, dtype="bf16", device=device, micro_batch=1,
                                       use_deepspeed=use_deepspeed)  # fmt: skip
            state["impl"] = state["trainer"].impl
        return state["trainer"]

    def fits(batch: int) -> bool:
        step = trainer()
        x, args = model_inputs(sizes, pixels, batch, device, vae)
        reset_peak(device)
        start = time.perf_counter()
        try:
            step.step(x, args)
            sync(device)
        except RuntimeError as err:
            if not is_oom(err):
                raise
            trials.append({"batch_size": batch, "fits": False, "error": str(err).splitlines()[0][:160]})
            return False
        trials.append({"batch_size": batch, "fits": True, "step_s": round(time.perf_counter() - start, 3),
                       "peak_memory_gib": peak_gib(device)})  # fmt: skip
        return True

    def attempt(batch: int) -> bool:
        ok = fits(batch)
        if not ok:
            state.pop("trainer", None)
            free_device_memory()
            reset_peak(device)
        return ok

    good, bad = 0, None
    batch = 1
    while batch <= sizes.fit_max_batch and time.perf_counter() < deadline:
        if not attempt(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > 1 and time.perf_counter() < deadline:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if attempt(mid) else (good, mid)
    converged = (bad is not None and bad - good <= 1) or (bad is None and good * 2 > sizes.fit_max_batch)
    return {
        "shape": sizes.fit_shape, "impl": state.get("impl"), "grad_checkpoint": True,
        "max_batch_size": good, "first_oom_batch_size": bad, "searched_to_convergence": converged,
        "search_cap": sizes.fit_max_batch, "trials": trials,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def guarded(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or {"error": ...} with the last lines of the traceback: one part never stops the rest."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the run goes on
        tb = traceback.format_exc().strip().splitlines()
        log.warning("%s: %s", type(err).__name__, err)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:400] if str(err) else ''}",
                "where": tb[-3:-1]}  # fmt: skip
    finally:
        free_device_memory()


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures: ratio (fast path vs fallback step time) and the throughput at 51x240p."""
    paths = report.get("paths", {})
    check = paths.get("fast_vs_fallback", {}) if isinstance(paths, dict) else {}
    train = report.get("train", {}).get("51x240p", {}) if isinstance(report.get("train"), dict) else {}
    best = train.get("no_grad_checkpoint", {}) if isinstance(train, dict) else {}
    return {
        "ratio": check.get("speedup_fast_vs_fallback"),
        "ratio_covers": "step time of the fallback (fp32, SDPA math) / the fast path (bf16, flash kernels), "
        "same model, inputs and seeds",
        "tokens_per_s_per_gpu": best.get("tokens_per_s_per_gpu") if isinstance(best, dict) else None,
        "mfu": best.get("mfu") if isinstance(best, dict) else None,
        "max_batch_size_51x240p": (report.get("fit") or {}).get("max_batch_size")
        if isinstance(report.get("fit"), dict) else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test runs)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes too")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget: a part that would start with under 20 s left is skipped, "
                        "and the batch-size search stops in time")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    out_file = args.out or (
        Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("bench_gpu.json")
    )

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    sizes = DRY if args.dry_run else REAL
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # what a launcher sets; DeepSpeed reads them
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_deepspeed = has("deepspeed")
    report: dict[str, Any] = {"bench": "gpu", "dry_run": args.dry_run, **device_facts(device),
                              "packages": {p: has(p) for p in ("deepspeed", "diffusers", "flash_attn", "apex",
                                                                "mmengine", "transformers")}}  # fmt: skip
    started = time.perf_counter()

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps({**headline(report), **report}) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        workdir = Path(tmp)
        report["process_group"] = guarded(lambda: process_group(device, workdir))  # DeepSpeed joins it
        vae, vae_error = None, missing("diffusers", "the v1.2 VAE (its SDXL image VAE)")
        if has("diffusers") and ({"encoders", "train", "fit"} & set(parts)):
            vae = guarded(lambda: build_vae(sizes, device, workdir, args.dry_run))
            vae, vae_error = (None, vae) if isinstance(vae, dict) else (vae, None)
        timings: dict[str, float] = {}
        report["part_s"] = timings
        deadline = started + args.budget_s
        for part in parts:
            left = deadline - time.perf_counter()
            if left < 20:
                report[part] = {"skipped": f"--budget-s {args.budget_s:g} spent before this part"}
                continue
            log.info("part %s (%.0f s of the budget left)", part, left)
            part_start = time.perf_counter()
            if part == "paths":
                report[part] = part_paths(sizes, device, use_deepspeed)
            elif part == "train":
                report[part] = guarded(lambda: part_train(sizes, device, report["bf16_peak_flops"],
                                                          use_deepspeed, vae))  # fmt: skip
            elif part == "encoders":
                report[part] = part_encoders(sizes, device, vae, vae_error)
            elif part == "fit":
                fit_sizes = replace(sizes, fit_budget_s=min(sizes.fit_budget_s, left - 15))
                report[part] = guarded(lambda s=fit_sizes: part_fit(s, device, use_deepspeed, vae))
            timings[part] = round(time.perf_counter() - part_start, 1)
            report["part_s"] = timings
            save()
        if dist.is_initialized():
            dist.destroy_process_group()
    save()
    line = out_file.read_text().strip()
    print(line, flush=True)
    return json.loads(line)


if __name__ == "__main__":
    main()
