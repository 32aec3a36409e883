"""Reference-conditioned and long-video sampling: load `reference_path` media into latents, apply
each prompt's `mask_strategy`, and loop generations that continue from the previous clip's end.

Latent frames vs pixel frames: the KL VAE works frame by frame, so one latent frame is one pixel
frame and `condition_frame_length` counts both. Open-Sora's v1.2 VAE maps each 17-frame chunk to 5
latent frames; `pixel_frames` is the one place that mapping lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from opensora_core.errors import ConfigError, MediaError
from opensora_core.sample.generate import Components, denoise, initial_noise
from opensora_core.sample.mask_strategy import MaskOp, apply_mask_strategy, loop_prompts, prompt_for_loop


@dataclass
class Condition:
    """One sample's conditioning: reference files (index = position) and the insertions to make."""

    reference_paths: list[str] = field(default_factory=list)
    strategy: list[MaskOp] = field(default_factory=list)


@dataclass
class LongVideo:
    """Stitched pixels [B, 3, T, H, W] in [-1, 1], each loop's final latents, and the reference latents."""

    video: Tensor
    latents: list[Tensor]
    references: list[list[Tensor]]


def has_temporal_compression(vae: object) -> bool:
    return getattr(vae, "patch_size", (1,))[0] != 1


def pixel_frames(vae: object, latent_frames: int) -> int:
    """Pixel frames covered by `latent_frames`: the same number for the frame-wise KL VAE, whole
    chunks for a chunked temporal VAE (v1.2: 5 latent -> 17 pixel frames, as Open-Sora's dframe_to_frame)."""
    if not has_temporal_compression(vae):
        return latent_frames
    latent_chunk = getattr(vae, "micro_z_frame_size", None)
    pixel_chunk = getattr(vae, "micro_frame_size", None)
    if latent_chunk is None or pixel_chunk is None:
        raise ConfigError(
            f"vae: {type(vae).__name__} without micro_frame_size has no fixed pixel length per latent frame; "
            "set vae.micro_frame_size (17 for OpenSoraVAE_V1_2)"
        )
    if latent_frames % latent_chunk:
        raise ConfigError(
            f"condition_frame_length={latent_frames}: must be a multiple of {latent_chunk} latent frames "
            f"(one {pixel_chunk}-frame VAE chunk) with {type(vae).__name__}"
        )
    return latent_frames // latent_chunk * pixel_chunk


def read_reference(path: str | Path, image_size: tuple[int, int]) -> Tensor:
    """An image or every frame of a video, resized and center-cropped to `image_size`: [3, T, H, W] in [-1, 1]."""
    from opensora_core.data.transforms import apply_transform
    from opensora_core.data.video_io import is_image_path, read_image

    path = Path(path)
    frames = read_image(path) if is_image_path(path) else _read_all_frames(path)
    return apply_transform(frames, image_size, "resize_crop")


def _read_all_frames(path: Path) -> np.ndarray:
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as err:  # PyAV raises many types for unreadable files
        raise MediaError(f"{path}: cannot decode reference video: {type(err).__name__}: {err}") from None
    if not frames:
        raise MediaError(f"{path}: reference video has no frames")
    return np.stack(frames)


def check_reference_paths(conditions: list[Condition], *, first_index: int = 0) -> None:
    """Every reference file exists, so a typo fails before any sampling starts."""
    for i, condition in enumerate(conditions):
        for path in condition.reference_paths:
            if not Path(path).is_file():
                raise ConfigError(
                    f"prompt {first_index + i}: reference_path {path!r} does not exist; "
                    "give a local image or video file"
                )


@torch.no_grad()
def encode_pixels(parts: Components, video: Tensor, generator: torch.Generator) -> Tensor:
    """Pixels [B, 3, T, H, W] -> latents [B, C, T', h, w] on the sampling device."""
    return parts.vae.encode(video.to(device=parts.device, dtype=parts.dtype), generator=generator)


@torch.no_grad()
def generate_long(
    parts: Components,
    prompts: list[str],
    conditions: list[Condition] | None = None,
    *,
    num_frames: int,
    image_size: tuple[int, int],
    fps: int,
    seed: int,
    loop: int = 1,
    condition_frame_length: int = 5,
    condition_frame_edit: float = 0.0,
    align: int | None = None,
    progress: bool = True,
) -> LongVideo:
    """`loop` generations, each continuing from the last `condition_frame_length` latent frames of the
    previous one, stitched to loop * (num_frames - condition_frame_length) + condition_frame_length frames.

    With loop=1 and no conditions this draws the same samples as `generate` for the same seed.
    """
    conditions = conditions or [Condition() for _ in prompts]
    if len(conditions) != len(prompts):
        raise ValueError(f"{len(conditions)} conditions for {len(prompts)} prompts")
    latent_frames = parts.vae.get_latent_size((num_frames, *image_size))[0]
    if loop > 1 and not 0 < condition_frame_length < latent_frames:
        raise ConfigError(
            f"condition_frame_length={condition_frame_length}: must be between 1 and "
            f"{latent_frames - 1} (num_frames={num_frames} gives {latent_frames} latent frames) when loop > 1"
        )
    overlap = pixel_frames(parts.vae, condition_frame_length) if loop > 1 else 0  # checked before sampling
    generator = torch.Generator(device="cpu").manual_seed(seed)
    encoder_generator = torch.Generator(device="cpu").manual_seed(seed)
    references = [
        [
            encode_pixels(parts, read_reference(p, image_size)[None], encoder_generator)[0]
            for p in c.reference_paths
        ]
        for c in conditions
    ]
    strategies = [list(c.strategy) for c in conditions]
    per_loop_prompts = [loop_prompts(p) for p in prompts]
    clips: list[Tensor] = []
    latents: list[Tensor] = []
    for loop_index in range(loop):
        if loop_index > 0:
            previous = encode_pixels(parts, clips[-1], encoder_generator)
            for i in range(len(prompts)):
                references[i].append(previous[i])
                strategies[i].append(
                    MaskOp(
                        loop=loop_index,
                        reference=len(references[i]) - 1,
                        reference_start=-condition_frame_length,
                        target_start=0,
                        length=condition_frame_length,
                        edit_rate=condition_frame_edit,
                    )
                )
        z = initial_noise(
            parts, len(prompts), num_frames=num_frames, image_size=image_size, generator=generator
        )
        mask = apply_mask_strategy(z, references, strategies, loop=loop_index, align=align)
        out = denoise(
            parts,
            z,
            [prompt_for_loop(p, loop_index) for p in per_loop_prompts],
            num_frames=num_frames,
            image_size=image_size,
            fps=fps,
            generator=generator,
            mask=mask,
            progress=progress,
        )
        latents.append(out)
        clips.append(parts.vae.decode(out.to(parts.dtype), num_frames=num_frames).float())
    video = torch.cat([clips[0]] + [clip[:, :, overlap:] for clip in clips[1:]], dim=2)
    return LongVideo(video=video, latents=latents, references=references)
