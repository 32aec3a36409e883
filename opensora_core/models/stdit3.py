"""STDiT3, Open-Sora v1.2's spatial-temporal diffusion transformer, in plain torch.

Reads top to bottom: optional kernels, small building blocks, one block, the model, then the presets.
State-dict names and shapes match Open-Sora's released checkpoints (spec/state-dicts.json).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Optional kernels: chosen once, with one log line; asking for a missing one falls back.
# ----------------------------------------------------------------------------------------------


@functools.cache
def flash_attn_func():
    """flash-attn's `flash_attn_func` when it is installed and CUDA is present, else None (logged once)."""
    if not torch.cuda.is_available():
        log.warning("enable_flash_attn=True but CUDA is not available: using torch SDPA attention")
        return None
    try:
        from flash_attn import flash_attn_func as func
    except ImportError:
        log.warning("enable_flash_attn=True but flash-attn is not installed: using torch SDPA attention")
        return None
    log.info("attention: flash-attn")
    return func


@functools.cache
def fused_layernorm_class() -> type[nn.Module]:
    """apex's FusedLayerNorm when installed with CUDA, else torch.nn.LayerNorm (logged once)."""
    if torch.cuda.is_available():
        try:
            from apex.normalization import FusedLayerNorm

            log.info("layernorm: apex FusedLayerNorm")
            return FusedLayerNorm
        except ImportError:
            pass
    log.warning("enable_layernorm_kernel=True but apex/CUDA is not available: using torch.nn.LayerNorm")
    return nn.LayerNorm


def make_layernorm(dim: int, use_kernel: bool) -> nn.Module:
    """Affine-free LayerNorm (adaLN supplies scale and shift), so the choice never changes the state dict."""
    cls = fused_layernorm_class() if use_kernel else nn.LayerNorm
    return cls(dim, eps=1e-6, elementwise_affine=False)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, use_flash: bool = False
) -> Tensor:
    """Softmax attention over [B, heads, N, head_dim]; `mask` [B, 1, 1, L] is True where a key is valid."""
    func = flash_attn_func() if use_flash else None
    if func is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # flash-attn wants [B, N, H, D]
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------------------------
# Sequence parallelism seam
# ----------------------------------------------------------------------------------------------


class SequenceParallel(Protocol):
    """What STDiT3 needs from a sequence-parallel (Ulysses) implementation; `opensora_core.parallel` provides one.

    The model splits the spatial tokens across ranks after embedding and gathers them before the final
    layer; spatial self-attention trades the token shard for a head shard around the attention itself.
    """

    def split(self, x: Tensor, dim: int) -> Tensor:
        """This rank's part of `x` along `dim` (padding if needed)."""
        ...

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """All ranks' parts of `x` concatenated along `dim` (may include padding; the model crops)."""
        ...

    def tokens_to_heads(self, x: Tensor) -> Tensor:
        """[B, H, N/P, D] -> [B, H/P, N, D] (all-to-all)."""
        ...

    def heads_to_tokens(self, x: Tensor) -> Tensor:
        """[B, H/P, N, D] -> [B, H, N/P, D] (all-to-all)."""
        ...


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def select_frames(x_mask: Tensor, x: Tensor, x_cond: Tensor, T: int, S: int) -> Tensor:
    """Per frame, take `x` where x_mask is True and `x_cond` (timestep-0 branch) where it is False."""
    B, N, C = x.shape
    out = torch.where(x_mask[:, :, None, None], x.view(B, T, S, C), x_cond.view(B, T, S, C))
    return out.view(B, N, C)


