"""deepspeed_config: Open-Sora plugin / dtype / grad_clip -> DeepSpeed config dict."""

import warnings

import pytest

from opensora_core.errors import ConfigError
from opensora_core.parallel.deepspeed_config import PLUGINS, deepspeed_config


@pytest.mark.parametrize(("plugin", "stage"), [("ddp", 0), ("zero1", 1), ("zero2", 2)])
def test_plugin_maps_to_zero_stage(plugin, stage):
    cfg = deepspeed_config(plugin, "fp32", 1.0, micro_batch_size=4)
    assert cfg["zero_optimization"]["stage"] == stage
    assert "sequence_parallel_size" not in cfg


def test_zero2_seq_is_stage2_with_sequence_parallel_size():
    cfg = deepspeed_config("zero2-seq", "bf16", 1.0, micro_batch_size=1, sp_size=2)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["sequence_parallel_size"] == 2


def test_batch_accumulation_and_clipping_are_passed_through():
    cfg = deepspeed_config("zero2", "fp32", 0.5, micro_batch_size=3, grad_accum=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5


@pytest.mark.parametrize(("dtype", "bf16", "fp16"), [("fp32", False, False), ("bf16", True, False)])
def test_dtype_sections(dtype, bf16, fp16):
    cfg = deepspeed_config("zero2", dtype, 1.0, micro_batch_size=1)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16


def test_fp16_on_gpu_enables_dynamic_loss_scaling():
    cfg = deepspeed_config("zero2", "fp16", 1.0, micro_batch_size=1, on_gpu=True)
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert cfg["bf16"]["enabled"] is False


def test_fp16_on_cpu_falls_back_to_fp32_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = deepspeed_config("zero2", "fp16", 1.0, micro_batch_size=1, on_gpu=False)
    assert cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] is False
    assert len(caught) == 1
    assert "fp16" in str(caught[0].message)


def test_unknown_plugin_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        deepspeed_config("zero3-offload", "fp32", 1.0, micro_batch_size=1)
    message = str(err.value)
    assert "plugin='zero3-offload'" in message
    assert all(name in message for name in PLUGINS)


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        deepspeed_config("zero2", "fp8", 1.0, micro_batch_size=1)


def test_sequence_parallel_needs_zero2_seq():
    with pytest.raises(ConfigError, match="sp_size=2"):
        deepspeed_config("zero2", "bf16", 1.0, micro_batch_size=1, sp_size=2)
    with pytest.raises(ConfigError, match="zero2-seq"):
        deepspeed_config("zero2-seq", "bf16", 1.0, micro_batch_size=1, sp_size=1)


def test_negative_grad_clip_is_a_config_error():
    with pytest.raises(ConfigError, match="grad_clip"):
        deepspeed_config("zero2", "fp32", -1.0, micro_batch_size=1)


@pytest.mark.parametrize(
    ("plugin", "world_size", "stage"),
    [
        ("zero2", 1, 1),  # one rank: nothing to partition, stage 1 without stage 2's per-gradient hooks
        ("zero2", 2, 2),
        ("zero2", None, 2),
        ("zero2-seq", 2, 2),
        ("zero1", 1, 1),
        ("ddp", 1, 0),
    ],
)
def test_zero2_on_a_single_rank_runs_as_stage_1(plugin, world_size, stage):
    sp_size = 2 if plugin == "zero2-seq" else 1
    cfg = deepspeed_config(plugin, "fp32", 1.0, micro_batch_size=1, sp_size=sp_size, world_size=world_size)
    assert cfg["zero_optimization"]["stage"] == stage
