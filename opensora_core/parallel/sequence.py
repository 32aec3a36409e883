"""Ulysses sequence parallelism: each sample's spatial tokens split across the ranks of an SP group.

`apply_sequence_parallel` changes how a plain STDiT3 / STDiT2 / STDiT runs, the model knowing nothing of it:
forward hooks split the tokens before the first block and gather them after the last (every block in
between sees this rank's share of each frame), and each spatial self-attention's kernel is wrapped so
the token shard is traded for a head shard around the softmax with an all-to-all
(`torch.distributed.all_to_all_single`, which gloo supports). Attention still sees the whole frame;
everything else in a block acts per token. Weights and the state dict do not change.

Gradients: ranks of one SP group hold the same batch and run the layers outside the split part
redundantly. The gather's backward multiplies by the SP size and the split's backward divides by
it (as Open-Sora does), so on every parameter the SP ranks' gradients sum to SP size x the true
gradient; DeepSpeed's average over all ranks (SP x DP) is then exactly the data-parallel average.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from opensora_core.errors import ConfigError
from opensora_core.models.kernels import AttentionKernel
from opensora_core.models.stdit import STDiT
from opensora_core.models.stdit2 import STDiT2
from opensora_core.models.stdit3 import STDiT3
from opensora_core.parallel.layout import ParallelLayout, check_heads_divisible


def new_sequence_parallel_groups(layout: ParallelLayout) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's (SP group, DP group). Every rank must call it: creating a group is collective."""
    sp_group = dp_group = None
    for ranks in layout.sp_group_ranks():
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            sp_group = group
    for ranks in layout.dp_group_ranks():
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            dp_group = group
    return sp_group, dp_group


class SequenceParallel(Protocol):
    """The collectives sequence parallelism needs; `UlyssesSequenceParallel` is the one over a process group."""

    def split(self, x: Tensor, dim: int) -> Tensor:
        """This rank's part of `x` along `dim` (padding if needed)."""
        ...

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """All ranks' parts of `x` concatenated along `dim` (may include padding; the caller crops)."""
        ...

    def tokens_to_heads(self, x: Tensor) -> Tensor:
        """[B, H, N/P, D] -> [B, H/P, N, D] (all-to-all)."""
        ...

    def heads_to_tokens(self, x: Tensor) -> Tensor:
        """[B, H/P, N, D] -> [B, H, N/P, D] (all-to-all)."""
        ...


class UlyssesSequenceParallel:
    """`SequenceParallel` over one process group (all-to-all around spatial attention).

    `split` remembers the unpadded length so attention never sees the padding tokens: the
    all-to-all that gathers the tokens crops them, the one that scatters them back re-pads.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._length: int | None = None

    def split(self, x: Tensor, dim: int) -> Tensor:
        length = x.shape[dim]
        self._length = length
        pad = -length % self.size
        if pad:
            x = _pad_dim(x, dim, pad)
        return _Split.apply(x, dim, self)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return _Gather.apply(x, dim, self)

    def tokens_to_heads(self, x: Tensor) -> Tensor:
        """[B, H, N/P, D] -> [B, H/P, N, D], without the padding tokens."""
        B, H, n, D = x.shape
        P = self.size
        send = x.reshape(B, P, H // P, n, D).transpose(0, 1)  # slice j goes to rank j
        out = _AllToAll.apply(send, self.group)  # slice j came from rank j: its tokens, our heads
        out = out.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * n, D)
        if self._length is not None and self._length < P * n:
            out = out[:, :, : self._length]
        return out

    def heads_to_tokens(self, x: Tensor) -> Tensor:
        """[B, H/P, N, D] -> [B, H, N/P, D], re-padding what `tokens_to_heads` cropped."""
        P = self.size
        pad = -x.shape[2] % P
        if pad:
            x = _pad_dim(x, 2, pad)
        B, h, N, D = x.shape
        send = x.reshape(B, h, P, N // P, D).permute(2, 0, 1, 3, 4)  # token chunk j goes to rank j
        out = _AllToAll.apply(send, self.group)  # slice j: rank j's heads for our tokens
        return out.transpose(0, 1).reshape(B, P * h, N // P, D)


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup) -> UlyssesSequenceParallel:
    """Make `model` (an STDiT3, STDiT2 or STDiT) run sequence parallel over `group`; its weights are untouched."""
    size = dist.get_world_size(group)
    if not isinstance(model, STDiT3 | STDiT2 | STDiT):
        raise ConfigError(
            f"sp_size={size}: model {type(model).__name__} does not support sequence parallelism"
        )
    check_heads_divisible(int(model.num_heads), size)
    sp = UlyssesSequenceParallel(group)
    parallelize_sequence(model, sp)
    return sp


def parallelize_sequence(model: STDiT3 | STDiT2 | STDiT, sp: SequenceParallel) -> None:
    """`apply_sequence_parallel` with any `SequenceParallel` (tests use a one-rank stand-in).

    The blocks, in the order they run, share the tokens out; only spatial self-attention needs a
    whole frame, since temporal attention, cross-attention and the MLP act per spatial position.
    """
    if isinstance(model, STDiT3):
        blocks = [
            blk for pair in zip(model.spatial_blocks, model.temporal_blocks, strict=True) for blk in pair
        ]
        spatial_attentions = [blk.attn for blk in model.spatial_blocks]
    elif isinstance(model, STDiT2 | STDiT):
        blocks = list(model.blocks)
        spatial_attentions = [blk.attn for blk in model.blocks]
    else:
        raise TypeError(f"{type(model).__name__} has no sequence-parallel plan (STDiT3, STDiT2, STDiT have)")
    for attn in spatial_attentions:
        if not isinstance(attn.kernel, AttentionKernel):
            raise ValueError(f"{type(model).__name__} is already sequence parallel")
        attn.kernel = UlyssesAttention(attn.kernel, sp)
    shards = TokenShards(sp)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(shards.enter_hook(block, first=i == 0), with_kwargs=True)
    blocks[-1].register_forward_hook(shards.leave_hook(blocks[-1]), with_kwargs=True)


class UlyssesAttention(nn.Module):
    """An attention kernel run on this rank's heads over all tokens, between two all-to-alls."""

    def __init__(self, kernel: nn.Module, sp: SequenceParallel):
        super().__init__()
        self.kernel = kernel
        self.sp = sp

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:  # a key mask would have to be gathered with the tokens; self-attention has none
            raise ValueError("sequence-parallel attention takes no key mask")
        q, k, v = (self.sp.tokens_to_heads(t) for t in (q, k, v))
        return self.sp.heads_to_tokens(self.kernel(q, k, v))


