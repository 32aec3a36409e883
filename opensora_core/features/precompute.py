"""`opensora precompute`: encode every kept sample of a bucket snapshot into a feature snapshot.

Ray Data does the work: CPU tasks read and transform each group of clips (one bucket, at most
`vae.micro_batch_size` of them) to its bucket size, an actor pool that builds the VAE and the text
encoder once per actor encodes each group in one call (one GPU per actor on a GPU cluster), and the
driver writes the rows bucket by bucket, sorted by (sample, view), then publishes the snapshot
atomically (data/publish.py). Rows whose `reuse_key` the CURRENT feature snapshot under the same root
already holds are copied from it instead of encoded.

What is frozen: view v of a clip starts at the frame an rng seeded by (seed, v, the path's stable hash)
draws, so a clip's crop does not depend on its row number or on the Ray parallelism; a group's VAE
posterior noise comes from a generator seeded by its members' reuse keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from opensora_core.config import ValidatedConfig
from opensora_core.data.manifest import BucketStats
from opensora_core.data.publish import (
    disk_full_error,
    move_into_place,
    point_current,
    remove_abandoned_builds,
    staging_dir,
)
from opensora_core.data.snapshot import Snapshot, open_snapshot
from opensora_core.data.stable_hash import key_hashes
from opensora_core.errors import ConfigError, MediaError, first_line, is_disk_full
from opensora_core.features.fingerprint import encoder_fingerprint
from opensora_core.features.settings import feature_settings
from opensora_core.features.store import (
    CURRENT_NAME,
    MANIFEST_NAME,
    EncoderInfo,
    FeatureBucket,
    FeatureManifest,
    FeatureSnapshot,
    embedding_array,
    feature_schema,
    latent_array,
    open_features,
    rows_per_group,
    write_empty_caption,
    write_errors,
    write_shard,
)
from opensora_core.storage import is_uri

log = logging.getLogger(__name__)

KIND = "feature snapshot"  # how publish.py's messages name what is built
GROUPS_PER_FILE = 64  # a part file holds about this many Parquet row groups (~512 MB)
DEFAULT_MICRO_BATCH = 4  # clips per encoder call when vae.micro_batch_size is unset
_INFO_GROUP = -1  # the group that only reports latent shapes and encodes the "" caption


@dataclass(frozen=True)
class FeatureInfo:
    """What `build_features` wrote: the feature snapshot directory and its manifest."""

    path: Path
    manifest: FeatureManifest

    def stored_bytes(self) -> int:
        """Bytes of the bucket shards (latents and captions of every row)."""
        return sum((self.path / f).stat().st_size for b in self.manifest.buckets for f in b.files)


@dataclass(frozen=True)
class EncodeSettings:
    """What a reading task and an encoding actor need (small, pickled into every Ray worker)."""

    vae: dict[str, Any] | None  # None: latents not stored
    text_encoder: dict[str, Any] | None  # None: captions not stored
    dtype: str  # stored dtype; CPU actors compute in fp32 and store this
    seed: int
    frame_interval: int
    transform_name: str


# --- one clip, one group: reading (CPU tasks) -----------------------------------------------------


def clip_rng(seed: int, view: int, path: str) -> np.random.Generator:
    """The rng that draws view `view` of `path`'s frame start: from the path, never its row number."""
    h = int(key_hashes([path])[0])
    return np.random.default_rng([seed & 0xFFFFFFFF, view, h & 0xFFFFFFFF, h >> 32])


