"""LPIPS (Zhang et al. 2018), the perceptual distance Open-Sora's VAE losses use: VGG16 features of both
images, unit-normalised per position, squared differences weighted by a 1x1 conv per layer, averaged.

Weights come from one local file (`lpips_path`), never a download: the state dict in the layout of
Open-Sora's / taming's LPIPS module — `net.slice{1..5}.{i}.weight|bias` (torchvision's VGG16 `features.{i}`
split at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) and `lin{0..4}.model.1.weight` (taming's vgg.pth).
The widths are read from the file, so a tiny random one (tests) has the same topology at a few channels.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from opensora_core.errors import CheckpointError
from opensora_core.models.weights import read_state_dict

# VGG16's convolutions per slice (each followed by a ReLU; slices 2-5 start with a 2x2 max pool).
VGG16_SLICES = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# ImageNet normalisation of inputs in [-1, 1], as LPIPS's ScalingLayer
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _vgg_slice(index: int, in_channels: int, width: int) -> nn.Sequential:
    """Slice `index` of VGG16's features with torchvision's layer numbering (so state-dict keys match)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    position = (0, 4, 9, 16, 23)[index]
    if index > 0:
        layers[str(position)] = nn.MaxPool2d(2, 2)
        position += 1
    for _ in range(VGG16_SLICES[index]):
        layers[str(position)] = nn.Conv2d(in_channels, width, 3, padding=1)
        layers[str(position + 1)] = nn.ReLU(inplace=False)
        position += 2
        in_channels = width
    return nn.Sequential(layers)


class VGGFeatures(nn.Module):
    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        channels = 3
        for i, width in enumerate(widths):
            setattr(self, f"slice{i + 1}", _vgg_slice(i, channels, width))
            channels = width

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(len(VGG16_SLICES)):
            x = getattr(self, f"slice{i + 1}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """A 1x1 conv to one channel; index 0 is LPIPS's dropout slot (identity here: always eval)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Frozen perceptual distance: images [N, 3, H, W] in [-1, 1] -> [N, 1, 1, 1]."""

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        self.net = VGGFeatures(widths)
        for i, width in enumerate(widths):
            setattr(self, f"lin{i}", NetLinLayer(width))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
            diff = (_unit(a) - _unit(b)) ** 2
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_lpips(path: str | Path, *, key: str = "lpips_path") -> LPIPS:
    """LPIPS with the weights in `path` (see the module docstring), loaded strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{key}={str(path)!r}: no such file (LPIPS weights are never downloaded: save the VGG16 + lin "
            "layers state dict there)"
        )
    # the input normalisation is a constant here; a full Open-Sora module's copy of it is not needed
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("scaling_layer.")}
    try:
        widths = tuple(int(state[f"lin{i}.model.1.weight"].shape[1]) for i in range(len(VGG16_SLICES)))
    except KeyError as err:
        raise CheckpointError(f"{path}: not an LPIPS state dict (no {err.args[0]!r})") from None
    model = LPIPS(widths)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit LPIPS: {str(err).splitlines()[0]}") from None
    return model
