"""Tiny local weights round-trip through the real from_pretrained; the VAE and T5 wrappers give the right shapes."""

from __future__ import annotations

import pytest
import torch

from opensora_core.models.registry import build_model, build_text_encoder, build_vae
from opensora_core.models.text_encoder import T5Encoder
from opensora_core.models.tiny_random import TinyPretrained, create_tiny_pretrained
from opensora_core.models.vae import VideoAutoencoderKL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyPretrained:
    return create_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), seed=0)


@pytest.fixture(scope="module")
def vae(tiny) -> VideoAutoencoderKL:
    return build_vae(
        {
            "type": "VideoAutoencoderKL",
            "from_pretrained": str(tiny.vae),
            "micro_batch_size": 4,
            "local_files_only": True,
        }
    )


@pytest.fixture(scope="module")
def t5(tiny) -> T5Encoder:
    return build_text_encoder(
        {
            "type": "t5",
            "from_pretrained": str(tiny.t5),
            "model_max_length": 12,
            "shardformer": True,
            "local_files_only": True,
        }
    )


def test_tiny_pretrained_round_trips_through_from_pretrained(tiny):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny.t5, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(tiny.t5, local_files_only=True)
    autoencoder = AutoencoderKL.from_pretrained(tiny.vae, local_files_only=True)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red ball").input_ids)
    assert tokens == ["▁a", "▁red", "▁ball", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert encoder.config.d_model == 32 and encoder.config.num_layers == 2
    assert autoencoder.config.latent_channels == 4
    assert list(autoencoder.config.block_out_channels) == [8, 16, 16, 16]


def test_unknown_words_are_spelled_out_not_lost(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.t5, local_files_only=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebu").input_ids) == ["▁", "z", "e", "b", "u", "</s>"]


def test_create_tiny_pretrained_is_idempotent(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*") if p.is_file()}
    again = create_tiny_pretrained(tiny.root, seed=0)
    assert again == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*") if p.is_file()} == before


def test_incomplete_directory_is_rewritten(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    paths = create_tiny_pretrained(tmp_path, seed=1)
    assert (paths.vae / "diffusion_pytorch_model.safetensors").is_file()
    assert (paths.t5 / "model.safetensors").is_file()


def test_vae_encodes_to_latents_at_one_eighth(vae):
    x = torch.rand(2, 3, 5, 64, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 5, 8, 6)
    assert vae.out_channels == 4 and vae.patch_size == (1, 8, 8)


def test_vae_decode_restores_pixel_shape(vae):
    with torch.no_grad():
        pixels = vae.decode(torch.randn(1, 4, 3, 8, 6), num_frames=3)
    assert pixels.shape == (1, 3, 3, 64, 48)


def test_vae_encode_is_deterministic_with_a_generator(vae):
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    with torch.no_grad():
        a = vae.encode(x, generator=torch.Generator().manual_seed(7))
        b = vae.encode(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_vae_latent_size_divides_space_and_keeps_time(vae):
    assert vae.get_latent_size((17, 144, 256)) == [17, 18, 32]
    assert vae.get_latent_size((None, None, None)) == [None, None, None]


def test_vae_state_dict_uses_open_sora_module_prefix(vae):
    assert all(key.startswith("module.") for key in vae.state_dict())
    assert not any(p.requires_grad for p in vae.parameters())


def test_t5_encode_pads_to_model_max_length_with_mask(t5):
    out = t5.encode(["a red ball", "a blue square drifts left over a bright sky at sunset slowly"])
    assert out["y"].shape == (2, 1, 12, 32)
    assert out["mask"].tolist()[0] == [1, 1, 1, 1] + [0] * 8  # 3 words + </s>
    assert out["mask"].tolist()[1] == [1] * 12  # truncated to the limit
    assert t5.output_dim == 32 and t5.model_max_length == 12


def test_t5_is_frozen_and_in_eval_mode(t5):
    assert not t5.model.training
    assert not any(p.requires_grad for p in t5.model.parameters())


def test_null_caption_is_the_models_learned_embedding(t5):
    model = build_model(
        {"type": "STDiT3-XL/2", "hidden_size": 32, "depth": 1, "num_heads": 2},
        in_channels=4,
        caption_channels=t5.output_dim,
        model_max_length=t5.model_max_length,
    )
    t5.y_embedder = model.y_embedder
    null = t5.null(3)
    assert null.shape == (3, 1, 12, 32)
    assert torch.equal(null[2, 0], model.y_embedder.y_embedding)
