"""STDiT2, Open-Sora v1.1's multi-resolution video diffusion transformer, in plain torch.

Each block runs spatial attention, a RoPE temporal attention with its own adaLN modulation, caption
cross-attention and an MLP. Sizes, aspect ratio, frame count and fps are embedded as conditioning.
The building blocks are in blocks.py; state-dict names and shapes match Open-Sora's released v1.1
checkpoints (spec/state-dicts.json "STDiT2-XL/2").
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
    PositionEmbedding2D,
    RotaryEmbedding,
    SelfAttention,
    SizeEmbedder,
    TimestepEmbedder,
    caption_key_mask,
    drop_path_rates,
    frame_modulations,
    freeze_parameters,
    initialize_weights,
    patch_grid,
    run_block,
    unpatchify,
)
from opensora_core.models.kernels import flash_attn_func, make_layernorm

# `freeze` values Open-Sora v1.1 accepts: train only the temporal attention, or keep cross-attention fixed.
FREEZE_CHOICES = ("not_temporal", "text")


# ----------------------------------------------------------------------------------------------
# One block
# ----------------------------------------------------------------------------------------------


class STDiT2Block(nn.Module):
    """Spatial attention, temporal attention (own 3-way adaLN), cross-attention, MLP; all residual.

    With a frame mask, condition frames (x_mask False) are modulated with the timestep-0 embeddings.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qk_norm: bool = False,
        qk_norm_legacy: bool = False,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
    ):
        super().__init__()
        attention = partial(
            SelfAttention,
            hidden_size,
            num_heads,
            qk_norm=qk_norm,
            qk_norm_legacy=qk_norm_legacy,
            enable_flash_attn=enable_flash_attn,
        )
        # registration order fixes the state-dict order of released checkpoints
        self.norm1 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.attn = attention()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm_temp = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.attn_temp = attention()
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t: Tensor,
        t_tmp: Tensor,
        y_mask: Tensor | None,
        x_mask: Tensor | None,
        t0: Tensor | None,
        t0_tmp: Tensor | None,
        T: int,
        S: int,
        rope: RotaryEmbedding,
    ) -> Tensor:
        """x [B, T*S, C]; t / t0 [B, 6C] and t_tmp / t0_tmp [B, 3C] adaLN inputs; x_mask [B, T] bool or None."""
        B, N, C = x.shape
        msa, mlp = frame_modulations(self.scale_shift_table, t, t0, x_mask, T, S)
        (tmp,) = frame_modulations(self.scale_shift_table_temporal, t_tmp, t0_tmp, x_mask, T, S)

        # spatial self-attention: the tokens of one frame
        x_s = self.attn(msa.modulate(self.norm1(x)).reshape(B * T, S, C)).view(B, N, C)
        x = x + self.drop_path(msa.gated(x_s))

        # temporal self-attention: one spatial position across frames, RoPE over time
        x_t = tmp.modulate(self.norm_temp(x)).view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        x_t = self.attn_temp(x_t, rope=rope).view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        x = x + self.drop_path(tmp.gated(x_t))

        # cross-attention to the caption (not modulated)
        x = x + self.cross_attn(x, y, y_mask)

        # MLP
        x_mlp = self.mlp(mlp.modulate(self.norm2(x)))
        return x + self.drop_path(mlp.gated(x_mlp))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class STDiT2(nn.Module):
    """Text-conditioned video diffusion transformer with size, aspect-ratio, length and fps conditioning.

    forward(x [B, C, T, H, W] latents, timestep [B], y [B, 1, L, caption_channels], mask [B, L],
    x_mask [B, T], num_frames / height / width / ar / fps [B]) returns [B, out_channels, T, H, W]
    float32; with pred_sigma the first `in_channels` channels are the prediction. Defaults are
    Open-Sora's STDiT2Config defaults; the published v1.1 configs set input_sq_size=512,
    qk_norm=True and qk_norm_legacy=True.
    """

    def __init__(
        self,
        *,
        input_size: Sequence[int | None] = (None, None, None),
        input_sq_size: int = 32,
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
        qk_norm: bool = False,
        qk_norm_legacy: bool = False,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        if freeze is not None and freeze not in FREEZE_CHOICES:
            raise ConfigError(
                f"model.freeze={freeze!r} is not valid; valid: None, {', '.join(FREEZE_CHOICES)}"
            )
        if hidden_size % 3:
            raise ConfigError(
                f"model.hidden_size={hidden_size} must be divisible by 3 (size + aspect embedders)"
            )
        self.input_size = tuple(input_size)  # latent size; unused (sizes are dynamic), kept for configs
        self.input_sq_size = input_sq_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.pred_sigma = pred_sigma
        self.patch_size = tuple(patch_size)
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        # accepted as Open-Sora does; STDiT2 has no temporal position embedding for it to switch off
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.grad_checkpointing = grad_checkpoint
        if enable_flash_attn:
            flash_attn_func()  # log the chosen attention path at build time

        # registration order fixes the state-dict order of released checkpoints
        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        drop_rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            STDiT2Block(
                hidden_size,
                num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=rate,
                qk_norm=qk_norm,
                qk_norm_legacy=qk_norm_legacy,
                enable_flash_attn=enable_flash_attn,
                enable_layernorm_kernel=enable_layernorm_kernel,
            )
            for rate in drop_rates
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)
        # height and width, and the aspect ratio, share the spatial conditioning (a third of hidden each)
        self.csize_embedder = SizeEmbedder(hidden_size // 3)
        self.ar_embedder = SizeEmbedder(hidden_size // 3)
        self.fl_embedder = SizeEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)

        # DiT's init; cross-attention, temporal attention and output start at zero
        initialize_weights(
            self,
            patch_embed=self.x_embedder,
            conditioning=[self.t_embedder, self.t_block, self.t_block_temp, self.y_embedder],
            zero=[
                *(linear for blk in self.blocks for linear in (blk.cross_attn.proj, blk.attn_temp.proj)),
                self.final_layer.linear,
            ],
        )
        freeze_parameters(self, freeze)
        self.rope.freqs.requires_grad_(False)

    def encode_text(self, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Caption features -> ([B, L, hidden], key mask [B, L] bool or None)."""
        y = self.y_embedder(y, self.training).squeeze(1)
        return y, caption_key_mask(mask, y.shape[0])

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        num_frames: Tensor | None = None,
        height: Tensor | None = None,
        width: Tensor | None = None,
        ar: Tensor | None = None,
        fps: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        conditions = {"num_frames": num_frames, "height": height, "width": width, "ar": ar, "fps": fps}
        missing = [name for name, value in conditions.items() if value is None]
        if missing:
            raise ValueError(
                f"STDiT2.forward needs {', '.join(missing)} per sample (pixel sizes, H/W, frames, fps)"
            )
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        # size / aspect (spatial) and length / fps (temporal) conditioning
        hw = torch.cat([height.reshape(-1, 1), width.reshape(-1, 1)], dim=1)
        data_info = torch.cat([self.csize_embedder(hw, B), self.ar_embedder(ar.reshape(-1, 1), B)], dim=1)
        fl = self.fl_embedder(num_frames.reshape(-1, 1), B) + self.fps_embedder(fps.reshape(-1, 1), B)

        # position embedding scaled so that every resolution covers the same extent as input_sq_size
        x_size = x.shape[2:]
        T, H, W = patch_grid(x, self.patch_size)
        S = H * W
        pos = self.pos_embed.for_video(
            H, W, height=height, width=width, input_sq_size=self.input_sq_size, dtype=dtype
        )
        x = (self.x_embedder(x).view(B, T, S, -1) + pos[:, None]).reshape(B, T * S, -1)

        # adaLN inputs; condition frames (x_mask False) get the timestep-0 ones
        t = self.t_embedder(timestep)
        t_spc, t_tmp = self.t_block(t + data_info), self.t_block_temp(t + fl)
        t0 = t0_spc = t0_spc_mlp = t0_tmp_mlp = None
        if x_mask is not None:
            x_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep))
            t0_spc = t0 + data_info
            t0_spc_mlp, t0_tmp_mlp = self.t_block(t0_spc), self.t_block_temp(t0 + fl)

        y, y_mask = self.encode_text(y, mask)

        checkpointing = self.grad_checkpointing and self.training
        for block in self.blocks:
            args = (x, y, t_spc, t_tmp, y_mask, x_mask, t0_spc_mlp, t0_tmp_mlp, T, S, self.rope)
            x = run_block(block, *args, checkpointing=checkpointing)

        # Open-Sora modulates generated frames with the bare timestep embedding but condition frames
        # with timestep-0 plus the size conditioning; released weights were trained that way.
        x = self.final_layer(x, t, x_mask, t0_spc, T, S)
        return unpatchify(x, self.patch_size, self.out_channels, T, H, W, *x_size).float()


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here.
# ----------------------------------------------------------------------------------------------

STDiT2_XL_2 = partial(STDiT2, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))

STDIT2_MODELS = {
    "STDiT2-XL/2": STDiT2_XL_2,
}
