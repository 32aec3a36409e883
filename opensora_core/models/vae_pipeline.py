"""Open-Sora v1.2's video VAE: the image AutoencoderKL frame by frame, then the temporal VAE on its
latents in 17-frame chunks (17 pixel frames -> 5 latent frames), normalised per channel.

Loading: `from_pretrained` is a local directory holding `model.safetensors` with the released keys
(`scale`, `shift`, `spatial_vae.module.*`, `temporal_vae.*`; spec/state-dicts.json), as in the HF repo
hpcai-tech/OpenSora-VAE-v1.2, plus optionally its `config.json`. All weights come from that file; the
image VAE only needs an architecture, taken from `config.json`'s `vae_2d.from_pretrained` when that names
a local diffusers AutoencoderKL directory (absolute, or relative to the pipeline directory), and
otherwise the SDXL VAE config the released pipeline wraps. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.models.vae import VideoAutoencoderKL
from opensora_core.models.vae_temporal import TEMPORAL_VAES, DiagonalGaussian, TemporalVAE
from opensora_core.models.weights import load_model_weights, weights_file

log = logging.getLogger(__name__)

# The image VAE Open-Sora v1.2 names, and its architecture (PixArt-Sigma's copy of the SDXL VAE):
# only shapes matter here, the weights are in the pipeline's own checkpoint.
SDXL_VAE_NAME = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# Per-channel latent statistics of the v1.2 VAE: latents are stored as (z - shift) / scale.
V1_2_SHIFT = (-0.10, 0.34, 0.27, 0.98)
V1_2_SCALE = (3.85, 2.32, 2.33, 3.06)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SPATIAL_CONFIG_DIR = "vae_2d"  # where save_pretrained puts the image VAE's AutoencoderKL config
SPATIAL_OPTIONS = frozenset(
    {
        "type",
        "from_pretrained",
        "subfolder",
        "micro_batch_size",
        "local_files_only",
        "cache_dir",
        "scaling_factor",
    }
)


def _channel_buffer(value: float | Sequence[float]) -> Tensor:
    """A scalar, or one value per latent channel shaped [1, C, 1, 1, 1] to broadcast over videos."""
    t = torch.tensor(value)
    return t[None, :, None, None, None] if t.dim() > 0 else t


def _json_floats(t: Tensor) -> float | list[float]:
    """A buffer as JSON numbers, without float32 noise (0.34, not 0.3400000035762787)."""
    values = [float(f"{v:.7g}") for v in t.flatten().tolist()]
    return values if t.dim() else values[0]


class VideoAutoencoderPipeline(nn.Module):
    """Pixels [B, 3, T, H, W] <-> latents [B, 4, T', H/8, W/8] through the spatial then the temporal VAE.

    With `micro_frame_size` the temporal VAE sees independent chunks of that many frames, so latents of
    one chunk never depend on frames of another. `cal_loss=True` is Open-Sora's VAE-training mode:
    no normalisation, and encode / decode also return the posterior and the image-VAE latents.
    """

    def __init__(
        self,
        spatial_vae: VideoAutoencoderKL,
        temporal_vae: TemporalVAE,
        *,
        micro_frame_size: int | None = None,
        shift: float | Sequence[float] = 0.0,
        scale: float | Sequence[float] = 1.0,
        freeze_vae_2d: bool = False,
        cal_loss: bool = False,
    ):
        super().__init__()
        self.spatial_vae = spatial_vae
        self.temporal_vae = temporal_vae
        # The image VAE wrapper freezes itself; inside the pipeline it trains unless asked not to, as in Open-Sora.
        self.spatial_vae.requires_grad_(not freeze_vae_2d)
        self.freeze_vae_2d = freeze_vae_2d
        self.cal_loss = cal_loss
        self.micro_frame_size = micro_frame_size
        self.micro_z_frame_size: int | None = (
            None
            if micro_frame_size is None
            else temporal_vae.get_latent_size([micro_frame_size, None, None])[0]
        )
        self.out_channels: int = temporal_vae.out_channels
        # Compression per axis (time from the temporal VAE, space from the image VAE).
        self.patch_size: tuple[int, int, int] = (
            temporal_vae.time_downsample_factor,
            spatial_vae.patch_size[1],
            spatial_vae.patch_size[2],
        )
        self.register_buffer("scale", _channel_buffer(scale))
        self.register_buffer("shift", _channel_buffer(shift))

    def _temporal_chunks(self, x: Tensor, size: int | None) -> list[Tensor]:
        if size is None:
            return [x]
        return [x[:, :, i : i + size] for i in range(0, x.shape[2], size)]

    def encode(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor | tuple[Tensor, DiagonalGaussian, Tensor]:
        """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 4, T', H/8, W/8] (posterior samples).

        `generator` drives both VAEs' sampling noise; without it they draw from torch's global RNG
        in the same order as Open-Sora (all image-VAE frames first, then each temporal chunk).
        """
        x_z = self.spatial_vae.encode(x, generator=generator)
        samples = []
        for chunk in self._temporal_chunks(x_z, self.micro_frame_size):
            posterior = self.temporal_vae.encode(chunk)
            samples.append(posterior.sample(generator))
        z = torch.cat(samples, dim=2)
        if self.cal_loss:
            return z, posterior, x_z  # the last chunk's posterior, as Open-Sora returns
        return (z - self.shift) / self.scale

    def decode(self, z: Tensor, num_frames: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Latents [B, 4, T', h, w] -> pixels [B, 3, num_frames, 8h, 8w].

        Give `num_frames`: the temporal VAE front-pads each chunk to a multiple of 4 frames, and only
        the frame count says how much to drop. Without it every chunk is taken as unpadded.
        """
        if not self.cal_loss:
            z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        if num_frames is None:
            num_frames = self.default_num_frames(z.shape[2])
        pieces = []
        for chunk in self._temporal_chunks(z, self.micro_z_frame_size):
            frames = num_frames if self.micro_frame_size is None else min(self.micro_frame_size, num_frames)
            pieces.append(self.temporal_vae.decode(chunk, num_frames=frames))
            num_frames -= self.micro_frame_size or 0
        x_z = torch.cat(pieces, dim=2)
        x = self.spatial_vae.decode(x_z)
        if self.cal_loss:
            return x, x_z
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, DiagonalGaussian, Tensor]:
        """VAE training step (cal_loss only): reconstruction, image-VAE reconstruction, z, posterior, x_z."""
        if not self.cal_loss:
            raise RuntimeError("VideoAutoencoderPipeline.forward needs cal_loss=True; use encode / decode")
        z, posterior, x_z = self.encode(x)
        x_rec, x_z_rec = self.decode(z, num_frames=x_z.shape[2])
        return x_rec, x_z_rec, z, posterior, x_z

    def default_num_frames(self, latent_frames: int) -> int:
        """Pixel frames `decode` assumes for `latent_frames` when not told: whole chunks, no padding."""
        factor = self.temporal_vae.time_downsample_factor
        if self.micro_frame_size is None:
            return latent_frames * factor
        chunks, rest = divmod(latent_frames, self.micro_z_frame_size)
        return chunks * self.micro_frame_size + rest * factor

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """Latent (T, H, W) of a pixel (T, H, W): whole chunks give micro_z_frame_size frames each, the
        remainder ceil(r / 4); e.g. (51, 240, 426) -> [15, 30, 53], (1, H, W) -> [1, ...]."""
        t, h, w = input_size
        if self.micro_frame_size is None or t is None:
            return self.temporal_vae.get_latent_size(self.spatial_vae.get_latent_size(input_size))
        size = self.temporal_vae.get_latent_size(
            self.spatial_vae.get_latent_size([self.micro_frame_size, h, w])
        )
        size[0] = size[0] * (t // self.micro_frame_size)
        if t % self.micro_frame_size:
            size[0] += self.temporal_vae.get_latent_size([t % self.micro_frame_size, None, None])[0]
        return size

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `model.safetensors` (the released key layout) and the configs `write_config` writes."""
        from safetensors.torch import save_file

        self.write_config(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, Path(directory) / WEIGHTS_NAME)

    def write_config(self, directory: str | Path) -> None:
        """Write a `config.json` describing both VAEs and the image VAE's AutoencoderKL config in
        `vae_2d/config.json`: what OpenSoraVAE_V1_2 reads beside weights to build their architecture."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.spatial_vae.module.save_config(directory / SPATIAL_CONFIG_DIR)
        config = {
            "architectures": ["VideoAutoencoderPipeline"],
            "model_type": "VideoAutoencoderPipeline",
            "vae_2d": {
                "type": "VideoAutoencoderKL",
                "from_pretrained": SPATIAL_CONFIG_DIR,
                "micro_batch_size": self.spatial_vae.micro_batch_size,
            },
            "vae_temporal": {"type": "VAE_Temporal", "from_pretrained": None, **self.temporal_vae.settings},
            "freeze_vae_2d": self.freeze_vae_2d,
            "cal_loss": self.cal_loss,
            "micro_frame_size": self.micro_frame_size,
            "shift": _json_floats(self.shift),
            "scale": _json_floats(self.scale),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def adapt_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint trained with one `scale` / `shift` for all channels (VideoAutoencoderPipeline's
        default 1 / 0) loads into a pipeline with one per channel (OpenSoraVAE_V1_2): the file's values
        are what the weights were trained with, so they are kept, per channel."""
        state = dict(state)
        for name in ("scale", "shift"):
            mine = getattr(self, name)
            if name in state and state[name].dim() == 0 and mine.dim() > 0:
                state[name] = state[name].expand_as(mine).clone()
        return state

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# ----------------------------------------------------------------------------------------------
# Building from config dicts (the `vae_2d` / `vae_temporal` entries of Open-Sora's pipeline config)
# ----------------------------------------------------------------------------------------------


def spatial_vae_config(name: str | None, subfolder: str | None, base_dir: Path | None) -> dict[str, Any]:
    """The AutoencoderKL architecture `vae_2d.from_pretrained` names: a local directory (absolute or
    relative to `base_dir`), else the built-in SDXL config for the released pipeline's VAE, else
    a copy in the Hugging Face cache."""
    from diffusers import AutoencoderKL

    if name:
        for root in ([base_dir / name] if base_dir else []) + [Path(name)]:
            if (root / (subfolder or "") / CONFIG_NAME).is_file():
                return dict(AutoencoderKL.load_config(str(root), subfolder=subfolder))
    if name in (None, SDXL_VAE_NAME):
        return dict(SDXL_VAE_CONFIG)
    try:
        return dict(AutoencoderKL.load_config(name, subfolder=subfolder, local_files_only=True))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"vae_2d.from_pretrained={name!r}: no local AutoencoderKL config there "
            f"(give a local diffusers VAE directory; nothing is downloaded) ({type(err).__name__})"
        ) from err


def build_spatial_vae(
    spec: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    where: str = "vae.vae_2d",
    with_weights: bool = False,
) -> VideoAutoencoderKL:
    """The image VAE of a `vae_2d` dict: randomly initialised when the pipeline's own checkpoint holds its
    weights, else (`with_weights`) loaded from its local `from_pretrained` diffusers directory."""
    unknown = sorted(set(spec) - SPATIAL_OPTIONS)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]} is not an option; valid: {', '.join(sorted(SPATIAL_OPTIONS))}"
        )
    if spec.get("type", "VideoAutoencoderKL") != "VideoAutoencoderKL":
        raise ConfigError(f"{where}.type={spec['type']!r} is not supported; valid: VideoAutoencoderKL")
    if with_weights:
        return VideoAutoencoderKL(
            spatial_weights_dir(spec, where),
            subfolder=spec.get("subfolder"),
            micro_batch_size=spec.get("micro_batch_size"),
            scaling_factor=spec.get("scaling_factor", 0.18215),
        )
    config = spatial_vae_config(spec.get("from_pretrained"), spec.get("subfolder"), base_dir)
    return VideoAutoencoderKL(
        config=config,
        micro_batch_size=spec.get("micro_batch_size"),
        scaling_factor=spec.get("scaling_factor", 0.18215),
    )


def has_local_spatial_weights(spec: Mapping[str, Any]) -> bool:
    """Whether `vae_2d.from_pretrained` (with its subfolder) is a local diffusers AutoencoderKL directory."""
    name = spec.get("from_pretrained")
    return bool(name) and (Path(name) / (spec.get("subfolder") or "") / CONFIG_NAME).is_file()


def spatial_weights_dir(spec: Mapping[str, Any], where: str = "vae.vae_2d") -> str:
    """The local diffusers AutoencoderKL directory `vae_2d.from_pretrained` names, or a one-line error."""
    name, subfolder = spec.get("from_pretrained"), spec.get("subfolder")
    if not has_local_spatial_weights(spec):
        raise CheckpointError(
            f"{where}.from_pretrained={name!r}"
            + (f" (subfolder {subfolder!r})" if subfolder else "")
            + ": no local AutoencoderKL there; a pipeline without its own from_pretrained starts from the "
            "image VAE's weights (never downloaded: fetch e.g. PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers)"
        )
    return str(name)


def build_temporal_vae(
    spec: Mapping[str, Any], *, where: str = "vae.vae_temporal", with_weights: bool = False
) -> TemporalVAE:
    """The temporal VAE of a `vae_temporal` dict: `VAE_Temporal_SD` (the v1.2 preset, settings may be
    overridden) or `VAE_Temporal` with every setting given. Its own from_pretrained is read only
    `with_weights`: otherwise the pipeline's checkpoint holds these weights."""
    options = dict(spec)
    type_name = options.pop("type", "VAE_Temporal_SD")
    weights = options.pop("from_pretrained", None)
    if type_name not in TEMPORAL_VAES:
        raise ConfigError(f"{where}.type={type_name!r} is not supported; valid: {', '.join(TEMPORAL_VAES)}")
    try:
        model = TEMPORAL_VAES[type_name](**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: cannot build {type_name} ({err})") from err
    if with_weights and weights:
        load_model_weights(model, weights, type_name=type_name, section=where)
    return model


def checkpoint_dir(from_pretrained: str | Path) -> Path:
    """The directory of a checkpoint: itself, or the folder of a weights file."""
    path = Path(from_pretrained)
    return path if path.is_dir() else path.parent


def read_saved_config(from_pretrained: str | Path) -> dict[str, Any]:
    """`config.json` next to the weights, or {} if there is none."""
    file = checkpoint_dir(from_pretrained) / CONFIG_NAME
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: cannot read the pipeline config ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(config).__name__}")
    return config


def build_pipeline(
    vae_2d: Mapping[str, Any],
    vae_temporal: Mapping[str, Any],
    *,
    from_pretrained: str | None = None,
    micro_frame_size: int | None = None,
    shift: float | Sequence[float] = 0.0,
    scale: float | Sequence[float] = 1.0,
    freeze_vae_2d: bool = False,
    cal_loss: bool = False,
    type_name: str = "VideoAutoencoderPipeline",
) -> VideoAutoencoderPipeline:
    """A pipeline from its two VAE dicts; `from_pretrained` weights are loaded strictly. A relative
    `vae_2d.from_pretrained` may point inside the checkpoint directory. Without `from_pretrained` each
    VAE loads its own weights, as in Open-Sora: the image VAE's from its local directory (required),
    the temporal VAE's from its from_pretrained when given."""
    base_dir = None
    if from_pretrained:
        weights_file(from_pretrained)  # fail on a missing checkpoint before building anything
        base_dir = checkpoint_dir(from_pretrained)
    own_weights = not from_pretrained and has_local_spatial_weights(vae_2d)
    pipeline = VideoAutoencoderPipeline(
        build_spatial_vae(vae_2d, base_dir=base_dir, with_weights=own_weights),
        build_temporal_vae(vae_temporal, with_weights=not from_pretrained),
        micro_frame_size=micro_frame_size,
        shift=shift,
        scale=scale,
        freeze_vae_2d=freeze_vae_2d,
        cal_loss=cal_loss,
    )
    if from_pretrained:
        load_model_weights(pipeline, from_pretrained, type_name=type_name, section="vae")
    return pipeline


def OpenSoraVAE_V1_2(
    micro_batch_size: int | None = 4,
    micro_frame_size: int | None = 17,
    from_pretrained: str | None = None,
    local_files_only: bool = False,
    freeze_vae_2d: bool = False,
    cal_loss: bool = False,
    force_huggingface: bool = False,
) -> VideoAutoencoderPipeline:
    """Open-Sora v1.2's VAE (SDXL image VAE + VAE_Temporal_SD, v1.2 shift / scale).

    With `from_pretrained`, a `config.json` beside the weights may describe smaller VAEs (tests, demos);
    the config's own keys (micro sizes, freeze, cal_loss) override it, as in Open-Sora.
    `local_files_only` and `force_huggingface` are accepted for config compatibility: loading is
    always from local files, in the layout the HF repo uses.
    """
    del local_files_only, force_huggingface
    vae_2d: dict[str, Any] = {
        "type": "VideoAutoencoderKL",
        "from_pretrained": SDXL_VAE_NAME,
        "subfolder": "vae",
    }
    vae_temporal: dict[str, Any] = {"type": "VAE_Temporal_SD", "from_pretrained": None}
    if from_pretrained:
        weights_file(from_pretrained)  # a missing checkpoint fails here, with where to get it
        saved = read_saved_config(from_pretrained)
        vae_2d = dict(saved.get("vae_2d") or vae_2d)
        vae_temporal = dict(saved.get("vae_temporal") or vae_temporal)
    vae_2d = {
        k: v for k, v in vae_2d.items() if k in ("type", "from_pretrained", "subfolder", "scaling_factor")
    }
    return build_pipeline(
        {**vae_2d, "micro_batch_size": micro_batch_size},
        vae_temporal,
        from_pretrained=from_pretrained,
        micro_frame_size=micro_frame_size,
        shift=V1_2_SHIFT,
        scale=V1_2_SCALE,
        freeze_vae_2d=freeze_vae_2d,
        cal_loss=cal_loss,
        type_name="OpenSoraVAE_V1_2",
    )
