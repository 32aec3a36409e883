"""Latte as Open-Sora adapted it: DiT's weights, but blocks alternate between space and time.

Even blocks attend over the tokens of one frame, odd blocks over one position across frames; the
temporal table is added once, before the first temporal block. Same state dict as DiT
(spec/state-dicts.json "Latte-XL/2"), same conditioning and fixed `input_size`.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor

from opensora_core.models.dit import DiT


class Latte(DiT):
    """DiT with factorised space / time attention (Latte's variant 1).

    forward as DiT's; `no_temporal_pos_emb` has no effect, as in Open-Sora's Latte.
    """

    def forward(self, x: Tensor, timestep: Tensor, y: Tensor, **kwargs) -> Tensor:
        B, T, S = x.shape[0], self.num_temporal, self.num_spatial
        x = self.embed_video(x)  # [B, T, S, D]
        D = x.shape[-1]
        c = self.embed_condition(timestep, y)
        c_spatial = c.repeat_interleave(T, dim=0)  # one condition per (sample, frame)
        c_temporal = c.repeat_interleave(S, dim=0)  # one condition per (sample, position)
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:
                x = self.run_block(block, x.reshape(B * T, S, D), c_spatial).view(B, T, S, D)
            else:
                x = x.transpose(1, 2).reshape(B * S, T, D)
                if i == 1:
                    x = x + self.pos_embed_temporal
                x = self.run_block(block, x, c_temporal).view(B, S, T, D).transpose(1, 2)
        x = self.final_layer(x.reshape(B, T * S, D), c)
        return self.unpatchify(x, self.out_channels).float()


# ----------------------------------------------------------------------------------------------
# Presets: the config's `type` string maps to one line here. Set model.input_size to the latent size.
# ----------------------------------------------------------------------------------------------

Latte_XL_2 = partial(Latte, depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2))
Latte_XL_2x2 = partial(Latte, depth=28, hidden_size=1152, num_heads=16, patch_size=(2, 2, 2))

LATTE_MODELS = {
    "Latte-XL/2": Latte_XL_2,
    "Latte-XL/2x2": Latte_XL_2x2,
}
