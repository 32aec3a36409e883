"""The PatchGAN discriminator Open-Sora v1.2's train_vae.py can train beside the VAE (`discriminator =
dict(type="NLayerDiscriminator", ...)`): strided 4x4 convs with BatchNorm over single frames, one logit
per patch. Layer indices match Open-Sora's `main.*` state-dict keys.
"""

from __future__ import annotations

from torch import Tensor, nn

from opensora_core.models.weights import load_model_weights


class NLayerDiscriminator(nn.Module):
    """Frames [N, input_nc, H, W] -> patch logits [N, 1, h, w] (Pix2Pix's PatchGAN)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)  # torch's default init, as Open-Sora registers this class bare

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def build_discriminator(options: dict) -> NLayerDiscriminator:
    """The discriminator of a checked `discriminator` section (opensora_core.train.vae_settings)."""
    options = {k: v for k, v in options.items() if k not in ("type", "use_actnorm")}
    weights = options.pop("from_pretrained", None)
    model = NLayerDiscriminator(**options)
    if weights:
        load_model_weights(model, weights, type_name="NLayerDiscriminator", section="discriminator")
    return model
