"""STDiT2 (Open-Sora v1.1) matches the released state-dict layout, runs in our training and sampling code,
and its options (frame mask, text mask, freeze, kernels, checkpointing, sequence parallel) behave."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DATA
from safetensors.torch import save_file

from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.models import kernels
from opensora_core.models.registry import build_model, count_parameters
from opensora_core.models.stdit2 import STDIT2_MODELS, STDiT2, STDiT2_XL_2
from opensora_core.sample.sampling_loop import sample_latents
from opensora_core.schedulers.rflow import RFlow

SIZES = {"in_channels": 4, "caption_channels": 16, "model_max_length": 6}
TINY = {
    "type": "STDiT2-XL/2",
    "hidden_size": 48,
    "depth": 2,
    "num_heads": 4,
    "input_sq_size": 512,
    "qk_norm": True,
    "qk_norm_legacy": True,
}


def tiny_model(**overrides) -> STDiT2:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY.items() if k != "type"} | SIZES | overrides
    model = STDiT2_XL_2(**kwargs)
    # Cross-attention, temporal attention and the output start at zero; give every weight a value.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(B: int = 2, T: int = 3, H: int = 8, W: int = 12) -> dict[str, torch.Tensor]:
    """Latents plus the conditioning our loop and sampler pass (pixel sizes = 8 x latent)."""
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(B, 4, T, H, W, generator=g),
        "timestep": torch.tensor([100.0, 700.0])[:B],
        "y": torch.randn(B, 1, 6, 16, generator=g),
        "mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])[:B],
        "num_frames": torch.full((B,), float(T)),
        "height": torch.full((B,), H * 8.0),
        "width": torch.full((B,), W * 8.0),
        "ar": torch.full((B,), H / W),
        "fps": torch.full((B,), 24.0 if T > 1 else 120.0),
    }


# ---- released layout -------------------------------------------------------------------------


def test_state_dict_layout_matches_released_checkpoint():
    entry = json.loads((DATA / "state-dicts.json").read_text())["models"]["STDiT2-XL/2"]
    kwargs = {k: v for k, v in entry["kwargs"].items() if k != "from_pretrained"}
    kwargs["input_size"] = tuple(kwargs["input_size"])
    with torch.device("meta"):
        model = STDIT2_MODELS["STDiT2-XL/2"](**kwargs)
    layout = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert layout == [[key, shape] for key, shape, _ in entry["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"] == 767_452_100
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["num_trainable_params"]
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == entry["frozen_params"]


def test_registry_counts_parameters_with_the_released_settings():
    entry = json.loads((DATA / "state-dicts.json").read_text())["models"]["STDiT2-XL/2"]
    assert count_parameters("STDiT2-XL/2") == entry["num_params"]


def test_published_v1_1_model_config_builds():
    config = {
        "type": "STDiT2-XL/2",
        "from_pretrained": None,
        "input_sq_size": 512,
        "qk_norm": True,
        "qk_norm_legacy": True,
        "enable_flash_attn": True,
        "enable_layernorm_kernel": True,
    }
    with torch.device("meta"):
        model = build_model(config, in_channels=4, caption_channels=4096, model_max_length=200)
    assert isinstance(model, STDiT2) and len(model.blocks) == 28 and model.input_sq_size == 512
    assert model.y_embedder.y_embedding.shape == (200, 4096)


# ---- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("T", "H", "W"),
    [(1, 8, 12), (1, 12, 8), (3, 8, 12), (4, 12, 8), (2, 7, 9)],
    ids=["image-landscape", "image-portrait", "video-landscape", "video-portrait", "video-odd-padded"],
)
def test_output_has_twice_the_latent_channels_and_the_input_size(T, H, W):
    with torch.no_grad():
        out = tiny_model()(**tiny_inputs(T=T, H=H, W=W))
    assert out.shape == (2, 8, T, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_without_pred_sigma_output_has_the_latent_channels():
    with torch.no_grad():
        out = tiny_model(pred_sigma=False)(**tiny_inputs())
    assert out.shape == (2, 4, 3, 8, 12)


def test_missing_conditioning_is_named():
    inputs = tiny_inputs()
    del inputs["ar"], inputs["num_frames"]
    with pytest.raises(ValueError, match="needs num_frames, ar per sample"):
        tiny_model()(**inputs)


@pytest.mark.parametrize("key", ["height", "ar", "num_frames", "fps"])
def test_each_size_and_length_condition_changes_the_prediction(key):
    model, inputs = tiny_model(), tiny_inputs()
    with torch.no_grad():
        a = model(**inputs)
        b = model(**{**inputs, key: inputs[key] * 1.5})
    assert (a - b).abs().max() > 1e-4


def test_all_true_frame_mask_equals_no_frame_mask():
    model, inputs = tiny_model(), tiny_inputs()
    with torch.no_grad():
        plain = model(**inputs)
        masked = model(**inputs, x_mask=torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(plain, masked, rtol=0, atol=1e-6)


def test_condition_frames_run_the_blocks_at_timestep_zero_and_the_others_as_given():
    model, inputs = tiny_model(), tiny_inputs()
    for blk in model.blocks:  # without temporal attention every frame is computed on its own
        torch.nn.init.zeros_(blk.attn_temp.proj.weight)
        torch.nn.init.zeros_(blk.attn_temp.proj.bias)
    block_outputs = []  # the final layer's input: [B, T*S, hidden]
    model.final_layer.register_forward_hook(
        lambda _, args, __: block_outputs.append(args[0].reshape(2, 3, -1))
    )
    x_mask = torch.tensor([[False, True, True], [True, True, False]])
    with torch.no_grad():
        masked = model(**inputs, x_mask=x_mask)
        plain = model(**inputs)
        model(**{**inputs, "timestep": torch.zeros(2)})
    masked_blocks, plain_blocks, zero_blocks = block_outputs
    for b in range(2):
        for t in range(3):
            expected = plain_blocks if x_mask[b, t] else zero_blocks
            torch.testing.assert_close(masked_blocks[b, t], expected[b, t], rtol=0, atol=1e-5)
            if x_mask[b, t]:
                torch.testing.assert_close(masked[b, :, t], plain[b, :, t], rtol=0, atol=1e-5)
    assert (plain_blocks[0, 0] - zero_blocks[0, 0]).abs().max() > 1e-3  # the two cases really differ


def test_frame_mask_reaches_generated_frames_only_through_temporal_attention():
    model, inputs = tiny_model(), tiny_inputs()
    with torch.no_grad():
        plain = model(**inputs)
        masked = model(**inputs, x_mask=torch.tensor([[False, True, True], [True, True, True]]))
    assert (plain[0, :, 1:] - masked[0, :, 1:]).abs().max() > 1e-4
    torch.testing.assert_close(plain[1], masked[1], rtol=0, atol=1e-6)  # no condition frame in sample 1


def test_padded_caption_tokens_do_not_change_the_output():
    model, inputs = tiny_model(), tiny_inputs()
    changed = {**inputs, "y": inputs["y"].clone()}
    changed["y"][0, :, 3:] = 100.0  # sample 0 masks tokens 3..5
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_text_mask_every_token_counts():
    model, inputs = tiny_model(), tiny_inputs()
    inputs["mask"] = None
    changed = {**inputs, "y": inputs["y"].clone()}
    changed["y"][0, :, 3:] = 100.0
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
        all_ones = model(**{**inputs, "mask": torch.ones(2, 6, dtype=torch.long)})
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(a, all_ones, rtol=0, atol=1e-6)


def test_qk_norm_legacy_changes_only_the_temporal_branch_order():
    inputs = tiny_inputs()
    with torch.no_grad():
        legacy = tiny_model(qk_norm_legacy=True)(**inputs)
        modern = tiny_model(qk_norm_legacy=False)(**inputs)
        image_legacy = tiny_model(qk_norm_legacy=True)(**tiny_inputs(T=1))
        image_modern = tiny_model(qk_norm_legacy=False)(**tiny_inputs(T=1))
    assert (legacy - modern).abs().max() > 1e-4  # RoPE before vs after the q/k norm
    torch.testing.assert_close(
        image_legacy, image_modern, rtol=0, atol=1e-6
    )  # RoPE at position 0 is identity


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = tiny_inputs()
    grads = []
    for flag in (False, True):
        model = tiny_model(grad_checkpoint=flag, class_dropout_prob=0.0).train()
        model(**inputs).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.grad_checkpointing is True
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def plain_attention(q, k, v, attn_mask=None, **_):
    """Textbook softmax attention (what Open-Sora computes without flash-attn)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.float().softmax(-1).to(q.dtype) @ v


