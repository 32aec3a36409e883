"""`opensora sample`: prompts from the config or CLI → videos/images named the way Open-Sora names them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from opensora_core.config import ValidatedConfig
from opensora_core.console import counting
from opensora_core.errors import ConfigError
from opensora_core.sample.mask_strategy import (
    LOOP_MARK,
    is_empty,
    loop_prompts,
    parse_mask_strategy,
    parse_reference_paths,
    split_prompt_json,
)

if TYPE_CHECKING:
    from opensora_core.sample.long_video import Condition

log = logging.getLogger(__name__)


def load_prompts(cfg: ValidatedConfig) -> list[str]:
    """`prompt` takes priority over `prompt_path` (one prompt per non-empty line).

    As in Open-Sora, start_index / end_index select lines of the prompt file; prompts given
    directly are all sampled and start_index only offsets their names.
    """
    raw = cfg.raw
    if raw.get("prompt"):
        return [raw.prompt] if isinstance(raw.prompt, str) else list(raw.prompt)
    if not raw.get("prompt_path"):
        raise ConfigError("prompt / prompt_path: neither is set; pass --prompt TEXT or --prompt-path FILE")
    path = Path(raw.prompt_path)
    if not path.is_file():
        raise ConfigError(
            f"prompt_path={raw.prompt_path!r}: file not found; give --prompt or an existing file"
        )
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    start, end = raw.get("start_index") or 0, raw.get("end_index")
    selected = prompts[start:end]
    if not selected:
        raise ConfigError(
            f"start_index={start}, end_index={end}: select no prompt of the {len(prompts)} in {path}"
        )
    return selected


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


def per_prompt_values(cfg: ValidatedConfig, key: str, count: int) -> list[str | None]:
    """`reference_path` / `mask_strategy`: one entry per prompt (None allowed), or unset."""
    value = cfg.raw.get(key)
    if value is None:
        return [None] * count
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != count:
        raise ConfigError(
            f"{key}: {len(values)} entries for {count} prompt(s); give one per prompt (None for no condition)"
        )
    return [None if is_empty(v) else str(v) for v in values]


def prompt_conditions(
    cfg: ValidatedConfig, prompts: list[str], *, first_index: int = 0
) -> tuple[list[str], list[Condition]]:
    """Strip JSON appended to each prompt and build each prompt's Condition (JSON overrides the config)."""
    from opensora_core.sample.long_video import Condition, check_reference_paths

    references = per_prompt_values(cfg, "reference_path", len(prompts))
    strategies = per_prompt_values(cfg, "mask_strategy", len(prompts))
    texts, conditions = [], []
    for i, prompt in enumerate(prompts):
        text, extra = split_prompt_json(prompt, prompt_index=first_index + i)
        reference = extra.get("reference_path", references[i])
        strategy = parse_mask_strategy(
            extra.get("mask_strategy", strategies[i]), prompt_index=first_index + i
        )
        paths = parse_reference_paths(reference)
        if paths and not strategy:
            strategy = parse_mask_strategy("0")  # Open-Sora's default: the reference's first frame first
        texts.append(text)
        conditions.append(Condition(reference_paths=paths, strategy=strategy))
    check_reference_paths(conditions, first_index=first_index)
    return texts, conditions


def append_scores(prompt: str, cfg: ValidatedConfig) -> str:
    """Open-Sora's score suffixes (aes / flow / camera_motion), each only if the prompt lacks it."""
    raw = cfg.raw
    for key, template in (
        ("aes", " aesthetic score: {:.1f}."),
        ("flow", " motion score: {:.1f}."),
        ("camera_motion", " camera motion: {}."),
    ):
        value = raw.get(key)
        marker = template.split(":")[0].strip()
        if value is not None and marker not in prompt:
            prompt = prompt.rstrip() + template.format(value)
    return prompt


def prompt_with_scores(prompt: str, cfg: ValidatedConfig) -> str:
    """`append_scores` on the prompt, or on each `|i|` loop segment of it."""
    segments = loop_prompts(prompt)
    if not LOOP_MARK.search(prompt):
        return append_scores(prompt, cfg)
    return " ".join(f"|{i}| {append_scores(text, cfg)}" for i, text in sorted(segments.items()))


def run_inference(cfg: ValidatedConfig) -> Iterator[Path]:
    """Generate every prompt (x num_sample) in batches of batch_size; yields the written files."""
    from opensora_core.sample.generate import build_components
    from opensora_core.sample.long_video import generate_long, has_temporal_compression
    from opensora_core.sample.writer import save_sample

    raw, s = cfg.raw, cfg.sampling
    for key in ("llm_refine", "prompt_generator", "watermark"):
        if raw.get(key):
            log.warning("%s=%r: not available in this build; ignored", key, raw[key])
    start_index = raw.get("start_index") or 0
    texts, conditions = prompt_conditions(cfg, load_prompts(cfg), first_index=start_index)
    num_frames = s.num_frames or 1
    size = image_size(cfg)
    num_sample = raw.get("num_sample") or 1
    loop = raw.get("loop") or 1
    if loop < 1:
        raise ConfigError(f"loop={loop}: must be >= 1")
    save_fps = s.save_fps or max(1, s.fps // s.frame_interval)
    parts = build_components(cfg)
    # `align` snaps insertion points to the v1.2 VAE's latent chunks; with the frame-wise KL VAE
    # every latent frame is a pixel frame and there is nothing to snap to.
    align = raw.get("align") if has_temporal_compression(parts.vae) else None
    jobs = [(start_index + i, i, k) for i in range(len(texts)) for k in range(num_sample)]
    with counting("sampling", len(jobs), unit="videos", enabled=bool(raw.get("verbose", 1))) as advance:
        for first in range(0, len(jobs), s.batch_size):
            batch = jobs[first : first + s.batch_size]
            result = generate_long(
                parts,
                [prompt_with_scores(texts[i], cfg) for _, i, _ in batch],
                [conditions[i] for _, i, _ in batch],
                num_frames=num_frames,
                image_size=size,
                fps=s.fps,
                seed=s.seed + first,
                loop=loop,
                condition_frame_length=int(raw.get("condition_frame_length", 5)),
                condition_frame_edit=float(raw.get("condition_frame_edit", 0.0)),
                align=align,
                progress=False,  # one bar over the videos instead of one per batch
            )
            for (index, i, k), video in zip(batch, result.video, strict=True):
                path = sample_path(
                    s.save_dir,
                    index,
                    prompt=texts[i],
                    sample_name=raw.get("sample_name"),
                    prompt_as_path=bool(raw.get("prompt_as_path")),
                    num_sample=num_sample,
                    k=k,
                )
                yield save_sample(video, path, fps=save_fps)
                advance(1)
