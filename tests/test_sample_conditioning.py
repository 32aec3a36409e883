"""`opensora sample` with references, mask strategies and long-video loops, on tiny random-weight models.

The VAE is random, so conditioned frames are compared as latents: where the edit rate is 0 the
sampled latent frames must equal the reference's encoded frames exactly.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.errors import ConfigError
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.sample.long_video import Condition, generate_long
from opensora_core.sample.mask_strategy import parse_mask_strategy
from opensora_core.sample.writer import save_sample

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 96)


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
        f"image_size = {SIZE!r}",
        "verbose = 0",
    ]
    lines += [f"{k} = {v!r}" for k, v in extra.items()]
    path = tmp_path / "sample_cfg.py"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, tiny):
    from opensora_core.sample.generate import build_components

    return build_components(load_config(sample_config(tmp_path_factory.mktemp("cfg"), tiny)))


def write_image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(path)
    return path


def write_video(path: Path, frames: int) -> Path:
    torch.manual_seed(0)
    return save_sample(torch.rand(3, frames, *SIZE) * 2 - 1, path, fps=8)


def video_info(path: Path) -> tuple[int, float, tuple[int, int]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, float(stream.average_rate), (stream.height, stream.width)


def test_t2i_writes_a_png_of_the_image_size(tmp_path: Path, tiny) -> None:
    config = sample_config(tmp_path, tiny)
    assert (
        cli_main(["sample", str(config), "--num-frames", "1", "--prompt", "a cat", "--sample-name", "img"])
        == 0
    )
    [png] = list((tmp_path / "samples").iterdir())
    assert png.name == "img_0000.png"
    assert Image.open(png).size == (SIZE[1], SIZE[0])


def test_t2v_names_files_after_prompts_at_fps_over_frame_interval(tmp_path: Path, tiny) -> None:
    config = sample_config(tmp_path, tiny, save_fps=None)
    argv = ["sample", str(config), "--num-frames", "4", "--fps", "24", "--frame-interval", "2"]
    assert cli_main([*argv, "--prompt", "a dog runs", "--prompt-as-path", "--seed", "3"]) == 0
    [mp4] = list((tmp_path / "samples").iterdir())
    assert mp4.name == "a dog runs.mp4"
    assert video_info(mp4) == (4, 12.0, SIZE)


def test_image_conditioned_sampling_keeps_the_reference_frame(tmp_path: Path, parts) -> None:
    image = write_image(tmp_path / "ref.png")
    condition = Condition([str(image)], parse_mask_strategy("0,0,0,0,1;0,0,0,-1,1"))
    result = generate_long(
        parts, ["a cat"], [condition], num_frames=5, image_size=SIZE, fps=24, seed=1, progress=False
    )
    [[ref]] = result.references
    assert ref.shape == (4, 1, SIZE[0] // 8, SIZE[1] // 8)
    latents = result.latents[0][0]
    assert torch.equal(latents[:, 0], ref[:, 0])
    assert torch.equal(latents[:, -1], ref[:, 0])
    assert not torch.equal(latents[:, 2], ref[:, 0])
    assert result.video.shape == (1, 3, 5, *SIZE)


def test_video_reference_frames_go_where_the_strategy_says(tmp_path: Path, parts) -> None:
    video = write_video(tmp_path / "ref", 6)
    condition = Condition([str(video)], parse_mask_strategy("0,0,1,2,3"))
    result = generate_long(
        parts, ["waves"], [condition], num_frames=6, image_size=SIZE, fps=24, seed=2, progress=False
    )
    [[ref]] = result.references
    assert ref.shape[1] == 6
    assert torch.equal(result.latents[0][0][:, 2:5], ref[:, 1:4])


def test_partial_edit_rate_changes_the_inserted_frame(tmp_path: Path, parts) -> None:
    image = write_image(tmp_path / "ref.png")
    condition = Condition([str(image)], parse_mask_strategy("0,0,0,0,1,0.5"))
    result = generate_long(
        parts, ["a cat"], [condition], num_frames=3, image_size=SIZE, fps=24, seed=1, progress=False
    )
    assert not torch.equal(result.latents[0][0][:, 0], result.references[0][0][:, 0])


def test_loop_continues_from_the_last_frames_and_stitches_to_the_spec_length(parts) -> None:
    result = generate_long(
        parts,
        ["a boat |1| the boat sinks"],
        num_frames=6,
        image_size=SIZE,
        fps=24,
        seed=4,
        loop=2,
        condition_frame_length=2,
        progress=False,
    )
    assert result.video.shape[2] == 2 * (6 - 2) + 2
    previous = result.references[0][-1]  # the first clip, re-encoded
    assert torch.equal(result.latents[1][0][:, :2], previous[:, -2:])
    second = parts.vae.decode(result.latents[1]).float()
    assert torch.equal(result.video[:, :, 6:], second[:, :, 2:])


def test_loop_one_without_conditions_matches_plain_generate(parts) -> None:
    from opensora_core.sample.generate import generate

    plain = generate(parts, ["a dog"], num_frames=3, image_size=SIZE, fps=24, seed=5, progress=False)
    looped = generate_long(parts, ["a dog"], num_frames=3, image_size=SIZE, fps=24, seed=5, progress=False)
    assert torch.equal(plain, looped.video)


def test_cli_video_extension_writes_the_stitched_length(tmp_path: Path, tiny) -> None:
    config = sample_config(tmp_path, tiny, fps=24, frame_interval=1, save_fps=None)
    argv = ["sample", str(config), "--prompt", "a boat", "--num-frames", "6", "--loop", "2"]
    assert cli_main([*argv, "--condition-frame-length", "2"]) == 0
    [mp4] = list((tmp_path / "samples").iterdir())
    assert mp4.name == "sample_0000.mp4"
    assert video_info(mp4) == (10, 24.0, SIZE)


def test_cli_reference_per_prompt_with_none_and_json_in_the_prompt(tmp_path: Path, tiny) -> None:
    image = write_image(tmp_path / "ref.png")
    config = sample_config(tmp_path, tiny, num_frames=3, fps=24, frame_interval=3, save_fps=None)
    json_prompt = f'a cliff{{"reference_path": "{image}", "mask_strategy": "0,0,0,-1,1"}}'
    argv = ["sample", str(config), "--prompt", "a cat", "a dog", json_prompt, "--num-sample", "2"]
    argv += ["--reference-path", str(image), "None", "None", "--mask-strategy", "0", "None", "None"]
    assert cli_main([*argv, "--batch-size", "2"]) == 0
    names = sorted(f.name for f in (tmp_path / "samples").iterdir())
    assert names == [f"sample_{i:04d}-{k}.mp4" for i in range(3) for k in range(2)]
    assert video_info(tmp_path / "samples/sample_0002-1.mp4") == (3, 8.0, SIZE)


def test_missing_reference_file_is_an_error_naming_the_prompt(tmp_path: Path, tiny, capsys) -> None:
    config = sample_config(tmp_path, tiny, num_frames=3)
    argv = ["sample", str(config), "--prompt", "a", "b", "--reference-path", "None", "nope.png"]
    assert cli_main([*argv, "--start-index", "4"]) == 2
    assert "prompt 5: reference_path 'nope.png' does not exist" in capsys.readouterr().err


def test_malformed_strategy_from_the_cli_is_an_error(tmp_path: Path, tiny, capsys) -> None:
    config = sample_config(tmp_path, tiny, num_frames=3)
    assert cli_main(["sample", str(config), "--prompt", "a", "--mask-strategy", "0,x"]) == 2
    assert "prompt 0: mask_strategy='0,x'" in capsys.readouterr().err


def test_condition_frame_length_must_leave_frames_to_generate(parts) -> None:
    with pytest.raises(ConfigError, match="condition_frame_length=5: must be between 1 and 2"):
        generate_long(parts, ["a"], num_frames=3, image_size=SIZE, fps=24, seed=0, loop=2, progress=False)
