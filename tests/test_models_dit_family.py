"""Open-Sora's fixed-size models (STDiT v1.0, DiT, Latte, PixArt) match the released layouts and behave as theirs."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import DATA
from safetensors.torch import save_file

from opensora_core.errors import ConfigError
from opensora_core.models import kernels
from opensora_core.models.dit import DiT_XL_2, DiT_XL_2x2
from opensora_core.models.fixed_size import sincos_table_1d, sincos_table_2d
from opensora_core.models.latte import Latte_XL_2, Latte_XL_2x2
from opensora_core.models.pixart import PixArt_Sigma_XL_2, PixArt_XL_2, PixArtMS_XL_2
from opensora_core.models.registry import build_model, count_parameters, model_preset
from opensora_core.models.stdit import STDiT_XL_2
from opensora_core.sample.sampling_loop import sample_latents
from opensora_core.schedulers import build_scheduler

RELEASED = ("STDiT-XL/2", "DiT-XL/2", "Latte-XL/2", "PixArt-XL/2")
NEW_TYPES = (
    "STDiT-XL/2",
    "DiT-XL/2",
    "DiT-XL/2x2",
    "Latte-XL/2",
    "Latte-XL/2x2",
    "PixArt-XL/2",
    "PixArt-1B/2",
    "PixArtMS-XL/2",
    "PixArt-Sigma-XL/2",
)
B, L, CAPTION = 2, 6, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run much faster on one thread than on cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh models zero their output layers; give every weight a value so each path shows in the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny(preset, input_size=(3, 4, 6), **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    text = {"caption_channels": CAPTION, "model_max_length": L}
    kwargs = dict(hidden_size=48, depth=2, num_heads=3, input_size=input_size, **text) | overrides
    return perturbed(preset(**kwargs))


def text_inputs(T: int = 3, H: int = 4, W: int = 6) -> dict[str, torch.Tensor]:
    """What the training loop passes: latents, timesteps, T5-style caption tokens and mask, sizes, fps."""
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(B, 4, T, H, W, generator=g),
        "timestep": torch.tensor([100.0, 700.0]),
        "y": torch.randn(B, 1, L, CAPTION, generator=g),
        "mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "num_frames": torch.full((B,), T * 17 / 5),
        "height": torch.full((B,), H * 8.0),
        "width": torch.full((B,), W * 8.0),
        "ar": torch.full((B,), H / W),
        "fps": torch.full((B,), 24.0),
    }


def pooled_inputs(T: int = 4, H: int = 4, W: int = 4) -> dict[str, torch.Tensor]:
    """DiT / Latte take one pooled caption vector per sample (Open-Sora's CLIP encoder output)."""
    inputs = text_inputs(T, H, W)
    inputs["y"] = inputs["y"][:, :, :1]
    inputs["mask"] = torch.ones(B, 1, dtype=torch.long)
    return inputs


# ----------------------------------------------------------------------------------------------
# The released layouts and sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RELEASED)
def test_state_dict_layout_matches_released_checkpoints(name):
    entry = json.loads((DATA / "state-dicts.json").read_text())["models"][name]
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "from_pretrained"}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    with torch.device("meta"):
        model = model_preset(name)(**kwargs)
    layout = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert layout == [[key, shape] for key, shape, _ in entry["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["num_trainable_params"]
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == set(entry["state_dict_buffers"])


@pytest.mark.parametrize("name", RELEASED)
def test_count_parameters_uses_the_released_settings(name):
    entry = json.loads((DATA / "state-dicts.json").read_text())["models"][name]
    assert count_parameters(name) == entry["num_params"]


def test_every_new_type_is_built_and_counted():
    counts = {name: count_parameters(name) for name in NEW_TYPES}
    assert counts["DiT-XL/2x2"] == counts["Latte-XL/2x2"] > counts["DiT-XL/2"]  # bigger patch, bigger output
    assert counts["PixArt-Sigma-XL/2"] == counts["PixArt-XL/2"] == 610_856_096
    assert counts["PixArtMS-XL/2"] == counts["PixArt-XL/2"] + 2 * (256 * 384 + 384 + 384 * 384 + 384)
    assert counts["PixArt-1B/2"] > 1_500_000_000


# ----------------------------------------------------------------------------------------------
# Position tables
# ----------------------------------------------------------------------------------------------


def test_2d_table_encodes_column_then_row_with_sines_before_cosines():
    dim, h, w = 16, 3, 5
    table = sincos_table_2d(dim, (h, w), scale=0.5)[0]
    row, col = 2, 3
    token = table[row * w + col]
    for j in range(dim // 4):
        freq = 10000 ** (-j / (dim // 4))
        assert token[j].item() == pytest.approx(math.sin(col / 0.5 * freq), abs=1e-6)
        assert token[dim // 4 + j].item() == pytest.approx(math.cos(col / 0.5 * freq), abs=1e-6)
        assert token[dim // 2 + j].item() == pytest.approx(math.sin(row / 0.5 * freq), abs=1e-6)


def test_base_size_stretches_every_grid_to_the_same_extent():
    small = sincos_table_2d(16, (2, 2), base_size=4)[0]
    large = sincos_table_2d(16, (4, 4), base_size=4)[0]
    assert torch.allclose(
        small[3], large[2 * 4 + 2], atol=1e-6
    )  # (1, 1) of 2x2 lies where (2, 2) of 4x4 does


def test_scales_set_the_model_tables():
    model = STDiT_XL_2(
        hidden_size=32, depth=1, num_heads=2, input_size=(4, 8, 8), space_scale=0.5, time_scale=2.0
    )
    assert torch.equal(model.pos_embed, sincos_table_2d(32, (4, 4), scale=0.5))
    assert torch.equal(model.pos_embed_temporal, sincos_table_1d(32, 4, scale=2.0))
    assert model.pos_embed_temporal[0, 1, 0].item() == pytest.approx(math.sin(0.5))


# ----------------------------------------------------------------------------------------------
# Shapes and sizes
# ----------------------------------------------------------------------------------------------

TEXT_MODELS = {"STDiT": STDiT_XL_2, "PixArt": PixArt_XL_2, "PixArt-Sigma": PixArt_Sigma_XL_2}
POOLED_MODELS = {"DiT": DiT_XL_2, "DiT-2x2": DiT_XL_2x2, "Latte": Latte_XL_2, "Latte-2x2": Latte_XL_2x2}


@pytest.mark.parametrize("family", TEXT_MODELS)
@pytest.mark.parametrize("size", [(1, 4, 6), (3, 6, 4)], ids=["image", "video"])
def test_caption_models_predict_velocity_and_sigma_per_latent(family, size):
    model = tiny(TEXT_MODELS[family], input_size=size)
    with torch.no_grad():
        out = model(**text_inputs(*size), x_mask=torch.ones(B, size[0], dtype=torch.bool))
    assert out.shape == (B, 8, *size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", POOLED_MODELS)
@pytest.mark.parametrize("size", [(2, 4, 6), (4, 6, 4)], ids=["short", "long"])
def test_pooled_caption_models_predict_velocity_and_sigma_per_latent(family, size):
    model = tiny(POOLED_MODELS[family], input_size=size)
    with torch.no_grad():
        out = model(**pooled_inputs(*size), x_mask=torch.ones(B, size[0], dtype=torch.bool))
    assert out.shape == (B, 8, *size)
    assert torch.isfinite(out).all()


def test_another_latent_size_is_a_config_error_naming_input_size():
    model = tiny(STDiT_XL_2, input_size=(3, 4, 6))
    with pytest.raises(ConfigError) as err:
        model(**text_inputs(3, 6, 4))
    assert str(err.value) == (
        "STDiT is built for latents of size [3, 4, 6] (model.input_size) but got [3, 6, 4]; "
        "set model.input_size to the latent [T, H, W]"
    )


def test_input_size_must_be_a_patch_multiple():
    with pytest.raises(
        ConfigError, match=r"model.input_size=\(3, 4, 4\) is not a multiple of the patch size"
    ):
        DiT_XL_2x2(hidden_size=32, depth=1, num_heads=2, input_size=(3, 4, 4))


def test_pooled_models_reject_caption_tokens():
    model = tiny(DiT_XL_2, input_size=(2, 4, 4))
    with pytest.raises(ConfigError, match=r"one pooled caption vector \[B, 1, 1, C\].*\[2, 1, 6, 16\]"):
        model(**text_inputs(2, 4, 4))


def test_dit_class_labels_condition_the_output():
    model = tiny(DiT_XL_2, input_size=(2, 4, 4), condition="label_10")
    assert model.y_embedder.embedding_table.num_embeddings == 11  # the extra row is the null label
    x = pooled_inputs(2, 4, 4)["x"]
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0]), torch.tensor([1, 2]))
        b = model(x, torch.tensor([10.0, 10.0]), torch.tensor([1, 3]))
    assert torch.allclose(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-4


def test_bad_condition_names_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"model.condition='clip' is not valid; valid: 'text', 'label_<num_classes>'"
    ):
        DiT_XL_2(hidden_size=32, depth=1, num_heads=2, condition="clip")


def test_latte_factorises_attention_over_the_same_weights():
    dit, latte = tiny(DiT_XL_2, input_size=(2, 4, 4)), tiny(Latte_XL_2, input_size=(2, 4, 4))
    latte.load_state_dict(dit.state_dict())
    with torch.no_grad():
        assert (dit(**pooled_inputs(2, 4, 4)) - latte(**pooled_inputs(2, 4, 4))).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Conditioning behaviour
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TEXT_MODELS)
def test_padded_caption_tokens_do_not_change_the_output(family):
    model, inputs = tiny(TEXT_MODELS[family]), text_inputs()
    changed = {**inputs, "y": inputs["y"].clone()}
    changed["y"][0, :, 3:] = 100.0  # sample 0 masks tokens 3..5
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        a, b = model(**{**inputs, "mask": None}), model(**{**changed, "mask": None})
    assert (a[0] - b[0]).abs().max() > 1e-3 and torch.allclose(a[1], b[1], atol=1e-6)


def test_stdit_frame_mask_changes_only_samples_with_condition_frames():
    model, inputs = tiny(STDiT_XL_2), text_inputs()
    with torch.no_grad():
        plain = model(**inputs)
        all_true = model(**inputs, x_mask=torch.ones(B, 3, dtype=torch.bool))
        masked = model(**inputs, x_mask=torch.tensor([[False, True, True], [True, True, True]]))
    assert torch.allclose(plain, all_true, atol=1e-6)
    assert (plain[0] - masked[0]).abs().max() > 1e-3
    assert torch.allclose(plain[1], masked[1], atol=1e-6)


def test_pixart_ignores_the_frame_mask_like_open_sora():
    model, inputs = tiny(PixArt_XL_2), text_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**inputs, x_mask=torch.tensor([[False, True, True]] * 2)))


def test_pixart_ms_conditions_on_size_and_aspect_ratio():
    model, inputs = tiny(PixArtMS_XL_2, input_size=(1, 4, 6)), text_inputs(1, 4, 6)
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, "height": torch.full((B,), 64.0)})
        hw = torch.stack([inputs["height"], inputs["width"]], dim=1)
        c = model(**{**inputs, "height": None, "width": None}, hw=hw)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, c)


