"""DPM-Solver++: the continuous VP schedule, exact solutions for constant predictions, guidance, config errors."""

from __future__ import annotations

import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.models.stdit3 import STDiT3_XL_2
from opensora_core.sample.sampling_loop import sample_latents
from opensora_core.schedulers import build_scheduler
from opensora_core.schedulers.dpm_solver import DPMSolver
from opensora_core.schedulers.iddpm import IDDPM


def test_timesteps_run_uniformly_from_1_to_one_thousandth():
    times = DPMSolver(num_sampling_steps=4).solver_times()
    assert times.tolist() == pytest.approx([1.0, 0.75025, 0.5005, 0.25075, 0.001])


def test_schedule_matches_the_discrete_chain_on_its_steps_and_interpolates_log_alpha_between():
    schedule = DPMSolver().schedule
    alphas_cumprod = IDDPM().alphas_cumprod
    t = torch.tensor([0.001, 0.5, 1.0])  # steps 0, 499 and 999 of the chain
    assert torch.allclose(schedule.alpha(t) ** 2, alphas_cumprod[[0, 499, 999]], rtol=1e-5)
    assert torch.allclose(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones(3))
    midway = schedule.log_alpha_at(torch.tensor([0.5005]))
    assert midway.item() == pytest.approx(
        0.25 * (alphas_cumprod[499].log() + alphas_cumprod[500].log()).item(), rel=1e-5
    )
    lam = schedule.half_log_snr(t)
    assert torch.allclose(lam, (schedule.alpha(t) / schedule.sigma(t)).log(), atol=1e-5)
    assert lam[-1].item() == pytest.approx(-5.06, abs=0.01)  # above DPM-Solver's -5.1 clip: nothing clipped


class ConstantTextEncoder:
    """Conditional captions are ones, the null caption zeros."""

    def encode(self, prompts):
        return {"y": torch.ones(len(prompts), 1, 2, 1), "mask": torch.ones(len(prompts), 2)}

    def null(self, n):
        return torch.zeros(n, 1, 2, 1)


class CaptionNoiseModel(torch.nn.Module):
    """Predicts noise = the caption's mean (cond 1, uncond 0), plus variance channels to be ignored."""

    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, x, t, y, **kwargs):
        self.timesteps.append(t.clone())
        eps = y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, torch.full_like(x, 100.0)], dim=1)


@pytest.mark.parametrize("steps", [3, 12])
def test_constant_guided_noise_is_solved_exactly(steps):
    # With noise prediction e everywhere, x_t = alpha_t * c + sigma_t * e is the exact ODE solution and
    # DPM-Solver++ reproduces it. Guidance: e = 0 + 3 * (1 - 0) = 3.
    scheduler = DPMSolver(num_sampling_steps=steps, cfg_scale=3.0)
    z = torch.randn(2, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    model = CaptionNoiseModel()
    out = sample_latents(model, ConstantTextEncoder(), scheduler, z, ["a", "b"], progress=False)
    ns, start, end = scheduler.schedule, torch.tensor([1.0]), torch.tensor([0.001])
    c = (z - ns.sigma(start) * 3.0) / ns.alpha(start)
    assert torch.allclose(out, ns.alpha(end) * c + ns.sigma(end) * 3.0, atol=1e-5)
    # one model call per step (the last prediction is not needed), each on the [cond, null] batch,
    # at float timesteps (t - 1/1000) * 1000
    assert len(model.timesteps) == steps
    assert model.timesteps[0].tolist() == pytest.approx([999.0] * 4)
    assert model.timesteps[1][0].item() == pytest.approx(999 * (1 - 1 / steps), rel=1e-5)


def test_sampling_is_deterministic_and_ignores_the_generator():
    torch.manual_seed(0)
    model = STDiT3_XL_2(hidden_size=32, depth=1, num_heads=2, caption_channels=16, model_max_length=6).eval()

    class RandomTextEncoder:
        def encode(self, prompts):
            y = torch.randn(len(prompts), 1, 6, 16, generator=torch.Generator().manual_seed(2))
            return {"y": y, "mask": torch.ones(len(prompts), 6, dtype=torch.long)}

        def null(self, n):
            return model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]

    args = {"fps": torch.full((2,), 24.0), "height": torch.full((2,), 64.0), "width": torch.full((2,), 96.0)}
    scheduler = build_scheduler({"type": "dpm-solver", "num_sampling_steps": 4, "cfg_scale": 7.0})
    z = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    a, b = (
        sample_latents(
            model,
            RandomTextEncoder(),
            scheduler,
            z,
            ["x", "y"],
            model_args=args,
            progress=False,
            generator=g,
        )
        for g in (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    )
    assert a.shape == z.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_condition_frames_are_a_config_error():
    with pytest.raises(ConfigError, match=r"scheduler.type='dpm-solver' cannot keep condition frames"):
        sample_latents(
            CaptionNoiseModel(),
            ConstantTextEncoder(),
            DPMSolver(),
            torch.zeros(1, 4, 2, 2, 2),
            ["a"],
            mask=torch.tensor([[0.0, 1.0]]),
            progress=False,
        )


def test_training_with_dpm_solver_is_a_config_error():
    with pytest.raises(ConfigError, match=r"scheduler.type='dpm-solver' only samples"):
        DPMSolver().training_losses(CaptionNoiseModel(), torch.zeros(1, 4, 1, 2, 2), {})


def test_config_options_and_step_count():
    scheduler = build_scheduler({"type": "dpm-solver", "num_sampling_steps": 25, "cfg_scale": 4.5})
    assert (scheduler.num_sampling_steps, scheduler.cfg_scale) == (25, 4.5)
    assert build_scheduler({"type": "dpm-solver"}).num_sampling_steps == 20
    with pytest.raises(ConfigError, match=r"scheduler.num_sampling_steps=1 must be an integer >= 2"):
        build_scheduler({"type": "dpm-solver", "num_sampling_steps": 1})
    with pytest.raises(ConfigError, match=r"scheduler.cfg_channel is not a dpm-solver option"):
        build_scheduler({"type": "dpm-solver", "cfg_channel": 3})
