"""Rectified flow: timestep transform values, loss and masks in training, guided Euler sampling."""

from __future__ import annotations

import math

import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.models.stdit3 import STDiT3_XL_2
from opensora_core.sample.sampling_loop import sample_latents
from opensora_core.schedulers import SCHEDULER_TYPES, build_scheduler
from opensora_core.schedulers.rflow import RFlow, add_noise, mean_flat, timestep_transform


def sizes(height: float, width: float, num_frames: float, batch: int = 1) -> dict[str, torch.Tensor]:
    return {
        "height": torch.full((batch,), height),
        "width": torch.full((batch,), width),
        "num_frames": torch.full((batch,), num_frames),
    }


def test_timestep_transform_keeps_512px_images_unchanged():
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    assert torch.allclose(timestep_transform(t, **sizes(512, 512, 1, batch=4)), t)


@pytest.mark.parametrize(
    ("height", "width", "num_frames", "t", "expected"),
    [
        (1024, 1024, 1, 500.0, 2 * 0.5 / (1 + 1 * 0.5) * 1000),  # ratio 2 -> 666.67
        (256, 256, 1, 500.0, 0.5 * 0.5 / (1 - 0.5 * 0.5) * 1000),  # ratio 0.5 -> 333.33
        # 17 frames are 5 latent frames: ratio = 2 * sqrt(5) = 4.4721 -> 331.95
        (1024, 1024, 17, 100.0, 2 * math.sqrt(5) * 0.1 / (1 + (2 * math.sqrt(5) - 1) * 0.1) * 1000),
        # 240p 51 frames: sqrt(240*426/512^2) * sqrt(15) = 2.4187 -> 707.50
        (240, 426, 51, 500.0, 707.4962),
    ],
)
def test_timestep_transform_hand_computed_values(height, width, num_frames, t, expected):
    out = timestep_transform(torch.tensor([t]), **sizes(height, width, num_frames))
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_timestep_transform_counts_short_videos_as_one_latent_frame():
    out = timestep_transform(torch.tensor([500.0]), **sizes(512, 512, 8))
    assert out.item() == pytest.approx(500.0)


def test_timestep_transform_scale_multiplies_the_ratio():
    out = timestep_transform(torch.tensor([500.0]), **sizes(512, 512, 1), scale=3.0)
    assert out.item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5) * 1000)


def test_add_noise_interpolates_from_data_to_noise():
    x0, noise = torch.ones(3, 1, 1, 1, 1), torch.zeros(3, 1, 1, 1, 1)
    out = add_noise(x0, noise, torch.tensor([0.0, 250.0, 1000.0]))
    assert out.flatten().tolist() == [1.0, 0.75, 0.0]


def test_mean_flat_with_frame_mask_averages_only_masked_frames():
    x = torch.arange(6.0).view(1, 1, 3, 1, 2)  # frames: [0,1], [2,3], [4,5]
    assert mean_flat(x).item() == 2.5
    assert mean_flat(x, mask=torch.tensor([[True, False, True]])).item() == (0 + 1 + 4 + 5) / 4


def tiny_model() -> STDiT3_XL_2:
    torch.manual_seed(0)
    return STDiT3_XL_2(hidden_size=32, depth=1, num_heads=2, caption_channels=16, model_max_length=6)


def model_kwargs(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "y": torch.randn(batch, 1, 6, 16, generator=g),
        "mask": torch.ones(batch, 6, dtype=torch.long),
        "fps": torch.full((batch,), 24.0),
        **sizes(64, 96, 17, batch),
    }