def load_clip(
    path: str, is_image: bool, view: int, size: tuple[int, int, int], settings: EncodeSettings
) -> tuple[np.ndarray, float]:
    """(video [C, T, H, W] float32 in [-1, 1] at the bucket's size, fps condition), as training reads it."""
    from opensora_core.data.transforms import apply_transform
    from opensora_core.data.video_io import IMG_FPS, read_clip, read_image

    t, h, w = size
    if is_image:
        frames, fps = read_image(path), float(IMG_FPS)
    else:
        clip = read_clip(path, t, settings.frame_interval, clip_rng(settings.seed, view, path))
        frames, fps = clip.frames, float(int(clip.fps // settings.frame_interval))
    return apply_transform(frames, (h, w), settings.transform_name).numpy(), fps


def read_group(item: dict[str, Any], settings: EncodeSettings) -> dict[str, Any]:
    """A group's clips decoded and transformed; a clip that fails is recorded in `errors` and left out."""
    t, h, w = int(item["t"]), int(item["h"]), int(item["w"])
    is_image, views = json.loads(item["is_image"]), json.loads(item["views"])
    videos, kept, fps, errors = [], [], [], []
    for j, path in enumerate(json.loads(item["paths"])):
        try:
            video, clip_fps = load_clip(path, is_image[j], views[j], (t, h, w), settings)
        except (MediaError, OSError) as err:
            errors.append({"path": path, "error": first_line(err, 500)})
            continue
        videos.append(video)
        kept.append(j)
        fps.append(clip_fps)
    texts = json.loads(item["texts"])
    return {
        "group": int(item["group"]),
        "noise_seed": int(item["noise_seed"]),
        "sizes": item["sizes"],
        "video": np.stack(videos) if videos else np.zeros((0, 3, t, h, w), np.float32),
        "kept": np.array(kept, dtype=np.int64),
        "fps": np.array(fps, dtype=np.float32),
        "texts": json.dumps(texts if int(item["group"]) == _INFO_GROUP else [texts[j] for j in kept]),
        "errors": json.dumps(errors),
    }


# --- encoding (the actor pool) --------------------------------------------------------------------


class GroupEncoder:
    """Builds the VAE and text encoder once; each call encodes whole groups (Ray's `map_batches` class)."""

    def __init__(self, settings: EncodeSettings) -> None:
        import torch

        from opensora_core.features.store import _TORCH
        from opensora_core.models.registry import build_text_encoder, build_vae

        self.settings = settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and ray_actor():
            torch.set_num_threads(1)  # one actor per core (see _encode_in_ray)
        # bf16 / fp16 convolutions are slow or missing on CPUs: compute in fp32 there, store the dtype asked
        self.compute_dtype = _TORCH[settings.dtype] if self.device.type == "cuda" else torch.float32
        self.vae = None
        if settings.vae is not None:
            self.vae = build_vae(dict(settings.vae)).to(self.device, self.compute_dtype).eval()
        self.text_encoder = None
        if settings.text_encoder is not None:
            self.text_encoder = build_text_encoder(dict(settings.text_encoder), device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["group"]))]
        out = [self.encode(row) for row in rows]
        return {k: _objects([o[k] for o in out]) for k in out[0]}

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        """A read group -> its stored features: latent [n, C, T', H', W'], text_len [n], text_embedding
        [sum(text_len), D] (storage dtype), plus `info` (latent shapes, caption width) for the info group."""
        import torch

        from opensora_core.features.store import to_storage

        out: dict[str, Any] = {k: row[k] for k in ("group", "kept", "fps", "errors")}
        info = int(row["group"]) == _INFO_GROUP
        out["info"] = json.dumps(self._info(json.loads(row["sizes"]))) if info else ""
        dtype = self.settings.dtype
        if self.vae is not None:
            video = np.asarray(row["video"])
            if len(video):
                x = torch.from_numpy(video).to(self.device, self.compute_dtype)
                generator = torch.Generator().manual_seed(int(row["noise_seed"]))
                with torch.no_grad():
                    z = self.vae.encode(x, generator=generator)
                out["latent"] = to_storage(z, dtype)
            else:
                out["latent"] = to_storage(torch.zeros(0, 1, 1, 1, 1), dtype)
        if self.text_encoder is not None:
            texts = json.loads(row["texts"])
            tokens, lengths = self._captions(texts) if texts else ([], [])
            width = tokens[0].shape[1] if tokens else 1
            flat = torch.cat(tokens) if tokens else torch.zeros(0, width)
            out["text_len"] = np.array(lengths, dtype=np.int32)
            out["text_embedding"] = to_storage(flat, dtype)
        return out

    def _captions(self, texts: list[str]) -> tuple[list[Any], list[int]]:
        """Each caption's real tokens [L_i, D]: T5's where its mask is 1, CLIP's single pooled token."""
        encoded = self.text_encoder.encode(texts)
        y, mask = encoded["y"][:, 0].float().cpu(), encoded.get("mask")
        lengths = [int(n) for n in mask.sum(dim=1).tolist()] if mask is not None else [1] * len(texts)
        return [y[i, :n] for i, n in enumerate(lengths)], lengths

    def _info(self, sizes: dict[str, list[int]]) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.vae is not None:
            channels = int(self.vae.out_channels)
            info["vae_channels"] = channels
            info["latent_shapes"] = {
                b: [channels, *map(int, self.vae.get_latent_size(s))] for b, s in sizes.items()
            }
        if self.text_encoder is not None:
            info["text_dim"] = int(self.text_encoder.output_dim)
            info["model_max_length"] = int(self.text_encoder.model_max_length)
            info["masked"] = self.settings.text_encoder.get("type") != "clip"
        return info


