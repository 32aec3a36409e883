"""The shared init (models/blocks.py) gives each model DiT's starting point: listed branches at zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opensora_core.models.dit import DiT_XL_2
from opensora_core.models.stdit2 import STDiT2_XL_2
from opensora_core.models.stdit3 import STDiT3_XL_2

TINY = dict(hidden_size=48, depth=2, num_heads=4, caption_channels=16, model_max_length=6)


def test_stdit3_starts_with_temporal_branches_at_zero_and_small_conditioning():
    torch.manual_seed(0)
    model = STDiT3_XL_2(**TINY)
    for blk in model.temporal_blocks:
        for linear in (blk.attn.proj, blk.cross_attn.proj, blk.mlp.fc2):
            assert not linear.weight.any() and not linear.bias.any()
    assert model.spatial_blocks[0].attn.proj.weight.abs().max() > 0
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.y_embedder.y_proj.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, nn.Linear))


def test_stdit2_starts_with_zero_output_so_a_fresh_model_predicts_zeros():
    torch.manual_seed(0)
    model = STDiT2_XL_2(**TINY)
    assert not model.final_layer.linear.weight.any()
    assert all(not blk.attn_temp.proj.weight.any() for blk in model.blocks)
    # the patch embedding is initialised as one linear map: xavier bound over fan-in + fan-out
    w = model.x_embedder.proj.weight.flatten(1)
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_dit_also_starts_its_patch_bias_and_modulation_at_zero():
    torch.manual_seed(0)
    model = DiT_XL_2(input_size=(2, 8, 8), **{**TINY, "model_max_length": 77})
    assert not model.x_embedder.proj.bias.any()
    assert all(not blk.adaLN_modulation[-1].weight.any() for blk in model.blocks)
    assert not model.final_layer.linear.weight.any()
