"""Open-Sora v1.2's temporal VAE: a causal 3D-conv autoencoder that compresses image-VAE latents in time.

Reads top to bottom: the causal convolution, one residual block, encoder, decoder, the posterior, the
model, then the preset. State-dict names and shapes match Open-Sora's `VAE_Temporal_SD`
(spec/state-dicts.json); the op order follows Open-Sora's so outputs match with the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "relu": nn.ReLU}


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, Sequence) else (value, value, value)  # type: ignore[return-value]


def front_padding(num_frames: int, factor: int) -> int:
    """Zero frames put in front so `num_frames` becomes a multiple of the time compression `factor`."""
    return (factor - num_frames % factor) % factor


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d whose output frame t sees input frames <= t only: all time padding goes in front.

    Space is zero-padded to keep H and W (odd kernels). With `time_stride` 2 the front padding shrinks
    by one, so 2n frames become n and frame 0 still starts a window.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        *,
        time_stride: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size}: spatial kernel sizes must be odd")
        time_pad = (kt - 1) + (1 - time_stride)
        # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, time_pad, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding, mode="constant"))


class ResBlock(nn.Module):
    """MAGVIT-style pre-norm residual block; a 1x1x1 conv projects the shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int, activation: str):
        super().__init__()
        self.activate = ACTIVATIONS[activation]()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = (
            CausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.activate(self.norm1(x)))
        h = self.conv2(self.activate(self.norm2(h)))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return h + shortcut


