"""Open-Sora's sample naming rules and prompt selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensora_core.config import load_config
from opensora_core.errors import ConfigError
from opensora_core.sample.inference import load_prompts, sample_path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = REPO / "configs/opensora-v1-2/inference/sample.py"


def test_default_name_is_sample_and_a_four_digit_index() -> None:
    assert sample_path("out", 3, prompt="a cat") == Path("out/sample_0003")


def test_sample_name_replaces_the_sample_prefix() -> None:
    assert sample_path("out", 12, prompt="a cat", sample_name="demo") == Path("out/demo_0012")


def test_num_sample_adds_a_dash_suffix_per_sample() -> None:
    names = [sample_path("out", 0, prompt="p", num_sample=3, k=k).name for k in range(3)]
    assert names == ["sample_0000-0", "sample_0000-1", "sample_0000-2"]


def test_prompt_as_path_names_the_file_after_the_prompt() -> None:
    assert sample_path("out", 5, prompt="a dog runs", prompt_as_path=True) == Path("out/a dog runs")


def test_prompt_takes_priority_over_prompt_path(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("from file\n")
    cfg = load_config(SAMPLE_CONFIG, {"prompt": ["from cli"], "prompt_path": str(prompts)})
    assert load_prompts(cfg) == ["from cli"]


def test_prompt_path_reads_one_prompt_per_line_within_the_index_range(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n\nc\nd\n")
    cfg = load_config(SAMPLE_CONFIG, {"prompt_path": str(prompts), "start_index": 1, "end_index": 3})
    assert load_prompts(cfg) == ["b", "c"]


def test_missing_prompt_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(SAMPLE_CONFIG, {"prompt_path": str(tmp_path / "nope.txt")})
    with pytest.raises(ConfigError, match="nope.txt"):
        load_prompts(cfg)