def ray_actor() -> bool:
    """Whether this code runs inside a Ray actor (not the in-process path of `num_actors=0`)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _objects(values: list[Any]) -> np.ndarray:
    """A column of per-row values (arrays of different shapes, strings) as one numpy object array."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def encode_in_process(items: Iterable[dict[str, Any]], settings: EncodeSettings) -> Iterator[dict[str, Any]]:
    """The same reading and encoding in this process, one group after another (no Ray): the baseline
    `bench/precompute.py` compares the Ray Data stage with."""
    encoder = GroupEncoder(settings)
    for item in items:
        yield encoder.encode(read_group(item, settings))


def _encode_in_ray(
    items: list[dict[str, Any]], settings: EncodeSettings, num_actors: int | None
) -> Iterator[dict[str, Any]]:
    """Read groups in Ray Data CPU tasks, encode them in an actor pool; yields them in `items` order."""
    import ray
    import ray.data

    from opensora_core.parallel.launch import connect_ray

    connect_ray()  # RAY_ADDRESS's cluster, else a local one; a caller that connected first keeps it
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the driver writes bucket after bucket
    ctx.enable_progress_bars = False  # the driver's bar counts samples; Ray's would count blocks
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    # GPU actors: one per GPU. CPU actors: one single-threaded actor per core, each reserving half a CPU,
    # so half the cluster's CPU reservations stay free for the read tasks that decode for them (an actor
    # holding a whole CPU per core would starve the reads). Small encoders gain little from intra-op
    # threads; whole encoder calls side by side use the cores better.
    actors = num_actors or (gpus if gpus else cpus)
    actor_cpus = 1 if gpus else 0.5
    read_cpus = 1 if gpus else 0.5  # a 1-CPU machine still fits one actor beside one read
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 8 * cpus))
    ds.set_name(f"precompute-{settings.transform_name}")  # the dataset's name on Ray's dashboard and logs
    # A read task reserves the memory of its decoded group (float32 pixels, twice for the transform), so
    # Ray starts no more decodes than fit; being unlike the actors' resources, it also keeps Ray Data
    # from fusing the reads into the encoder actors, which would then decode and encode in turn.
    memory = max(
        2 * 4 * 3 * int(i["t"]) * int(i["h"]) * int(i["w"]) * len(json.loads(i["paths"])) for i in items
    )
    ds = ds.map(
        read_group, fn_kwargs={"settings": settings}, num_cpus=read_cpus, memory=max(memory, 64 << 20)
    )
    ds = ds.map_batches(
        GroupEncoder,
        fn_constructor_kwargs={"settings": settings},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus,
    )
    yield from ds.iter_rows()


# --- the plan: which rows to produce, which to reuse ------------------------------------------------


