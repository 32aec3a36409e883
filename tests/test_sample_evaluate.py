"""Per-checkpoint evaluation: every checkpoint of a run is sampled and logged under its own step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    assert artifacts == [
        ("eval-run", "eval/step_000004"),
        ("train-run", "eval/step_000004"),
        ("eval-run", "eval/step_000008"),
        ("train-run", "eval/step_000008"),
    ]
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
