"""Checkpoint evaluation: sample the config's fixed prompts from one checkpoint and record them.

Besides each checkpoint's videos, every prompt gets one image strip: a frame of its sample from each
checkpoint evaluated so far, labelled with the step, so a run's progress reads left to right at a glance.
The strips are rebuilt from the samples on disk after each checkpoint and logged again over the last.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from opensora_core import tracking
from opensora_core.config import ValidatedConfig
from opensora_core.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a red square drifts left over a blue gradient"]


@dataclass
class EvalResult:
    checkpoint: str
    global_step: int
    samples: list[str] = field(default_factory=list)
    sampling_seconds: float = 0.0


@dataclass(frozen=True)
class EvalSettings:
    """Fixed evaluation settings read from a training config's `eval_*` keys."""

    prompts: list[str]
    image_size: tuple[int, int]
    num_frames: int
    fps: int
    seed: int

    @classmethod
    def from_config(cfg: type, config: ValidatedConfig) -> EvalSettings:
        from opensora_core.data.aspect import get_image_size, get_num_frames

        raw = config.raw
        prompts = list(raw.get("eval_prompts") or DEFAULT_PROMPTS)
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError("eval_prompts: expected a list of non-empty strings")
        if raw.get("eval_image_size") is not None:
            image_size = tuple(int(v) for v in raw.eval_image_size)
        else:
            image_size = tuple(
                get_image_size(raw.get("eval_resolution", "144p"), raw.get("eval_aspect_ratio", "9:16"))
            )
        return cfg(
            prompts=prompts,
            image_size=image_size,  # type: ignore[arg-type]
            num_frames=get_num_frames(raw.get("eval_num_frames", 17)),
            fps=int(raw.get("eval_fps", 24)),
            seed=int(raw.get("eval_seed", 1024)),
        )


def checkpoint_step(checkpoint: Path) -> int:
    """global_step from running_states.json, else from the `epochE-global_stepG` directory name."""
    states = checkpoint / "running_states.json"
    if states.is_file():
        return int(json.loads(states.read_text())["global_step"])
    match = re.search(r"global_step(\d+)", checkpoint.name)
    if match is None:
        raise CheckpointError(f"{checkpoint}: not a checkpoint directory (no running_states.json)")
    return int(match.group(1))


