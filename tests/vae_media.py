"""Tiny media for the VAE tests: two short clips, one image and one corrupt file, plus tiny random
VAE and LPIPS weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from opensora_core.data.demo_data import write_video
from opensora_core.models.tiny_random import TinyPretrained, create_tiny_lpips, create_tiny_pretrained

CLIP_FRAMES = 10


@dataclass(frozen=True)
class VaeMedia:
    media: Path
    corrupt: Path
    pretrained: TinyPretrained
    lpips: Path


def write_vae_media(root: Path) -> VaeMedia:
    rng = np.random.default_rng(0)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 200, 40)[None, None, :, None]
    for i in range(2):
        noise = rng.integers(0, 40, (CLIP_FRAMES, 40, 40, 3))
        write_video(media / f"clip{i}.mp4", np.clip(ramp + noise, 0, 255).astype(np.uint8), 24)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(media / "still.png")
    corrupt = media / "broken.mp4"
    corrupt.write_bytes(b"not a video")
    return VaeMedia(
        media,
        corrupt,
        create_tiny_pretrained(root / "pretrained"),
        create_tiny_lpips(root / "lpips.safetensors"),
    )
