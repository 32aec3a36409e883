"""Where each rank sits in the sequence- and data-parallel groups, and the checks on `sp_size` (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from opensora_core.errors import ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: SP groups are consecutive ranks, DP groups the ranks at the same SP index."""

    rank: int
    world_size: int
    sp_size: int

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    def sp_group_ranks(self) -> list[list[int]]:
        return [list(range(g * self.sp_size, (g + 1) * self.sp_size)) for g in range(self.dp_size)]

    def dp_group_ranks(self) -> list[list[int]]:
        return [list(range(s, self.world_size, self.sp_size)) for s in range(self.sp_size)]


def parallel_layout(rank: int, world_size: int, sp_size: int) -> ParallelLayout:
    """The layout for `sp_size`, or ConfigError when it does not divide the number of ranks."""
    if sp_size < 1 or world_size % sp_size:
        valid = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"sp_size={sp_size} must divide the number of training workers ({world_size}); valid: {valid}"
        )
    return ParallelLayout(rank=rank, world_size=world_size, sp_size=sp_size)


def check_sp_size(sp_size: int, num_train_workers: int) -> None:
    """A config's SP groups must tile its training workers."""
    if num_train_workers % sp_size:
        valid = [d for d in range(1, num_train_workers + 1) if num_train_workers % d == 0]
        raise ConfigError(
            f"sp_size={sp_size} must divide num_train_workers={num_train_workers}; valid sp_size values: {valid}"
        )


def check_heads_divisible(num_heads: int, sp_size: int) -> None:
    """Ulysses shards attention heads across the SP group, so each rank needs a whole number of them."""
    if num_heads % sp_size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ConfigError(
            f"sp_size={sp_size} must divide model.num_heads={num_heads}; valid sp_size values: {valid}"
        )
