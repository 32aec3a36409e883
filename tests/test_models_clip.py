"""The `clip` text encoder: a local CLIPTextModel + CLIPTokenizer whose caption is the pooled embedding
as one token [B, 1, 1, D], as Open-Sora's ClipEncoder gives it (no mask)."""

from __future__ import annotations

import pytest
import torch

from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.models.registry import build_model, build_text_encoder
from opensora_core.models.text_encoder import ClipEncoder
from opensora_core.models.tiny_random import TinyPretrained, create_tiny_pretrained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyPretrained:
    return create_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), seed=0)


@pytest.fixture(scope="module")
def clip(tiny) -> ClipEncoder:
    return build_text_encoder({"type": "clip", "from_pretrained": str(tiny.clip), "local_files_only": True})


def test_tiny_clip_round_trips_through_from_pretrained(tiny):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny.clip, local_files_only=True)
    model = CLIPTextModel.from_pretrained(tiny.clip, local_files_only=True)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red sky").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "sky</w>", "<|endoftext|>"]
    assert model.config.hidden_size == 32 and model.config.eos_token_id == tokenizer.eos_token_id


def test_encode_gives_the_pooled_embedding_as_one_token_without_mask(clip):
    out = clip.encode(["a red ball", "a blue square drifts left"])
    assert set(out) == {"y"}
    assert out["y"].shape == (2, 1, 1, 32)
    assert clip.output_dim == 32 and clip.model_max_length == 77


def test_pooled_embedding_is_the_end_of_text_state(clip):
    ids = clip.tokenizer(["a red ball"], return_tensors="pt").input_ids  # unpadded
    with torch.no_grad():
        hidden = clip.model(input_ids=ids).last_hidden_state
    assert torch.allclose(clip.encode(["a red ball"])["y"][0, 0, 0], hidden[0, -1], atol=1e-6)


def test_padding_length_does_not_change_the_caption(tiny, clip):
    short = ClipEncoder(str(tiny.clip), model_max_length=12, local_files_only=True)
    assert torch.allclose(short.encode(["a cat"])["y"], clip.encode(["a cat"])["y"], atol=1e-6)


def test_long_prompts_are_truncated_to_model_max_length(tiny):
    short = ClipEncoder(str(tiny.clip), model_max_length=4, local_files_only=True)
    prompt = "a dog runs along the beach at sunset while birds fly over the calm sea"
    assert short.encode([prompt])["y"].shape == (1, 1, 1, 32)


def test_null_caption_is_the_models_one_token_embedding(clip):
    model = build_model(
        {"type": "STDiT3-XL/2", "hidden_size": 32, "depth": 1, "num_heads": 2},
        in_channels=4,
        caption_channels=clip.output_dim,
        model_max_length=1,
    )
    clip.y_embedder = model.y_embedder
    null = clip.null(3)
    assert null.shape == (3, 1, 1, 32)
    assert torch.equal(null[1, 0], model.y_embedder.y_embedding)


def test_clip_is_frozen_and_in_eval_mode(clip):
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())


def test_model_max_length_beyond_the_position_table_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match=r"text_encoder.model_max_length=100: .* has 77 positions"):
        build_text_encoder({"type": "clip", "from_pretrained": str(tiny.clip), "model_max_length": 100})


def test_t5_only_options_are_rejected_for_clip(tiny):
    with pytest.raises(ConfigError) as err:
        build_text_encoder({"type": "clip", "from_pretrained": str(tiny.clip), "shardformer": True})
    assert str(err.value) == (
        "text_encoder.shardformer is not a clip option; valid: cache_dir, from_pretrained, "
        "local_files_only, model_max_length"
    )


def test_missing_clip_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"text_encoder.from_pretrained=.*nope: cannot load a CLIP"):
        build_text_encoder(
            {"type": "clip", "from_pretrained": str(tmp_path / "nope"), "local_files_only": True}
        )
