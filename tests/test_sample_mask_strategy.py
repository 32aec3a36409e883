"""mask_strategy strings, prompt-appended JSON, loop prompts and applying a strategy to latents."""

from __future__ import annotations

import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.sample.mask_strategy import (
    MaskOp,
    apply_mask_strategy,
    loop_prompts,
    nearest_aligned,
    parse_mask_strategy,
    parse_reference_paths,
    prompt_for_loop,
    split_prompt_json,
)


def test_a_single_zero_fills_the_documented_defaults() -> None:
    assert parse_mask_strategy("0") == [MaskOp(0, 0, 0, 0, 1, 0.0)]


def test_six_fields_give_length_and_edit_rate() -> None:
    assert parse_mask_strategy("0,0,0,0,8,0.3") == [MaskOp(0, 0, 0, 0, 8, 0.3)]


def test_semicolons_separate_insertions_and_minus_one_is_kept_for_the_end() -> None:
    assert parse_mask_strategy("0,0,0,0,1;0,0,0,-1,1") == [
        MaskOp(0, 0, 0, 0, 1, 0.0),
        MaskOp(0, 0, 0, -1, 1, 0.0),
    ]


def test_every_field_count_from_one_to_six_parses() -> None:
    assert parse_mask_strategy("1,2") == [MaskOp(1, 2, 0, 0, 1, 0.0)]
    assert parse_mask_strategy("1,2,-3") == [MaskOp(1, 2, -3, 0, 1, 0.0)]
    assert parse_mask_strategy(" 2, 1, 0, 4 ") == [MaskOp(2, 1, 0, 4, 1, 0.0)]
    assert parse_mask_strategy("0,0,0,0,1,1") == [MaskOp(0, 0, 0, 0, 1, 1.0)]


@pytest.mark.parametrize("empty", [None, "", "None"])
def test_missing_strategies_mean_no_insertion(empty: str | None) -> None:
    assert parse_mask_strategy(empty) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,0,0,0,1,0.5,7", "1 to 6 comma-separated"),
        ("0,,1", "1 to 6 comma-separated"),
        ("a", "must be integers"),
        ("0,0,0,0,1.5", "must be integers"),
        ("0,0,0,0,0", "length >= 1"),
        ("0,0,0,0,1,2", "edit_rate must be between 0 and 1"),
    ],
)
def test_malformed_strategy_names_the_prompt_and_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"prompt 3: mask_strategy=.*{message}"):
        parse_mask_strategy(text, prompt_index=3)


def test_reference_paths_are_semicolon_separated() -> None:
    assert parse_reference_paths("a.png; b.mp4") == ["a.png", "b.mp4"]
    assert parse_reference_paths("None") == []


def test_json_after_the_prompt_is_split_off() -> None:
    prompt = 'Waves at a cliff.{"reference_path": "cliff.png", "mask_strategy": "0"}'
    assert split_prompt_json(prompt) == (
        "Waves at a cliff.",
        {"reference_path": "cliff.png", "mask_strategy": "0"},
    )


def test_a_prompt_without_json_is_unchanged() -> None:
    assert split_prompt_json("a cat") == ("a cat", {})


def test_unknown_json_keys_and_bad_json_are_errors_naming_the_prompt() -> None:
    with pytest.raises(ConfigError, match="prompt 2: prompt: unknown JSON key.*fps"):
        split_prompt_json('a cat {"fps": 3}', prompt_index=2)
    with pytest.raises(ConfigError, match="prompt 0: prompt: text after"):
        split_prompt_json('a cat {"mask_strategy": ', prompt_index=0)


def test_loop_prompts_pick_the_latest_segment_for_each_loop() -> None:
    prompts = loop_prompts("|0| a cat sleeps |2| the cat wakes")
    assert prompts == {0: "a cat sleeps", 2: "the cat wakes"}
    assert [prompt_for_loop(prompts, i) for i in range(4)] == [
        "a cat sleeps",
        "a cat sleeps",
        "the cat wakes",
        "the cat wakes",
    ]
    assert loop_prompts("plain") == {0: "plain"}


def test_nearest_aligned_rounds_and_stays_inside() -> None:
    assert nearest_aligned(7, 5, 20) == 5
    assert nearest_aligned(8, 5, 20) == 10
    assert nearest_aligned(14, 5, 15) == 10  # 15 would be past the end


def test_apply_inserts_reference_frames_and_sets_the_edit_rate() -> None:
    z = torch.zeros(2, 1, 6, 1, 1)
    ref = torch.arange(4.0).view(1, 4, 1, 1) + 10  # frames 10, 11, 12, 13
    mask = apply_mask_strategy(z, [[ref], []], [parse_mask_strategy("0,0,1,2,8,0.3"), []])
    assert z[0, 0, :, 0, 0].tolist() == [0, 0, 11, 12, 13, 0]  # length clipped to the reference
    assert mask[0].tolist() == pytest.approx([1, 1, 0.3, 0.3, 0.3, 1])
    assert mask[1].tolist() == [1] * 6
    assert (z[1] == 0).all()


def test_apply_counts_negative_starts_from_the_end() -> None:
    z = torch.zeros(1, 1, 5, 1, 1)
    image = torch.full((1, 1, 1, 1), 7.0)
    mask = apply_mask_strategy(z, [[image]], [parse_mask_strategy("0,0,0,0,1;0,0,0,-1,1")])
    assert z[0, 0, :, 0, 0].tolist() == [7, 0, 0, 0, 7]
    assert mask[0].tolist() == [0, 1, 1, 1, 0]


def test_apply_only_uses_this_loops_insertions_and_returns_none_without_any() -> None:
    z = torch.zeros(1, 1, 4, 1, 1)
    assert apply_mask_strategy(z, [[torch.ones(1, 1, 1, 1)]], [parse_mask_strategy("1")], loop=0) is None
    assert (z == 0).all()


def test_apply_with_a_missing_reference_index_is_an_error() -> None:
    with pytest.raises(ConfigError, match="prompt 0: mask_strategy uses reference 1"):
        apply_mask_strategy(
            torch.zeros(1, 1, 4, 1, 1), [[torch.ones(1, 1, 1, 1)]], [parse_mask_strategy("0,1")]
        )