@dataclass
class _Plan:
    """One row per (sample, view) of the feature snapshot, in output order (bucket, sample, view)."""

    rows: pa.Table  # sample, path, text, view, reuse_key, is_image, bucket (index into `buckets`)
    buckets: tuple[BucketStats, ...]


def _column(table: pa.Table, name: str, default: Any) -> list[Any]:
    if name not in table.column_names:
        return [default] * table.num_rows
    return table[name].fill_null(default).to_pylist()


def _plan(snapshot: Snapshot, settings: EncodeSettings, views: int, stored: dict[str, str]) -> _Plan:
    kept = snapshot.table()
    buckets = snapshot.manifest.buckets
    n = kept.num_rows
    bucket_of = np.repeat(np.arange(len(buckets)), [b.count for b in buckets])
    paths, texts = _column(kept, "path", ""), _column(kept, "text", "")
    sizes, mtimes = _column(kept, "file_size", -1), _column(kept, "mtime_ns", -1)
    images = _column(kept, "is_image", False)
    common = "|".join(
        [str(settings.frame_interval), settings.transform_name, str(settings.seed), settings.dtype]
        + [f"{k}={v}" for k, v in sorted(stored.items())]
    )
    samples, view_col, keys = [], [], []
    for i in range(n):
        for v in range(views):
            text = f"{paths[i]}|{sizes[i]}|{mtimes[i]}|{texts[i]}|{buckets[bucket_of[i]].key.id}|{v}|{common}"
            keys.append(hashlib.sha256(text.encode()).hexdigest()[:24])
            samples.append(i)
            view_col.append(v)
    idx = np.array(samples, dtype=np.int64)
    rows = pa.table(
        {
            "sample": pa.array(idx, pa.int64()),
            "path": pa.array([paths[i] for i in samples], pa.string()),
            "text": pa.array([texts[i] or "" for i in samples], pa.string()),
            "view": pa.array(view_col, pa.int16()),
            "reuse_key": pa.array(keys, pa.string()),
            "is_image": pa.array([bool(images[i]) for i in samples], pa.bool_()),
            "bucket": pa.array(bucket_of[idx] if n else np.zeros(0, np.int64), pa.int64()),
        }
    )
    return _Plan(rows, buckets)


def _previous(root: Path) -> FeatureSnapshot | None:
    """The CURRENT feature snapshot under `root`, if one can be read (else nothing is reused)."""
    if not (root / CURRENT_NAME).is_file():
        return None
    try:
        return open_features(root)
    except ConfigError as err:
        log.warning("not reusing the current feature snapshot: %s", err)
        return None


class _Reuse:
    """Rows of the previous feature snapshot that this build would compute again, found by reuse_key."""

    def __init__(self, previous: FeatureSnapshot | None) -> None:
        self.previous = previous
        self.where: dict[str, tuple[int, int]] = {}
        self.files: list[Path] = []
        if previous is None:
            return
        self.files = [previous.path / f for b in previous.manifest.buckets for f in b.files]
        for i, file in enumerate(self.files):
            keys = pq.read_table(file, columns=["reuse_key"])["reuse_key"].to_pylist()
            self.where.update((k, (i, r)) for r, k in enumerate(keys))

    def mask(self, keys: list[str]) -> np.ndarray:
        return np.array([k in self.where for k in keys], dtype=bool)

    def rows(self, plan_rows: pa.Table, schema: pa.Schema) -> pa.Table:
        """The previous rows for `plan_rows` (all reusable), with `sample` rewritten to this snapshot's."""
        if plan_rows.num_rows == 0:
            return schema.empty_table()
        spots = [self.where[k] for k in plan_rows["reuse_key"].to_pylist()]
        parts, order = [], []
        for file in sorted({f for f, _ in spots}):
            wanted = [(j, r) for j, (f, r) in enumerate(spots) if f == file]
            table = pq.read_table(self.files[file]).take(pa.array([r for _, r in wanted]))
            parts.append(table.select(schema.names).cast(schema))
            order += [j for j, _ in wanted]
        table = pa.concat_tables(parts).take(pa.array(np.argsort(order)))
        return table.set_column(0, "sample", plan_rows["sample"])


