"""Training overhead: steps/s of the same tiny STDiT3 and synthetic clips on three paths.

(a) baseline: a plain single-process PyTorch loop (VAE + T5 encode, rflow loss, AdamW with gradient
    clipping, EMA update: the same training recipe) in this process;
(b) ours: `opensora_core.train.train` (Ray Train + DeepSpeed, plugin zero2, gloo) with 1 worker (one
    rank: ZeRO-2 runs as stage 1, see `parallel.deepspeed_config.zero_stage`);
(c) ours with 2 workers (ZeRO-2 data parallel; the same micro-batch size per worker).

This machine is shared and its speed drifts by tens of percent within minutes, so the runs alternate:
plain, (b), plain, (b), ..., plain, (c), plain, and each of our runs is compared with the mean of the
plain loops just before and after it. ratio = the median over the `--rounds` runs of (b) of seconds
per step of (a) / seconds per step of (b) (the goal: >= 0.9); ratio_2_workers the same for (c), which
trains twice the samples per step.

Steps/s are measured after `--warmup` steps over `--steps` steps: for (b) and (c) from the wall-clock
timestamps of the MLflow metrics the loop logs every `--warmup` steps (so that logging is included, as
in a real run). Ray gives each worker one CPU (one torch thread), so the baseline runs on one thread
too. launch_to_first_step_s: from calling `train()` (what `opensora train` calls once its config is
loaded; the first run starts the local Ray) to the end of step 1, estimated as the time to the first
logged step minus the steady-state time of the steps before it.

Usage: python bench/train_overhead.py [--steps 200] [--warmup 5] [--rounds 5] [--hidden-size 64] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def training_config(pretrained: Any, args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    frames, size = args.num_frames, args.size
    return dict(
        model=dict(
            type="STDiT3-XL/2",
            hidden_size=args.hidden_size,
            depth=args.depth,
            num_heads=4,
            enable_flash_attn=False,
            enable_layernorm_kernel=False,
        ),
        vae=dict(type="VideoAutoencoderKL", from_pretrained=str(pretrained.vae), local_files_only=True),
        text_encoder=dict(
            type="t5", from_pretrained=str(pretrained.t5), model_max_length=8, local_files_only=True
        ),
        scheduler=dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal"),
        # the clips' shape; the batches are synthetic_data's, no media is read
        dataset=dict(type="VideoTextDataset", num_frames=frames, image_size=(size, size)),
        synthetic_data=dict(
            num_batches=total_steps * 2,
            batch_size=args.batch_size,
            num_frames=frames,
            height=size,
            width=size,
        ),
        dtype="fp32",
        plugin="zero2",
        grad_clip=1.0,
        lr=1e-4,
        ema_decay=0.99,
        seed=42,
        epochs=1,
        max_steps=total_steps,
        log_every=args.warmup,
        ckpt_every=0,
    )


def plain_loop(cfg: dict[str, Any], args: argparse.Namespace) -> float:
    """(a): seconds per step of a bare PyTorch loop over the same model, encoders, loss and data."""
    from opensora_core.data.batches import SyntheticClips
    from opensora_core.models.registry import build_model, build_text_encoder, build_vae
    from opensora_core.schedulers import build_scheduler
    from opensora_core.train.ema import create_ema, update_ema
    from opensora_core.train.step import CONDITION_KEYS

    torch.set_num_threads(1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    text_encoder = build_text_encoder(dict(cfg["text_encoder"]), device=torch.device("cpu"))
    vae = build_vae(dict(cfg["vae"])).eval().requires_grad_(False)
    model = build_model(
        dict(cfg["model"]),
        in_channels=vae.out_channels,
        caption_channels=text_encoder.output_dim,
        model_max_length=text_encoder.model_max_length,
    ).train()
    scheduler = build_scheduler(dict(cfg["scheduler"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    ema = create_ema(model)
    clips = SyntheticClips(**cfg["synthetic_data"], seed=cfg["seed"])
    batches = iter(clips)
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = next(batches)
        with torch.no_grad():
            x = vae.encode(batch["video"])
            model_args = dict(text_encoder.encode(list(batch["text"])))
        model_args.update({k: batch[k].float() for k in CONDITION_KEYS})
        loss = scheduler.training_losses(model, x, model_args)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        update_ema(ema, model, cfg["ema_decay"])
    return (time.perf_counter() - start) / args.steps


def ray_train(
    cfg: dict[str, Any], args: argparse.Namespace, root: Path, name: str, workers: int
) -> dict[str, float]:
    """(b) / (c): seconds per step after warm-up, and seconds from calling train() to the end of step 1."""
    import mlflow
    from mmengine import Config

    from opensora_core.train import train

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("train-overhead") or client.get_experiment(
        client.create_experiment("train-overhead")
    )
    run_id = client.create_run(experiment.experiment_id, run_name=name).info.run_id
    launched = time.time()
    train(
        Config(cfg),
        snapshot_dir=None,
        output_dir=str(root / name),
        mlflow_run_id=run_id,
        num_workers=workers,
        use_gpu=False,
    )
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    stamps = {m.step: m.timestamp / 1000 for m in history}
    first_logged, last = args.warmup, args.warmup + args.steps
    per_step = (stamps[last] - stamps[first_logged]) / args.steps
    # the loop's own step_time (data, forward, backward, optimizer; no logging or reporting)
    step_times = [m.value for m in client.get_metric_history(run_id, "step_time") if m.step > first_logged]
    return {
        "s_per_step": per_step,
        "loop_step_time_s": sum(step_times) / len(step_times),
        "launch_to_first_step_s": stamps[first_logged] - launched - (first_logged - 1) * per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="measured steps (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="1-worker runs, each between two plain loops")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="clip height and width in pixels")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the loop logs every --warmup steps)")

    import ray

    from opensora_core.models.tiny_random import create_tiny_pretrained

    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.environ.pop("RAY_ADDRESS", None)
        pretrained = create_tiny_pretrained(root / "pretrained")
        cfg = training_config(pretrained, args, args.warmup + args.steps)

        # plain, ours, plain, ours, ..., plain: each of our runs is compared with the plain loops just
        # before and after it, so the machine's drift (it is shared) falls on both sides alike
        plain = [plain_loop(cfg, args)]
        ours = []
        for i in range(args.rounds):
            # the first run starts the local Ray: its launch time is the one reported
            ours.append(ray_train(cfg, args, root, f"one-worker-{i}", 1))
            plain.append(plain_loop(cfg, args))
        two = ray_train(cfg, args, root, "two-workers", 2)
        plain.append(plain_loop(cfg, args))
        ray.shutdown()

    ratios = [(plain[i] + plain[i + 1]) / 2 / run["s_per_step"] for i, run in enumerate(ours)]
    plain_around_two = (plain[-2] + plain[-1]) / 2
    one = ours[ratios.index(statistics.median_low(ratios))]
    print(
        json.dumps(
            {
                "ratio": statistics.median(ratios),
                "ratio_per_round": ratios,
                "ratio_2_workers": plain_around_two / two["s_per_step"],
                "plain_steps_per_s": 1 / statistics.median(plain),
                "ray_deepspeed_1_worker_steps_per_s": 1 / one["s_per_step"],
                "ray_deepspeed_2_workers_steps_per_s": 1 / two["s_per_step"],
                "ray_deepspeed_2_workers_samples_per_s": 2 * args.batch_size / two["s_per_step"],
                "plain_samples_per_s": args.batch_size / statistics.median(plain),
                "launch_to_first_step_s": ours[0]["launch_to_first_step_s"],
                "plain_s_per_step": plain,
                "ray_1_worker_s_per_step": [run["s_per_step"] for run in ours],
                "ray_1_worker_loop_step_time_s": [run["loop_step_time_s"] for run in ours],
                "ray_2_workers_s_per_step": two["s_per_step"],
                "ray_2_workers_loop_step_time_s": two["loop_step_time_s"],
                "warmup_steps": args.warmup,
                "measured_steps": args.steps,
                "model": f"STDiT3 hidden {args.hidden_size} depth {args.depth}",
                "clips": f"{args.batch_size}x{args.num_frames}x{args.size}x{args.size}",
            }
        )
    )


if __name__ == "__main__":
    main()
