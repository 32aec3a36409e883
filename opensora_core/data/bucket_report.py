"""The report of a bucket snapshot: a text table of its buckets, and a picture of samples per
(resolution, num_frames) and per aspect ratio (`_report.png` in the snapshot)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from opensora_core.data.aspect import RESOLUTIONS
from opensora_core.data.manifest import Manifest

# A leading underscore: Parquet readers skip the file when they open the snapshot.
REPORT_PLOT_NAME = "_report.png"


def format_report(manifest: Manifest) -> str:
    """A plain-text table of samples and batches per bucket."""
    header = ("resolution", "frames", "ratio", "size", "samples", "batch", "batches")
    lines = [
        (b.resolution, str(b.num_frames), b.aspect_ratio, f"{b.height}x{b.width}", str(b.count),
         str(b.batch_size), str(b.num_batches))
        for b in manifest.buckets
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [
        f"snapshot {manifest.snapshot_id}  seed {manifest.seed}  epoch {manifest.epoch}  "
        f"frame_interval {manifest.frame_interval}  config {manifest.config_hash}",
        fmt.format(*header),
        *(fmt.format(*row) for row in lines),
        report_summary(manifest),
    ]
    return "\n".join(out)


def report_rows(manifest: Manifest) -> list[dict[str, str | int]]:
    """The report's table as one dict per bucket (the columns of `format_report`), for table views such
    as a Prefect table artifact."""
    return [
        {"resolution": b.resolution, "frames": b.num_frames, "ratio": b.aspect_ratio,
         "size": f"{b.height}x{b.width}", "samples": b.count, "batch": b.batch_size, "batches": b.num_batches}
        for b in manifest.buckets
    ]  # fmt: skip


def report_summary(manifest: Manifest) -> str:
    """The report's closing line: what was kept, in how many buckets and batches."""
    return (
        f"{manifest.num_kept} of {manifest.num_samples} samples kept in {len(manifest.buckets)} buckets "
        f"({manifest.num_sitting_out} sit out this epoch), {manifest.num_batches} full batches"
    )


def bucket_count_grid(manifest: Manifest) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(resolutions, frame counts, samples[res, frames], full batches[res, frames]) of the kept buckets."""
    resolutions = sorted({b.resolution for b in manifest.buckets}, key=RESOLUTIONS.index)
    frames = sorted({b.num_frames for b in manifest.buckets})
    counts = np.zeros((len(resolutions), len(frames)), dtype=np.int64)
    batches = np.zeros_like(counts)
    for b in manifest.buckets:
        i, j = resolutions.index(b.resolution), frames.index(b.num_frames)
        counts[i, j] += b.count
        batches[i, j] += b.num_batches
    return resolutions, frames, counts, batches


def aspect_ratio_counts(manifest: Manifest) -> dict[float, int]:
    """Kept samples per aspect-ratio key (height / width), over all resolutions and frame counts."""
    counts: Counter[float] = Counter()
    for b in manifest.buckets:
        counts[float(b.aspect_ratio)] += b.count
    return dict(sorted(counts.items()))


def write_report_plot(manifest: Manifest, path: str | Path) -> Path:
    """PNG of a snapshot at `path`: samples per (resolution, num_frames) heat map and an aspect-ratio
    histogram (matplotlib's Agg backend; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    resolutions, frames, counts, batches = bucket_count_grid(manifest)
    ratios = aspect_ratio_counts(manifest)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    heat, hist = fig.subplots(1, 2, width_ratios=[1.2, 1])
    fig.suptitle(
        f"bucket snapshot {manifest.snapshot_id}: {manifest.num_kept} of {manifest.num_samples} samples "
        f"kept, {manifest.num_batches} full batches (seed {manifest.seed}, epoch {manifest.epoch})"
    )

    if counts.size:
        image = heat.imshow(counts, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=heat, label="samples")
        limit = counts.max() / 2
        for (i, j), n in np.ndenumerate(counts):
            if n:
                heat.text(j, i, f"{n}\n{batches[i, j]} b", ha="center", va="center", fontsize=8,
                          color="black" if n > limit else "white")  # fmt: skip
    heat.set_xticks(range(len(frames)), [str(t) for t in frames])
    heat.set_yticks(range(len(resolutions)), resolutions)
    heat.set_xlabel("num_frames (1 = image)")
    heat.set_ylabel("resolution")
    heat.set_title("samples (and full batches) per resolution x num_frames")

    positions = np.arange(len(ratios))
    hist.bar(positions, list(ratios.values()), color="tab:blue")
    hist.set_xticks(positions, [f"{r:.2f}" for r in ratios], rotation=90, fontsize=7)
    hist.set_xlabel("aspect-ratio bucket (height / width)")
    hist.set_ylabel("samples")
    hist.set_title("aspect-ratio histogram")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: same bytes across installs
    return path
