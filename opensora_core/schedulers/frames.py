"""Per-latent-frame masks: the frames a training loss averages over, and the frames a sampling step
re-noises, generates or keeps as conditions."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class FrameMasks(NamedTuple):
    """At one sampling step, each [B, T] bool over latent frames.

    renoise: the condition frame is replaced by its noised version before the model call;
    generate: the model treats the frame as being generated (`x_mask`), else as clean;
    keep: after the step the frame is reset to what it was before the model call.
    """

    renoise: Tensor
    generate: Tensor
    keep: Tensor


def mean_flat(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over all but the batch dim; with a frame mask [B, T], only over frames where mask is True."""
    if mask is None:
        return x.mean(dim=list(range(1, x.dim())))
    B, C, T = x.shape[:3]
    per_frame = x.transpose(1, 2).reshape(B, T, -1)  # [B, T, C*H*W]
    m = mask.to(x.dtype)
    return (per_frame * m[:, :, None]).sum(dim=(1, 2)) / (m.sum(dim=1) * per_frame.shape[-1])