def test_sdpa_and_plain_attention_agree(monkeypatch):
    model, inputs = tiny_model(), tiny_inputs()
    inputs["x_mask"] = torch.tensor([[False, True, True], [True, True, True]])
    with torch.no_grad():
        sdpa = model(**inputs)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", plain_attention)
        plain = model(**inputs)
    torch.testing.assert_close(sdpa, plain, rtol=0, atol=1e-5)


def test_flash_attn_and_layernorm_kernel_fall_back_on_cpu_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels.flash_attn_func.cache_clear()
    kernels.fused_layernorm_class.cache_clear()
    inputs = tiny_inputs()
    try:
        with caplog.at_level(logging.WARNING):
            fast = tiny_model(enable_flash_attn=True, enable_layernorm_kernel=True)
            with torch.no_grad():
                out, again = fast(**inputs), fast(**inputs)
    finally:
        kernels.flash_attn_func.cache_clear()
        kernels.fused_layernorm_class.cache_clear()
    with torch.no_grad():
        reference = tiny_model()(**inputs)
    warnings = [r.getMessage() for r in caplog.records if "enable_flash_attn" in r.getMessage()]
    assert len(warnings) == 1 and "torch SDPA" in warnings[0]
    assert isinstance(fast.blocks[0].norm1, torch.nn.LayerNorm)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-6)


