"""Improved DDPM: beta schedules and respacing, hybrid training loss, guided ancestral sampling, frame masks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opensora_core.config import read_config
from opensora_core.errors import ConfigError
from opensora_core.models.stdit3 import STDiT3_XL_2
from opensora_core.sample.sampling_loop import guided_prediction, sample_latents
from opensora_core.schedulers import build_scheduler
from opensora_core.schedulers.iddpm import IDDPM, IDDPMSpeed, beta_schedule, respaced_timesteps

REPO = Path(__file__).resolve().parents[1]


# -- schedules and respacing -------------------------------------------------------------------------


def test_linear_schedule_runs_from_1e4_to_0_02_and_alphas_cumprod_ends_near_4e5():
    betas = beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64
    assert (betas[0].item(), betas[-1].item()) == pytest.approx((1e-4, 0.02))
    scheduler = IDDPM()
    assert scheduler.num_timesteps == 1000
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.9999, rel=1e-6)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-4)


def test_linear_schedule_scales_with_the_number_of_steps():
    betas = beta_schedule("linear", 250)
    assert (betas[0].item(), betas[-1].item()) == pytest.approx((4e-4, 0.08))


def test_cosine_schedule_caps_betas_at_0_999():
    betas = beta_schedule("squaredcos_cap_v2", 1000)
    alpha_bar = [math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (0.0, 0.001)]
    assert betas[0].item() == pytest.approx(1 - alpha_bar[1] / alpha_bar[0], rel=1e-12)
    assert betas[-1].item() == 0.999
    assert IDDPM(noise_schedule="squaredcos_cap_v2").alphas_cumprod[0].item() == pytest.approx(
        0.99995873, rel=1e-6
    )


@pytest.mark.parametrize(
    ("respacing", "expected"),
    [
        ("10", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
        ("ddim10", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
        ("2,3", [0, 499, 500, 750, 999]),  # two sections of 500 steps: 2 and 3 evenly strided steps
    ],
)
def test_respaced_timesteps(respacing, expected):
    assert respaced_timesteps(1000, respacing) == expected


def test_respacing_keeps_the_alphas_cumprod_of_the_kept_steps():
    full, spaced = IDDPM(), IDDPM(num_sampling_steps=10)
    assert spaced.num_timesteps == 10
    assert spaced.timestep_map.tolist() == respaced_timesteps(1000, "10")
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-5)
    assert IDDPM(timestep_respacing="").num_timesteps == IDDPM(timestep_respacing=None).num_timesteps == 1000


def test_ddim_respacing_without_an_integer_stride_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"timestep_respacing='ddim600': no integer stride takes exactly 600 of 1000"
    ):
        IDDPM(timestep_respacing="ddim600")


def test_both_step_settings_are_a_config_error():
    with pytest.raises(ConfigError) as err:
        build_scheduler({"type": "iddpm", "num_sampling_steps": 100, "timestep_respacing": ""})
    assert str(err.value) == (
        "scheduler.num_sampling_steps=100 and scheduler.timestep_respacing='' both set the steps; set only one"
    )


def test_unknown_noise_schedule_and_option_name_the_key():
    with pytest.raises(
        ConfigError, match=r"scheduler.noise_schedule='cosine' is not valid; valid: linear, squaredcos"
    ):
        IDDPM(noise_schedule="cosine")
    with pytest.raises(
        ConfigError, match=r"scheduler.sample_method is not a iddpm option; valid: num_sampling_steps"
    ):
        build_scheduler({"type": "iddpm", "sample_method": "uniform"})


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        ("configs/opensora-v1-1/inference/sample.py", 100),
        ("configs/opensora-v1-1/train/stage1.py", 1000),
        ("configs/opensora-v1-1/train/video.py", 1000),
        ("configs/opensora-v1-1/train/image.py", 1000),
    ],
)
def test_open_sora_v1_1_configs_build_their_scheduler(config, steps):
    scheduler = build_scheduler(dict(read_config(REPO / config).scheduler))
    assert type(scheduler) is IDDPM and scheduler.num_timesteps == steps


# -- training ----------------------------------------------------------------------------------------


def tiny_model() -> STDiT3_XL_2:
    torch.manual_seed(0)
    return STDiT3_XL_2(hidden_size=32, depth=1, num_heads=2, caption_channels=16, model_max_length=6)


def sizes(batch: int) -> dict[str, torch.Tensor]:
    return {
        "fps": torch.full((batch,), 24.0),
        "height": torch.full((batch,), 64.0),
        "width": torch.full((batch,), 96.0),
        "num_frames": torch.full((batch,), 17.0),
    }


def test_hybrid_training_loss_is_finite_and_falls_tenfold_when_overfitting():
    model = tiny_model().train()
    model.y_embedder.uncond_prob = 0.0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 2, 4, 6, generator=g), torch.randn(2, 4, 2, 4, 6, generator=g)
    kwargs = {
        "y": torch.randn(2, 1, 6, 16, generator=g),
        "mask": torch.ones(2, 6, dtype=torch.long),
        **sizes(2),
    }
    scheduler, t = IDDPM(), torch.tensor([300, 700])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        terms = scheduler.training_losses(model, x0, kwargs, noise=noise, t=t)
        assert terms["loss"].shape == (2,) and torch.isfinite(terms["loss"]).all()
        assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
        optimizer.zero_grad()
        terms["loss"].mean().backward()
        optimizer.step()
        losses.append(terms["loss"].mean().item())
    assert losses[-1] < losses[0] / 10


class RecordingModel(torch.nn.Module):
    """Predicts zero noise and the midpoint variance, and remembers every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((x.clone(), t.clone(), dict(kwargs)))
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def test_condition_frames_are_noised_to_t0_and_left_out_of_the_loss():
    model, scheduler = RecordingModel(), IDDPM()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 2, 2, generator=g), torch.randn(1, 4, 3, 2, 2, generator=g)
    mask = torch.tensor([[False, True, True]])
    terms = scheduler.training_losses(model, x0, {}, noise=noise, mask=mask, t=torch.tensor([600]))
    x, t, kwargs = model.calls[0]
    a0, a600 = scheduler.alphas_cumprod[0], scheduler.alphas_cumprod[600]
    assert torch.allclose(x[:, :, 0], a0.sqrt() * x0[:, :, 0] + (1 - a0).sqrt() * noise[:, :, 0])
    assert torch.allclose(x[:, :, 1:], a600.sqrt() * x0[:, :, 1:] + (1 - a600).sqrt() * noise[:, :, 1:])
    assert t.tolist() == [600] and torch.equal(kwargs["x_mask"], mask)
    assert terms["mse"].item() == pytest.approx(noise[:, :, 1:].pow(2).mean().item(), rel=1e-6)


