"""Benchmark: forward + backward of a small STDiT3 on CPU at a 240p latent, SDPA against plain attention.

The latent is what Open-Sora v1.2's VAE makes of a 17-frame 240p (240x426) clip: [4, 5, 30, 53]. The model
is STDiT3 with `--hidden-size` / `--depth` / `--num-heads` (small enough for a CPU), one sample, a
T5-sized caption. Ours: attention through torch's `scaled_dot_product_attention` (what the model uses).
Baseline: the same model with attention written out as softmax(q k^T / sqrt(d)) v, the path Open-Sora
takes when flash-attn is off. Each variant runs in its own process, so its peak RSS is its own.
`ratio` = baseline seconds per step / ours. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time

import torch
from torch.nn import functional as F

LATENT = (4, 5, 30, 53)  # channels, latent frames, height, width: 17 x 240 x 426 through the v1.2 VAE


def plain_attention(q, k, v, attn_mask=None, **_):
    """Attention with the score matrix written out, as Open-Sora's non-flash path computes it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def measure(variant: str, args: argparse.Namespace, out: multiprocessing.Queue) -> None:
    from opensora_core.models import kernels, stdit3

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if variant == "plain":
        kernels.F = _FunctionalWith(plain_attention)  # the attention kernel's view of torch.nn.functional
    model = stdit3.STDiT3(
        in_channels=LATENT[0],
        hidden_size=args.hidden_size,
        depth=args.depth,
        num_heads=args.num_heads,
        caption_channels=args.caption_channels,
        model_max_length=args.text_length,
    ).train()
    x = torch.randn(1, *LATENT)
    t = torch.tensor([500.0])
    y = torch.randn(1, 1, args.text_length, args.caption_channels)
    mask = torch.ones(1, args.text_length, dtype=torch.long)
    kwargs = dict(fps=torch.tensor([24.0]), height=torch.tensor([240.0]), width=torch.tensor([426.0]))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x, t, y, mask=mask, **kwargs).float().pow(2).mean().backward()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    params = sum(p.numel() for p in model.parameters())
    out.put({"variant": variant, "s_per_step": seconds, "peak_rss_mib": peak_kib / 1024, "params": params})


class _FunctionalWith:
    """torch.nn.functional with `scaled_dot_product_attention` replaced."""

    def __init__(self, sdpa) -> None:
        self._sdpa = sdpa

    def __getattr__(self, name: str):
        return self._sdpa if name == "scaled_dot_product_attention" else getattr(F, name)


def run(variant: str, args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=measure, args=(variant, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--caption-channels", type=int, default=4096)
    parser.add_argument("--text-length", type=int, default=300)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    ours = run("sdpa", args)
    baseline = run("plain", args)
    tokens = LATENT[1] * (LATENT[2] // 2) * (-(-LATENT[3] // 2))
    print(
        json.dumps(
            {
                "bench": "models",
                "ratio": round(baseline["s_per_step"] / ours["s_per_step"], 2),
                "sdpa_s_per_step": round(ours["s_per_step"], 3),
                "plain_s_per_step": round(baseline["s_per_step"], 3),
                "sdpa_peak_rss_mib": round(ours["peak_rss_mib"]),
                "plain_peak_rss_mib": round(baseline["peak_rss_mib"]),
                "model": f"STDiT3 hidden {args.hidden_size} depth {args.depth} heads {args.num_heads}",
                "params": ours["params"],
                "latent": list(LATENT),
                "tokens": tokens,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
