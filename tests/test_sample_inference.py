"""`opensora sample` and checkpoint evaluation on tiny random-weight models loaded from local folders."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from safetensors.torch import save_file

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.errors import CheckpointError
from opensora_core.models.tiny_random import create_tiny_pretrained

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return create_tiny_pretrained(tmp_path_factory.mktemp("weights"))


def sample_config(tmp_path: Path, tiny, **extra: object) -> Path:
    lines = [
        f'_base_ = ["{REPO / "configs/opensora-v1-2/inference/sample.py"}"]',
        "model = dict(hidden_size=32, depth=1, num_heads=2, from_pretrained=None, enable_flash_attn=False,"
        " enable_layernorm_kernel=False)",
        f'vae = dict(_delete_=True, type="VideoAutoencoderKL", from_pretrained="{tiny.vae}", local_files_only=True)',
        f'text_encoder = dict(from_pretrained="{tiny.t5}", model_max_length=8, local_files_only=True)',
        "scheduler = dict(num_sampling_steps=2)",
        'dtype = "fp32"',
        f'save_dir = "{tmp_path / "samples"}"',
        "image_size = (64, 96)",
    ]
    lines += [f"{k} = {v!r}" for k, v in extra.items()]
    path = tmp_path / "sample_cfg.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sample_writes_named_mp4s_with_the_requested_frames_and_fps(tmp_path: Path, tiny) -> None:
    config = sample_config(tmp_path, tiny, num_frames=5, fps=24, frame_interval=1, save_fps=12)
    code = cli_main(
        ["sample", str(config), "--prompt", "a red square", "a blue circle", "--sample-name", "t"]
    )
    assert code == 0
    files = sorted((tmp_path / "samples").iterdir())
    assert [f.name for f in files] == ["t_0000.mp4", "t_0001.mp4"]
    with av.open(str(files[0])) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert frames == 5
        assert float(stream.average_rate) == 12
        assert (stream.height, stream.width) == (64, 96)


def test_sample_with_one_frame_writes_pngs_and_num_sample_suffixes(tmp_path: Path, tiny) -> None:
    config = sample_config(tmp_path, tiny, num_frames=1)
    assert cli_main(["sample", str(config), "--prompt", "a cat", "--num-sample", "2"]) == 0
    names = sorted(f.name for f in (tmp_path / "samples").iterdir())
    assert names == ["sample_0000-0.png", "sample_0000-1.png"]


def test_sampling_is_deterministic_for_a_seed(tmp_path: Path, tiny) -> None:
    from opensora_core.sample.generate import build_components, generate

    cfg = load_config(sample_config(tmp_path, tiny, num_frames=3))
    parts = build_components(cfg)
    first = generate(parts, ["a dog"], num_frames=3, image_size=(64, 96), fps=24, seed=5, progress=False)
    second = generate(parts, ["a dog"], num_frames=3, image_size=(64, 96), fps=24, seed=5, progress=False)
    other = generate(parts, ["a dog"], num_frames=3, image_size=(64, 96), fps=24, seed=6, progress=False)
    assert first.shape == (1, 3, 3, 64, 96)
    assert (first == second).all()
    assert not (first == other).all()


def test_evaluate_samples_the_eval_prompts_from_a_checkpoint(tmp_path: Path, tiny) -> None:
    from opensora_core.models.registry import build_model
    from opensora_core.sample.evaluate import evaluate_checkpoint

    config = tmp_path / "train_cfg.py"
    config.write_text(
        f'_base_ = ["{REPO / "configs/opensora-v1-2/train/demo.py"}"]\n'
        "model = dict(hidden_size=32, depth=1, num_heads=2)\n"
        f'vae = dict(from_pretrained="{tiny.vae}")\n'
        f'text_encoder = dict(from_pretrained="{tiny.t5}", model_max_length=8)\n'
        'scheduler = dict(num_sampling_steps=2)\neval_prompts = ["one", "two"]\neval_image_size = (64, 64)\n'
        "eval_num_frames = 3\n"
    )
    cfg = load_config(config)
    model = build_model(cfg.model.as_dict(), in_channels=4, caption_channels=32, model_max_length=8)
    checkpoint = tmp_path / "run" / "epoch0-global_step7"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint / "ema.safetensors")
    (checkpoint / "running_states.json").write_text(json.dumps({"global_step": 7}))

    result = evaluate_checkpoint(cfg, checkpoint, tmp_path / "eval", progress=False)

    assert result.global_step == 7
    assert [Path(p).name for p in result.samples] == ["sample_0000.mp4", "sample_0001.mp4"]
    assert all(Path(p).parent.name == "step_000007" for p in result.samples)


def test_evaluate_rejects_a_directory_without_weights(tmp_path: Path) -> None:
    from opensora_core.sample.evaluate import checkpoint_weights

    with pytest.raises(CheckpointError, match="no ema.safetensors or model.safetensors"):
        checkpoint_weights(tmp_path)
