"""PixArt-alpha / PixArt-Sigma as Open-Sora runs them on video: one attention over all frames' tokens.

Text-to-image transformers with adaLN-single conditioning and caption cross-attention, built for one
latent size (`input_size`) with fixed sin-cos tables for space and (unless no_temporal_pos_emb) time.
Reads top to bottom: one block, the model, then the presets. State-dict names
and shapes match spec/state-dicts.json "PixArt-XL/2".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from opensora_core.errors import ConfigError
from opensora_core.models.blocks import (
    CaptionEmbedder,
    CrossAttention,
    DropPath,
    FinalLayer,
    Mlp,
    PatchEmbed3D,
    SelfAttention,
    SizeEmbedder,
    TimestepEmbedder,
    adaln_single,
    caption_key_mask,
    drop_path_rates,
    freeze_parameters,
    initialize_weights,
    modulate,
)
from opensora_core.models.fixed_size import FixedSizeModel, sincos_table_1d, sincos_table_2d
from opensora_core.models.kernels import flash_attn_func, make_layernorm


class PixArtBlock(nn.Module):
    """adaLN-single block: self-attention, caption cross-attention (not modulated), MLP."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qk_norm: bool = False,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
    ):
        super().__init__()
        self.norm1 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.attn = SelfAttention(
            hidden_size, num_heads, qk_norm=qk_norm, enable_flash_attn=enable_flash_attn
        )
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, y: Tensor, t: Tensor, y_mask: Tensor | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_single(
            self.scale_shift_table, t
        )
        x = x + self.drop_path(gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.cross_attn(x, y, y_mask)
        return x + self.drop_path(gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class PixArt(FixedSizeModel):
    """Text-conditioned diffusion transformer for one latent size; video tokens attend jointly.

    forward(x [B, C, T, H, W] latents of exactly `input_size`, timestep [B], y [B, 1, L, caption_channels],
    mask [B, L]) returns [B, out_channels, T, H, W] float32 (first `in_channels` channels are the
    prediction with pred_sigma). The frame mask and other keyword arguments are ignored, as in Open-Sora.
    The spatial table spans `base_size` units (default: the token grid's side) divided by space_scale.
    qk_norm (RMS-normalised queries/keys) is PixArt-Sigma's option. size_conditioning makes it PixArtMS:
    the image size and aspect ratio join the timestep, from `height`, `width` (pixels) and `ar` [B] as
    the pipeline passes them, or PixArt's `hw` [B, 2].
    """

    position_tables = ("pos_embed", "pos_embed_temporal")

    def __init__(
        self,
        *,
        input_size: Sequence[int | None] = (1, 32, 32),
        in_channels: int = 4,
        patch_size: Sequence[int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        no_temporal_pos_emb: bool = False,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        freeze: str | None = None,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        base_size: int | None = None,
        qk_norm: bool = False,
        size_conditioning: bool = False,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        if size_conditioning and hidden_size % 3:
            raise ConfigError(f"model.hidden_size={hidden_size}: PixArtMS needs a multiple of 3")
        if enable_sequence_parallelism:
            raise ConfigError(
                f"model.enable_sequence_parallelism=True: {type(self).__name__} does not support it"
            )
        if freeze not in (None, "text"):
            raise ConfigError(f"model.freeze={freeze!r} is not valid; valid: None, 'text'")
        self.set_input_size(input_size, patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.pred_sigma = pred_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.space_scale = space_scale
        self.time_scale = time_scale
        # base_size is given in latent pixels; the table works in tokens
        self.base_size = (
            int(math.sqrt(self.num_spatial)) if base_size is None else base_size // self.patch_size[1]
        )
        self.grad_checkpointing = grad_checkpoint
        if enable_flash_attn:
            flash_attn_func()  # log the chosen attention path at build time

        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.register_buffer(
            "pos_embed",
            sincos_table_2d(hidden_size, self.grid[1:], scale=space_scale, base_size=self.base_size),
        )
        self.register_buffer(
            "pos_embed_temporal", sincos_table_1d(hidden_size, self.num_temporal, scale=time_scale)
        )
        self.blocks = nn.ModuleList(
            [
                PixArtBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    drop_path=rate,
                    qk_norm=qk_norm,
                    enable_flash_attn=enable_flash_attn,
                    enable_layernorm_kernel=enable_layernorm_kernel,
                )
                for rate in drop_path_rates(drop_path, depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

        # PixArt's init: cross-attention and output layers start at zero
        initialize_weights(
            self,
            patch_embed=self.x_embedder,
            conditioning=[self.t_embedder, self.t_block, self.y_embedder],
            zero=[*(blk.cross_attn.proj for blk in self.blocks), self.final_layer.linear],
        )
        self.size_conditioning = size_conditioning
        if size_conditioning:  # created after the init, so they keep torch's default init as in PixArt
            self.csize_embedder = SizeEmbedder(hidden_size // 3)
            self.ar_embedder = SizeEmbedder(hidden_size // 3)
        freeze_parameters(self, freeze)  # only None or "text" get here

    def embed_timestep(
        self,
        timestep: Tensor,
        *,
        height: Tensor | None = None,
        width: Tensor | None = None,
        ar: Tensor | None = None,
        hw: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """[B, hidden]: the timestep embedding; with size_conditioning, plus the embedded (h, w) and ar."""
        t = self.t_embedder(timestep)
        if not self.size_conditioning:
            return t
        if hw is None:
            if height is None or width is None:
                raise ValueError("PixArtMS needs height and width (pixels) or hw [B, 2] per sample")
            hw = torch.stack([height.reshape(-1), width.reshape(-1)], dim=1)
        if ar is None:
            raise ValueError("PixArtMS needs the aspect ratio ar (height / width) per sample")
        B = t.shape[0]
        return t + torch.cat([self.csize_embedder(hw, B), self.ar_embedder(ar, B)], dim=1)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        self.check_latent_size(x)
        dtype = self.x_embedder.proj.weight.dtype
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        B, T, S = x.shape[0], self.num_temporal, self.num_spatial

        x = self.x_embedder(x).view(B, T, S, -1) + self.pos_embed[:, None]
        if not self.no_temporal_pos_emb:
            x = x + self.pos_embed_temporal[:, :, None]
        x = x.reshape(B, T * S, -1)

        t = self.embed_timestep(timestep, **kwargs)
        t_mlp = self.t_block(t)
        y = self.y_embedder(y, self.training).squeeze(1)
        y_mask = caption_key_mask(mask, y.shape[0])

        for block in self.blocks:
            x = self.run_block(block, x, y, t_mlp, y_mask)
        x = self.final_layer(x, t, None, None, T, S)
        return self.unpatchify(x, self.out_channels).float()


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here. Set model.input_size to the latent size.
# ----------------------------------------------------------------------------------------------

PixArt_XL_2 = partial(PixArt, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
PixArt_1B_2 = partial(PixArt, depth=28, hidden_size=1872, num_heads=26, patch_size=(1, 2, 2))
PixArtMS_XL_2 = partial(
    PixArt, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), size_conditioning=True
)
# PixArt-Sigma without KV compression is PixArt with qk_norm available; its 2K checkpoints use space_scale=4.
PixArt_Sigma_XL_2 = partial(PixArt, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))

PIXART_MODELS = {
    "PixArt-XL/2": PixArt_XL_2,
    "PixArt-1B/2": PixArt_1B_2,
    "PixArtMS-XL/2": PixArtMS_XL_2,
    "PixArt-Sigma-XL/2": PixArt_Sigma_XL_2,
}