def test_respaced_training_gives_the_model_full_chain_timesteps():
    model = RecordingModel()
    IDDPM(timestep_respacing="10").training_losses(
        model, torch.zeros(2, 4, 1, 2, 2), {}, t=torch.tensor([1, 9])
    )
    assert model.calls[0][1].tolist() == [111, 999]


def test_speed_variant_draws_dual_timesteps_and_weights_the_mse_by_one_over_one_plus_snr():
    speed, plain = IDDPMSpeed(), IDDPM()
    assert speed.meaningful_steps == 700  # sqrt(1 - alphas_cumprod) grows < 5e-5 per step from here
    # steps where the noise level still grows fast are 5x as likely: (tanh(+) + 1.5) / (tanh(-) + 1.5)
    assert (speed.timestep_probs[0] / speed.timestep_probs[-1]).item() == pytest.approx(5.0, rel=1e-3)
    t = speed.sample_timesteps(8, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.shape == (8,) and t.min() >= 0 and t.max() < 1000
    assert torch.equal(t[5:], (t[:3] - 700).abs())  # 8 // 2 + 1 draws, then their mirrors around 700

    x0, noise, fixed = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2), torch.tensor([10, 900])
    weighted = speed.training_losses(RecordingModel(), x0, {}, noise=noise, t=fixed)["mse"]
    unweighted = plain.training_losses(RecordingModel(), x0, {}, noise=noise, t=fixed)["mse"]
    assert torch.allclose(weighted, (1 - plain.alphas_cumprod[fixed]) * unweighted, rtol=1e-5)


