"""The model authors' released checkpoints (DiT, Latte, PixArt) load as Open-Sora's configs use them.

Each test saves random weights in the file's original layout under its released name: a 2D patch
embedding, a `pos_embed` of the image size it was trained at, Latte's {"ema", "model", "args"} wrapper,
PixArt's {"state_dict"} wrapper and 120 caption tokens.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from opensora_core.errors import CheckpointError
from opensora_core.models.registry import build_model

HIDDEN = 32
TINY = {"hidden_size": HIDDEN, "depth": 2, "num_heads": 2, "input_size": [2, 4, 4]}


def build(
    type_name: str, caption_channels: int = 16, model_max_length: int = 6, **options
) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"type": type_name, **TINY, **options}
    return build_model(
        cfg, in_channels=4, caption_channels=caption_channels, model_max_length=model_max_length
    )


def random_weights(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def original_layout(state: dict[str, torch.Tensor], *, image_tokens: int) -> dict[str, torch.Tensor]:
    """Our layout back to an image model's: 2D patch embedding, one `pos_embed` at the training size."""
    out = {k: v for k, v in state.items() if not k.startswith("pos_embed")}
    out["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].squeeze(2)
    out["pos_embed"] = torch.randn(1, image_tokens, HIDDEN)
    return out


def assert_loaded(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> None:
    for name, value in model.state_dict().items():
        if name.startswith("pos_embed") or name.startswith(skip):
            continue
        expected = weights[name].reshape(value.shape)
        assert torch.equal(value, expected), name


def test_dit_class_checkpoint_loads_into_a_label_conditioned_dit(tmp_path):
    source = random_weights(build("DiT-XL/2", condition="label_10"))
    file = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(original_layout(source, image_tokens=1024), file)
    model = build("DiT-XL/2", condition="label_10", from_pretrained=str(file))
    assert_loaded(model, source)
    assert model.y_embedder.embedding_table.weight.shape == (11, HIDDEN)  # 10 classes + the null label


def test_latte_ucf101_checkpoint_takes_its_ema_weights(tmp_path):
    source = random_weights(build("Latte-XL/2", condition="label_101"))
    ema = original_layout(source, image_tokens=256) | {"temp_embed": torch.randn(1, 16, HIDDEN)}
    file = tmp_path / "Latte-XL-2-256x256-ucf101.pt"
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    torch.save({"ema": ema, "model": raw, "args": argparse.Namespace(model="Latte-XL/2")}, file)
    model = build("Latte-XL/2", condition="label_101", from_pretrained=str(file))
    assert_loaded(model, source)


def test_text_dit_starts_from_the_class_checkpoint_with_its_caption_embedder_at_init(tmp_path, caplog):
    """Open-Sora's dit/train/16x256x256.py: a CLIP-conditioned DiT from DiT-XL-2-256x256.pt."""
    source = random_weights(build("DiT-XL/2", condition="label_1000"))
    file = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(original_layout(source, image_tokens=1024), file)
    fresh = build("DiT-XL/2", caption_channels=16, model_max_length=1)
    with caplog.at_level(logging.INFO, logger="opensora_core.models.upstream"):
        model = build("DiT-XL/2", caption_channels=16, model_max_length=1, from_pretrained=str(file))
    assert_loaded(model, source, skip=("y_embedder",))
    for name, value in model.y_embedder.state_dict().items():
        assert torch.equal(value, fresh.y_embedder.state_dict()[name]), name
    assert "left at init (e.g. y_embedder." in caplog.text
    assert "1 in the file unused (e.g. y_embedder.embedding_table.weight)" in caplog.text


def test_stdit_starts_from_pixart_with_temporal_attention_at_init_and_captions_padded(tmp_path, caplog):
    """Open-Sora v1.0's opensora/train/16x256x256.py: STDiT-XL/2 from PixArt-XL-2-512x512.pth."""
    pixart = random_weights(build("PixArt-XL/2", caption_channels=16, model_max_length=4))
    file = tmp_path / "PixArt-XL-2-512x512.pth"
    torch.save({"state_dict": original_layout(pixart, image_tokens=4096)}, file)
    fresh = build("STDiT-XL/2", model_max_length=6)
    with caplog.at_level(logging.INFO, logger="opensora_core.models.upstream"):
        model = build("STDiT-XL/2", model_max_length=6, from_pretrained=str(file))
    assert_loaded(model, pixart, skip=("blocks.0.attn_temp", "blocks.1.attn_temp", "y_embedder.y_embedding"))
    for name, value in model.state_dict().items():
        if ".attn_temp." in name:
            assert torch.equal(value, fresh.state_dict()[name]), name
    y = model.y_embedder.y_embedding
    assert (
        torch.equal(y[:4], pixart["y_embedder.y_embedding"])
        and torch.equal(y[4], y[3])
        and torch.equal(y[5], y[3])
    )
    assert "4 caption tokens in the file, 6 in the model: padded" in caplog.text
    assert "left at init (e.g. blocks.0.attn_temp.qkv.weight)" in caplog.text


def test_an_upstream_name_on_another_models_weights_is_refused(tmp_path):
    file = tmp_path / "PixArt-XL-2-512x512.pth"
    torch.save(random_weights(build("DiT-XL/2", condition="label_10")), file)
    with pytest.raises(
        CheckpointError, match=r"PixArt-XL-2-512x512.pth: does not fit model.type='STDiT-XL/2'"
    ):
        build("STDiT-XL/2", from_pretrained=str(file))


def test_a_wider_upstream_model_names_the_wrongly_shaped_tensor(tmp_path):
    file = tmp_path / "DiT-XL-2-256x256.pt"
    wide = build("DiT-XL/2", condition="label_10", hidden_size=64, num_heads=2)
    torch.save(
        original_layout(random_weights(wide), image_tokens=16) | {"pos_embed": torch.zeros(1, 16, 64)}, file
    )
    with pytest.raises(CheckpointError, match=r"wrongly shaped tensors \(e.g. 'x_embedder.proj.weight'"):
        build("DiT-XL/2", condition="label_10", from_pretrained=str(file))


def test_under_another_name_the_same_partial_file_is_loaded_strictly(tmp_path):
    pixart = random_weights(build("PixArt-XL/2", caption_channels=16, model_max_length=6))
    file = tmp_path / "my_pixart.pth"
    torch.save({"state_dict": original_layout(pixart, image_tokens=64)}, file)
    with pytest.raises(
        CheckpointError, match=r"my_pixart.pth: does not fit model.type='STDiT-XL/2': 8 missing"
    ):
        build("STDiT-XL/2", from_pretrained=str(file))
