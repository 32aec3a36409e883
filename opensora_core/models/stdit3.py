"""STDiT3, Open-Sora v1.2's spatial-temporal diffusion transformer, in plain torch.

Reads top to bottom: one block, the model, then the presets; the shared pieces are in blocks.py.
State-dict names and shapes match Open-Sora's released checkpoints (spec/state-dicts.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

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
    TimestepEmbedder,
    caption_key_mask,
    drop_path_rates,
    frame_modulations,
    initialize_weights,
    patch_grid,
    run_block,
    unpatchify,
)
from opensora_core.models.kernels import flash_attn_func, make_layernorm

# ----------------------------------------------------------------------------------------------
# One block
# ----------------------------------------------------------------------------------------------


class STDiT3Block(nn.Module):
    """adaLN-single transformer block: self-attention over space (or time), cross-attention to text, MLP.

    With a frame mask, condition frames (x_mask False) are modulated with the timestep-0 embedding.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        temporal: bool = False,
        qk_norm: bool = True,
        qk_norm_legacy: bool = False,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
    ):
        super().__init__()
        self.temporal = temporal
        self.norm1 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.attn = SelfAttention(
            hidden_size,
            num_heads,
            qk_norm=qk_norm,
            qk_norm_legacy=qk_norm_legacy,
            enable_flash_attn=enable_flash_attn,
        )
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t: Tensor,
        y_mask: Tensor | None,
        x_mask: Tensor | None,
        t0: Tensor | None,
        T: int,
        S: int,
        rope: RotaryEmbedding | None = None,
    ) -> Tensor:
        B, N, C = x.shape
        msa, mlp = frame_modulations(self.scale_shift_table, t, t0, x_mask, T, S)

        # self-attention over space (tokens of one frame) or time (one position across frames)
        x_m = msa.modulate(self.norm1(x))
        if self.temporal:
            x_m = x_m.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            x_m = self.attn(x_m, rope=rope)
            x_m = x_m.view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        else:
            x_m = self.attn(x_m.reshape(B * T, S, C)).view(B, N, C)
        x = x + self.drop_path(msa.gated(x_m))

        # cross-attention to the caption (not modulated)
        x = x + self.cross_attn(x, y, y_mask)

        # MLP
        x_m = self.mlp(mlp.modulate(self.norm2(x)))
        return x + self.drop_path(mlp.gated(x_m))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class STDiT3(nn.Module):
    """Text-conditioned video diffusion transformer: alternating spatial and temporal blocks.

    forward(x [B, C, T, H, W] latents, timestep [B], y [B, 1, L, caption_channels], mask [B, L], ...)
    returns [B, out_channels, T, H, W] float32; with pred_sigma the first `in_channels` channels are the
    prediction and the rest are learned-variance values.
    """

    def __init__(
        self,
        *,
        input_size: Sequence[int | None] = (None, None, None),
        input_sq_size: int = 512,
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
        model_max_length: int = 300,
        qk_norm: bool = True,
        qk_norm_legacy: bool = False,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        only_train_temporal: bool = False,
        freeze_y_embedder: bool = False,
        skip_y_embedder: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        self.input_size = tuple(input_size)  # latent size; unused (sizes are dynamic), kept for configs
        self.input_sq_size = input_sq_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.pred_sigma = pred_sigma
        self.patch_size = tuple(patch_size)
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.model_max_length = model_max_length
        self.caption_channels = caption_channels
        self.skip_y_embedder = skip_y_embedder
        # Open-Sora's switch, accepted for its configs; `opensora_core.parallel.sequence` applies SP from outside
        self.enable_sequence_parallelism = enable_sequence_parallelism
        self.grad_checkpointing = grad_checkpoint
        if enable_flash_attn:
            flash_attn_func()  # log the chosen attention path at build time

        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)

        drop_rates = drop_path_rates(drop_path, depth)
        block = partial(
            STDiT3Block,
            hidden_size,
            num_heads,
            mlp_ratio=mlp_ratio,
            qk_norm=qk_norm,
            qk_norm_legacy=qk_norm_legacy,
            enable_flash_attn=enable_flash_attn,
            enable_layernorm_kernel=enable_layernorm_kernel,
        )
        self.spatial_blocks = nn.ModuleList([block(drop_path=r) for r in drop_rates])
        self.temporal_blocks = nn.ModuleList([block(drop_path=r, temporal=True) for r in drop_rates])
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

        # DiT's init; temporal branches start at zero so a fresh model acts per frame
        initialize_weights(
            self,
            patch_embed=self.x_embedder,
            conditioning=[self.t_embedder, self.fps_embedder, self.t_block, self.y_embedder],
            zero=[
                linear
                for blk in self.temporal_blocks
                for linear in (blk.attn.proj, blk.cross_attn.proj, blk.mlp.fc2)
            ],
        )
        if only_train_temporal:
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith("temporal_blocks."))
        if freeze_y_embedder:
            self.y_embedder.requires_grad_(False)
        self.rope.freqs.requires_grad_(False)

    def encode_text(self, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Caption features -> ([B, L, hidden], key mask [B, L] bool or None)."""
        if not self.skip_y_embedder:
            y = self.y_embedder(y, self.training)
        y = y.squeeze(1)
        return y, caption_key_mask(mask, y.shape[0])

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        fps: Tensor | None = None,
        height: Tensor | None = None,
        width: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        if fps is None or height is None or width is None:
            raise ValueError("STDiT3.forward needs fps, height and width (pixel sizes) per sample")
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        x_size = x.shape[2:]
        T, H, W = patch_grid(x, self.patch_size)
        S = H * W
        pos = self.pos_embed.for_video(
            H, W, height=height, width=width, input_sq_size=self.input_sq_size, dtype=dtype
        )

        # timestep (+ fps) conditioning, and the timestep-0 branch for condition frames
        t = self.t_embedder(timestep) + self.fps_embedder(fps.to(dtype), B)
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep)) + self.fps_embedder(fps.to(dtype), B)
            t0_mlp = self.t_block(t0)

        y, y_mask = self.encode_text(y, mask)

        x = (self.x_embedder(x).view(B, T, S, -1) + pos[:, None]).reshape(B, T * S, -1)

        checkpointing = self.grad_checkpointing and self.training
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = run_block(
                spatial, x, y, t_mlp, y_mask, x_mask, t0_mlp, T, S, None, checkpointing=checkpointing
            )
            x = run_block(
                temporal, x, y, t_mlp, y_mask, x_mask, t0_mlp, T, S, self.rope, checkpointing=checkpointing
            )

        x = self.final_layer(x, t, x_mask, t0, T, S)
        return unpatchify(x, self.patch_size, self.out_channels, T, H, W, *x_size).float()


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here.
# ----------------------------------------------------------------------------------------------

STDiT3_XL_2 = partial(STDiT3, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
STDiT3_3B_2 = partial(STDiT3, depth=28, hidden_size=1872, num_heads=26, patch_size=(1, 2, 2))

STDIT3_MODELS = {
    "STDiT3-XL/2": STDiT3_XL_2,
    "STDiT3-3B/2": STDiT3_3B_2,
}