def checkpoint_weights(checkpoint: Path) -> Path:
    """EMA weights when the checkpoint has them (Open-Sora samples from EMA), else the model's."""
    for name in ("ema.safetensors", "model.safetensors"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise CheckpointError(
        f"{checkpoint}: no ema.safetensors or model.safetensors; is it a complete checkpoint?"
    )


def evaluate_checkpoint(
    config: ValidatedConfig,
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    mlflow_run_id: str | None = None,
    progress: bool = True,
    on_sample: Callable[[int], None] | None = None,
) -> EvalResult:
    """Sample every eval prompt from `checkpoint` into `output_dir/step_{G}/`, log them under step G.

    `progress` draws a bar over each sample's steps; `on_sample(1)` is called after each sample instead
    when the caller draws one bar over all of them."""
    from opensora_core.features.lineage import sampling_config
    from opensora_core.sample.generate import build_components, generate
    from opensora_core.sample.writer import save_sample

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint directory does not exist")
    step = checkpoint_step(checkpoint)
    settings = EvalSettings.from_config(config)
    # a config that trains from features may name no VAE / text encoder: sampling takes the features'
    parts = build_components(sampling_config(config), model_weights=str(checkpoint_weights(checkpoint)))
    out_dir = Path(output_dir) / f"step_{step:06d}"
    result = EvalResult(checkpoint=str(checkpoint), global_step=step)
    start = time.perf_counter()
    for index, prompt in enumerate(settings.prompts):
        video = generate(
            parts,
            [prompt],
            num_frames=settings.num_frames,
            image_size=settings.image_size,
            fps=settings.fps,
            seed=settings.seed + index,
            progress=progress and on_sample is None,
        )
        path = save_sample(video[0], out_dir / f"sample_{index:04d}", fps=settings.fps)
        result.samples.append(str(path))
        if on_sample is not None:
            on_sample(1)
    result.sampling_seconds = time.perf_counter() - start
    (out_dir / "prompts.json").write_text(json.dumps(settings.prompts, indent=2))
    if mlflow_run_id:
        log_eval_result(mlflow_run_id, result, write_strips(output_dir, settings.prompts))
    log.info("evaluated %s: %d samples in %.1fs", checkpoint, len(result.samples), result.sampling_seconds)
    return result


def log_eval_result(run_id: str, result: EvalResult, strips: Sequence[Path] = ()) -> None:
    """Samples under eval/step_{G} and the sampling time at step G, so runs line up by step in MLflow;
    the prompts' strips under eval/strips (replacing the previous checkpoint's)."""
    step = result.global_step
    for path in result.samples:
        tracking.log_artifact(run_id, path, artifact_path=f"eval/step_{step:06d}")
    for path in strips:
        tracking.log_artifact(run_id, path, artifact_path=STRIPS_DIR)
    tracking.log_metrics(
        run_id,
        {"eval/sampling_seconds": result.sampling_seconds, "eval/num_samples": len(result.samples)},
        step=step,
    )


def find_checkpoints(path: str | Path) -> list[Path]:
    """`path` itself if it is a checkpoint, else the complete `epoch*-global_step*` checkpoints in it
    (a training run's exp dir), in global-step order. A URI's checkpoints are fetched to local disk."""
    from opensora_core.storage import pathlike
    from opensora_core.train.checkpoint import RUNNING_STATES, fetch_checkpoint

    where = pathlike(path)
    if (where / RUNNING_STATES).is_file():
        return [fetch_checkpoint(where)]
    found = [c for c in where.glob("epoch*-global_step*") if (c / RUNNING_STATES).is_file()]
    if not found:
        raise CheckpointError(
            f"{where}: neither a checkpoint nor a run directory with epoch*-global_step* checkpoints"
        )
    return sorted((fetch_checkpoint(c) for c in found), key=checkpoint_step)


def evaluate_checkpoints(
    config: ValidatedConfig,
    path: str | Path,
    output_dir: str | Path,
    *,
    mlflow_run_ids: Sequence[str] = (),
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate every checkpoint `find_checkpoints(path)` finds; each result goes to every given run, with
    the prompts' strips as they stand after it. `progress`: one bar over all the samples."""
    from opensora_core.console import counting

    results = []
    checkpoints = find_checkpoints(path)
    prompts = EvalSettings.from_config(config).prompts
    with counting("evaluate", len(checkpoints) * len(prompts), unit="samples", enabled=progress) as advance:
        for checkpoint in checkpoints:
            result = evaluate_checkpoint(config, checkpoint, output_dir, progress=False, on_sample=advance)
            strips = write_strips(output_dir, prompts) if mlflow_run_ids else []
            for run_id in mlflow_run_ids:
                log_eval_result(run_id, result, strips)
            results.append(result)
    return results


# ---------------------------------------------------------------- one strip per prompt

STRIPS_DIR = "eval/strips"  # in MLflow; on disk `<output_dir>/strips`
STRIP_HEIGHT = 160  # px of each frame in a strip: small sizes are scaled up to be seen, large ones down
_GAP, _LABEL = 4, 22  # px between frames, and of the label band above them


def strip_image(frames: Sequence[np.ndarray], labels: Sequence[str], title: str = "") -> Image.Image:
    """Frames ([H, W, 3] uint8, any sizes) side by side at STRIP_HEIGHT, each under its label, under a
    title line; white background. Pure: no files."""
    from PIL import Image, ImageDraw, ImageFont

    if not frames or len(frames) != len(labels):
        raise ValueError(f"strip_image: {len(frames)} frames for {len(labels)} labels")
    font = ImageFont.load_default(size=14)
    tiles = []
    for frame in frames:
        height, width = frame.shape[:2]
        size = (max(1, round(width * STRIP_HEIGHT / height)), STRIP_HEIGHT)
        tiles.append(
            Image.fromarray(np.ascontiguousarray(frame[..., :3])).resize(size, Image.Resampling.NEAREST)
        )
    top = _LABEL * (2 if title else 1)
    width = sum(t.width for t in tiles) + _GAP * (len(tiles) + 1)
    strip = Image.new("RGB", (width, top + STRIP_HEIGHT + _GAP), "white")
    draw = ImageDraw.Draw(strip)
    if title:
        draw.text((_GAP, 3), title, fill="black", font=font)
    x = _GAP
    for tile, label in zip(tiles, labels, strict=True):
        draw.text((x, top - _LABEL + 3), label, fill="black", font=font)
        strip.paste(tile, (x, top))
        x += tile.width + _GAP
    return strip


def sample_frame(path: str | Path) -> np.ndarray:
    """The middle frame of a saved sample (an .mp4, or a .png for one frame) as [H, W, 3] uint8."""
    import av

    from opensora_core.data.video_io import is_image_path, read_image

    if is_image_path(path):
        return read_image(path)[0]
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise CheckpointError(f"{path}: a sample with no frames")
    return frames[len(frames) // 2]


def write_strips(output_dir: str | Path, prompts: Sequence[str]) -> list[Path]:
    """`<output_dir>/strips/prompt_{i}.png` for each prompt: its sample's middle frame from every
    `step_*` directory that sampled that prompt (by its `prompts.json`), in step order."""
    output_dir = Path(output_dir)
    steps = sorted(output_dir.glob("step_*"), key=lambda d: d.name)
    written = []
    for index, prompt in enumerate(prompts):
        frames, labels = [], []
        for step_dir in steps:
            sample = _sample_of(step_dir, prompt)
            if sample is not None:
                frames.append(sample_frame(sample))
                labels.append(f"step {int(step_dir.name.removeprefix('step_'))}")
        if not frames:
            continue
        path = output_dir / "strips" / f"prompt_{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        strip_image(frames, labels, title=prompt if len(prompt) <= 100 else prompt[:97] + "...").save(path)
        written.append(path)
    return written


def _sample_of(step_dir: Path, prompt: str) -> Path | None:
    """The sample file of `prompt` in one step's directory, if that evaluation had the prompt."""
    prompts_file = step_dir / "prompts.json"
    if not prompts_file.is_file():
        return None
    prompts = json.loads(prompts_file.read_text())
    if prompt not in prompts:
        return None
    found = sorted(step_dir.glob(f"sample_{prompts.index(prompt):04d}.*"))
    return found[0] if found else None
