"""STDiT3 reproduces Open-Sora's reference outputs, matches the released state-dict layout, and its options work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA
from safetensors.torch import load_file

from opensora_core.models.stdit3 import STDIT3_MODELS, STDiT3, STDiT3_XL_2

REFERENCE = DATA / "reference-outputs" / "stdit3"


def reference_model() -> STDiT3:
    kwargs = json.loads((REFERENCE / "meta.json").read_text())["constructor_kwargs"]
    kwargs["input_size"] = tuple(kwargs["input_size"])
    model = STDiT3(**kwargs).eval()
    model.load_state_dict(load_file(REFERENCE / "weights.safetensors"), strict=True)
    return model


def tiny_model(**overrides) -> STDiT3:
    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, depth=2, num_heads=2, caption_channels=16, model_max_length=6) | overrides
    model = STDiT3_XL_2(**kwargs)
    # Fresh temporal branches start at zero; give every weight a value so each path shows in the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_inputs(B: int = 2, T: int = 3, H: int = 8, W: int = 12, L: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(B, 4, T, H, W, generator=g),
        "timestep": torch.tensor([100.0, 700.0])[:B],
        "y": torch.randn(B, 1, L, 16, generator=g),
        "mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])[:B],
        "fps": torch.full((B,), 24.0),
        "height": torch.full((B,), 64.0),
        "width": torch.full((B,), 96.0),
    }


@pytest.mark.parametrize("case", ["video", "image"])
def test_reference_weights_reproduce_open_sora_outputs(case):
    inputs = torch.load(REFERENCE / "inputs.pt")[case]
    expected = torch.load(REFERENCE / "output.pt")[case]
    with torch.no_grad():
        out = reference_model()(**inputs)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() < 1e-5


def test_reference_model_parameter_count_matches_meta():
    meta = json.loads((REFERENCE / "meta.json").read_text())
    assert sum(p.numel() for p in reference_model().parameters()) == meta["num_params"] == 342888


@pytest.mark.parametrize("name", ["STDiT3-XL/2", "STDiT3-3B/2"])
def test_state_dict_layout_matches_released_checkpoints(name):
    entry = json.loads((DATA / "state-dicts.json").read_text())["models"][name]
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "from_pretrained"}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    with torch.device("meta"):
        model = STDIT3_MODELS[name](**kwargs)
    layout = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert layout == [[key, shape] for key, shape, _ in entry["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["num_trainable_params"]
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == sorted(
        entry["frozen_params"]
    )


def test_odd_sizes_are_padded_to_patches_and_cropped_back():
    inputs = tiny_inputs(H=7, W=9)
    with torch.no_grad():
        out = tiny_model()(**inputs)
    assert out.shape == (2, 8, 3, 7, 9)
    assert torch.isfinite(out).all()


def test_padded_caption_tokens_do_not_change_the_output():
    model, inputs = tiny_model(), tiny_inputs()
    changed = {**inputs, "y": inputs["y"].clone()}
    changed["y"][0, :, 3:] = 100.0  # sample 0 masks tokens 3..5
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    assert torch.allclose(a, b, atol=1e-6)


def test_without_text_mask_every_token_counts():
    model, inputs = tiny_model(), tiny_inputs()
    changed = {**inputs, "y": inputs["y"].clone(), "mask": None}
    changed["y"][0, :, 3:] = 100.0
    with torch.no_grad():
        a, b = model(**{**inputs, "mask": None}), model(**changed)
    assert (a[0] - b[0]).abs().max() > 1e-3
    assert torch.allclose(a[1], b[1], atol=1e-6)


def test_all_true_frame_mask_equals_no_frame_mask():
    model, inputs = tiny_model(), tiny_inputs()
    with torch.no_grad():
        plain = model(**inputs)
        masked = model(**inputs, x_mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose(plain, masked, atol=1e-6)


def test_frame_mask_changes_only_samples_with_condition_frames():
    model, inputs = tiny_model(), tiny_inputs()
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    with torch.no_grad():
        plain = model(**inputs)
        masked = model(**inputs, x_mask=x_mask)
    assert (plain[0] - masked[0]).abs().max() > 1e-3  # sample 0 has a condition frame
    assert torch.allclose(plain[1], masked[1], atol=1e-6)  # sample 1 has none


def test_fps_changes_the_prediction():
    model, inputs = tiny_model(), tiny_inputs()
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "fps": torch.full((2,), 120.0)})
    assert (a - b).abs().max() > 1e-4


def test_position_embedding_scales_with_pixel_size():
    model, inputs = tiny_model(), tiny_inputs()
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "height": torch.full((2,), 128.0), "width": torch.full((2,), 192.0)})
    assert (a - b).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = tiny_inputs()
    grads = []
    for flag in (False, True):
        model = tiny_model(grad_checkpoint=flag).train()
        model.y_embedder.uncond_prob = 0.0  # no random caption drop, so both runs see the same input
        model(**inputs).pow(2).mean().backward()
        grads.append(model.spatial_blocks[0].attn.qkv.weight.grad.clone())
    assert model.grad_checkpointing is True
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_freeze_y_embedder_freezes_only_the_caption_projection():
    model = tiny_model(freeze_y_embedder=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        "rope.freqs",
        "y_embedder.y_proj.fc1.weight",
        "y_embedder.y_proj.fc1.bias",
        "y_embedder.y_proj.fc2.weight",
        "y_embedder.y_proj.fc2.bias",
    }


def test_overrides_shrink_the_model():
    model = tiny_model(hidden_size=48, depth=3, num_heads=3, caption_channels=16, model_max_length=6)
    assert len(model.spatial_blocks) == len(model.temporal_blocks) == 3
    assert model.y_embedder.y_embedding.shape == (6, 16)
    assert model.x_embedder.proj.weight.shape == (48, 4, 1, 2, 2)