# -- sampling ----------------------------------------------------------------------------------------


class ConstantTextEncoder:
    """Conditional captions are ones, the null caption zeros."""

    def encode(self, prompts):
        return {"y": torch.ones(len(prompts), 1, 2, 1), "mask": torch.ones(len(prompts), 2)}

    def null(self, n):
        return torch.zeros(n, 1, 2, 1)


class CaptionModel(torch.nn.Module):
    """Every output channel = the caption's mean value + the channel index: cond = 1 + c, uncond = c."""

    def forward(self, x, t, y, **kwargs):
        out = torch.arange(8.0).view(1, 8, 1, 1, 1) + y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1)
        return out.expand(x.shape[0], 8, *x.shape[2:])


@pytest.mark.parametrize(("cfg_channel", "guided"), [(3, 3), (None, 4)])
def test_guidance_applies_to_the_first_cfg_channel_channels_only(cfg_channel, guided):
    scheduler = IDDPM(cfg_scale=4.0, cfg_channel=cfg_channel)
    x = torch.zeros(2, 4, 1, 1, 1)
    y = torch.cat([torch.ones(2, 1, 2, 1), torch.zeros(2, 1, 2, 1)])
    out = guided_prediction(
        CaptionModel(), x, torch.tensor([5, 5]), {"y": y}, 4.0, channels=scheduler.cfg_channel
    )
    channel = torch.arange(8.0)
    # guided: uncond + 4 * (cond - uncond) = c + 4; the rest come from the conditional half: c + 1
    expected = torch.where(channel < guided, channel + 4, channel + 1)
    assert out.shape == (2, 8, 1, 1, 1)
    assert torch.equal(out[:, :, 0, 0, 0], expected.expand(2, 8))


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

    return model, RandomTextEncoder()


def test_sample_returns_latent_shape_and_is_deterministic_with_a_seed(tiny_sampling):
    model, text_encoder = tiny_sampling
    scheduler = build_scheduler(
        {"type": "iddpm", "num_sampling_steps": 5, "cfg_scale": 7.0, "cfg_channel": 3}
    )
    z = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> torch.Tensor:
        return sample_latents(
            model,
            text_encoder,
            scheduler,
            z,
            ["x", "y"],
            model_args=sizes(2),
            progress=False,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert a.shape == z.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_keeps_condition_frames_and_marks_them_clean_for_the_model():
    model, scheduler = RecordingModel(), IDDPM(num_sampling_steps=4)
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0.0, 1.0]])  # frame 0 is a condition
    out = sample_latents(model, ConstantTextEncoder(), scheduler, z, ["a"], mask=mask, progress=False)
    steps = [call[1][0].item() for call in model.calls]
    assert steps == [999, 666, 333, 0]
    for step, (x, _, kwargs) in enumerate(model.calls):
        assert kwargs["x_mask"].tolist() == [[False, True], [False, True]]  # cond and null halves
        assert torch.equal(x[:1, :, 0], z[:, :, 0]) == (step < 3)
    # Open-Sora re-noises condition frames to t = 0 on the last step and denoises them with the model,
    # which moves them by about sqrt(1 / alphas_cumprod[0] - 1) = 0.01 noise
    assert (out[:, :, 0] - z[:, :, 0]).abs().max() < 0.05
    assert (out[:, :, 1] - z[:, :, 1]).abs().max() > 0.1


def test_partial_edit_frames_are_kept_then_renoised_at_their_step():
    model, scheduler = RecordingModel(), IDDPM(num_sampling_steps=10)
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0.5, 1.0]])  # frame 0 is kept for steps 9..6, re-noised at step 5
    sample_latents(model, ConstantTextEncoder(), scheduler, z, ["a"], mask=mask, progress=False)
    for step, (x, _, kwargs) in zip(range(9, -1, -1), model.calls, strict=True):
        assert kwargs["x_mask"][0].tolist() == [step < 5, True]
        assert torch.equal(x[:1, :, 0], z[:, :, 0]) == (step > 5)