def test_training_loss_is_finite_and_decreases():
    model = tiny_model().train()
    model.y_embedder.uncond_prob = 0.0
    scheduler = RFlow(use_timestep_transform=True, sample_method="logit-normal")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 2, 4, 6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([300.0, 700.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = scheduler.training_losses(model, x0, model_kwargs(2), noise=noise, t=t)["loss"]
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("method", ["uniform", "logit-normal"])
def test_training_timesteps_are_in_range_and_seeded(method):
    scheduler = RFlow(sample_method=method)
    a = scheduler.sample_timesteps(256, torch.device("cpu"), torch.Generator().manual_seed(1))
    b = scheduler.sample_timesteps(256, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 1000


def test_logit_normal_timesteps_concentrate_in_the_middle():
    t = RFlow(sample_method="logit-normal").sample_timesteps(
        4000, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    assert ((t > 250) & (t < 750)).float().mean().item() == pytest.approx(
        0.728, abs=0.02
    )  # P(|N(0,1)| < ln 3)


class RecordingModel(torch.nn.Module):
    """Predicts zero velocity and remembers what it was called with."""

    def forward(self, x, t, **kwargs):
        self.x, self.t, self.kwargs = x, t, kwargs
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def test_condition_frames_stay_clean_and_leave_the_loss():
    model = RecordingModel()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 2, 2, generator=g), torch.randn(1, 4, 3, 2, 2, generator=g)
    mask = torch.tensor([[False, True, True]])
    loss = RFlow().training_losses(model, x0, {}, noise=noise, mask=mask, t=torch.tensor([600.0]))["loss"]
    assert torch.equal(model.x[:, :, 0], x0[:, :, 0])
    assert torch.allclose(model.x[:, :, 1:], 0.4 * x0[:, :, 1:] + 0.6 * noise[:, :, 1:])
    assert torch.equal(model.kwargs["x_mask"], mask)
    assert loss.item() == pytest.approx((x0 - noise)[:, :, 1:].pow(2).mean().item(), rel=1e-6)


class ConstantTextEncoder:
    """Conditional captions are ones, the null caption zeros."""

    def encode(self, prompts):
        return {"y": torch.ones(len(prompts), 1, 2, 1), "mask": torch.ones(len(prompts), 2)}

    def null(self, n):
        return torch.zeros(n, 1, 2, 1)


class CaptionVelocityModel(torch.nn.Module):
    """Velocity = the caption's mean value, so cond = 1 and uncond = 0 everywhere."""

    def forward(self, x, t, y, **kwargs):
        v = y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1).expand_as(x)
        return torch.cat([v, torch.zeros_like(x)], dim=1)


def test_sampling_applies_guidance_and_integrates_the_whole_interval():
    z = torch.zeros(2, 4, 1, 2, 2)
    scheduler = RFlow(num_sampling_steps=5, cfg_scale=3.0)
    out = sample_latents(
        CaptionVelocityModel(), ConstantTextEncoder(), scheduler, z, ["a", "b"], progress=False
    )
    # v = uncond + 3 * (cond - uncond) = 3, integrated over dt summing to 1
    assert torch.allclose(out, torch.full_like(z, 3.0))


def test_sampling_schedule_is_shifted_per_sample_by_the_transform():
    scheduler = RFlow(num_sampling_steps=2, use_timestep_transform=True)
    args = {
        "height": torch.tensor([512.0, 1024.0]),
        "width": torch.tensor([512.0, 1024.0]),
        "num_frames": torch.ones(2),
    }
    scheduler.set_timesteps(device="cpu", batch_size=2, model_args=args)
    steps = scheduler.timesteps
    assert [s.tolist() for s in steps] == [[1000.0, 1000.0], pytest.approx([500.0, 2000 / 3])]


@pytest.fixture(scope="module")
def tiny_sampling():
    model = tiny_model().eval()

    class RandomTextEncoder:
        def encode(self, prompts):
            return {
                "y": torch.randn(len(prompts), 1, 6, 16, generator=torch.Generator().manual_seed(2)),
                "mask": torch.ones(len(prompts), 6, dtype=torch.long),
            }

        def null(self, n):
            return model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]

    args = {"fps": torch.full((2,), 24.0), **sizes(64, 96, 17, 2)}
    return model, RandomTextEncoder(), args


def test_sample_returns_latent_shape_and_is_deterministic_with_a_seed(tiny_sampling):
    model, text_encoder, args = tiny_sampling
    scheduler = RFlow(num_sampling_steps=3, cfg_scale=7.0, use_timestep_transform=True)
    z = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0]])  # partial edit draws fresh noise

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sample_latents(
            model,
            text_encoder,
            scheduler,
            z,
            ["x", "y"],
            model_args=args,
            mask=mask,
            progress=False,
            generator=generator,
        )

    a, b, c = run(1), run(1), run(2)
    assert a.shape == z.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_keeps_frames_with_mask_zero(tiny_sampling):
    model, text_encoder, args = tiny_sampling
    z = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = sample_latents(
        model,
        text_encoder,
        RFlow(num_sampling_steps=2),
        z,
        ["x", "y"],
        model_args=args,
        mask=mask,
        progress=False,
    )
    assert torch.equal(out[0, :, 0], z[0, :, 0]) and torch.equal(out[1, :, 2], z[1, :, 2])
    assert not torch.equal(out[0, :, 1], z[0, :, 1])


def test_build_scheduler_reads_the_config():
    scheduler = build_scheduler(
        {"type": "rflow", "use_timestep_transform": True, "num_sampling_steps": 30, "cfg_scale": 7.0}
    )
    assert (scheduler.num_sampling_steps, scheduler.cfg_scale, scheduler.use_timestep_transform) == (
        30,
        7.0,
        True,
    )


def test_every_scheduler_type_builds_with_its_defaults():
    assert SCHEDULER_TYPES == ("iddpm", "iddpm-speed", "dpm-solver", "rflow")
    built = {type_name: build_scheduler({"type": type_name}) for type_name in SCHEDULER_TYPES}
    assert {name: type(s).__name__ for name, s in built.items()} == {
        "iddpm": "IDDPM",
        "iddpm-speed": "IDDPMSpeed",
        "dpm-solver": "DPMSolver",
        "rflow": "RFlow",
    }
    assert {name: s.cfg_scale for name, s in built.items()} == dict.fromkeys(SCHEDULER_TYPES, 4.0)
    assert (built["rflow"].num_sampling_steps, built["dpm-solver"].num_sampling_steps) == (10, 20)
    # iddpm without num_sampling_steps or timestep_respacing samples the full 1000-step chain
    assert len(built["iddpm"].timestep_map) == len(built["iddpm-speed"].timestep_map) == 1000


def test_unknown_scheduler_type_lists_valid_names():
    with pytest.raises(
        ConfigError, match=r"scheduler.type='ddim' is unknown; valid types: iddpm, iddpm-speed"
    ):
        build_scheduler({"type": "ddim"})


def test_unknown_scheduler_option_is_named():
    with pytest.raises(ConfigError, match=r"scheduler.cfg_channel is not a rflow option"):
        build_scheduler({"type": "rflow", "cfg_channel": 3})


def test_unknown_sample_method_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"scheduler.sample_method='normal' is not valid; valid: uniform, logit-normal"
    ):
        build_scheduler({"type": "rflow", "sample_method": "normal"})
