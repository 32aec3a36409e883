"""Write generated samples to disk: videos as H.264 mp4, single frames as png."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(sample: torch.Tensor) -> np.ndarray:
    """[C, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    if sample.ndim != 4 or sample.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] sample, got shape {tuple(sample.shape)}")
    x = sample.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def save_sample(sample: torch.Tensor, path: str | Path, *, fps: float = 24.0) -> Path:
    """Save one sample; `path` has no suffix: .png for one frame, .mp4 otherwise. Written atomically."""
    frames = to_uint8_frames(sample)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[0] == 1:
        from PIL import Image

        out = path.with_suffix(".png")
        tmp = out.with_name(f".{out.name}.tmp")
        Image.fromarray(frames[0]).save(tmp, format="PNG")
    else:
        out = path.with_suffix(".mp4")
        tmp = out.with_name(f".{out.name}.tmp")
        _write_mp4(frames, tmp, fps)
    os.replace(tmp, out)
    return out


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    from fractions import Fraction

    import av

    # yuv420p needs even sides: drop a trailing row/column rather than resample.
    t, h, w, _ = frames.shape
    frames = frames[:, : h - h % 2, : w - w % 2]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
