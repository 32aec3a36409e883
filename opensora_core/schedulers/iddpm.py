"""Improved DDPM (Open-Sora v1.0/v1.1's `iddpm`, and `iddpm-speed`): hybrid training loss and ancestral sampling steps.

Convention: integer timesteps t in [0, N) of a (possibly respaced) discrete VP chain;
x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * noise. The model predicts noise in its
first C output channels and, with `learn_sigma`, an interpolation value v in [-1, 1] in the next C
channels: log variance = (v + 1)/2 * log(beta_t) + (1 - v)/2 * log(posterior variance_t).

diffusers' DDPMScheduler builds the same "linear" and "squaredcos_cap_v2" betas, but in float32 and
without respacing, learned-range variance or the variational-bound loss, and its fixed-large variance
differs at t = 0; Open-Sora derives respaced betas from float64 cumulative products and then every
table from those betas as float32 tensors. The tables are built here in that order so sampled latents
match Open-Sora's to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from opensora_core.errors import ConfigError
from opensora_core.schedulers.frames import FrameMasks, mean_flat

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


# -- schedules ---------------------------------------------------------------------------------------


def beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """float64 betas [num_timesteps]: Ho et al.'s linear 1e-4..0.02 (scaled to the step count) or the cosine schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ConfigError(f"scheduler.noise_schedule={name!r} is not valid; valid: {', '.join(NOISE_SCHEDULES)}")


def respaced_timesteps(num_timesteps: int, respacing: str | Sequence[int]) -> list[int]:
    """The timesteps of the full chain kept for a respaced one, ascending.

    `respacing` is "ddimN" (the DDIM paper's fixed integer stride giving exactly N steps), or section
    counts "N" / "N1,N2,...": the chain is cut into equal sections and each section is evenly strided
    (rounding fractional positions) into that many steps.
    """
    where = f"scheduler.timestep_respacing={respacing!r}"
    if isinstance(respacing, str):
        if respacing.startswith("ddim"):
            count = _int_or_error(respacing[len("ddim") :], where)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return list(range(0, num_timesteps, stride))
            raise ConfigError(f"{where}: no integer stride takes exactly {count} of {num_timesteps} steps")
        respacing = [_int_or_error(part, where) for part in respacing.split(",")]
    size_per, extra = divmod(num_timesteps, len(respacing))
    start, steps = 0, []
    for i, count in enumerate(respacing):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ConfigError(f"{where}: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def _int_or_error(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{where}: expected 'N', 'N1,N2,...' or 'ddimN' with integers N") from None


# -- Gaussian helpers of the variational bound (in bits after dividing by log 2) --------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) per element for a Gaussian discretised to 256 bins on [-1, 1] (the decoder term at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] as float32, shaped [B, 1, ...] to broadcast over an ndim-dimensional batch."""
    return table.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


# -- the scheduler -----------------------------------------------------------------------------------


