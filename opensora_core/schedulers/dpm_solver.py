"""DPM-Solver++ sampling steps (Open-Sora's `dpm-solver`): second-order multistep, for noise-predicting models.

The model's first C output channels are noise predictions on the linear-beta discrete VP chain of
1000 steps. DPM-Solver treats that chain as continuous in t in [1/1000, 1]: log(alpha_t) is linearly
interpolated between the discrete steps (t_n = (n + 1)/1000), the solver steps uniformly in t from
1 to 1/1000, and the model is given the float timestep (t - 1/1000) * 1000.

diffusers' DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint") takes the same update steps, but rounds its timesteps to integers,
interpolates sigmas instead of log-alphas, and switches to first order at the end below 15 steps
instead of 10, so its samples differ; the few lines of the solver are written here instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from opensora_core.errors import ConfigError
from opensora_core.schedulers.frames import FrameMasks
from opensora_core.schedulers.iddpm import beta_schedule

TRAIN_STEPS = 1000
SOLVER_ORDER = 2
LOWER_ORDER_FINAL_BELOW = 10  # with fewer steps, the last step is first order (stabler for few steps)


class DiscreteVPSchedule:
    """alpha_t, sigma_t and the half log-SNR lambda_t of a discrete VP chain, for continuous t in (0, 1].

    The linear schedule's lambda at t = 1 is -5.06, above DPM-Solver's -5.1 clipping threshold, so no
    steps are clipped from the end of the chain.
    """

    def __init__(self, betas: Tensor):
        log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)  # float64, then stored as float32
        self.log_alpha = log_alphas.float()
        self.total_steps = int(betas.shape[0])
        self.t_grid = torch.linspace(0.0, 1.0, self.total_steps + 1)[1:]

    def log_alpha_at(self, t: Tensor) -> Tensor:
        """log(alpha_t) [N] for t [N] (or a scalar, giving [1]): piecewise linear, extrapolated at the ends."""
        t = t.reshape(-1)
        xp, fp = self.t_grid.to(t.device), self.log_alpha.to(t.device)
        k = (torch.searchsorted(xp, t, right=True) - 1).clamp(0, xp.shape[0] - 2)
        x0, x1, y0, y1 = xp[k], xp[k + 1], fp[k], fp[k + 1]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha_at(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha_at(t)))

    def half_log_snr(self, t: Tensor) -> Tensor:
        log_alpha = self.log_alpha_at(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


class DPMSolver:
    """Open-Sora's `dpm-solver` scheduler: `set_timesteps` and `step` only (Open-Sora trains no model with it).

    Multistep: `step` keeps the last two data predictions, so one sampling run must call `step` once
    per entry of `timesteps`, in order, after `set_timesteps`.
    """

    def __init__(self, num_sampling_steps: int = 20, cfg_scale: float = 4.0):
        # Open-Sora leaves num_sampling_steps=None, which fails when sampling; 20 is DPM-Solver's default.
        _check_steps(num_sampling_steps)
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.schedule = DiscreteVPSchedule(beta_schedule("linear", TRAIN_STEPS))
        self.set_timesteps()

    def training_losses(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        raise ConfigError("scheduler.type='dpm-solver' only samples; train with iddpm, iddpm-speed or rflow")

    def solver_times(self, device: torch.device | str | None = "cpu") -> Tensor:
        """The solver's continuous times [steps + 1], uniform from 1 down to 1/1000."""
        return torch.linspace(1.0, 1.0 / self.schedule.total_steps, self.num_sampling_steps + 1).to(device)

    def set_timesteps(
        self,
        num_sampling_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        batch_size: int = 1,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        """`timesteps` [steps, B]: the float timesteps (t - 1/1000) * 1000 the model is given at the
        solver's times but the last."""
        if num_sampling_steps is not None:
            _check_steps(num_sampling_steps)
            self.num_sampling_steps = num_sampling_steps
        self._times = self.solver_times(device)
        model_times = (self._times[:-1] - 1.0 / self.schedule.total_steps) * 1000.0
        self.timesteps = model_times[:, None].repeat(1, batch_size)
        self._step_index = 0
        self._data_predictions: list[Tensor] = []

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Solve from this step's time to the next one, given the (guided) noise prediction in the first
        half of `model_output`'s channels. Deterministic: `generator` is unused."""
        ns, k = self.schedule, self._step_index
        s, t = self._times[k], self._times[k + 1]
        eps = model_output.chunk(2, dim=1)[0]
        self._data_predictions = [*self._data_predictions[-1:], (sample - ns.sigma(s) * eps) / ns.alpha(s)]
        last = k + 1 == self.num_sampling_steps
        # the first step has a single previous prediction; with few steps the last is first order too
        if k == 0 or (last and self.num_sampling_steps < LOWER_ORDER_FINAL_BELOW):
            x = self._first_order_step(sample, s, t, self._data_predictions[-1])
        else:
            x = self._second_order_step(sample, self._data_predictions, [self._times[k - 1], s], t)
        self._step_index += 1
        return x

    def frame_masks(self, mask: Tensor, index: int) -> FrameMasks:
        raise ConfigError(
            "scheduler.type='dpm-solver' cannot keep condition frames (reference_path / mask_strategy); "
            "use iddpm or rflow"
        )

    def _first_order_step(self, x: Tensor, s: Tensor, t: Tensor, x0_s: Tensor) -> Tensor:
        """DPM-Solver++-1 (DDIM) from time s to t, given the data prediction at s."""
        ns = self.schedule
        h = ns.half_log_snr(t) - ns.half_log_snr(s)
        alpha_t = torch.exp(ns.log_alpha_at(t))
        phi_1 = torch.expm1(-h)
        return ns.sigma(t) / ns.sigma(s) * x - alpha_t * phi_1 * x0_s

    def _second_order_step(self, x: Tensor, prev_x0: list[Tensor], prev_t: list[Tensor], t: Tensor) -> Tensor:
        """Multistep DPM-Solver++(2M) to t from the last two data predictions (the midpoint variant)."""
        ns = self.schedule
        x0_1, x0_0 = prev_x0[-2], prev_x0[-1]
        lambda_1, lambda_0, lambda_t = (
            ns.half_log_snr(prev_t[-2]),
            ns.half_log_snr(prev_t[-1]),
            ns.half_log_snr(t),
        )
        sigma_0, sigma_t = ns.sigma(prev_t[-1]), ns.sigma(t)
        alpha_t = torch.exp(ns.log_alpha_at(t))
        h_0 = lambda_0 - lambda_1
        h = lambda_t - lambda_0
        r0 = h_0 / h
        d1_0 = (1.0 / r0) * (x0_0 - x0_1)
        phi_1 = torch.expm1(-h)
        return (sigma_t / sigma_0) * x - (alpha_t * phi_1) * x0_0 - 0.5 * (alpha_t * phi_1) * d1_0


def _check_steps(num_sampling_steps: object) -> None:
    if not isinstance(num_sampling_steps, int) or num_sampling_steps < SOLVER_ORDER:
        raise ConfigError(
            f"scheduler.num_sampling_steps={num_sampling_steps!r} must be an integer >= {SOLVER_ORDER} for dpm-solver"
        )
