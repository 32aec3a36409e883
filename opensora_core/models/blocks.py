"""The building blocks Open-Sora's diffusion transformers share: embedders, attention, adaLN-single, init.

Each model file (stdit3.py, stdit2.py, stdit.py, pixart.py, dit.py) adds its own block and model on top.
Parameter names here are the ones released checkpoints use (timm's and PixArt's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from opensora_core.models.kernels import AttentionKernel

# ----------------------------------------------------------------------------------------------
# Small functions
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


def patch_grid(x: Tensor, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Latents [B, C, Tx, Hx, Wx] -> token grid (T, H, W), counting the patches PatchEmbed3D pads."""
    _, _, Tx, Hx, Wx = x.shape
    pt, ph, pw = patch_size
    return -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)


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


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth growing linearly from 0 at the first block to `drop_path` at the last."""
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


def run_block(block: nn.Module, *args, checkpointing: bool) -> Tensor:
    """`block(*args)`; with `checkpointing` (and grad enabled) its activations are recomputed in backward."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


# ----------------------------------------------------------------------------------------------
# Normalisation and positions
# ----------------------------------------------------------------------------------------------


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

    def for_video(
        self, h: int, w: int, *, height: Tensor, width: Tensor, input_sq_size: int, dtype: torch.dtype
    ) -> Tensor:
        """The table for an (h, w) token grid of a video `height` x `width` pixels (first sample's size).

        Scaled so that every resolution covers the extent a square `input_sq_size` video covers.
        """
        scale = (float(height.reshape(-1)[0]) * float(width.reshape(-1)[0])) ** 0.5 / input_sq_size
        return self(
            h, w, scale=scale, base_size=round((h * w) ** 0.5), device=self.inv_freq.device, dtype=dtype
        )


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


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


class SizeEmbedder(TimestepEmbedder):
    """[B, d] (or [B]) scalars -> [B, d * hidden]: each scalar embedded alone, the d results concatenated."""

    def forward(self, s: Tensor, batch_size: int) -> Tensor:
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != batch_size:  # CFG doubles the batch; sizes come once per prompt
            s = s.repeat(batch_size // s.shape[0], 1)
        return super().forward(s.reshape(-1)).reshape(batch_size, -1)


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


# ----------------------------------------------------------------------------------------------
# Attention and residual branches
# ----------------------------------------------------------------------------------------------


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


class SelfAttention(nn.Module):
    """Multi-head self-attention with RMS-normalised queries/keys and optional RoPE (temporal blocks).

    The softmax itself is `self.kernel` ([B, heads, N, head_dim] in and out), the one place parallelism
    may change how attention runs.
    """

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
        self.kernel = AttentionKernel(use_flash=enable_flash_attn)

    def forward(self, x: Tensor, rope: RotaryEmbedding | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm_legacy and rope is not None:
            q, k = self.q_norm(rope(q)), self.k_norm(rope(k))
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q), rope(k)
        out = self.kernel(q, k, v)
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
        self.kernel = AttentionKernel()

    def forward(self, x: Tensor, y: Tensor, y_mask: Tensor | None) -> Tensor:
        """x [B, N, C]; y [B, L, C]; y_mask [B, L] bool (True = real token) or None."""
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (
            self.kv_linear(y).view(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        mask = y_mask[:, None, None, :] if y_mask is not None else None
        out = self.kernel(q, k, v, mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


# ----------------------------------------------------------------------------------------------
# adaLN-single (PixArt's conditioning: one shared timestep projection, a learned table per block)
# ----------------------------------------------------------------------------------------------


def adaln_single(table: Tensor, t: Tensor) -> tuple[Tensor, ...]:
    """A block's table [n, C] plus the shared projection t [B, n*C] -> n modulation tensors [B, 1, C]."""
    n = table.shape[0]
    return (table[None] + t.reshape(t.shape[0], n, -1)).chunk(n, dim=1)


@dataclass(frozen=True)
class FrameModulation:
    """One adaLN (shift, scale, gate) triple; with a frame mask, condition frames use the timestep-0 triple."""

    x_mask: Tensor | None
    shift: Tensor
    scale: Tensor
    gate: Tensor
    shift0: Tensor | None
    scale0: Tensor | None
    gate0: Tensor | None
    T: int
    S: int

    def modulate(self, h: Tensor) -> Tensor:
        out = modulate(h, self.shift, self.scale)
        if self.x_mask is None:
            return out
        return select_frames(self.x_mask, out, modulate(h, self.shift0, self.scale0), self.T, self.S)

    def gated(self, x: Tensor) -> Tensor:
        out = self.gate * x
        if self.x_mask is None:
            return out
        return select_frames(self.x_mask, out, self.gate0 * x, self.T, self.S)


def frame_modulations(
    table: Tensor, t: Tensor, t0: Tensor | None, x_mask: Tensor | None, T: int, S: int
) -> list[FrameModulation]:
    """adaLN-single for a block with a frame mask: one FrameModulation per (shift, scale, gate) in `table`.

    t0 (the timestep-0 projection) is used only with a mask: condition frames (x_mask False) take it.
    """
    n = table.shape[0]
    parts = adaln_single(table, t)
    parts0 = adaln_single(table, t0) if x_mask is not None else (None,) * n
    return [FrameModulation(x_mask, *parts[i : i + 3], *parts0[i : i + 3], T=T, S=S) for i in range(0, n, 3)]


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
# Weight initialisation (DiT's recipe, which every model here follows with its own lists)
# ----------------------------------------------------------------------------------------------


def initialize_weights(
    model: nn.Module,
    *,
    patch_embed: PatchEmbed3D,
    conditioning: Iterable[nn.Module] = (),
    zero: Iterable[nn.Linear] = (),
) -> None:
    """Xavier-uniform linears with zero bias, the patch embedding initialised as one linear map, then
    N(0, 0.02) for every linear inside the `conditioning` modules (timestep, caption MLPs; in order)
    and zeros for the `zero` linears (branches that should start switched off).
    """

    def xavier(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(xavier)
    w = patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for module in conditioning:
        for linear in module.modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=0.02)
    for linear in zero:
        nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
