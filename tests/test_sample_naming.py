"""Open-Sora's sample naming rules and prompt selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensora_core.config import load_config
from opensora_core.errors import ConfigError
from opensora_core.sample.inference import load_prompts, prompt_conditions, prompt_with_scores, sample_path

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


def test_prompts_given_directly_are_all_sampled_whatever_the_start_index() -> None:
    cfg = load_config(SAMPLE_CONFIG, {"prompt": ["a", "b"], "start_index": 5})
    assert load_prompts(cfg) == ["a", "b"]


def test_an_index_range_past_the_file_is_a_config_error(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    cfg = load_config(SAMPLE_CONFIG, {"prompt_path": str(prompts), "start_index": 2})
    with pytest.raises(ConfigError, match="start_index=2, end_index=None: select no prompt of the 2"):
        load_prompts(cfg)


def test_scores_are_appended_once_and_to_every_loop_segment() -> None:
    cfg = load_config(SAMPLE_CONFIG, {"aes": 6.5, "flow": 3.0})
    assert prompt_with_scores("a cat.", cfg) == "a cat. aesthetic score: 6.5. motion score: 3.0."
    assert (
        prompt_with_scores("a cat. aesthetic score: 5.0.", cfg)
        == "a cat. aesthetic score: 5.0. motion score: 3.0."
    )
    assert prompt_with_scores("|0| a |1| b", cfg) == (
        "|0| a aesthetic score: 6.5. motion score: 3.0. |1| b aesthetic score: 6.5. motion score: 3.0."
    )


def test_reference_paths_need_one_entry_per_prompt() -> None:
    cfg = load_config(SAMPLE_CONFIG, {"prompt": ["a", "b"], "reference_path": ["x.png"]})
    with pytest.raises(ConfigError, match="reference_path: 1 entries for 2 prompt"):
        prompt_conditions(cfg, ["a", "b"])


def test_json_in_the_prompt_overrides_the_config_and_a_lone_reference_defaults_to_strategy_0(
    tmp_path: Path,
) -> None:
    image = tmp_path / "i.png"
    image.write_bytes(b"")
    cfg = load_config(SAMPLE_CONFIG, {"mask_strategy": ["0,0,0,0,2", None]})
    prompts = [
        f'a{{"reference_path": "{image}", "mask_strategy": "0,0,0,-1"}}',
        f'b{{"reference_path": "{image}"}}',
    ]
    texts, conditions = prompt_conditions(cfg, prompts)
    assert texts == ["a", "b"]
    assert [c.reference_paths for c in conditions] == [[str(image)], [str(image)]]
    assert [(op.target_start, op.length) for op in conditions[0].strategy] == [(-1, 1)]
    assert [(op.target_start, op.length) for op in conditions[1].strategy] == [(0, 1)]
