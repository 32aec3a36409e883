"""`opensora vae reconstruct CONFIG`: Open-Sora's scripts/inference_vae.py. Each clip or image of a folder,
metadata table or bucket snapshot goes through the VAE at the config's num_frames and image_size; the
original and its reconstruction are written (mp4 for clips, png for images: `ori/`, `rec/`, and both side
by side in `compare/`), and PSNR, SSIM and, with a local LPIPS (`lpips_path`), LPIPS are reported per
file and as means: a table on stdout, `quality.csv` beside the files, and an MLflow run when tracking is on.

Files that cannot be read (or are too short for the clip) are skipped and listed, as the scanner does;
a folder is scanned first, so a corrupt file is recorded by the scan's errors table too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from opensora_core.config import ValidatedConfig
from opensora_core.errors import ConfigError, MediaError

log = logging.getLogger(__name__)

QUALITY_FILE = "quality.csv"
SKIPPED_FILE = "skipped.csv"


@dataclass(frozen=True)
class FileQuality:
    """One file's reconstruction: where both versions went and how close they are."""

    path: str
    frames: int
    psnr: float
    ssim: float
    lpips: float | None
    original: str
    reconstruction: str


@dataclass
class ReconstructResult:
    files: list[FileQuality]
    skipped: list[tuple[str, str]]  # (path, why)
    output_dir: Path
    latent_mean: list[float] = field(default_factory=list)  # per channel (cal_stats)
    latent_std: list[float] = field(default_factory=list)
    run_id: str | None = None

    def means(self) -> dict[str, float]:
        """Mean PSNR / SSIM (/ LPIPS) over the files (PSNR of identical files, inf, is left out)."""
        out: dict[str, float] = {}
        for name in ("psnr", "ssim", "lpips"):
            values = [getattr(f, name) for f in self.files if getattr(f, name) is not None]
            values = [v for v in values if math.isfinite(v)]
            if values:
                out[name] = sum(values) / len(values)
        return out


def reconstruct(
    cfg: ValidatedConfig,
    *,
    data: str | None = None,
    snapshot: str | None = None,
    output: str | None = None,
    progress: bool = True,
) -> ReconstructResult:
    """Reconstruct every file of `data` (a folder, CSV or metadata .parquet; default dataset.data_path)
    or of the bucket snapshot `snapshot`, up to the config's `num_samples`."""
    from opensora_core.data.dataset import VideoTextDataset

    if not cfg.is_vae_model:
        raise ConfigError(
            f"model.type={cfg.model.type!r}: vae reconstruct needs a VAE model (OpenSoraVAE_V1_2, ...)"
        )
    out = Path(output or cfg.sampling.save_dir)
    table, skipped = _source_table(cfg, data, snapshot, out)
    limit = cfg.raw.get("num_samples")
    rows = range(table.num_rows if limit is None else min(int(limit), table.num_rows))
    num_frames, image_size = cfg.sampling.num_frames or 1, cfg.sampling.image_size
    options = cfg.dataset.options if cfg.dataset else {}
    dataset = VideoTextDataset(
        table, num_frames=num_frames, frame_interval=int(options.get("frame_interval", 1) or 1),
        image_size=image_size, transform_name=options.get("transform_name") or "center", seed=cfg.sampling.seed,
    )  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.sampling.dtype]
    model, lpips = _models(cfg, device, dtype)
    torch.manual_seed(cfg.sampling.seed)
    fps = cfg.sampling.fps // cfg.sampling.frame_interval
    result = ReconstructResult([], skipped, out)
    stats = _LatentStats()
    for i in _progress(rows, progress):
        try:
            item = dataset.clip(i)
        except (MediaError, OSError) as err:
            result.skipped.append((str(dataset.rows.paths[i]), str(err)))
            log.warning("skipped %s", err)
            continue
        quality, z = _reconstruct_one(
            model, lpips, item, index=i, out=out, fps=fps, device=device, dtype=dtype
        )
        result.files.append(quality)
        stats.add(z)
    result.latent_mean, result.latent_std = stats.per_channel()
    _write_tables(result)
    result.run_id = _log_to_mlflow(cfg, result)
    return result


def _source_table(
    cfg: ValidatedConfig, data: str | None, snapshot: str | None, out: Path
) -> tuple[Any, list]:
    """The rows to reconstruct, and the files a scan of a folder could not read."""
    import pyarrow.parquet as pq

    from opensora_core.data.batches import read_clips_table
    from opensora_core.data.scan import scan

    if snapshot:
        return read_clips_table(snapshot), []
    source = data or (cfg.dataset.options.get("data_path") if cfg.dataset else None)
    if not source:
        raise ConfigError(
            "dataset.data_path: not set; pass --data (a media folder, a path,text CSV or a .parquet)"
        )
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"--data {source}: no such file or directory")
    if path.suffix == ".parquet":
        return pq.read_table(path), []
    result = scan(path, out / "meta.parquet", progress=False)
    errors = pq.read_table(result.errors_path).to_pylist() if result.errors_path.is_file() else []
    return pq.read_table(result.metadata_path), [(e["path"], e["error"]) for e in errors]


