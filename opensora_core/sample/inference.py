"""`opensora sample`: prompts from the config or CLI → videos/images named the way Open-Sora names them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from opensora_core.config import ValidatedConfig
from opensora_core.errors import ConfigError

log = logging.getLogger(__name__)


def load_prompts(cfg: ValidatedConfig) -> list[str]:
    """`prompt` takes priority over `prompt_path` (one prompt per non-empty line)."""
    raw = cfg.raw
    if raw.get("prompt"):
        prompts = [raw.prompt] if isinstance(raw.prompt, str) else list(raw.prompt)
    elif raw.get("prompt_path"):
        path = Path(raw.prompt_path)
        if not path.is_file():
            raise ConfigError(
                f"prompt_path={raw.prompt_path!r}: file not found; give --prompt or an existing file"
            )
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ConfigError("prompt / prompt_path: neither is set; pass --prompt TEXT or --prompt-path FILE")
    start = raw.get("start_index") or 0
    end = raw.get("end_index")
    return prompts[start:end]


def sample_path(
    save_dir: str | Path,
    index: int,
    *,
    prompt: str,
    sample_name: str | None = None,
    prompt_as_path: bool = False,
    num_sample: int = 1,
    k: int = 0,
) -> Path:
    """`sample_{index:04d}`, `{sample_name}_{index:04d}`, or the prompt itself; `-k` when num_sample > 1."""
    if prompt_as_path:
        stem = f"{sample_name or ''}{prompt[:50]}".replace("/", "_")
    else:
        stem = f"{sample_name or 'sample'}_{index:04d}"
    if num_sample != 1:
        stem = f"{stem}-{k}"
    return Path(save_dir) / stem


def image_size(cfg: ValidatedConfig) -> tuple[int, int]:
    from opensora_core.data.aspect import get_image_size

    s = cfg.sampling
    if s.image_size is not None:
        return s.image_size
    return tuple(get_image_size(s.resolution, s.aspect_ratio))  # type: ignore[return-value]


def run_inference(cfg: ValidatedConfig) -> Iterator[Path]:
    """Generate every prompt (× num_sample) in batches of batch_size; yields the written files."""
    from opensora_core.sample.generate import build_components, generate
    from opensora_core.sample.writer import save_sample

    raw, s = cfg.raw, cfg.sampling
    for key in ("reference_path", "mask_strategy"):
        if raw.get(key) and any(v not in (None, "", "None") for v in raw[key]):
            raise ConfigError(f"{key}: conditioning on references is not available in this build yet")
    if (raw.get("loop") or 1) > 1:
        raise ConfigError(f"loop={raw.loop}: long-video looping is not available in this build yet")
    prompts = load_prompts(cfg)
    num_frames = s.num_frames or 1
    size = image_size(cfg)
    num_sample = raw.get("num_sample") or 1
    save_fps = s.save_fps or max(1, s.fps // s.frame_interval)
    start_index = raw.get("start_index") or 0
    parts = build_components(cfg)
    jobs = [(start_index + i, prompt, k) for i, prompt in enumerate(prompts) for k in range(num_sample)]
    for first in range(0, len(jobs), s.batch_size):
        batch = jobs[first : first + s.batch_size]
        videos = generate(
            parts,
            [prompt for _, prompt, _ in batch],
            num_frames=num_frames,
            image_size=size,
            fps=s.fps,
            seed=s.seed + first,
        )
        for (index, prompt, k), video in zip(batch, videos, strict=True):
            path = sample_path(
                s.save_dir,
                index,
                prompt=prompt,
                sample_name=raw.get("sample_name"),
                prompt_as_path=bool(raw.get("prompt_as_path")),
                num_sample=num_sample,
                k=k,
            )
            yield save_sample(video, path, fps=save_fps)
