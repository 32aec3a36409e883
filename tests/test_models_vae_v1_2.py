"""Open-Sora v1.2's VAE (OpenSoraVAE_V1_2 = image VAE + VAE_Temporal_SD): released layout, latent sizes,
chunked encode / decode, normalisation, strict local loading, and sampling through it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest
import torch
from conftest import DATA
from safetensors.torch import load_file, save_file

from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.models.registry import build_vae
from opensora_core.models.tiny_random import TinyPretrained, create_tiny_pretrained
from opensora_core.models.vae_pipeline import (
    V1_2_SCALE,
    V1_2_SHIFT,
    OpenSoraVAE_V1_2,
    VideoAutoencoderPipeline,
)
from opensora_core.models.vae_temporal import CausalConv3d, VAE_Temporal_SD

REPO = Path(__file__).resolve().parents[1]
RELEASED = json.loads((DATA / "state-dicts.json").read_text())["models"]


def released_layout(type_name: str) -> list[tuple[str, list[int]]]:
    return [(name, shape) for name, shape, _ in RELEASED[type_name]["state_dict"]]


def layout(model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(name, list(t.shape)) for name, t in model.state_dict().items()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyPretrained:
    return create_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), seed=0)


@pytest.fixture(scope="module")
def vae(tiny) -> VideoAutoencoderPipeline:
    config = {
        "type": "OpenSoraVAE_V1_2",
        "from_pretrained": str(tiny.vae_v1_2),
        "micro_frame_size": 17,
        "micro_batch_size": 4,
    }
    return build_vae(config).eval()


@pytest.fixture(scope="module")
def released() -> VideoAutoencoderPipeline:
    with torch.device("meta"):
        return OpenSoraVAE_V1_2()


def pixels(frames: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_temporal_vae_has_the_released_layout_and_size():
    with torch.device("meta"):
        model = VAE_Temporal_SD()
    assert layout(model) == released_layout("VAE_Temporal_SD")
    assert (
        sum(p.numel() for p in model.parameters()) == RELEASED["VAE_Temporal_SD"]["num_params"] == 309_687_144
    )


def test_pipeline_has_the_released_layout_and_size(released):
    assert layout(released) == released_layout("OpenSoraVAE_V1_2")
    assert sum(p.numel() for p in released.parameters()) == 393_341_007
    trainable = sum(p.numel() for p in released.parameters() if p.requires_grad)
    assert trainable == RELEASED["OpenSoraVAE_V1_2"]["num_trainable_params"]
    assert released.out_channels == 4 and released.micro_z_frame_size == 5


def test_freeze_vae_2d_freezes_only_the_image_vae():
    with torch.device("meta"):
        model = OpenSoraVAE_V1_2(freeze_vae_2d=True)
    assert not any(p.requires_grad for p in model.spatial_vae.parameters())
    assert all(p.requires_grad for p in model.temporal_vae.parameters())


@pytest.mark.parametrize(
    ("frames", "latent_frames"),
    [(1, 1), (2, 1), (5, 2), (17, 5), (18, 6), (21, 6), (22, 7), (34, 10), (51, 15), (68, 20)],
)
def test_latent_frames_count_whole_chunks_then_the_remainder(released, frames, latent_frames):
    assert released.get_latent_size((frames, 240, 426)) == [latent_frames, 30, 53]


def test_latent_size_of_unknown_dimensions_stays_unknown(released):
    assert released.get_latent_size((None, None, None)) == [None, None, None]
    assert released.temporal_vae.get_latent_size((17, 30, 53)) == [5, 30, 53]  # 17 -> padded to 20 -> 5


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (20, 6)])  # an image; a chunk + 3 frames
def test_encode_decode_shapes_round_trip(vae, frames, latent_frames):
    with torch.no_grad():
        z = vae.encode(pixels(frames), generator=torch.Generator().manual_seed(0))
        assert z.shape == (1, 4, latent_frames, 2, 2)
        assert list(z.shape[2:]) == vae.get_latent_size((frames, 16, 16))
        x = vae.decode(z, num_frames=frames)
    assert x.shape == (1, 3, frames, 16, 16)


def test_decode_without_num_frames_assumes_whole_chunks(vae):
    with torch.no_grad():
        x = vae.decode(torch.randn(1, 4, 6, 2, 2))  # a chunk of 5 + 1 latent frame
    assert x.shape[2] == 17 + 4


def test_encode_with_a_generator_is_reproducible(vae):
    x = pixels(5)
    with torch.no_grad():
        a = vae.encode(x, generator=torch.Generator().manual_seed(3))
        b = vae.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_later_chunks_do_not_change_earlier_latent_frames(vae):
    x = pixels(34)
    changed = x.clone()
    changed[:, :, 20] = -changed[:, :, 20]  # a frame of the second 17-frame chunk
    with torch.no_grad():
        a = vae.encode(x, generator=torch.Generator().manual_seed(0))
        b = vae.encode(changed, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, :, :5], b[:, :, :5])
    assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_causal_conv_output_never_sees_later_frames():
    conv = CausalConv3d(2, 3, 3)
    x = torch.randn(1, 2, 8, 4, 4)
    changed = x.clone()
    changed[:, :, 5] += 1
    with torch.no_grad():
        a, b = conv(x), conv(changed)
    assert a.shape == x.shape[:1] + (3,) + x.shape[2:]
    assert torch.equal(a[:, :, :5], b[:, :, :5])
    assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_group_norm_lets_later_frames_of_a_chunk_shift_earlier_latents(vae):
    """As in Open-Sora: the convolutions are causal, but GroupNorm statistics span the whole chunk."""
    x_z = torch.randn(1, 4, 17, 2, 2)
    changed = x_z.clone()
    changed[:, :, 16] += 1
    with torch.no_grad():
        a = vae.temporal_vae.encode(x_z).mode()
        b = vae.temporal_vae.encode(changed).mode()
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])


def test_latents_are_normalised_with_the_v1_2_shift_and_scale(tiny, vae):
    raw = OpenSoraVAE_V1_2(from_pretrained=str(tiny.vae_v1_2), cal_loss=True).eval()
    x = pixels(7)
    with torch.no_grad():
        z = vae.encode(x, generator=torch.Generator().manual_seed(1))
        z_raw, posterior, x_z = raw.encode(x, generator=torch.Generator().manual_seed(1))
        shift = torch.tensor(V1_2_SHIFT).view(1, 4, 1, 1, 1)
        scale = torch.tensor(V1_2_SCALE).view(1, 4, 1, 1, 1)
        assert torch.allclose(z, (z_raw - shift) / scale, atol=1e-6)
        assert x_z.shape == (1, 4, 7, 2, 2) and posterior.mean.shape == z_raw.shape == (1, 4, 2, 2, 2)
        decoded = vae.decode(z, num_frames=7)
        decoded_raw, _ = raw.decode(z * scale + shift, num_frames=7)
    assert torch.allclose(decoded, decoded_raw, atol=1e-5)


def test_weights_load_strictly_from_the_local_directory(tiny, vae):
    saved = load_file(tiny.vae_v1_2 / "model.safetensors")
    state = vae.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert vae.shift.flatten().tolist() == pytest.approx(V1_2_SHIFT)


def test_save_pretrained_round_trips(tmp_path, vae):
    vae.save_pretrained(tmp_path / "copy")
    again = build_vae({"type": "OpenSoraVAE_V1_2", "from_pretrained": str(tmp_path / "copy")})
    ours, loaded = vae.state_dict(), again.state_dict()
    assert ours.keys() == loaded.keys()
    assert all(torch.equal(ours[k], loaded[k]) for k in ours)


def test_checkpoint_of_another_vae_is_a_one_line_checkpoint_error(tmp_path, tiny):
    shutil.copytree(tiny.vae_v1_2, tmp_path / "kl")
    kl = build_vae({"type": "VideoAutoencoderKL", "from_pretrained": str(tiny.vae)})
    save_file({k: v.contiguous() for k, v in kl.state_dict().items()}, tmp_path / "kl" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        build_vae({"type": "OpenSoraVAE_V1_2", "from_pretrained": str(tmp_path / "kl")})
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit vae.type='OpenSoraVAE_V1_2'" in message and "missing" in message


def test_a_hub_name_without_local_files_says_how_to_fetch_it():
    with pytest.raises(CheckpointError, match=r"hpcai-tech/OpenSora-VAE-v1.2: no such file or directory"):
        build_vae({"type": "OpenSoraVAE_V1_2", "from_pretrained": "hpcai-tech/OpenSora-VAE-v1.2"})


def test_each_vae_type_lists_its_own_options():
    with pytest.raises(ConfigError) as err:
        build_vae({"type": "OpenSoraVAE_V1_2", "subfolder": "vae"})
    assert str(err.value) == (
        "vae.subfolder is not a OpenSoraVAE_V1_2 option; valid: cal_loss, force_huggingface, freeze_vae_2d, "
        "from_pretrained, local_files_only, micro_batch_size, micro_frame_size"
    )
    with pytest.raises(
        ConfigError, match=r"vae.filters is not a VAE_Temporal_SD option; valid: activation_fn, "
    ):
        build_vae({"type": "VAE_Temporal_SD", "filters": 8})


def test_temporal_vae_type_builds_the_released_preset():
    with torch.device("meta"):
        model = build_vae({"type": "VAE_Temporal_SD", "from_pretrained": None})
    assert layout(model) == released_layout("VAE_Temporal_SD")


def test_pipeline_type_builds_from_its_two_vae_dicts(tiny):
    vae = build_vae(
        {
            "type": "VideoAutoencoderPipeline",
            "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": str(tiny.vae), "micro_batch_size": 4},
            "vae_temporal": {"type": "VAE_Temporal_SD", "filters": 8, "num_res_blocks": 1, "num_groups": 4},
            "micro_frame_size": 17,
            "shift": list(V1_2_SHIFT),
            "scale": list(V1_2_SCALE),
        }
    )
    assert vae.get_latent_size((51, 64, 96)) == [15, 8, 12]
    assert vae.scale.shape == (1, 4, 1, 1, 1)


def sample_config(tmp_path: Path, tiny: TinyPretrained, **extra: object) -> Path:
    """The published v1.2 inference config with tiny local models; the VAE section keeps its type."""
    lines = [
        f'_base_ = ["{REPO / "configs/opensora-v1-2/inference/sample.py"}"]',
        "model = dict(hidden_size=32, depth=1, num_heads=2, from_pretrained=None, enable_flash_attn=False,"
        " enable_layernorm_kernel=False)",
        f'vae = dict(from_pretrained="{tiny.vae_v1_2}")',
        f'text_encoder = dict(from_pretrained="{tiny.t5}", model_max_length=8, local_files_only=True)',
        "scheduler = dict(num_sampling_steps=2)",
        'dtype = "fp32"',
        f'save_dir = "{tmp_path / "samples"}"',
        "image_size = (16, 16)",
    ]
    lines += [f"{k} = {v!r}" for k, v in extra.items()]
    path = tmp_path / "sample_cfg.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_v1_2_sample_config_writes_a_video_with_the_requested_frames(tmp_path, tiny):
    from opensora_core.cli import main as cli_main
    from opensora_core.config import load_config

    config = sample_config(tmp_path, tiny, num_frames=22, loop=2)
    assert load_config(config).vae.as_dict()["type"] == "OpenSoraVAE_V1_2"
    assert cli_main(["sample", str(config), "--prompt", "a red ball"]) == 0
    (video,) = (tmp_path / "samples").iterdir()
    with av.open(str(video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    # Two 22-frame clips (5 + 2 latent frames each); the second continues from the first's last 5
    # latent frames = one 17-frame chunk, which is dropped when stitching.
    assert frames == 22 + 22 - 17