# --- writing ----------------------------------------------------------------------------------------


class _BucketWriter:
    """One bucket's part files: encoded rows arrive in (sample, view) order and are merged with the
    reused rows, so each part is sorted and every part follows the one before."""

    def __init__(self, directory: Path, base: Path, reused: pa.Table, views: int, rows_per_file: int) -> None:
        self.directory, self.base, self.views, self.rows_per_file = directory, base, views, rows_per_file
        self.reused, self.pending, self.pending_rows = reused, [], 0
        self.files: list[str] = []
        self.samples: set[int] = set()

    def _key(self, table: pa.Table) -> np.ndarray:
        return table["sample"].to_numpy() * self.views + table["view"].to_numpy().astype(np.int64)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows_per_file:
            last = int(self._key(self.pending[-1])[-1])
            cut = int(np.searchsorted(self._key(self.reused), last, side="right"))
            self._write(self.reused.slice(0, cut))
            self.reused = self.reused.slice(cut)

    def finish(self) -> list[str]:
        self._write(self.reused)
        return self.files

    def _write(self, reused: pa.Table) -> None:
        parts = [*self.pending, reused] if reused.num_rows else self.pending
        self.pending, self.pending_rows = [], 0
        if not parts:
            return
        table = pa.concat_tables(parts)
        table = table.take(pc.sort_indices(table, [("sample", "ascending"), ("view", "ascending")]))
        path = self.directory / f"part-{len(self.files):05d}.parquet"
        write_shard(table, path)
        self.files.append(path.relative_to(self.base).as_posix())
        self.samples.update(table["sample"].to_pylist())


def _encoded_table(
    out: dict[str, Any], plan_rows: pa.Table, size: tuple[int, int, int], schema: pa.Schema, dtype: str
) -> pa.Table:
    """The rows of one encoded group (the clips that loaded), in the shard schema."""
    kept = np.asarray(out["kept"], dtype=np.int64)
    if len(kept) == 0:  # every clip of the group failed
        return schema.empty_table()
    rows = plan_rows.take(pa.array(kept))
    t, h, w = size
    n = len(kept)
    columns: dict[str, Any] = {
        "sample": rows["sample"],
        "path": rows["path"],
        "text": rows["text"],
        "view": rows["view"],
        "reuse_key": rows["reuse_key"],
        "num_frames": pa.array(np.full(n, t), pa.int32()),
        "height": pa.array(np.full(n, h), pa.int32()),
        "width": pa.array(np.full(n, w), pa.int32()),
        "fps": pa.array(np.asarray(out["fps"], dtype=np.float32)),
        "ar": pa.array(np.full(n, h / w, dtype=np.float32)),
    }
    if "latent" in schema.names:
        columns["latent"] = latent_array(np.asarray(out["latent"]))
    if "text_len" in schema.names:
        lengths = np.asarray(out["text_len"], dtype=np.int64)
        splits = np.split(np.asarray(out["text_embedding"]), np.cumsum(lengths)[:-1])
        columns["text_len"] = pa.array(lengths.astype(np.int32))
        columns["text_embedding"] = embedding_array(splits, dtype)
    return pa.table(columns, schema=schema)


