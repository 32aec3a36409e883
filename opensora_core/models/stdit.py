"""STDiT, Open-Sora v1.0's spatial-temporal diffusion transformer (PixArt-alpha plus temporal attention).

Built for one latent size (`input_size`), like Open-Sora's: fixed sin-cos tables for space and time.
Reads top to bottom: one block, the model, then the presets. State-dict names and shapes match
Open-Sora's released v1.0 checkpoints (spec/state-dicts.json "STDiT-XL/2").
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
    TimestepEmbedder,
    caption_key_mask,
    drop_path_rates,
    frame_modulations,
    freeze_parameters,
    initialize_weights,
)
from opensora_core.models.fixed_size import FixedSizeModel, sincos_table_1d, sincos_table_2d
from opensora_core.models.kernels import flash_attn_func, make_layernorm

# `freeze` values: train only the temporal attention, or keep the caption cross-attention fixed.
FREEZE_CHOICES = ("not_temporal", "text")


class STDiTBlock(nn.Module):
    """adaLN-single block: spatial attention, temporal attention, caption cross-attention, MLP.

    The temporal attention sees the un-normalised residual stream and reuses the spatial gate; the
    first block adds the temporal position table to its input. Both are how v1.0 was trained.
    With a frame mask, condition frames (x_mask False) are modulated with the timestep-0 embedding,
    except in the temporal branch.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
    ):
        super().__init__()
        attention = partial(
            SelfAttention, hidden_size, num_heads, qk_norm=False, enable_flash_attn=enable_flash_attn
        )
        self.norm1 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.attn = attention()
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = attention()

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t: Tensor,
        y_mask: Tensor | None,
        temporal_pos: Tensor | None,
        x_mask: Tensor | None,
        t0: Tensor | None,
        T: int,
        S: int,
    ) -> Tensor:
        B, N, C = x.shape
        msa, mlp = frame_modulations(self.scale_shift_table, t, t0, x_mask, T, S)

        # spatial attention: tokens of one frame
        x_s = self.attn(msa.modulate(self.norm1(x)).reshape(B * T, S, C)).view(B, N, C)
        x = x + self.drop_path(msa.gated(x_s))

        # temporal attention: one position across frames
        x_t = x.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        if temporal_pos is not None:
            x_t = x_t + temporal_pos
        x_t = self.attn_temp(x_t).view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        x = x + self.drop_path(msa.gate * x_t)

        # cross-attention to the caption (not modulated)
        x = x + self.cross_attn(x, y, y_mask)

        # MLP
        x_m = self.mlp(mlp.modulate(self.norm2(x)))
        return x + self.drop_path(mlp.gated(x_m))


class STDiT(FixedSizeModel):
    """Text-conditioned video diffusion transformer for one latent size.

    forward(x [B, C, T, H, W] latents of exactly `input_size`, timestep [B], y [B, 1, L, caption_channels],
    mask [B, L], x_mask [B, T]) returns [B, out_channels, T, H, W] float32; with pred_sigma the first
    `in_channels` channels are the prediction. Other keyword arguments (fps, sizes) are ignored.
    space_scale / time_scale divide the table positions: v1.0 used space_scale 0.5 at 256px, 1.0 at 512px.
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
        caption_channels: int = 4096,
        model_max_length: int = 120,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        freeze: str | None = None,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        if freeze is not None and freeze not in FREEZE_CHOICES:
            raise ConfigError(
                f"model.freeze={freeze!r} is not valid; valid: None, {', '.join(FREEZE_CHOICES)}"
            )
        self.set_input_size(input_size, patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.pred_sigma = pred_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.space_scale = space_scale
        self.time_scale = time_scale
        self.grad_checkpointing = grad_checkpoint
        # Open-Sora's switch, accepted for its configs; `opensora_core.parallel.sequence` applies SP from outside
        self.enable_sequence_parallelism = enable_sequence_parallelism
        if enable_flash_attn:
            flash_attn_func()  # log the chosen attention path at build time

        self.register_buffer("pos_embed", sincos_table_2d(hidden_size, self.grid[1:], scale=space_scale))
        self.register_buffer(
            "pos_embed_temporal", sincos_table_1d(hidden_size, self.num_temporal, scale=time_scale)
        )
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            [
                STDiTBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    drop_path=rate,
                    enable_flash_attn=enable_flash_attn,
                    enable_layernorm_kernel=enable_layernorm_kernel,
                )
                for rate in drop_path_rates(drop_path, depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

        # PixArt's init; temporal attention outputs start at zero so a fresh model acts per frame
        initialize_weights(
            self,
            patch_embed=self.x_embedder,
            conditioning=[self.t_embedder, self.t_block, self.y_embedder],
            zero=[
                *(linear for blk in self.blocks for linear in (blk.cross_attn.proj, blk.attn_temp.proj)),
                self.final_layer.linear,
            ],
        )
        freeze_parameters(self, freeze)

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        self.check_latent_size(x)
        dtype = self.x_embedder.proj.weight.dtype
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        B = x.shape[0]
        T, S = self.num_temporal, self.num_spatial

        x = (self.x_embedder(x).view(B, T, S, -1) + self.pos_embed[:, None]).reshape(B, T * S, -1)

        # timestep conditioning, and the timestep-0 branch for condition frames
        t = self.t_embedder(timestep)
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep))
            t0_mlp = self.t_block(t0)

        y = self.y_embedder(y, self.training).squeeze(1)
        y_mask = caption_key_mask(mask, y.shape[0])

        for i, block in enumerate(self.blocks):
            temporal_pos = self.pos_embed_temporal if i == 0 else None
            x = self.run_block(block, x, y, t_mlp, y_mask, temporal_pos, x_mask, t0_mlp, T, S)

        x = self.final_layer(x, t, x_mask, t0, T, S)
        return self.unpatchify(x, self.out_channels).float()


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here. Set model.input_size to the latent size.
# ----------------------------------------------------------------------------------------------

STDiT_XL_2 = partial(STDiT, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))

STDIT_MODELS = {
    "STDiT-XL/2": STDiT_XL_2,
}