class IDDPM:
    """Open-Sora's `iddpm` scheduler: `training_losses` for training; `set_timesteps` and `step` for sampling."""

    def __init__(
        self,
        num_sampling_steps: int | None = None,
        timestep_respacing: str | Sequence[int] | None = None,
        noise_schedule: str = "linear",
        use_kl: bool = False,
        sigma_small: bool = False,
        predict_xstart: bool = False,
        learn_sigma: bool = True,
        rescale_learned_sigmas: bool = False,
        diffusion_steps: int = 1000,
        cfg_scale: float = 4.0,
        cfg_channel: int | None = None,
    ):
        if num_sampling_steps is not None and timestep_respacing is not None:
            raise ConfigError(
                f"scheduler.num_sampling_steps={num_sampling_steps!r} and "
                f"scheduler.timestep_respacing={timestep_respacing!r} both set the steps; set only one"
            )
        if cfg_channel is not None and (not isinstance(cfg_channel, int) or cfg_channel < 1):
            raise ConfigError(f"scheduler.cfg_channel={cfg_channel!r} must be a positive integer or None")
        if num_sampling_steps is not None:
            timestep_respacing = str(num_sampling_steps)
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]

        self.predict_xstart = predict_xstart
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        # rescale_learned_sigmas scales the bound term by N/1000 (1 for the usual 1000-step chain);
        # use_kl trains on the bound alone, scaled by N, instead of MSE + bound.
        self.use_kl = use_kl
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel

        self.noise_schedule = noise_schedule
        self.diffusion_steps = diffusion_steps
        self._respace(timestep_respacing)

    def _respace(self, timestep_respacing: str | Sequence[int]) -> None:
        # Respacing keeps a subset of the full chain's timesteps and recomputes the betas between
        # them, so the kept steps have the same alphas_cumprod as in the full chain.
        betas = beta_schedule(self.noise_schedule, self.diffusion_steps)
        full_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        kept = respaced_timesteps(self.diffusion_steps, timestep_respacing)
        if len(kept) < 2:
            raise ConfigError(f"scheduler.timestep_respacing={timestep_respacing!r}: needs at least 2 steps")
        self.timestep_map = torch.tensor(kept)  # respaced index -> the timestep the model is given
        kept_cumprod = full_alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_cumprod[:-1]])
        self._build_tables((1 - kept_cumprod / previous).float())
        self.timesteps = self.timestep_map.flip(0)[:, None]  # set per batch by set_timesteps

    def _build_tables(self, betas: Tensor) -> None:
        # float32 throughout, as Open-Sora stores the respaced betas as a FloatTensor
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.tensor([1.0]), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0, so its log takes the t = 1 value there
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = torch.log(betas)
        # fixed "large" variance is beta_t, except at t = 0 where beta_0 would be too small for the decoder
        fixed_large = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self.fixed_log_variance = (
            self.posterior_log_variance_clipped if self.sigma_small else torch.log(fixed_large)
        )

    # -- the diffusion process -----------------------------------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alphas_cumprod[t]) * x_start + sqrt(1 - alphas_cumprod[t]) * noise."""
        n = x_start.dim()
        return (
            _extract(self.sqrt_alphas_cumprod, t, n) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise
        )

    def q_posterior_mean(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        n = x_t.dim()
        return (
            _extract(self.posterior_mean_coef1, t, n) * x_start
            + _extract(self.posterior_mean_coef2, t, n) * x_t
        )

    def p_mean_variance(self, model_output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log variance, predicted x0) of p(x_{t-1} | x_t) from the model's raw output."""
        n, C = x.dim(), x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"iddpm with learn_sigma=True needs {2 * C} model output channels (noise + variance), "
                    f"got {model_output.shape[1]}; build the model with pred_sigma=True"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, n)
            max_log = _extract(self.log_betas, t, n)
            frac = (var_values + 1) / 2  # var_values in [-1, 1] spans [posterior variance, beta]
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            if model_output.shape[1] != C:
                raise ValueError(
                    f"iddpm with learn_sigma=False needs {C} model output channels, got "
                    f"{model_output.shape[1]}; set learn_sigma=True or build the model with pred_sigma=False"
                )
            log_variance = _extract(self.fixed_log_variance, t, n)
        if self.predict_xstart:
            pred_xstart = model_output
        else:
            pred_xstart = (
                _extract(self.sqrt_recip_alphas_cumprod, t, n) * x
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, n) * model_output
            )
        return self.q_posterior_mean(pred_xstart, x, t), log_variance, pred_xstart

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Respaced indices -> the full-chain timesteps the model was trained on."""
        return self.timestep_map.to(t.device)[t]

    # -- training ------------------------------------------------------------------------------------

    def sample_timesteps(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training timesteps [B], uniform over the chain's indices."""
        if generator is None:
            return torch.randint(0, self.num_timesteps, (batch,), device=device)
        return torch.randint(
            0, self.num_timesteps, (batch,), generator=generator, device=generator.device
        ).to(device)

    def mse_weights(self, t: Tensor) -> Tensor | None:
        """Per-sample weights of the noise MSE (None: unweighted)."""
        return None

    def vb_terms(
        self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """One term of the variational bound per sample, in bits per dim: the decoder NLL at t = 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        n = x_t.dim()
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_variance = _extract(self.posterior_log_variance_clipped, t, n)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance), mask=mask) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
        nll = mean_flat(nll, mask=mask) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x_start: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """{"loss": [B], "mse", "vb"}: noise MSE plus, with learned variance, the bound's term for the variance.

        The bound term sees the noise prediction detached, so it trains only the variance channels.
        `mask` [B, T] bool: frames where it is False are condition frames, noised only to t = 0, left
        out of the loss, and passed to the model as `x_mask` unless the caller already set one.
        """
        model_kwargs = dict(model_kwargs or {})
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], x_start.device, generator)
        if noise is None:
            noise = torch.randn(
                x_start.shape,
                generator=generator,
                device=_gen_device(generator, x_start),
                dtype=x_start.dtype,
            ).to(x_start.device)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")

        x_t = self.q_sample(x_start, t, noise)
        if mask is not None:
            mask = mask.bool()
            x_t0 = self.q_sample(x_start, torch.zeros_like(t), noise)
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_t0)
            model_kwargs.setdefault("x_mask", mask)
        model_output = model(x_t, self.model_timesteps(t), **model_kwargs)

        if self.use_kl:
            if mask is not None:
                raise ValueError("iddpm with use_kl=True does not support frame masks (mask_ratios)")
            return {"loss": self.vb_terms(model_output, x_start, x_t, t) * self.num_timesteps}

        terms = {}
        C = x_t.shape[1]
        if self.learn_sigma:
            eps, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms(frozen, x_start, x_t, t, mask=mask)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            model_output = eps
        target = x_start if self.predict_xstart else noise
        if model_output.shape != target.shape:
            raise ValueError(
                f"model output {tuple(model_output.shape)} does not match the target {tuple(target.shape)}"
            )
        error = (target - model_output) ** 2
        weights = self.mse_weights(t)
        if weights is not None:
            error = weights.view(-1, *([1] * (error.dim() - 1))) * error
        terms["mse"] = mean_flat(error, mask=mask)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # -- sampling ------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_sampling_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        batch_size: int = 1,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        """`timesteps` [steps, B]: the full-chain timesteps the model is given, from the last kept one
        down to 0. A step count other than the chain's respaces it (and so the training chain too)."""
        if num_sampling_steps is not None and num_sampling_steps != self.num_timesteps:
            self._respace(str(num_sampling_steps))
        self.timesteps = self.timestep_map.flip(0)[:, None].repeat(1, batch_size).to(device)

    def _chain_index(self, timesteps: Tensor) -> Tensor:
        """Full-chain timesteps the model is given -> indices of the (respaced) chain."""
        return torch.searchsorted(self.timestep_map.to(timesteps.device), timesteps)

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw x_{t-1} from p(x_{t-1} | x_t) given the model's raw (guided) output; no noise at t = 0.

        Open-Sora runs its loop on the doubled guidance batch; its noise is drawn at that size and cut
        to the first half, so a seeded run matches theirs.
        """
        t = self._chain_index(timestep)
        mean, log_variance, _ = self.p_mean_variance(model_output, sample, t)
        noise = _randn(sample, 2 * sample.shape[0], generator)
        nonzero = (t != 0).float().view(-1, *([1] * (sample.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t for the full-chain timesteps [B] the model is given (entries of `timesteps`)."""
        return self.q_sample(original_samples, self._chain_index(timesteps), noise)

    def noise_like(self, sample: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fresh noise for re-noising condition frames, drawn at the doubled batch size as in `step`."""
        return _randn(sample, 2 * sample.shape[0], generator)

    def frame_masks(self, mask: Tensor, index: int) -> FrameMasks:
        """At step `index` (chain index i = N - 1 - index), for `mask` [B, T] (1 = generate, 0 = keep,
        in between = keep until chain index mask * N): a frame is re-noised at its own index, generated
        below it and kept above it, as Open-Sora does."""
        start = (mask.to(torch.float32) * self.num_timesteps).to(torch.int32)
        i = self.num_timesteps - 1 - index
        return FrameMasks(renoise=start == i, generate=start > i, keep=start < i)


class IDDPMSpeed(IDDPM):
    """Open-Sora's `iddpm-speed` (SpeeD): same chain and sampling, but training draws timesteps where the
    noise level still changes more often, pairs each with a "dual" timestep, and weights the noise MSE
    by 1 / (1 + SNR) (P2 weighting with k = gamma = 1)."""

    p2_k = 1.0
    p2_gamma = 1.0

    def _build_tables(self, betas: Tensor) -> None:
        super()._build_tables(betas)
        grad = torch.gradient(self.sqrt_one_minus_alphas_cumprod)[0]
        # the first step from which the noise level grows by less than 5e-5 per step
        self.meaningful_steps = int(torch.argmax((grad < 5e-5).int())) + 1
        # ~5x more probability where the noise level still grows by more than 1e-4 per step
        self.timestep_probs = F.normalize(torch.tanh(1e6 * (grad - 1e-4)) + 1.5, p=1, dim=0)
        snr = 1.0 / (1 - self.alphas_cumprod) - 1
        self.p2_weights = 1 / (self.p2_k + snr) ** self.p2_gamma

    def sample_timesteps(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Half the batch from `timestep_probs`, the other half their mirror around `meaningful_steps`."""
        t = torch.multinomial(self.timestep_probs, batch // 2 + 1, replacement=True, generator=generator)
        ms = self.meaningful_steps
        dual = torch.where(t < ms, ms - t, t - ms)
        return torch.cat([t, dual], dim=0)[:batch].to(device)

    def mse_weights(self, t: Tensor) -> Tensor:
        return _extract(self.p2_weights, t, 1)


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _randn(like: Tensor, rows: int, generator: torch.Generator | None) -> Tensor:
    """Normal noise shaped like `like`, drawn for `rows` rows and cut to like's rows."""
    shape = (rows, *like.shape[1:])
    if generator is None:
        noise = torch.randn(shape, device=like.device, dtype=like.dtype)
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise[: like.shape[0]].to(like.device)