# ---- options ---------------------------------------------------------------------------------


def test_freeze_not_temporal_trains_only_temporal_attention():
    model = tiny_model(freeze="not_temporal")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".attn_temp." in n for n in trainable)
    assert "blocks.0.attn_temp.qkv.weight" in trainable and "blocks.1.attn_temp.proj.bias" in trainable


def test_freeze_text_freezes_cross_attention_only():
    model = tiny_model(freeze="text")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"rope.freqs"} | {n for n, _ in model.named_parameters() if ".cross_attn." in n}


def test_unknown_freeze_value_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"model.freeze='spatial' is not valid; valid: None, not_temporal, text"
    ):
        STDiT2(hidden_size=48, depth=1, num_heads=4, freeze="spatial")


def test_registry_rejects_an_option_the_model_type_does_not_take():
    with pytest.raises(
        ConfigError, match=r"model.freeze_y_embedder is not an option of STDiT2-XL/2; valid: "
    ):
        build_model({**TINY, "freeze_y_embedder": True}, **SIZES)
    with pytest.raises(ConfigError, match=r"model.freeze is not an option of STDiT3-XL/2"):
        build_model(
            {"type": "STDiT3-XL/2", "hidden_size": 32, "depth": 1, "num_heads": 2, "freeze": "text"}, **SIZES
        )
    with pytest.raises(ConfigError, match=r"model.hiden_size is not a model option"):
        build_model({**TINY, "hiden_size": 8}, **SIZES)


# ---- checkpoints -----------------------------------------------------------------------------


def test_from_pretrained_directory_loads_strictly_through_the_registry(tmp_path):
    source = tiny_model()
    save_file(source.state_dict(), tmp_path / "ema.safetensors")
    loaded = build_model({**TINY, "from_pretrained": str(tmp_path)}, **SIZES).eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), source(**inputs), rtol=0, atol=0)


