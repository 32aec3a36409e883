"""Optional fast kernels (flash-attn, apex FusedLayerNorm) behind torch fallbacks, chosen once with one log line.

Asking for a kernel that is not there falls back to torch SDPA / nn.LayerNorm; the choice never changes
a state dict.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


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


class AttentionKernel(nn.Module):
    """`attention` as a module without parameters, so `opensora_core.parallel` can wrap it in place."""

    def __init__(self, use_flash: bool = False):
        super().__init__()
        self.use_flash = use_flash

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return attention(q, k, v, mask=mask, use_flash=self.use_flash)