def test_no_temporal_pos_emb_drops_the_temporal_table():
    with_table = tiny(PixArt_XL_2)
    without = tiny(PixArt_XL_2, no_temporal_pos_emb=True)
    with torch.no_grad():
        assert (with_table(**text_inputs()) - without(**text_inputs())).abs().max() > 1e-4


@pytest.mark.parametrize("freeze, trainable", [("text", "cross_attn"), ("not_temporal", "attn_temp")])
def test_stdit_freeze_options(freeze, trainable):
    model = STDiT_XL_2(hidden_size=32, depth=1, num_heads=2, input_size=(2, 4, 4), freeze=freeze)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if freeze == "text":
        assert frozen and all("cross_attn" in n for n in frozen)
    else:
        assert all(p.requires_grad == (trainable in n) for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match="model.freeze='all' is not valid; valid: None, not_temporal, text"):
        STDiT_XL_2(hidden_size=32, depth=1, num_heads=2, freeze="all")


# ----------------------------------------------------------------------------------------------
# Execution options
# ----------------------------------------------------------------------------------------------

ALL_FAMILIES = [
    (STDiT_XL_2, text_inputs),
    (PixArt_XL_2, text_inputs),
    (DiT_XL_2, lambda: pooled_inputs(3, 4, 6)),
    (Latte_XL_2, lambda: pooled_inputs(3, 4, 6)),
]
FAMILY_IDS = ["STDiT", "PixArt", "DiT", "Latte"]