class TokenShards:
    """Forward hooks on the blocks of a model: each block's (x [B, T*S, C], T, S) become this rank's share.

    The first block's hook splits every frame's S tokens, the others only pass the local S on; after the
    last block the shares are gathered and the split's padding cropped, so the model sees whole frames.
    """

    def __init__(self, sp: SequenceParallel):
        self.sp = sp
        self.length: int | None = None  # tokens per frame before the split

    def enter_hook(self, block: nn.Module, *, first: bool):
        signature = inspect.signature(block.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            bound = signature.bind(*args, **kwargs)
            a = bound.arguments
            if first:
                x, T, self.length = a["x"], a["T"], a["S"]
                B, _, C = x.shape
                a["x"] = self.sp.split(x.view(B, T, self.length, C), dim=2).reshape(B, -1, C)
            a["S"] = a["x"].shape[1] // a["T"]
            return bound.args, bound.kwargs

        return hook

    def leave_hook(self, block: nn.Module):
        signature = inspect.signature(block.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
            a = signature.bind(*args, **kwargs).arguments  # the arguments as `enter_hook` left them
            B, _, C = out.shape
            whole = self.sp.gather(out.view(B, a["T"], a["S"], C), dim=2)[:, :, : self.length]
            return whole.reshape(B, -1, C)

        return hook


# ------------------------------------------------------------------------------------------------
# Autograd functions: each collective's backward is the matching collective the other way.


def _pad_dim(x: Tensor, dim: int, pad: int) -> Tensor:
    dim = dim % x.ndim
    return F.pad(x, (0, 0) * (x.ndim - 1 - dim) + (0, pad))


class _AllToAll(torch.autograd.Function):
    """Slice j of dim 0 goes to rank j; slice j of the output came from rank j (its own inverse)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllToAll.apply(grad, ctx.group), None


class _Split(torch.autograd.Function):
    """Forward: this rank's chunk. Backward: all ranks' chunk gradients, divided by the SP size."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, sp: UlyssesSequenceParallel) -> Tensor:
        ctx.dim, ctx.sp = dim, sp
        return x.chunk(sp.size, dim=dim)[sp.rank].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.sp) / ctx.sp.size, None, None


class _Gather(torch.autograd.Function):
    """Forward: all ranks' chunks concatenated. Backward: this rank's chunk, times the SP size."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, sp: UlyssesSequenceParallel) -> Tensor:
        ctx.dim, ctx.sp = dim, sp
        return _all_gather(x, dim, sp)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        sp = ctx.sp
        return grad.chunk(sp.size, dim=ctx.dim)[sp.rank].contiguous() * sp.size, None, None


def _all_gather(x: Tensor, dim: int, sp: UlyssesSequenceParallel) -> Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(sp.size)]
    dist.all_gather(parts, x, group=sp.group)
    return torch.cat(parts, dim=dim)