def test_stdit3_checkpoint_is_refused_with_a_one_line_error(tmp_path):
    stdit3_model = build_model(
        {"type": "STDiT3-XL/2", "hidden_size": 48, "depth": 2, "num_heads": 4}, **SIZES
    )
    save_file(stdit3_model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        build_model({**TINY, "from_pretrained": str(tmp_path)}, **SIZES)
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit model.type='STDiT2-XL/2'" in message and "missing" in message


# ---- our training and sampling code ----------------------------------------------------------


def test_tiny_model_overfits_one_batch_with_rflow():
    model = tiny_model(hidden_size=48, depth=1, class_dropout_prob=0.0).train()
    inputs = tiny_inputs(T=2, H=4, W=4)
    x0 = inputs.pop("x")
    inputs.pop("timestep")
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([250.0, 750.0])
    scheduler = RFlow()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = scheduler.training_losses(model, x0, inputs, noise=noise, t=t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_training_losses_with_condition_frames_reach_the_model_as_x_mask():
    model, inputs = tiny_model(class_dropout_prob=0.0).train(), tiny_inputs()
    x0 = inputs.pop("x")
    inputs.pop("timestep")
    mask = torch.tensor([[False, True, True], [True, True, True]])
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("x_mask")), with_kwargs=True
    )
    loss = RFlow().training_losses(model, x0, inputs, mask=mask, generator=torch.Generator().manual_seed(0))
    assert loss["loss"].shape == (2,) and torch.isfinite(loss["loss"]).all()
    assert len(seen) == 1 and torch.equal(seen[0], mask)
    loss["loss"].mean().backward()
    grad = model.blocks[0].scale_shift_table_temporal.grad
    assert grad.shape == model.blocks[0].scale_shift_table_temporal.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_guided_sampling_uses_the_model_null_caption(tmp_path):
    from opensora_core.models.text_encoder import T5Encoder
    from opensora_core.models.tiny_random import create_tiny_pretrained
    from opensora_core.sample.generate import model_condition

    paths = create_tiny_pretrained(tmp_path)
    text_encoder = T5Encoder(str(paths.t5), model_max_length=6, local_files_only=True)
    model = build_model(
        {**TINY, "depth": 1},
        in_channels=4,
        caption_channels=text_encoder.output_dim,
        model_max_length=text_encoder.model_max_length,
    ).eval()
    text_encoder.y_embedder = model.y_embedder
    assert text_encoder.null(2).shape == (2, 1, 6, text_encoder.output_dim)

    condition = model_condition(
        2, num_frames=9, height=64, width=96, fps=24, device="cpu", dtype=torch.float32
    )
    z = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    out = sample_latents(
        model,
        text_encoder,
        RFlow(num_sampling_steps=2, cfg_scale=7.0),
        z,
        ["a red ball", "the sea"],
        model_args=condition,
        mask=mask,
        progress=False,
    )
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert torch.equal(out[0, :, 0], z[0, :, 0])  # the condition frame is kept


# ---- sequence parallelism --------------------------------------------------------------------


def _sp_worker(rank: int, world_size: int, port: int, out: dict) -> None:
    from opensora_core.parallel.layout import parallel_layout
    from opensora_core.parallel.sequence import apply_sequence_parallel, new_sequence_parallel_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        sp_group, _ = new_sequence_parallel_groups(parallel_layout(rank, world_size, sp_size=world_size))
        model = tiny_model(class_dropout_prob=0.0).train()
        apply_sequence_parallel(model, sp_group)
        out[rank] = _loss_and_grads(model)
    finally:
        dist.destroy_process_group()


def _loss_and_grads(model: STDiT2) -> tuple[float, dict[str, torch.Tensor]]:
    inputs = tiny_inputs(H=6, W=10)  # 15 spatial tokens: the split pads one
    inputs["x_mask"] = torch.tensor([[False, True, True], [True, True, True]])
    target = torch.randn(2, 8, 3, 6, 10, generator=torch.Generator().manual_seed(5))
    loss = (model(**inputs) - target).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if dist.is_initialized():  # what DeepSpeed does over the ranks: average the gradients
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return loss.item(), grads


def test_sequence_parallel_on_two_ranks_matches_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_sp_worker, args=(2, port, out), nprocs=2, join=True)
    reference_loss, reference_grads = _loss_and_grads(tiny_model(class_dropout_prob=0.0).train())
    for rank in (0, 1):
        loss, grads = out[rank]
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
