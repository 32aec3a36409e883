"""What Open-Sora's v1.0-era models (STDiT, PixArt, DiT, Latte) share: each is built for one latent size.

Their token grid and sin-cos position tables are fixed by `input_size` at construction, and the tables
are persistent buffers, so they appear in the released state dicts (spec/state-dicts.json).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from opensora_core.errors import ConfigError
from opensora_core.models.blocks import run_block

# Keys of sin-cos tables in upstream checkpoints; Open-Sora drops them on load and keeps the ones it
# computed from the model's own input_size (DiT/Latte/PixArt originals call theirs "pos_embed"/"temp_embed").
POSITION_TABLE_KEYS = ("pos_embed", "pos_embed_spatial", "pos_embed_temporal", "temp_embed")


# ----------------------------------------------------------------------------------------------
# Sin-cos position tables (MAE's recipe, in float64 like Open-Sora's numpy code, stored as float32)
# ----------------------------------------------------------------------------------------------


def sincos_features(dim: int, pos: Tensor) -> Tensor:
    """[M] positions -> [M, dim] float64 features: sines of all frequencies, then cosines."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_table_2d(
    dim: int, grid: tuple[int, int], scale: float = 1.0, base_size: int | None = None
) -> Tensor:
    """[1, h*w, dim] table for an (h, w) token grid in row-major order; the first half encodes the column.

    Positions are divided by `scale` and, with `base_size`, stretched so every grid spans base_size units.
    """
    if dim % 4:
        raise ConfigError(f"hidden_size must be divisible by 4 for the 2D position table, got {dim}")
    h, w = grid
    rows = torch.arange(h, dtype=torch.float32) / scale
    cols = torch.arange(w, dtype=torch.float32) / scale
    if base_size is not None:
        rows = rows * (base_size / h)
        cols = cols * (base_size / w)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    table = torch.cat([sincos_features(dim // 2, grid_cols), sincos_features(dim // 2, grid_rows)], dim=1)
    return table.float().unsqueeze(0)


def sincos_table_1d(dim: int, length: int, scale: float = 1.0) -> Tensor:
    """[1, length, dim] table for positions 0..length-1 divided by `scale`."""
    if dim % 2:
        raise ConfigError(f"hidden_size must be even for the temporal position table, got {dim}")
    pos = torch.arange(length, dtype=torch.float64) / scale
    return sincos_features(dim, pos).float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------


class FixedSizeModel(nn.Module):
    """A diffusion transformer whose token grid is fixed by `input_size` (latent [T, H, W]).

    Subclasses call `set_input_size` first in __init__, register their tables under the names in
    `position_tables`, and use `check_latent_size`, `unpatchify` and `run_block` in forward.
    """

    position_tables: tuple[str, ...] = ()
    grad_checkpointing: bool = False

    def set_input_size(self, input_size: Sequence[int | None], patch_size: Sequence[int]) -> None:
        name = type(self).__name__
        if len(input_size) != 3 or any(s is None for s in input_size):
            raise ConfigError(
                f"model.input_size={tuple(input_size)!r}: {name} needs the latent size [T, H, W] it is "
                "built for, e.g. (16, 32, 32) for 16x256x256 video through an 8x VAE"
            )
        self.input_size = tuple(int(s) for s in input_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        if any(s % p for s, p in zip(self.input_size, self.patch_size, strict=True)):
            raise ConfigError(
                f"model.input_size={self.input_size} is not a multiple of the patch size {self.patch_size}"
            )
        self.grid = tuple(s // p for s, p in zip(self.input_size, self.patch_size, strict=True))
        self.num_temporal = self.grid[0]
        self.num_spatial = self.grid[1] * self.grid[2]

    def check_latent_size(self, x: Tensor) -> None:
        """Open-Sora's fixed-size models cannot run other sizes: say so instead of failing in a reshape."""
        if tuple(x.shape[2:]) != self.input_size:
            raise ConfigError(
                f"{type(self).__name__} is built for latents of size {list(self.input_size)} "
                f"(model.input_size) but got {list(x.shape[2:])}; set model.input_size to the latent [T, H, W]"
            )

    def unpatchify(self, x: Tensor, out_channels: int) -> Tensor:
        """[B, T*H*W, pt*ph*pw*C_out] -> [B, C_out, T*pt, H*ph, W*pw]."""
        (t, h, w), (pt, ph, pw) = self.grid, self.patch_size
        x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], out_channels, t * pt, h * ph, w * pw)

    def run_block(self, block: nn.Module, *args) -> Tensor:
        return run_block(block, *args, checkpointing=self.grad_checkpointing and self.training)

    def adapt_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Make an Open-Sora / upstream checkpoint fit this model, as Open-Sora's loader does.

        Position tables in the file are replaced by this model's own (they depend only on input_size and
        the scales), and 2D patch-embedding weights of image checkpoints (PixArt, DiT) gain a time axis.
        """
        state = {k: v for k, v in state.items() if k not in POSITION_TABLE_KEYS}
        state.update({name: getattr(self, name) for name in self.position_tables})
        weight = state.get("x_embedder.proj.weight")
        if weight is not None and weight.ndim == 4:
            state["x_embedder.proj.weight"] = weight.unsqueeze(2)
        return state
