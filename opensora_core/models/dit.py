"""DiT as Open-Sora adapted it to video: joint attention over all frames' tokens, adaLN-Zero conditioning.

Conditioned on one vector per sample: a pooled caption embedding (`condition="text"`, Open-Sora pairs it
with the CLIP text encoder: caption_channels 512) or a class label (`condition="label_<num_classes>"`).
Built for one latent size (`input_size`). Reads top to bottom: building blocks, one block, the final
layer, the model, then the presets. State-dict names and shapes match spec/state-dicts.json "DiT-XL/2".
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
    Mlp,
    PatchEmbed3D,
    SelfAttention,
    TimestepEmbedder,
    initialize_weights,
)
from opensora_core.models.fixed_size import FixedSizeModel, sincos_table_1d, sincos_table_2d
from opensora_core.models.kernels import flash_attn_func, make_layernorm
from opensora_core.models.registry import parse_condition

# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def norm_and_modulate(norm: nn.Module, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: LayerNorm (computed in fp32, as DiT does) then a per-sample scale and shift [B, D]."""
    dtype = x.dtype
    x = norm(x.float()).to(dtype)
    return x * (scale.unsqueeze(1) + 1) + shift.unsqueeze(1)


class LabelEmbedder(nn.Module):
    """Class label -> [B, hidden]; with dropout an extra row serves as the null label for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------
# One block and the final layer
# ----------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention and MLP, each modulated and gated by the condition vector."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
    ):
        super().__init__()
        self.norm1 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=False, enable_flash_attn=enable_flash_attn)
        self.norm2 = make_layernorm(hidden_size, enable_layernorm_kernel)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [B, N, D] tokens, c [B, D] condition."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(norm_and_modulate(self.norm1, x, shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(norm_and_modulate(self.norm2, x, shift_mlp, scale_mlp))


class DiTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map to one patch of output channels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_and_modulate(self.norm_final, x, shift, scale))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DiT(FixedSizeModel):
    """Video DiT for one latent size: every block attends over all T*H*W tokens together.

    forward(x [B, C, T, H, W] latents of exactly `input_size`, timestep [B], y) with y the pooled caption
    [B, 1, 1, caption_channels] (condition="text") or labels [B] (condition="label_N") returns
    [B, out_channels, T, H, W] float32 (first `in_channels` channels are the prediction with learn_sigma).
    Other keyword arguments (text mask, frame mask, sizes, fps) are ignored, as in Open-Sora.
    """

    position_tables = ("pos_embed_spatial", "pos_embed_temporal")

    def __init__(
        self,
        *,
        input_size: Sequence[int | None] = (16, 32, 32),
        in_channels: int = 4,
        patch_size: Sequence[int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        condition: str = "text",
        no_temporal_pos_emb: bool = False,
        caption_channels: int = 512,
        model_max_length: int = 77,  # unused: the caption is one pooled vector
        enable_flash_attn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        if enable_sequence_parallelism:
            raise ConfigError(
                f"model.enable_sequence_parallelism=True: {type(self).__name__} does not support it"
            )
        self.set_input_size(input_size, patch_size)
        self.num_classes = parse_condition(condition)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.caption_channels = caption_channels
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.grad_checkpointing = grad_checkpoint
        if enable_flash_attn:
            flash_attn_func()  # log the chosen attention path at build time

        self.register_buffer("pos_embed_spatial", sincos_table_2d(hidden_size, self.grid[1:]))
        self.register_buffer("pos_embed_temporal", sincos_table_1d(hidden_size, self.num_temporal))
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        if self.num_classes is None:
            self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, token_num=1)
        else:
            self.y_embedder = LabelEmbedder(self.num_classes, hidden_size, class_dropout_prob)
        self.t_embedder = TimestepEmbedder(hidden_size)
        block = partial(
            DiTBlock,
            hidden_size,
            num_heads,
            mlp_ratio=mlp_ratio,
            enable_flash_attn=enable_flash_attn,
            enable_layernorm_kernel=enable_layernorm_kernel,
        )
        self.blocks = nn.ModuleList([block() for _ in range(depth)])
        self.final_layer = DiTFinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)
        # DiT's init: modulation and output layers start at zero, so a fresh model predicts zeros
        initialize_weights(
            self,
            patch_embed=self.x_embedder,
            conditioning=[self.t_embedder, self.y_embedder],  # a label table has no linear: left as built
            zero=[
                *(blk.adaLN_modulation[-1] for blk in self.blocks),
                self.final_layer.adaLN_modulation[-1],
                self.final_layer.linear,
            ],
        )
        nn.init.zeros_(self.x_embedder.proj.bias)  # DiT alone starts the patch bias at zero

    def embed_condition(self, timestep: Tensor, y: Tensor) -> Tensor:
        """Timestep embedding plus the caption (or label) embedding: [B, hidden]."""
        t = self.t_embedder(timestep)
        if self.num_classes is not None:
            return t + self.y_embedder(y, self.training)
        if y.ndim != 4 or y.shape[1:3] != (1, 1):
            raise ConfigError(
                f"{type(self).__name__} conditions on one pooled caption vector [B, 1, 1, C] (Open-Sora uses "
                f"text_encoder.type='clip'); got caption features of shape {list(y.shape)}"
            )
        y = self.y_embedder(y.to(t.dtype), self.training)
        return t + y.squeeze(1).squeeze(1)

    def embed_video(self, x: Tensor) -> Tensor:
        """Latents -> [B, T, S, hidden] tokens with the spatial table added."""
        self.check_latent_size(x)
        x = x.to(self.x_embedder.proj.weight.dtype)
        return (
            self.x_embedder(x).view(x.shape[0], self.num_temporal, self.num_spatial, -1)
            + self.pos_embed_spatial[:, None]
        )

    def forward(self, x: Tensor, timestep: Tensor, y: Tensor, **kwargs) -> Tensor:
        B = x.shape[0]
        x = self.embed_video(x)
        if not self.no_temporal_pos_emb:
            x = x + self.pos_embed_temporal[:, :, None]
        x = x.reshape(B, self.num_temporal * self.num_spatial, -1)
        c = self.embed_condition(timestep, y)
        for block in self.blocks:
            x = self.run_block(block, x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x, self.out_channels).float()


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here. Set model.input_size to the latent size.
# ----------------------------------------------------------------------------------------------

DiT_XL_2 = partial(DiT, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
DiT_XL_2x2 = partial(DiT, depth=28, hidden_size=1152, num_heads=16, patch_size=(2, 2, 2))

DIT_MODELS = {
    "DiT-XL/2": DiT_XL_2,
    "DiT-XL/2x2": DiT_XL_2x2,
}
