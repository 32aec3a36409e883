"""The model authors' own released checkpoints, which Open-Sora's configs name by file name.

`DiT-XL-2-256x256.pt` (facebookresearch/DiT), `Latte-XL-2-256x256-ucf101.pt` (Latte's ucf101.pt),
`PixArt-XL-2-512x512.pth` (PixArt-alpha) and their siblings are image (or other-condition) models in
their authors' layouts. Open-Sora loads them into its video models after converting the layout, and
non-strictly, because starting a video model from an image model is the point: STDiT-XL/2 from
PixArt-XL-2-512x512.pth gets every spatial weight and keeps its temporal attention at its init.

Here the conversion is `upstream_state` and the load stays guarded: a file is treated this way only
under one of these names (keep the released name when copying it locally), every tensor the model
and the file share must have the same shape, and most of the model must come from the file, so a
checkpoint of an unrelated model is still refused. What was left at init and what went unused is
logged in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from opensora_core.errors import CheckpointError
from opensora_core.models.weights import KeyDiff

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# File name -> where it comes from (Open-Sora's own list of the files its configs name).
UPSTREAM_RELEASES = {
    "DiT-XL-2-256x256.pt": "facebookresearch/DiT",
    "DiT-XL-2-512x512.pt": "facebookresearch/DiT",
    "Latte-XL-2-256x256-ucf101.pt": "maxin-cn/Latte ucf101.pt",
    "PixArt-XL-2-256x256.pth": "PixArt-alpha/PixArt-alpha",
    "PixArt-XL-2-SAM-256x256.pth": "PixArt-alpha/PixArt-alpha",
    "PixArt-XL-2-512x512.pth": "PixArt-alpha/PixArt-alpha",
    "PixArt-XL-2-1024-MS.pth": "PixArt-alpha/PixArt-alpha",
    "PixArt-1B-2.pth": "PixArt-alpha",
    "PixArt-Sigma-XL-2-256x256.pth": "PixArt-alpha/PixArt-Sigma",
    "PixArt-Sigma-XL-2-512-MS.pth": "PixArt-alpha/PixArt-Sigma",
    "PixArt-Sigma-XL-2-1024-MS.pth": "PixArt-alpha/PixArt-Sigma",
    "PixArt-Sigma-XL-2-2K-MS.pth": "PixArt-alpha/PixArt-Sigma",
    "OpenSora-v1-16x256x256.pth": "hpcai-tech/Open-Sora",
    "OpenSora-v1-HQ-16x256x256.pth": "hpcai-tech/Open-Sora",
    "OpenSora-v1-HQ-16x512x512.pth": "hpcai-tech/Open-Sora",
}

# A partial load must still fill at least this share of the model's tensors from the file.
MIN_LOADED_FRACTION = 0.5


def is_upstream_release(file: Path) -> bool:
    return file.name in UPSTREAM_RELEASES


def upstream_state(file: Path, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` in this model's layout: Latte's EMA weights, Sigma's blocks as STDiT3's spatial blocks."""
    if isinstance(
        state.get("ema"), dict
    ):  # Latte's training checkpoint: {"ema": ..., "model": ..., "opt": ...}
        state = state["ema"]
    if type(model).__name__ == "STDiT3" and "PixArt-Sigma" in file.name:
        state = {
            k.replace("blocks.", "spatial_blocks.", 1) if k.startswith("blocks.") else k: v
            for k, v in state.items()
        }
    return state


def fit_caption_length(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Pad (repeating its last row) or cut the file's null caption `y_embedder.y_embedding` to the model's length.

    PixArt-alpha and v1.0 store 120 tokens, v1.1 200, v1.2 300; the text length is a config choice.
    """
    import torch

    key = "y_embedder.y_embedding"
    theirs, ours = state.get(key), model.state_dict().get(key)
    if theirs is None or ours is None or theirs.ndim != 2 or theirs.shape[1:] != ours.shape[1:]:
        return state
    have, want = theirs.shape[0], ours.shape[0]
    if have == want:
        return state
    log.info(
        "%s: %d caption tokens in the file, %d in the model: %s",
        key,
        have,
        want,
        "padded" if have < want else "cut",
    )
    if have < want:
        fitted = torch.cat([theirs, theirs[-1:].expand(want - have, -1)], dim=0)
    else:
        fitted = theirs[:want]
    return {**state, key: fitted}


def load_partial(
    model: nn.Module, file: Path, state: dict[str, torch.Tensor], *, section: str, type_name: str
) -> None:
    """Load what the file and the model share, as Open-Sora does for upstream files, with the guards above."""
    expected = model.state_dict()
    diff = KeyDiff.of(expected, state)
    shared, missing, unused = diff.shared, diff.missing, diff.unexpected
    if diff.wrong_shape:
        k = diff.wrong_shape[0]
        raise CheckpointError(
            f"{file}: does not fit {section}.type={type_name!r}: {len(diff.wrong_shape)} wrongly shaped tensors "
            f"(e.g. {k!r}: {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model; "
            "check hidden_size / depth / patch_size against the released model)"
        )
    if len(shared) < MIN_LOADED_FRACTION * len(expected):
        raise CheckpointError(
            f"{file}: does not fit {section}.type={type_name!r}: only {len(shared)} of its {len(expected)} "
            "tensors are in the file"
        )
    model.load_state_dict({k: state[k] for k in shared}, strict=False)
    log.info(
        "loaded %d of %d %s tensors from %s (%s's release, Open-Sora's non-strict load); "
        "%d left at init%s, %d in the file unused%s",
        len(shared), len(expected), type_name, file.name, UPSTREAM_RELEASES[file.name],
        len(missing), f" (e.g. {missing[0]})" if missing else "",
        len(unused), f" (e.g. {unused[0]})" if unused else "",
    )  # fmt: skip