@pytest.mark.parametrize("preset, inputs", ALL_FAMILIES, ids=FAMILY_IDS)
def test_gradient_checkpointing_gives_the_same_gradients(preset, inputs):
    grads = []
    for flag in (False, True):
        model = tiny(preset, grad_checkpoint=flag, class_dropout_prob=0.0).train()
        model(**inputs()).pow(2).mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert model.grad_checkpointing is True
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def plain_attention(q, k, v, *, mask=None, use_flash=False):
    """Softmax attention written out, as Open-Sora's non-flash path computes it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(q.dtype) @ v


@pytest.mark.parametrize("preset, inputs", ALL_FAMILIES, ids=FAMILY_IDS)
def test_sdpa_and_plain_attention_agree(preset, inputs, monkeypatch):
    model = tiny(preset)
    with torch.no_grad():
        sdpa = model(**inputs())
        monkeypatch.setattr(kernels, "attention", plain_attention)
        plain = model(**inputs())
    assert (sdpa - plain).abs().max() < 1e-5


def test_kernel_options_fall_back_on_cpu_with_one_warning(caplog):
    kernels.flash_attn_func.cache_clear()
    kernels.fused_layernorm_class.cache_clear()
    reference = tiny(STDiT_XL_2)
    with caplog.at_level(logging.WARNING, logger="opensora_core.models.kernels"):
        fast = tiny(STDiT_XL_2, enable_flash_attn=True, enable_layernorm_kernel=True)
        tiny(PixArt_XL_2, enable_flash_attn=True, enable_layernorm_kernel=True)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("enable_flash_attn=True" in w for w in warnings) == 1
    assert sum("enable_layernorm_kernel=True" in w for w in warnings) == 1
    with torch.no_grad():
        assert torch.equal(reference(**text_inputs()), fast(**text_inputs()))


def test_sequence_parallelism_is_refused_with_a_config_error():
    with pytest.raises(ConfigError, match="enable_sequence_parallelism=True"):
        PixArt_XL_2(hidden_size=32, depth=1, num_heads=2, enable_sequence_parallelism=True)


# ----------------------------------------------------------------------------------------------
# Loading weights through the registry
# ----------------------------------------------------------------------------------------------

SIZES = {"in_channels": 4, "caption_channels": CAPTION, "model_max_length": L}


@pytest.mark.parametrize("name", NEW_TYPES)
def test_from_pretrained_loads_strictly_through_the_registry(name, tmp_path):
    cfg = {"type": name, "hidden_size": 48, "depth": 2, "num_heads": 3, "input_size": [2, 4, 4]}
    torch.manual_seed(0)
    source = perturbed(build_model(cfg, **SIZES))
    save_file(source.state_dict(), tmp_path / "ema.safetensors")
    loaded = build_model({**cfg, "from_pretrained": str(tmp_path)}, **SIZES)
    assert loaded.state_dict().keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_position_tables_in_a_checkpoint_are_recomputed_and_image_weights_gain_a_time_axis(tmp_path):
    cfg = {"type": "PixArt-XL/2", "hidden_size": 48, "depth": 1, "num_heads": 3, "input_size": [2, 4, 4]}
    source = perturbed(
        build_model({**cfg, "input_size": [1, 8, 8]}, **SIZES)
    )  # an image checkpoint, other size
    state = source.state_dict()
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :, 0]  # PixArt-alpha's Conv2d layout
    torch.save(state, tmp_path / "model.pt")
    loaded = build_model({**cfg, "from_pretrained": str(tmp_path)}, **SIZES)
    assert torch.equal(loaded.x_embedder.proj.weight, source.x_embedder.proj.weight)
    assert torch.equal(loaded.pos_embed, sincos_table_2d(48, (2, 2), base_size=2))
    assert loaded.pos_embed_temporal.shape == (1, 2, 48)


def test_model_options_of_another_type_are_named():
    with pytest.raises(ConfigError, match=r"model.condition is not an option of STDiT-XL/2"):
        build_model({"type": "STDiT-XL/2", "condition": "text"}, **SIZES)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, inputs", [ALL_FAMILIES[0], ALL_FAMILIES[2]], ids=["STDiT", "DiT"])
def test_tiny_model_overfits_one_batch_with_rflow(preset, inputs):
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, depth=1, num_heads=2, caption_channels=CAPTION, model_max_length=L)
    model = preset(**sizes, input_size=(3, 4, 6), class_dropout_prob=0.0).train()
    scheduler = build_scheduler({"type": "rflow"})
    model_args = {k: v for k, v in inputs().items() if k not in ("x", "timestep")}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 4, 3, 4, 6, generator=g)
    noise, t = torch.randn(x0.shape, generator=g), torch.tensor([300.0, 700.0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = scheduler.training_losses(model, x0, model_args, noise=noise, t=t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


class StandInTextEncoder:
    """Random caption features of the right shape; the null caption is the model's learned one."""

    def __init__(self, tokens: int, with_mask: bool):
        self.tokens, self.with_mask = tokens, with_mask
        self.y_embedder = None

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(len(prompts))
        out = {"y": torch.randn(len(prompts), 1, self.tokens, CAPTION, generator=g)}
        if self.with_mask:
            out["mask"] = torch.ones(len(prompts), self.tokens, dtype=torch.long)
        return out

    def null(self, n: int) -> torch.Tensor:
        return self.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


@pytest.mark.parametrize("preset, tokens", [(STDiT_XL_2, L), (PixArt_XL_2, L), (Latte_XL_2, 1)])
def test_rflow_sampling_with_guidance_runs(preset, tokens):
    model = tiny(preset, input_size=(2, 4, 6))
    encoder = StandInTextEncoder(tokens, with_mask=tokens > 1)
    encoder.y_embedder = model.y_embedder
    z = torch.randn(B, 4, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    sizes = {
        k: v for k, v in text_inputs(2, 4, 6).items() if k in ("num_frames", "height", "width", "ar", "fps")
    }
    scheduler = build_scheduler({"type": "rflow", "num_sampling_steps": 3})
    out = sample_latents(model, encoder, scheduler, z, ["a", "b"], model_args=sizes, progress=False)
    assert out.shape == z.shape and torch.isfinite(out).all()