class Encoder(nn.Module):
    """Widening stages of residual blocks; stride-2 causal convs between stages halve the frame count."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: Sequence[int],
        temporal_downsample: Sequence[bool],
        num_groups: int,
        activation: str,
    ):
        super().__init__()
        block = partial(ResBlock, num_groups=num_groups, activation=activation)
        widths = [filters * m for m in channel_multipliers]
        self.activate = ACTIVATIONS[activation]()
        self.conv_in = CausalConv3d(in_channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        previous = filters
        for width in widths:
            stage = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.append(block(previous, width))
                previous = width
            self.block_res_blocks.append(stage)
        # Between stage i and i+1; an Identity keeps the indices (and checkpoint names) of later stages.
        self.conv_blocks = nn.ModuleList(
            CausalConv3d(widths[i], widths[i], 3, time_stride=2) if temporal_downsample[i] else nn.Identity()
            for i in range(len(widths) - 1)
        )
        self.res_blocks = nn.ModuleList(block(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.norm1 = nn.GroupNorm(num_groups, widths[-1])
        self.conv2 = CausalConv3d(widths[-1], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for i, stage in enumerate(self.block_res_blocks):
            for res_block in stage:
                x = res_block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for res_block in self.res_blocks:
            x = res_block(x)
        return self.conv2(self.activate(self.norm1(x)))


class Decoder(nn.Module):
    """The encoder mirrored: stages run from widest to narrowest, and where the encoder halved time a
    causal conv doubles the channels that are then unfolded into twice the frames (depth to time)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: Sequence[int],
        temporal_downsample: Sequence[bool],
        num_groups: int,
        activation: str,
    ):
        super().__init__()
        block = partial(ResBlock, num_groups=num_groups, activation=activation)
        widths = [filters * m for m in channel_multipliers]
        n = len(widths)
        self.time_strides = [2 if temporal_downsample[i - 1] else 1 for i in range(1, n)]
        self.activate = ACTIVATIONS[activation]()
        self.conv1 = CausalConv3d(in_channels, widths[-1], 3)
        self.res_blocks = nn.ModuleList(block(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        # Stage i (run in reverse) takes the output of stage i+1, or of the top res blocks for the last one.
        self.block_res_blocks = nn.ModuleList(
            nn.ModuleList(
                block(widths[min(i + 1, n - 1)] if j == 0 else widths[i], widths[i])
                for j in range(num_res_blocks)
            )
            for i in range(n)
        )
        # conv_blocks[i - 1] follows stage i (i >= 1).
        self.conv_blocks = nn.ModuleList(
            CausalConv3d(widths[i], widths[i] * stride, 3) if stride > 1 else nn.Identity()
            for i, stride in zip(range(1, n), self.time_strides, strict=True)
        )
        self.norm1 = nn.GroupNorm(num_groups, widths[0])
        self.conv_out = CausalConv3d(widths[0], out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for res_block in self.res_blocks:
            x = res_block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for res_block in self.block_res_blocks[i]:
                x = res_block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                x = depth_to_time(x, self.time_strides[i - 1])
        return self.conv_out(self.activate(self.norm1(x)))


def depth_to_time(x: Tensor, stride: int) -> Tensor:
    """[B, C*s, T, H, W] -> [B, C, T*s, H, W]; channel c*s + k becomes frame t*s + k of channel c."""
    if stride == 1:
        return x
    B, Cs, T, H, W = x.shape
    x = x.view(B, Cs // stride, stride, T, H, W).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Cs // stride, T * stride, H, W)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, ...] (mean first); logvar clamped as in Open-Sora."""

    def __init__(self, moments: Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps; eps is drawn in fp32 on the generator's device (the CPU by default), like
        Open-Sora, so a seed gives the same sample on any device and in any dtype."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(device=self.moments.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to N(0, 1) per sample, summed over [C, T, H, W]."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3, 4])


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class TemporalVAE(nn.Module):
    """Causal video VAE over [B, C, T, H, W] (in Open-Sora: the image VAE's latents); space is untouched.

    Time is compressed by 2 ** sum(temporal_downsample); inputs are zero-padded in front to a multiple
    of that factor and `decode(num_frames=...)` drops the same padding again. GroupNorm statistics
    span all frames of a clip, so a later frame can still shift earlier latents slightly: the
    convolutions are causal, the model as a whole is not.
    """

    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (True, True, False),
        num_groups: int = 32,
        activation_fn: str = "swish",
    ):
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn={activation_fn!r}: valid: {', '.join(ACTIVATIONS)}")
        if len(temporal_downsample) != len(channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample={tuple(temporal_downsample)}: needs one entry per stage boundary "
                f"({len(channel_multipliers) - 1} for channel_multipliers={tuple(channel_multipliers)})"
            )
        # Kept for save_pretrained: enough to build the same architecture again.
        self.settings = {
            "in_out_channels": in_out_channels,
            "latent_embed_dim": latent_embed_dim,
            "embed_dim": embed_dim,
            "filters": filters,
            "num_res_blocks": num_res_blocks,
            "channel_multipliers": list(channel_multipliers),
            "temporal_downsample": [bool(d) for d in temporal_downsample],
            "num_groups": num_groups,
            "activation_fn": activation_fn,
        }
        self.time_downsample_factor = 2 ** sum(bool(d) for d in temporal_downsample)
        self.patch_size = (self.time_downsample_factor, 1, 1)
        self.out_channels = embed_dim  # latent channels (equal to in_out_channels in every preset)
        stages = {
            "filters": filters,
            "num_res_blocks": num_res_blocks,
            "channel_multipliers": tuple(channel_multipliers),
            "temporal_downsample": tuple(temporal_downsample),
            "num_groups": num_groups,
            "activation": activation_fn,
        }
        self.encoder = Encoder(in_channels=in_out_channels, out_channels=2 * latent_embed_dim, **stages)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = Decoder(in_channels=latent_embed_dim, out_channels=in_out_channels, **stages)

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """Latent (T, H, W): T rounded up to the time factor, then divided; H and W unchanged."""
        t, h, w = input_size
        factor = self.time_downsample_factor
        return [None if t is None else (t + front_padding(t, factor)) // factor, h, w]

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """[B, C, T, H, W] -> posterior over [B, embed_dim, ceil(T / factor), H, W]."""
        pad = front_padding(x.shape[2], self.time_downsample_factor)
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor:
        """[B, embed_dim, t, H, W] -> [B, C, num_frames, H, W]; `num_frames` (default t * factor) tells
        how much front padding the encoder added."""
        factor = self.time_downsample_factor
        if num_frames is None:
            num_frames = z.shape[2] * factor
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, front_padding(num_frames, factor) :]

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian, Tensor]:
        """Reconstruction, posterior and latent (for VAE training losses)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, num_frames=x.shape[2]), posterior, z


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

# Open-Sora v1.2's temporal VAE: 4 -> 4 channels, time / 4 (no downsample after the first stage).
VAE_Temporal_SD = partial(
    TemporalVAE,
    in_out_channels=4,
    latent_embed_dim=4,
    embed_dim=4,
    filters=128,
    num_res_blocks=4,
    channel_multipliers=(1, 2, 2, 4),
    temporal_downsample=(False, True, True),
)

TEMPORAL_VAES = {
    "VAE_Temporal_SD": VAE_Temporal_SD,
    "VAE_Temporal": TemporalVAE,  # every setting explicit: how tiny test pipelines describe theirs
}