def _items(plan: _Plan, todo: np.ndarray, micro_batch: int, settings: EncodeSettings) -> list[dict[str, Any]]:
    """The groups to encode, info group first: per bucket, the rows to encode in chunks of `micro_batch`.

    Every field is a scalar or a JSON string, so every Ray Data block has the same schema.
    """
    sizes = {b.key.id: [b.num_frames, b.height, b.width] for b in plan.buckets}
    texts = [""] if settings.text_encoder is not None else []
    info = {"group": _INFO_GROUP, "rows": "[]", "paths": "[]", "texts": json.dumps(texts), "is_image": "[]",
            "views": "[]", "t": 1, "h": 1, "w": 1, "noise_seed": 0, "sizes": json.dumps(sizes)}  # fmt: skip
    items = [info]
    bucket = plan.rows["bucket"].to_numpy()
    for b, stats in enumerate(plan.buckets):
        rows = np.flatnonzero((bucket == b) & todo)
        for start in range(0, len(rows), micro_batch):
            chunk = plan.rows.take(pa.array(rows[start : start + micro_batch]))
            keys = chunk["reuse_key"].to_pylist()
            items.append(
                {
                    "group": len(items) - 1,
                    "rows": json.dumps(rows[start : start + micro_batch].tolist()),
                    "paths": json.dumps(chunk["path"].to_pylist()),
                    "texts": json.dumps(chunk["text"].to_pylist()),
                    "is_image": json.dumps(chunk["is_image"].to_pylist()),
                    "views": json.dumps(chunk["view"].to_pylist()),
                    "t": stats.num_frames,
                    "h": stats.height,
                    "w": stats.width,
                    "noise_seed": latent_noise_seed(keys),
                    "sizes": "{}",
                }
            )
    return items


def latent_noise_seed(reuse_keys: list[str]) -> int:
    """The seed of a group's VAE posterior noise: its members' reuse keys, in order."""
    return int(hashlib.sha256("|".join(reuse_keys).encode()).hexdigest()[:15], 16)


# --- the stage ----------------------------------------------------------------------------------------


def encode_settings(cfg: ValidatedConfig) -> tuple[EncodeSettings, bool, bool]:
    """(settings, store latents, store captions) of a training config; ConfigError names a missing piece.

    Neither `load_video_features` nor `load_text_features` set: both are stored (whoever runs
    precompute wants features).
    """
    if cfg.training is None or cfg.dataset is None:
        raise ConfigError(
            f"{cfg.path}: precompute needs a training config (dataset, bucket_config, vae, text_encoder)"
        )
    if cfg.dataset.type != "VariableVideoTextDataset":
        raise ConfigError(
            f"dataset.type={cfg.dataset.type!r}: precompute encodes bucket snapshots; use VariableVideoTextDataset"
        )
    features = feature_settings(cfg.raw)
    video, text = features.load_video_features, features.load_text_features
    if not (video or text):
        video = text = True
    for wanted, spec, key in ((video, cfg.vae, "vae"), (text, cfg.text_encoder, "text_encoder")):
        if wanted and spec is None:
            raise ConfigError(f"{key}: missing; precompute needs {key} = dict(type=..., from_pretrained=...)")
    from opensora_core.train import absolute_paths  # Ray workers run in their own directories

    sections = absolute_paths(
        {
            "vae": cfg.vae.as_dict() if video else None,
            "text_encoder": cfg.text_encoder.as_dict() if text else None,
        }
    )
    options = cfg.dataset.options
    settings = EncodeSettings(
        vae=sections["vae"],
        text_encoder=sections["text_encoder"],
        dtype=cfg.training.dtype,
        seed=cfg.training.seed,
        frame_interval=int(options.get("frame_interval", 1) or 1),
        transform_name=str(options.get("transform_name") or "resize_crop"),
    )
    return settings, video, text


