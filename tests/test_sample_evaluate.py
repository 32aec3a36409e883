"""Per-checkpoint evaluation: every checkpoint of a run is sampled and logged under its own step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from opensora_core.config import load_config
from opensora_core.errors import CheckpointError
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.sample import evaluate

REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(run_dir: Path, cfg, epoch: int, step: int) -> Path:
    from opensora_core.models.registry import build_model

    model = build_model(cfg.model.as_dict(), in_channels=4, caption_channels=32, model_max_length=8)
    checkpoint = run_dir / f"epoch{epoch}-global_step{step}"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint / "ema.safetensors")
    (checkpoint / "running_states.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def test_find_checkpoints_lists_complete_ones_in_step_order(tmp_path: Path) -> None:
    for name, complete in (
        ("epoch1-global_step12", True),
        ("epoch0-global_step3", True),
        ("epoch2-global_step20", False),
    ):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "running_states.json").write_text(
                json.dumps({"global_step": int(name.split("step")[1])})
            )
    (tmp_path / "eval").mkdir()
    found = evaluate.find_checkpoints(tmp_path)
    assert [p.name for p in found] == ["epoch0-global_step3", "epoch1-global_step12"]
    assert evaluate.find_checkpoints(found[1]) == [found[1]]


def test_find_checkpoints_in_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="epoch\\*-global_step\\* checkpoints"):
        evaluate.find_checkpoints(tmp_path)


def eval_config(tmp_path: Path) -> Path:
    tiny = create_tiny_pretrained(tmp_path / "weights")
    config = tmp_path / "train_cfg.py"
    config.write_text(
        f'_base_ = ["{REPO / "configs/opensora-v1-2/train/demo.py"}"]\n'
        "model = dict(hidden_size=32, depth=1, num_heads=2)\n"
        f'vae = dict(from_pretrained="{tiny.vae}")\n'
        f'text_encoder = dict(from_pretrained="{tiny.t5}", model_max_length=8)\n'
        'scheduler = dict(num_sampling_steps=2)\neval_prompts = ["one"]\neval_image_size = (64, 64)\n'
        "eval_num_frames = 3\n"
    )
    return config


def test_the_evaluate_command_samples_every_checkpoint_of_a_run_directory(tmp_path: Path, capsys) -> None:
    from opensora_core.cli import main as cli_main

    config = eval_config(tmp_path)
    write_checkpoint(tmp_path / "run", load_config(config), 0, 2)
    write_checkpoint(tmp_path / "run", load_config(config), 0, 5)
    assert cli_main(["evaluate", str(config), "--checkpoint", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / f"run/eval/step_00000{s}/sample_0000.mp4") for s in (2, 5)]


def test_every_checkpoint_is_sampled_and_logged_to_every_run_at_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(eval_config(tmp_path))
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir, cfg, 0, 4)
    write_checkpoint(run_dir, cfg, 1, 8)
    artifacts, metrics = [], []
    monkeypatch.setattr(
        evaluate.tracking,
        "log_artifact",
        lambda run, path, artifact_path: artifacts.append((run, artifact_path)),
    )
    monkeypatch.setattr(
        evaluate.tracking,
        "log_metrics",
        lambda run, values, step: metrics.append((run, step, sorted(values))),
    )

    results = evaluate.evaluate_checkpoints(
        cfg, run_dir, run_dir / "eval", mlflow_run_ids=["eval-run", "train-run"], progress=False
    )

    assert [r.global_step for r in results] == [4, 8]
    assert [Path(r.samples[0]).relative_to(run_dir).as_posix() for r in results] == [
        "eval/step_000004/sample_0000.mp4",
        "eval/step_000008/sample_0000.mp4",
    ]
    # each checkpoint's samples, then the prompt's strip again (now with one more frame)
    assert artifacts == [
        ("eval-run", "eval/step_000004"),
        ("eval-run", "eval/strips"),
        ("train-run", "eval/step_000004"),
        ("train-run", "eval/strips"),
        ("eval-run", "eval/step_000008"),
        ("eval-run", "eval/strips"),
        ("train-run", "eval/step_000008"),
        ("train-run", "eval/strips"),
    ]
    strip = Image.open(run_dir / "eval" / "strips" / "prompt_0000.png")
    assert strip.height == evaluate.STRIP_HEIGHT + 2 * 22 + 4  # title and label bands above the frames
    assert strip.width == 2 * evaluate.STRIP_HEIGHT + 3 * 4  # two 64x64 samples at the strip's height
    names = ["eval/num_samples", "eval/sampling_seconds"]
    assert metrics == [
        ("eval-run", 4, names),
        ("train-run", 4, names),
        ("eval-run", 8, names),
        ("train-run", 8, names),
    ]


def test_evaluate_never_runs_the_config_saved_in_a_checkpoint(tmp_path: Path) -> None:
    """A config is Python: the copy inside a checkpoint (possibly from elsewhere) is never loaded on its own."""
    from opensora_core.cli import main as cli_main

    config = eval_config(tmp_path)
    checkpoint = write_checkpoint(tmp_path / "run", load_config(config), 0, 2)
    marker = tmp_path / "config_in_checkpoint_ran"
    (checkpoint / "config.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert cli_main(["evaluate", str(config), "--checkpoint", str(checkpoint)]) == 0
    assert not marker.exists()


def test_a_strip_shows_each_checkpoint_s_frame_at_one_height_under_its_step():
    red = np.full((32, 48, 3), (255, 0, 0), np.uint8)
    blue = np.full((16, 16, 3), (0, 0, 255), np.uint8)
    strip = np.asarray(evaluate.strip_image([red, blue], ["step 2", "step 4"], title="a red square"))
    h = evaluate.STRIP_HEIGHT
    top = 2 * 22  # the title line and the labels
    assert strip.shape == (top + h + 4, 4 + h * 3 // 2 + 4 + h + 4, 3)
    assert (strip[top : top + h, 4 : 4 + h * 3 // 2] == (255, 0, 0)).all()  # scaled to the strip's height
    assert (strip[top : top + h, 8 + h * 3 // 2 : 8 + h * 5 // 2] == (0, 0, 255)).all()
    assert (strip[:top] != 255).any(axis=-1).sum() > 50  # the title and labels are drawn


def test_strips_take_the_middle_frame_of_the_prompt_s_sample_in_each_step_in_step_order(tmp_path: Path):
    import torch

    from opensora_core.sample.writer import save_sample

    for step, level in ((10, 0.5), (2, -0.5)):  # written out of order
        out = tmp_path / f"step_{step:06d}"
        video = torch.full((3, 5, 32, 32), -1.0)
        video[:, 2] = level  # only the middle frame is grey
        save_sample(video, out / "sample_0001", fps=8)
        (out / "prompts.json").write_text(json.dumps(["other", "the prompt"]))
    (tmp_path / "step_000005").mkdir()  # an evaluation cut short: no prompts.json, left out

    strips = evaluate.write_strips(tmp_path, ["the prompt", "never sampled"])
    assert strips == [tmp_path / "strips" / "prompt_0000.png"]
    pixels = np.asarray(Image.open(strips[0]))
    middle = 2 * 22 + evaluate.STRIP_HEIGHT // 2
    first, second = (
        pixels[middle, 4 + evaluate.STRIP_HEIGHT // 2],
        pixels[middle, 8 + evaluate.STRIP_HEIGHT * 3 // 2],
    )
    assert abs(int(first[0]) - 64) < 12 and abs(int(second[0]) - 191) < 12  # step 2 (darker), then step 10
