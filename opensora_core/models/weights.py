"""Reading `from_pretrained` weight files and loading them strictly into a built model."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opensora_core.errors import CheckpointError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FILES = ("ema.safetensors", "model.safetensors", "model.safetensors.index.json", "ema.pt", "model.pt")


def weights_file(path: str | Path) -> Path:
    """The weights file for `from_pretrained`: the file itself, or the first of WEIGHT_FILES in a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{p}: no weights file in this directory; expected one of {', '.join(WEIGHT_FILES)}"
        )
    raise CheckpointError(
        f"{path}: no such file or directory (weights are never downloaded here: fetch them first, "
        "e.g. `hf download <repo> --local-dir DIR`, and point from_pretrained at DIR)"
    )


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a sharded safetensors index, or a torch .pt/.pth/.bin state dict."""
    import torch
    from safetensors.torch import load_file

    try:
        if file.name.endswith(".safetensors.index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(file.parent / shard))
            return state
        if file.suffix == ".safetensors":
            return load_file(file)
        # upstream training checkpoints (DiT, Latte) also pickle their argparse arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and pickle raise their own types; all mean an unreadable file
        raise CheckpointError(f"{file}: cannot read weights ({first_line(err)})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    return state


@dataclass(frozen=True)
class KeyDiff:
    """How a file's state dict differs from a model's: the strict load and the upstream partial load
    read the same three lists."""

    shared: list[str]
    missing: list[str]  # in the model, not in the file
    unexpected: list[str]  # in the file, not in the model
    wrong_shape: list[str]  # in both, with different shapes

    @classmethod
    def of(cls, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> KeyDiff:
        shared = [k for k in expected if k in state]
        return cls(
            shared=shared,
            missing=[k for k in expected if k not in state],
            unexpected=[k for k in state if k not in expected],
            wrong_shape=[k for k in shared if tuple(state[k].shape) != tuple(expected[k].shape)],
        )


def load_model_weights(model: nn.Module, path: str | Path, *, type_name: str, section: str = "model") -> None:
    """Load weights with strict=True; a checkpoint of another model type raises CheckpointError."""
    from opensora_core.models import upstream

    file = weights_file(path)
    state = read_state_dict(file)
    from_upstream = upstream.is_upstream_release(file)
    if from_upstream:
        state = upstream.upstream_state(file, state, model)
    if hasattr(model, "adapt_checkpoint"):  # e.g. fixed-size models recompute their position tables
        state = model.adapt_checkpoint(state)
    state = upstream.fit_caption_length(state, model)
    if from_upstream:
        upstream.load_partial(model, file, state, section=section, type_name=type_name)
        return
    diff = KeyDiff.of(model.state_dict(), state)
    if diff.missing or diff.unexpected or diff.wrong_shape:
        example = (diff.missing or diff.unexpected or diff.wrong_shape)[0]
        raise CheckpointError(
            f"{file}: does not fit {section}.type={type_name!r}: {len(diff.missing)} missing, "
            f"{len(diff.unexpected)} unexpected, {len(diff.wrong_shape)} wrongly shaped keys (e.g. {example!r})"
        )
    model.load_state_dict(state, strict=True)
    log.info("loaded %s weights from %s", type_name, file)