def build_features(
    cfg: ValidatedConfig,
    snapshot: str | Path | Snapshot,
    root: str | Path,
    *,
    progress: bool = True,
    num_actors: int | None = None,
    rows_per_file: int | None = None,
) -> FeatureInfo:
    """Encode the kept samples of `snapshot` x `feature_views` into a new feature snapshot under `root`,
    reusing the rows of `root/CURRENT` whose reuse key is unchanged, and point `root/CURRENT` at it.

    `num_actors` encoding actors (default: one per GPU, else half the CPUs); `rows_per_file` caps a part
    file's rows (default: about 512 MB of rows).
    """
    settings, video, text = encode_settings(cfg)
    views = feature_settings(cfg.raw).views
    if is_uri(root):
        raise ConfigError(f"feature snapshot root {root!r}: only local paths are supported for now")
    snap = snapshot if isinstance(snapshot, Snapshot) else open_snapshot(snapshot)
    fingerprints = {
        "vae": encoder_fingerprint(settings.vae) if settings.vae else "",
        "text_encoder": encoder_fingerprint(settings.text_encoder) if settings.text_encoder else "",
    }
    plan = _plan(snap, settings, views, {**fingerprints, "video": str(video), "text": str(text)})
    root = Path(root).resolve()
    reuse = _Reuse(_previous(root))
    todo = ~reuse.mask(plan.rows["reuse_key"].to_pylist())
    micro_batch = int((settings.vae or {}).get("micro_batch_size") or DEFAULT_MICRO_BATCH)
    items = _items(plan, todo, micro_batch, settings)
    content = "|".join(
        [snap.manifest.snapshot_id, *fingerprints.values(), str(views), settings.dtype, str(video), str(text)]
    )
    feature_id = (
        f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"
    )
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root, KIND)
    tmp = staging_dir(root, feature_id)
    encode = encode_in_process if num_actors == 0 else lambda i, s: _encode_in_ray(i, s, num_actors)
    try:
        tmp.mkdir()
        build = _Build(tmp, plan, reuse, items, settings, views, rows_per_file)
        build.run(encode(items, settings), progress)
        manifest = FeatureManifest(
            feature_id=feature_id,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            bucket_snapshot_id=snap.manifest.snapshot_id,
            bucket_snapshot_path=str(snap.path),
            dtype=settings.dtype,
            transform_name=settings.transform_name,
            frame_interval=settings.frame_interval,
            seed=settings.seed,
            views=views,
            video_features=video,
            text_features=text,
            vae=build.encoder_info("vae", fingerprints["vae"]),
            text_encoder=build.encoder_info("text_encoder", fingerprints["text_encoder"]),
            buckets=tuple(build.buckets),
            num_samples=snap.manifest.num_kept,
            num_encoded=build.num_encoded,
            num_reused=int((~todo).sum()),
            num_errors=len(build.failed),
            reused_from=reuse.previous.manifest.feature_id if reuse.previous and (~todo).any() else None,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        final = move_into_place(tmp, root, feature_id)
    except BaseException as err:
        full = is_disk_full(err, root)  # before the partial files go: they hold the space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full_error(root, feature_id, KIND) from None
        raise
    if final.name != feature_id:
        manifest = replace(manifest, feature_id=final.name)
        (final / MANIFEST_NAME).write_text(manifest.to_json())
    point_current(root, final.name)
    log.info(
        "feature snapshot %s: %d rows encoded, %d reused from %s, %d samples left out",
        final, manifest.num_encoded, manifest.num_reused, manifest.reused_from, manifest.num_errors,
    )  # fmt: skip
    return FeatureInfo(final, manifest)


class _Build:
    """The driver's side of a build: writes each bucket as its groups arrive, records errors."""

    def __init__(
        self,
        directory: Path,
        plan: _Plan,
        reuse: _Reuse,
        items: list[dict[str, Any]],
        settings: EncodeSettings,
        views: int,
        rows_per_file: int | None,
    ) -> None:
        self.directory, self.plan, self.reuse, self.items = directory, plan, reuse, items
        self.settings, self.views, self.rows_per_file = settings, views, rows_per_file
        self.info: dict[str, Any] = {}
        self.buckets: list[FeatureBucket] = []
        self.errors: list[dict[str, str]] = []
        self.failed: set[int] = set()
        self.num_encoded = 0
        self._writers: dict[int, _BucketWriter] = {}
        self._open_groups = np.zeros(len(plan.buckets), dtype=np.int64)
        self._bucket_of_group: dict[int, int] = {}
        bucket = plan.rows["bucket"].to_numpy()
        for item in items[1:]:
            b = int(bucket[json.loads(item["rows"])[0]])
            self._bucket_of_group[int(item["group"])] = b
            self._open_groups[b] += 1

    def run(self, outputs: Iterable[dict[str, Any]], progress: bool) -> None:
        total = sum(len(json.loads(item["rows"])) for item in self.items)
        with _progress_bar(total, enabled=progress) as advance:
            for out in outputs:
                group = int(out["group"])
                if group == _INFO_GROUP:
                    self._start(out)
                    continue
                self._add(group, out)
                advance(len(json.loads(self.items[group + 1]["rows"])))
        if not self.info:
            raise RuntimeError("precompute: the encoders never reported (no info group came back)")
        if self.errors:
            write_errors(self.directory, self.errors)

    def _schema(self, b: int) -> pa.Schema:
        shape = self.info.get("latent_shapes", {}).get(self.plan.buckets[b].key.id)
        text_dim = self.info.get("text_dim")
        return feature_schema(self.settings.dtype, tuple(shape) if shape else None, text_dim)

    def _start(self, out: dict[str, Any]) -> None:
        """The info group: latent shapes and caption width known, the "" caption stored; buckets that
        need no encoding are written now."""
        self.info = json.loads(out["info"])
        if self.settings.text_encoder is not None:
            write_empty_caption(self.directory, np.asarray(out["text_embedding"]), self.settings.dtype)
        for b in range(len(self.plan.buckets)):
            if self._open_groups[b] == 0:
                self._finish(b)

    def _writer(self, b: int) -> _BucketWriter:
        if b not in self._writers:
            schema = self._schema(b)
            rows = self.plan.rows.filter(pc.equal(self.plan.rows["bucket"], b))
            reusable = rows.filter(pa.array(self.reuse.mask(rows["reuse_key"].to_pylist())))
            per_file = (
                self.rows_per_file
                or rows_per_group(schema, self.info.get("model_max_length", 1)) * GROUPS_PER_FILE
            )
            self._writers[b] = _BucketWriter(
                self.directory / self.plan.buckets[b].key.id,
                self.directory,
                self.reuse.rows(reusable, schema),
                self.views,
                per_file,
            )
        return self._writers[b]

    def _add(self, group: int, out: dict[str, Any]) -> None:
        b = self._bucket_of_group[group]
        stats = self.plan.buckets[b]
        rows = self.plan.rows.take(pa.array(json.loads(self.items[group + 1]["rows"]), pa.int64()))
        table = _encoded_table(
            out, rows, (stats.num_frames, stats.height, stats.width), self._schema(b), self.settings.dtype
        )
        self._writer(b).add(table)
        self.num_encoded += table.num_rows
        kept = set(np.asarray(out["kept"]).tolist())
        self.failed.update(s for j, s in enumerate(rows["sample"].to_pylist()) if j not in kept)
        self.errors += [{**e, "bucket": stats.key.id} for e in json.loads(out["errors"])]
        self._open_groups[b] -= 1
        if self._open_groups[b] == 0:
            self._finish(b)

    def _finish(self, b: int) -> None:
        stats = self.plan.buckets[b]
        writer = self._writer(b)
        files = writer.finish()
        shape = self.info.get("latent_shapes", {}).get(stats.key.id)
        self.buckets.append(
            FeatureBucket(
                id=stats.key.id,
                num_frames=stats.num_frames,
                height=stats.height,
                width=stats.width,
                latent_shape=tuple(shape) if shape else None,
                count=len(writer.samples - self.failed),
                files=tuple(files),
            )
        )

    def encoder_info(self, key: str, fingerprint: str) -> EncoderInfo | None:
        section = getattr(self.settings, key)
        if section is None:
            return None
        if key == "vae":
            return EncoderInfo(section, fingerprint, int(self.info["vae_channels"]))
        return EncoderInfo(
            section,
            fingerprint,
            int(self.info["text_dim"]),
            model_max_length=int(self.info["model_max_length"]),
            masked=bool(self.info["masked"]),
        )


class _progress_bar:  # noqa: N801 (used as a context manager, like rich's own)
    """Context manager yielding advance(n) over the samples to encode; a rich bar on stderr."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self._progress = total, enabled and total > 0, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self._progress.start()
        task = self._progress.add_task("encode", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
