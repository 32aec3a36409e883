"""The model registry maps config `type` strings to models and loads `from_pretrained` weights strictly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.models.registry import (
    MODEL_TYPES,
    TEXT_ENCODER_TYPES,
    VAE_TYPES,
    build_model,
    build_text_encoder,
    build_vae,
    count_parameters,
)

TINY = {"type": "STDiT3-XL/2", "hidden_size": 32, "depth": 1, "num_heads": 2}
SIZES = {"in_channels": 4, "caption_channels": 16, "model_max_length": 6}


def test_registry_lists_every_open_sora_name():
    assert MODEL_TYPES == (
        "STDiT-XL/2",
        "STDiT2-XL/2",
        "STDiT3-XL/2",
        "STDiT3-3B/2",
        "DiT-XL/2",
        "DiT-XL/2x2",
        "Latte-XL/2",
        "Latte-XL/2x2",
        "PixArt-XL/2",
        "PixArt-1B/2",
        "PixArtMS-XL/2",
        "PixArt-Sigma-XL/2",
    )
    assert VAE_TYPES == (
        "VideoAutoencoderKL",
        "OpenSoraVAE_V1_2",
        "VAE_Temporal_SD",
        "VideoAutoencoderPipeline",
    )
    assert TEXT_ENCODER_TYPES == ("t5", "clip", "classes")


def test_config_overrides_and_derived_sizes_reach_the_model():
    model = build_model({**TINY, "qk_norm": True, "freeze_y_embedder": True}, **SIZES)
    assert model.hidden_size == 32 and len(model.spatial_blocks) == 1
    assert model.y_embedder.y_embedding.shape == (6, 16)
    assert not model.y_embedder.y_proj.fc1.weight.requires_grad


def test_open_sora_only_keys_are_accepted():
    extra = {
        "enable_flash_attn": False,
        "enable_layernorm_kernel": False,
        "qk_norm_legacy": False,
        "local_files_only": True,
        "shardformer": True,
        "cache_dir": None,
        "input_sq_size": 512,
        "from_pretrained": None,
    }
    assert build_model({**TINY, **extra}, **SIZES).input_sq_size == 512


def test_every_type_an_open_sora_config_may_name_is_built():
    from functools import partial

    from opensora_core.models.registry import (
        MODEL_TYPES,
        MODELS,
        TEXT_ENCODER_OPTIONS,
        TEXT_ENCODER_TYPES,
        TEXT_ENCODERS,
        VAE_OPTIONS,
        VAE_TYPES,
        VAES,
    )
    from opensora_core.registry import resolve
    from opensora_core.schedulers import SCHEDULER_TYPES, SCHEDULERS

    assert set(MODELS) == set(MODEL_TYPES)
    assert set(VAE_OPTIONS) == set(VAE_TYPES)
    assert set(TEXT_ENCODER_OPTIONS) == set(TEXT_ENCODER_TYPES)
    assert set(SCHEDULERS) == set(SCHEDULER_TYPES)
    # every entry names an object that exists: a preset for each model, a class or builder for the rest
    assert all(isinstance(resolve(target), partial) for target in MODELS.values())
    for registry in (VAES, TEXT_ENCODERS, SCHEDULERS):
        assert all(callable(resolve(target)) for target in registry.values())


def test_unknown_model_type_lists_valid_names():
    with pytest.raises(ConfigError, match=r"model.type='STDiT4' is unknown; valid types: STDiT-XL/2, "):
        build_model({"type": "STDiT4"}, **SIZES)


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match=r"model.hiden_size is not a model option"):
        build_model({**TINY, "hiden_size": 8}, **SIZES)


def test_caption_channels_must_match_the_text_encoder():
    with pytest.raises(ConfigError, match=r"model.caption_channels=32 .* give 16"):
        build_model({**TINY, "caption_channels": 32}, **SIZES)


def test_from_pretrained_loads_a_checkpoint_directory(tmp_path):
    torch.manual_seed(0)
    source = build_model(TINY, **SIZES)
    save_file(source.state_dict(), tmp_path / "ema.safetensors")
    loaded = build_model({**TINY, "from_pretrained": str(tmp_path)}, **SIZES)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_from_pretrained_loads_a_torch_file(tmp_path):
    source = build_model(TINY, **SIZES)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    loaded = build_model({**TINY, "from_pretrained": str(tmp_path / "weights.pt")}, **SIZES)
    assert torch.equal(loaded.final_layer.linear.weight, source.final_layer.linear.weight)


def test_checkpoint_of_another_model_names_the_file_and_mismatch(tmp_path):
    other = build_model({**TINY, "depth": 2}, **SIZES)  # one more spatial + temporal block: 2 x 17 keys
    file = tmp_path / "model.safetensors"
    save_file(other.state_dict(), file)
    with pytest.raises(CheckpointError) as err:
        build_model({**TINY, "from_pretrained": str(file)}, **SIZES)
    message = str(err.value)
    assert str(file) in message
    assert "0 missing, 34 unexpected, 0 wrongly shaped keys" in message


def test_checkpoint_with_other_shapes_is_rejected(tmp_path):
    other = build_model({**TINY, "hidden_size": 64}, **SIZES)
    save_file(other.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"0 missing, 0 unexpected, \d+ wrongly shaped keys"):
        build_model({**TINY, "from_pretrained": str(tmp_path)}, **SIZES)


def test_missing_weights_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        build_model({**TINY, "from_pretrained": str(tmp_path / "nope")}, **SIZES)


def test_count_parameters_matches_the_released_model_size():
    assert count_parameters("STDiT3-XL/2") == 1_207_643_972


def test_count_parameters_of_unknown_type_is_a_config_error():
    with pytest.raises(ConfigError, match="model.type='STDiT4' is unknown; valid types"):
        count_parameters("STDiT4")


def test_vae_options_are_checked_per_type():
    with pytest.raises(ConfigError) as err:
        build_vae({"type": "VideoAutoencoderKL", "from_pretrained": "x", "freeze_vae_2d": True})
    assert str(err.value) == (
        "vae.freeze_vae_2d is not a VideoAutoencoderKL option; valid: cache_dir, from_pretrained, "
        "local_files_only, micro_batch_size, scaling_factor, subfolder"
    )


def test_unknown_text_encoder_type_lists_valid_names():
    with pytest.raises(ConfigError, match=r"text_encoder.type='bert' is unknown; valid types: t5, clip"):
        build_text_encoder({"type": "bert", "from_pretrained": "x"})


def test_missing_vae_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"vae.from_pretrained=.*nope"):
        build_vae(
            {
                "type": "VideoAutoencoderKL",
                "from_pretrained": str(tmp_path / "nope"),
                "local_files_only": True,
            }
        )


def test_unreadable_weights_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read weights"):
        build_model({**TINY, "from_pretrained": str(bad)}, **SIZES)


def test_opensora_models_lists_every_registered_type_with_its_count(capsys):
    import json

    from conftest import DATA

    from opensora_core.cli import main as cli_main
    from opensora_core.models.registry import MODEL_TYPES, TEXT_ENCODER_TYPES, VAE_TYPES
    from opensora_core.schedulers import SCHEDULER_TYPES

    assert cli_main(["models"]) == 0
    counts = {}
    for line in capsys.readouterr().out.splitlines():
        name, count = line.split()[:2]
        counts[name] = int(count.replace(",", ""))
    assert list(counts) == [*MODEL_TYPES, *VAE_TYPES, *TEXT_ENCODER_TYPES, *SCHEDULER_TYPES]
    released = json.loads((DATA / "state-dicts.json").read_text())["models"]
    for name, entry in released.items():
        assert counts[name] == entry["num_params"], name
    assert counts["t5"] == 4_762_310_656  # T5 v1.1 XXL encoder
    assert all(counts[name] == 0 for name in SCHEDULER_TYPES)
