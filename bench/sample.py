"""Sampling speed: seconds per sampling step for a small STDiT3 at two sizes, and the overhead around
the model call.

Baseline ("bare"): the model called `steps` times in a plain Euler loop on prompt embeddings computed
beforehand, the least work sampling can do. Ours: `generate()` (text encoding, rflow sampling with
guidance and the timestep transform, VAE decode) and `opensora sample` end to end in this process
(config loading, building every component, writing the mp4). ratio = bare seconds / generate
seconds at the larger size, so 1.0 means no overhead around the model.

Usage: python bench/sample.py [--steps 4] [--hidden-size 64] [--depth 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def write_config(root: Path, tiny, args: argparse.Namespace) -> Path:
    lines = [
        f'_base_ = ["{REPO / "configs/opensora-v1-2/inference/sample.py"}"]',
        f"model = dict(hidden_size={args.hidden_size}, depth={args.depth}, num_heads=4, from_pretrained=None,"
        " enable_flash_attn=False, enable_layernorm_kernel=False)",
        f'vae = dict(_delete_=True, type="VideoAutoencoderKL", from_pretrained="{tiny.vae}", local_files_only=True)',
        f'text_encoder = dict(from_pretrained="{tiny.t5}", model_max_length=8, local_files_only=True)',
        f"scheduler = dict(num_sampling_steps={args.steps})",
        'dtype = "fp32"',
        f'save_dir = "{root / "samples"}"',
        "verbose = 0",
    ]
    path = root / "bench_cfg.py"
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def bare_loop(parts, prompt: str, *, num_frames: int, size: tuple[int, int], steps: int) -> float:
    """Seconds for `steps` guided model calls and Euler updates, nothing else."""
    from opensora_core.sample.generate import model_condition

    encoded = dict(parts.text_encoder.encode([prompt]))
    encoded["y"] = torch.cat([encoded["y"], parts.text_encoder.null(1).to(encoded["y"])], 0)
    args = {
        **encoded,
        **model_condition(
            1,
            num_frames=num_frames,
            height=size[0],
            width=size[1],
            fps=24,
            device=parts.device,
            dtype=parts.dtype,
        ),
    }
    latent = parts.vae.get_latent_size((num_frames, *size))
    z = torch.randn(1, parts.vae.out_channels, *latent, generator=torch.Generator().manual_seed(0))
    z = z.to(device=parts.device, dtype=parts.dtype)
    _sync()
    start = time.perf_counter()
    for i in range(steps):
        t = torch.full((2,), (1 - i / steps) * 1000.0, device=parts.device)
        pred = parts.model(torch.cat([z, z]), t, **args).chunk(2, dim=1)[0]
        cond, uncond = pred.chunk(2)
        z = z + (uncond + 7.0 * (cond - uncond)) / steps
    _sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import logging

    logging.disable(logging.WARNING)
    from opensora_core.cli import main as cli_main
    from opensora_core.config import load_config
    from opensora_core.models.tiny_random import create_tiny_pretrained
    from opensora_core.sample.generate import build_components, generate

    torch.manual_seed(0)
    prompt = "a red square drifts left"
    sizes = [(3, (64, 64)), (5, (96, 96))]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = create_tiny_pretrained(root / "weights")
        config = write_config(root, tiny, args)
        parts = build_components(load_config(config))
        per_size = {}
        for num_frames, size in sizes:
            kwargs = {"num_frames": num_frames, "image_size": size, "fps": 24}
            generate(parts, [prompt], seed=0, progress=False, **kwargs)  # warm-up
            ours, bare = [], []
            for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
                bare.append(bare_loop(parts, prompt, num_frames=num_frames, size=size, steps=args.steps))
                ours.append(
                    _timed(lambda kwargs=kwargs: generate(parts, [prompt], seed=0, progress=False, **kwargs))
                )
            per_size[f"{num_frames}x{size[0]}x{size[1]}"] = {
                "generate_seconds": round(min(ours), 4),
                "bare_seconds": round(min(bare), 4),
                "generate_seconds_per_step": round(min(ours) / args.steps, 5),
                "bare_seconds_per_step": round(min(bare) / args.steps, 5),
            }
        num_frames, size = sizes[-1]
        argv = ["sample", str(config), "--prompt", prompt, "--num-frames", str(num_frames)]
        argv += ["--image-size", str(size[0]), str(size[1]), "--seed", "0"]
        cli = min(_timed(lambda: cli_main(argv)) for _ in range(args.repeats))
    large = per_size[f"{num_frames}x{size[0]}x{size[1]}"]
    print(
        json.dumps(
            {
                "benchmark": "sample",
                "ratio": round(large["bare_seconds"] / large["generate_seconds"], 3),
                "baseline": "bare guided model-call loop on precomputed embeddings (larger size)",
                "ours": "generate(): text encoding + rflow sampling + VAE decode",
                "steps": args.steps,
                "model": {"hidden_size": args.hidden_size, "depth": args.depth},
                "sizes": per_size,
                "cli_seconds": round(cli, 4),
                "cli_overhead_seconds": round(cli - large["generate_seconds"], 4),
                "cli_ratio": round(large["bare_seconds"] / cli, 3),
                "device": str(parts.device),
                "threads": torch.get_num_threads(),
            }
        )
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
