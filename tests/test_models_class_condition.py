"""Class-conditional DiT / Latte: `text_encoder.type="classes"`, prompts are class ids (Open-Sora's -class.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.errors import ConfigError
from opensora_core.models.text_encoder import ClassEncoder
from opensora_core.models.tiny_random import create_tiny_pretrained

REPO = Path(__file__).resolve().parents[1]


def test_class_ids_encode_and_the_null_label_is_num_classes():
    encoder = ClassEncoder(num_classes=10)
    assert torch.equal(encoder.encode(["3", " 7\n"])["y"], torch.tensor([3, 7]))
    assert torch.equal(encoder.null(2), torch.tensor([10, 10]))
    with pytest.raises(ConfigError, match=r"prompt or caption 'a cat': .* an integer in \[0, 10\)"):
        encoder.encode(["a cat"])
    with pytest.raises(ConfigError, match=r"'10'"):
        encoder.encode(["10"])


@pytest.mark.parametrize(
    ("model", "text_encoder", "message"),
    [
        (
            'dict(type="DiT-XL/2", condition="label_10")',
            'dict(type="classes", num_classes=5)',
            "has 10 classes",
        ),
        ('dict(type="DiT-XL/2")', 'dict(type="classes", num_classes=5)', "model.condition must be 'label_5'"),
        (
            'dict(type="DiT-XL/2", condition="label_10")',
            'dict(type="clip", from_pretrained="x")',
            "takes class ids",
        ),
    ],
)
def test_mismatched_condition_and_encoder_is_one_config_error(tmp_path, model, text_encoder, message):
    path = tmp_path / "cfg.py"
    path.write_text(f'model = {model}\ntext_encoder = {text_encoder}\nscheduler = dict(type="dpm-solver")\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_dit_class_config_samples_class_ids_with_guidance(tmp_path):
    """configs/dit/inference/1x256x256-class.py at tiny size: a prompt file of ImageNet ids, CFG 4."""
    tiny = create_tiny_pretrained(tmp_path / "weights")
    (tmp_path / "ids.txt").write_text("207\n360\n")
    config = tmp_path / "cfg.py"
    config.write_text(
        "\n".join(
            [
                f'_base_ = ["{REPO / "configs/dit/inference/1x256x256-class.py"}"]',
                "model = dict(hidden_size=32, depth=1, num_heads=2, from_pretrained=None)",  # input_size from the VAE
                f'vae = dict(from_pretrained="{tiny.vae}")',
                "scheduler = dict(num_sampling_steps=2)",
                'dtype = "fp32"',
                "image_size = (32, 32)",
                f'prompt_path = "{tmp_path / "ids.txt"}"',
                f'save_dir = "{tmp_path / "samples"}"',
            ]
        )
        + "\n"
    )
    assert cli_main(["sample", str(config)]) == 0
    assert sorted(p.suffix for p in (tmp_path / "samples").iterdir()) == [".png", ".png"]