def _models(cfg: ValidatedConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The VAE in Open-Sora's loss mode (un-normalised latents, the posterior) and LPIPS if it is local."""
    from opensora_core.models.lpips import load_lpips
    from opensora_core.models.registry import build_vae

    model = build_vae({**cfg.model.as_dict(), "cal_loss": True}, section="model").to(device, dtype).eval()
    lpips_path = cfg.vae_loss.lpips_path if cfg.vae_loss else None
    lpips = None
    if lpips_path and Path(lpips_path).is_file():
        lpips = load_lpips(lpips_path).to(device, dtype)
    elif lpips_path:
        log.warning("LPIPS not reported: lpips_path=%s does not exist (nothing is downloaded)", lpips_path)
    return model, lpips


@torch.no_grad()
def _reconstruct_one(
    model: Any, lpips: Any, item: dict[str, Any], *, index: int, out: Path, fps: int, device, dtype
) -> tuple[FileQuality, torch.Tensor]:
    from opensora_core.sample.quality import psnr, ssim, to_unit_range
    from opensora_core.sample.writer import save_sample
    from opensora_core.train.vae_loss import frames

    x = item["video"][None].to(device=device, dtype=dtype)
    z, _, _ = model.encode(x)
    x_rec, _ = model.decode(z, num_frames=x.shape[2])
    original, rec = to_unit_range(x[0]), to_unit_range(x_rec[0])
    distance = None
    if lpips is not None:
        distance = lpips(frames(x).clamp(-1, 1), frames(x_rec).clamp(-1, 1)).float().mean().item()
    name = f"{index:03d}-{Path(item['path']).stem}"
    saved = [
        save_sample(video, out / folder / name, fps=fps)
        for folder, video in (
            ("ori", x[0]),
            ("rec", x_rec[0]),
            ("compare", torch.cat([x[0], x_rec[0]], dim=-1)),
        )
    ]
    quality = FileQuality(
        path=str(item["path"]), frames=int(x.shape[2]), psnr=psnr(original, rec), ssim=ssim(original, rec),
        lpips=distance, original=str(saved[0]), reconstruction=str(saved[1]),
    )  # fmt: skip
    return quality, z


class _LatentStats:
    """inference_vae.py's `cal_stats`: each latent channel's mean and standard deviation over the files
    (what a trained VAE's `shift` and `scale` are set from)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.count = 0

    def add(self, z: torch.Tensor) -> None:
        z = z.float().transpose(0, 1).flatten(1)  # [C, N]
        self.sum = z.sum(1) if self.sum is None else self.sum + z.sum(1)
        self.sq = z.pow(2).sum(1) if self.sq is None else self.sq + z.pow(2).sum(1)
        self.count += z.shape[1]

    def per_channel(self) -> tuple[list[float], list[float]]:
        if not self.count:
            return [], []
        mean = self.sum / self.count
        std = (self.sq / self.count - mean**2).clamp(min=0).sqrt()
        return mean.tolist(), std.tolist()


def _write_tables(result: ReconstructResult) -> None:
    import pandas as pd

    result.output_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([asdict(f) for f in result.files], columns=list(FileQuality.__dataclass_fields__)).to_csv(
        result.output_dir / QUALITY_FILE, index=False
    )
    pd.DataFrame(result.skipped, columns=["path", "error"]).to_csv(
        result.output_dir / SKIPPED_FILE, index=False
    )


def _log_to_mlflow(cfg: ValidatedConfig, result: ReconstructResult) -> str | None:
    """A `vae-reconstruct` run: the config as params, mean metrics, the per-file and skipped tables."""
    from opensora_core import tracking

    if not tracking.tracking_enabled():
        return None
    with tracking.stage_run("vae-reconstruct", parent_run_id=None) as run_id:
        tracking.log_config(run_id, cfg.raw.to_dict(), cfg.path)
        metrics = {f"{name}_mean": value for name, value in result.means().items()}
        metrics.update(files=float(len(result.files)), files_skipped=float(len(result.skipped)))
        tracking.log_metrics(run_id, metrics, step=0)
        for name in (QUALITY_FILE, SKIPPED_FILE):
            tracking.log_artifact(run_id, result.output_dir / name, artifact_path="reconstruct")
    return run_id


def _progress(rows: range, enabled: bool):
    from rich.progress import track

    return track(rows, description="reconstructing", disable=not enabled, transient=True)


def summary_table(result: ReconstructResult) -> Any:
    """The per-file rich table, the means in its last row."""
    from rich.table import Table

    has_lpips = any(f.lpips is not None for f in result.files)
    table = Table(title=f"VAE reconstruction ({result.output_dir})")
    for column in ("file", "frames", "PSNR (dB)", "SSIM", *(("LPIPS",) if has_lpips else ())):
        table.add_column(column, justify="left" if column == "file" else "right")
    for f in result.files:
        table.add_row(
            Path(f.path).name, str(f.frames), f"{f.psnr:.2f}", f"{f.ssim:.4f}",
            *((f"{f.lpips:.4f}" if f.lpips is not None else "-",) if has_lpips else ()),
        )  # fmt: skip
    means = result.means()
    if result.files:
        table.add_section()
        table.add_row(
            "mean", "", f"{means.get('psnr', math.inf):.2f}", f"{means['ssim']:.4f}",
            *((f"{means['lpips']:.4f}",) if has_lpips else ()),
        )  # fmt: skip
    return table


def summary_line(result: ReconstructResult) -> str:
    means = result.means()
    parts = [f"{len(result.files)} files reconstructed", f"{len(result.skipped)} skipped"]
    parts += [f"mean {name.upper()} {value:.4g}" for name, value in means.items()]
    if result.latent_mean:
        parts.append(
            "latent mean/std per channel "
            + ", ".join(
                f"{m:.3f}/{s:.3f}" for m, s in zip(result.latent_mean, result.latent_std, strict=True)
            )
        )
    where = f"; files in {result.output_dir} ({QUALITY_FILE}, {SKIPPED_FILE})"
    return ", ".join(parts) + where + (f"; MLflow run {result.run_id}" if result.run_id else "")
