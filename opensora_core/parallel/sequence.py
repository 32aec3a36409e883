"""Ulysses sequence parallelism: each sample's spatial tokens split across the ranks of an SP group.

Applied to a plain STDiT3 through its `set_sequence_parallel` seam; the model's weights and state
dict do not change. Spatial self-attention trades the token shard for a head shard with an
all-to-all (`torch.distributed.all_to_all_single`, which gloo supports), so attention still sees
the whole frame; everything else in a block acts per token.

Gradients: ranks of one SP group hold the same batch and run the layers outside the split part
redundantly. The gather's backward multiplies by the SP size and the split's backward divides by
it (as Open-Sora does), so on every parameter the SP ranks' gradients sum to SP size x the true
gradient; DeepSpeed's average over all ranks (SP x DP) is then exactly the data-parallel average.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from opensora_core.errors import ConfigError
from opensora_core.parallel.layout import ParallelLayout, check_heads_divisible, parallel_layout

__all__ = [
    "ParallelLayout",
    "apply_sequence_parallel",
    "check_heads_divisible",
    "new_sequence_parallel_groups",
    "parallel_layout",
]


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


class UlyssesSequenceParallel:
    """STDiT3's `SequenceParallel` over one process group (all-to-all around spatial attention).

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


def apply_sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup) -> UlyssesSequenceParallel:
    """Make `model` (anything with `set_sequence_parallel`, e.g. STDiT3) run sequence parallel over `group`."""
    size = dist.get_world_size(group)
    if not hasattr(model, "set_sequence_parallel"):
        raise ConfigError(
            f"sp_size={size}: model {type(model).__name__} does not support sequence parallelism"
        )
    check_heads_divisible(int(model.num_heads), size)
    sp = UlyssesSequenceParallel(group)
    model.set_sequence_parallel(sp)
    return sp


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