def caption_key_mask(mask: Tensor | None, batch: int) -> Tensor | None:
    """Text-encoder attention mask [B', L] -> key mask [batch, L] bool (True = real token), or None."""
    if mask is None:
        return None
    if mask.shape[0] != batch:  # CFG doubles the batch but passes the conditional mask only
        mask = mask.repeat(batch // mask.shape[0], 1)
    return mask.reshape(batch, -1) != 0


def freeze_parameters(model: nn.Module, freeze: str | None) -> None:
    """Open-Sora's `freeze`: "not_temporal" trains only temporal attention, "text" fixes cross-attention."""
    if freeze == "not_temporal":
        for name, param in model.named_parameters():
            param.requires_grad_("attn_temp" in name)
    elif freeze == "text":
        for name, param in model.named_parameters():
            if "cross_attn" in name:
                param.requires_grad_(False)


def unpatchify(
    x: Tensor, patch_size: Sequence[int], out_channels: int, T: int, H: int, W: int, Tx: int, Hx: int, Wx: int
) -> Tensor:
    """[B, T*H*W, pt*ph*pw*C_out] -> [B, C_out, Tx, Hx, Wx], cropping the patch padding."""
    pt, ph, pw = patch_size
    B = x.shape[0]
    x = x.view(B, T, H, W, pt, ph, pw, out_channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, out_channels, T * pt, H * ph, W * pw)
    return x[:, :, :Tx, :Hx, :Wx]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[N] scalars -> [N, dim] float32 features, cosines first (the layout the released weights expect)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class RMSNorm(nn.Module):
    """LLaMA-style RMSNorm (statistics in fp32) used for query/key normalisation."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the sequence axis (-2), rotating interleaved channel pairs.

    `freqs` is a frozen parameter because released checkpoints store it (key `rope.freqs`).
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-2]
        freqs = self.freqs.float()
        angles = torch.outer(torch.arange(n, device=x.device, dtype=freqs.dtype), freqs)
        angles = angles.repeat_interleave(2, dim=-1)  # [N, D]: pairs (0,1), (2,3), ... share a frequency
        xf = x.float()
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


class PositionEmbedding2D(nn.Module):
    """2D sin-cos position embedding computed on the fly, scaled to the video's resolution."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2D position embedding, got {dim}")
        half = dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _sincos(self, pos: Tensor) -> Tensor:
        out = torch.outer(pos, self.inv_freq)
        return torch.cat([out.sin(), out.cos()], dim=-1)

    def forward(self, h: int, w: int, *, scale: float, base_size: int, device, dtype) -> Tensor:
        """[1, h*w, dim], tokens in row-major (h, w) order; the first half encodes the column."""
        rows = torch.arange(h, device=device) / scale * (base_size / h)
        cols = torch.arange(w, device=device) / scale * (base_size / w)
        grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
        emb = torch.cat([self._sincos(grid_cols.reshape(-1)), self._sincos(grid_rows.reshape(-1))], dim=-1)
        return emb.unsqueeze(0).to(dtype)


class PatchEmbed3D(nn.Module):
    """Video [B, C, T, H, W] -> tokens [B, T'*H'*W', hidden]; pads T, H, W up to patch multiples."""

    def __init__(self, patch_size: Sequence[int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (timm's Mlp names: fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TimestepEmbedder(nn.Module):
    """Scalar per sample (timestep, fps) -> [B, hidden] through sinusoidal features and an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor, batch_size: int | None = None) -> Tensor:
        t = t.reshape(-1)
        if batch_size is not None and t.shape[0] != batch_size:  # one value for the whole batch
            t = t.repeat(batch_size // t.shape[0])
        freq = sinusoidal_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder features to hidden size; holds the learned null caption used for CFG."""

    def __init__(self, caption_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """[B, 1, L, caption_channels] -> [B, 1, L, hidden]; while training, captions drop to null w.p. uncond_prob."""
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if caption.shape[2:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption features {tuple(caption.shape[2:])} do not match the null caption "
                    f"{tuple(self.y_embedding.shape)}: text length must equal model_max_length"
                )
            if force_drop_ids is None:
                drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            else:
                drop = force_drop_ids == 1
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RMS-normalised queries/keys and optional RoPE (temporal blocks)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qk_norm: bool = True,
        qk_norm_legacy: bool = False,
        enable_flash_attn: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # v1.1 checkpoints were trained with RoPE applied before the q/k norm.
        self.qk_norm_legacy = qk_norm_legacy
        self.enable_flash_attn = enable_flash_attn
        self.sequence_parallel: SequenceParallel | None = None

    def forward(self, x: Tensor, rope: RotaryEmbedding | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm_legacy and rope is not None:
            q, k = self.q_norm(rope(q)), self.k_norm(rope(k))
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q), rope(k)
        if self.sequence_parallel is not None:
            q, k, v = (self.sequence_parallel.tokens_to_heads(t) for t in (q, k, v))
        out = attention(q, k, v, use_flash=self.enable_flash_attn)
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.heads_to_tokens(out)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Video tokens attend to their own sample's caption tokens; padded caption tokens are masked out."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, y_mask: Tensor | None) -> Tensor:
        """x [B, N, C]; y [B, L, C]; y_mask [B, L] bool (True = real token) or None."""
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (
            self.kv_linear(y).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        mask = y_mask[:, None, None, :] if y_mask is not None else None
        out = attention(q, k, v, mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


# ----------------------------------------------------------------------------------------------
# One block and the final layer
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
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)
        ).chunk(6, dim=1)
        if x_mask is not None:
            shift_msa0, scale_msa0, gate_msa0, shift_mlp0, scale_mlp0, gate_mlp0 = (
                self.scale_shift_table[None] + t0.reshape(B, 6, -1)
            ).chunk(6, dim=1)

        # self-attention over space (tokens of one frame) or time (one position across frames)
        h = self.norm1(x)
        x_m = modulate(h, shift_msa, scale_msa)
        if x_mask is not None:
            x_m = select_frames(x_mask, x_m, modulate(h, shift_msa0, scale_msa0), T, S)
        if self.temporal:
            x_m = x_m.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            x_m = self.attn(x_m, rope=rope)
            x_m = x_m.view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        else:
            x_m = self.attn(x_m.reshape(B * T, S, C)).view(B, N, C)
        x_gated = gate_msa * x_m
        if x_mask is not None:
            x_gated = select_frames(x_mask, x_gated, gate_msa0 * x_m, T, S)
        x = x + self.drop_path(x_gated)

        # cross-attention to the caption (not modulated)
        x = x + self.cross_attn(x, y, y_mask)

        # MLP
        h = self.norm2(x)
        x_m = modulate(h, shift_mlp, scale_mlp)
        if x_mask is not None:
            x_m = select_frames(x_mask, x_m, modulate(h, shift_mlp0, scale_mlp0), T, S)
        x_m = self.mlp(x_m)
        x_gated = gate_mlp * x_m
        if x_mask is not None:
            x_gated = select_frames(x_mask, x_gated, gate_mlp0 * x_m, T, S)
        return x + self.drop_path(x_gated)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from hidden size to one patch of output channels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: Tensor, t: Tensor, x_mask: Tensor | None, t0: Tensor | None, T: int, S: int
    ) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            # Open-Sora normalises the already-modulated x for the condition frames; released weights were
            # trained that way, so we keep it to reproduce their outputs.
            x = select_frames(x_mask, x, modulate(self.norm_final(x), shift0, scale0), T, S)
        return self.linear(x)


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
        self.enable_sequence_parallelism = enable_sequence_parallelism
        self.grad_checkpointing = grad_checkpoint
        self.sequence_parallel: SequenceParallel | None = None
        if enable_flash_attn:
            flash_attn_func()  # log the chosen attention path at build time

        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)

        drop_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
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

        self.initialize_weights()
        if only_train_temporal:
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith("temporal_blocks."))
        if freeze_y_embedder:
            self.y_embedder.requires_grad_(False)
        self.rope.freqs.requires_grad_(False)

    def initialize_weights(self) -> None:
        """DiT-style init; temporal branches start at zero so a fresh model acts per frame."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.fps_embedder.mlp[0]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.fps_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for blk in self.temporal_blocks:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.mlp.fc2.weight)

    def set_sequence_parallel(self, sp: SequenceParallel | None) -> None:
        """Shard spatial tokens across ranks with `sp` (None turns it off); weights are unchanged."""
        self.sequence_parallel = sp
        for blk in self.spatial_blocks:
            blk.attn.sequence_parallel = sp

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
        _, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
        S = H * W

        # position embedding scaled so that every resolution covers the same extent as input_sq_size
        scale = (float(height.reshape(-1)[0]) * float(width.reshape(-1)[0])) ** 0.5 / self.input_sq_size
        pos = self.pos_embed(H, W, scale=scale, base_size=round(S**0.5), device=x.device, dtype=dtype)

        # timestep (+ fps) conditioning, and the timestep-0 branch for condition frames
        t = self.t_embedder(timestep) + self.fps_embedder(fps.to(dtype), B)
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep)) + self.fps_embedder(fps.to(dtype), B)
            t0_mlp = self.t_block(t0)

        y, y_mask = self.encode_text(y, mask)

        x = self.x_embedder(x).view(B, T, S, -1) + pos[:, None]
        S_full = S
        if self.sequence_parallel is not None:
            x = self.sequence_parallel.split(x, dim=2)
            S = x.shape[2]
        x = x.reshape(B, T * S, -1)

        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = self._run_block(spatial, x, y, t_mlp, y_mask, x_mask, t0_mlp, T, S, None)
            x = self._run_block(temporal, x, y, t_mlp, y_mask, x_mask, t0_mlp, T, S, self.rope)

        if self.sequence_parallel is not None:
            x = self.sequence_parallel.gather(x.view(B, T, S, -1), dim=2)[:, :, :S_full]
            S = S_full
            x = x.reshape(B, T * S, -1)

        x = self.final_layer(x, t, x_mask, t0, T, S)
        return self.unpatchify(x, T, H, W, Tx, Hx, Wx).float()

    def _run_block(self, block: STDiT3Block, *args) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def unpatchify(self, x: Tensor, T: int, H: int, W: int, Tx: int, Hx: int, Wx: int) -> Tensor:
        return unpatchify(x, self.patch_size, self.out_channels, T, H, W, Tx, Hx, Wx)


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here.
# ----------------------------------------------------------------------------------------------

STDiT3_XL_2 = partial(STDiT3, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
STDiT3_3B_2 = partial(STDiT3, depth=28, hidden_size=1872, num_heads=26, patch_size=(1, 2, 2))

STDIT3_MODELS = {
    "STDiT3-XL/2": STDiT3_XL_2,
    "STDiT3-3B/2": STDiT3_3B_2,
}
