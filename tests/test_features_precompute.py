"""`opensora precompute`: features equal a direct encode, bad clips are recorded, rebuilds reuse what did not
change, and a build that dies or fills the disk leaves the previous feature snapshot current."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.data import bucket_build
from opensora_core.data.scan import scan
from opensora_core.data.transforms import apply_transform
from opensora_core.data.video_io import read_clip
from opensora_core.errors import ConfigError, StorageError
from opensora_core.features import precompute
from opensora_core.features.fingerprint import encoder_fingerprint
from opensora_core.features.precompute import clip_rng, latent_noise_seed
from opensora_core.features.store import CURRENT_NAME, open_features
from opensora_core.models.registry import build_text_encoder, build_vae
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.stages import build_buckets, precompute_stage
from tests.conftest import grey_clip

SIZE = (5, 144, 256)  # the one bucket: 144p, 5 frames, 9:16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture
def local_buckets(monkeypatch):
    """Bucket snapshots are assigned in this process (their own Ray build is tested elsewhere)."""

    def assign_locally(keys, cfg, frame_interval, seed, epoch, *args):
        return bucket_build.bucket_indices(keys, cfg, frame_interval, seed, epoch)

    monkeypatch.setattr(bucket_build, "_assign_in_ray", assign_locally)


def add_clip(media: Path, name: str, caption: str, num_frames: int = 12) -> Path:
    (media / f"{name}.txt").write_text(caption)
    return grey_clip(media / f"{name}.mp4", num_frames, height=144, width=256)


def write_config(tmp_path: Path, tiny, *, views: int = 1, **extra: object) -> Path:
    lines = [
        f'dataset = dict(type="VariableVideoTextDataset", data_path="{tmp_path / "media"}", transform_name="resize_crop")',
        'bucket_config = {"144p": {5: (1.0, 2)}}',
        'dtype = "fp32"',
        'model = dict(type="STDiT3-XL/2", hidden_size=32, depth=1, num_heads=2)',
        f'vae = dict(type="VideoAutoencoderKL", from_pretrained="{tiny.vae}", micro_batch_size=1)',
        f'text_encoder = dict(type="t5", from_pretrained="{tiny.t5}", model_max_length=16)',
        'scheduler = dict(type="rflow")',
        "seed = 3",
        f'outputs = "{tmp_path / "outputs"}"',
        f"feature_views = {views}",
        *(f"{k} = {v!r}" for k, v in extra.items()),
    ]
    path = tmp_path / "config.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def media_and_buckets(tmp_path: Path, tiny, *, clips: int = 3, views: int = 1):
    """A few captioned grey clips, scanned and bucketed under {outputs}/buckets; returns the config."""
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    for i in range(clips):
        add_clip(media, f"clip{i}", f"a red square moves left {i}")
    cfg = load_config(write_config(tmp_path, tiny, views=views))
    rebucket(cfg, tmp_path)
    return cfg


def rebucket(cfg, tmp_path: Path) -> None:
    scan(tmp_path / "media", tmp_path / "meta.parquet", progress=False)
    build_buckets(cfg, tmp_path / "meta.parquet")


def direct_encode(cfg, path: str, text: str, view: int, reuse_key: str):
    """The same clip and crop through the same models, here and now."""
    vae = build_vae(cfg.vae.as_dict()).eval()
    t5 = build_text_encoder(cfg.text_encoder.as_dict())
    frames = read_clip(path, SIZE[0], 1, clip_rng(cfg.training.seed, view, path)).frames
    x = apply_transform(frames, SIZE[1:], "resize_crop")[None]
    with torch.no_grad():
        z = vae.encode(x, generator=torch.Generator().manual_seed(latent_noise_seed([reuse_key])))
    caption = t5.encode([text])
    n = int(caption["mask"].sum())
    return z[0], caption["y"][0, 0, :n]


def rows_of(snapshot) -> dict[tuple[int, int], dict]:
    out = {}
    for bucket in snapshot.manifest.buckets:
        for file in bucket.files:
            for row in pq.read_table(
                snapshot.path / file, columns=["sample", "view", "path", "text", "reuse_key"]
            ).to_pylist():
                out[(row["sample"], row["view"])] = row
    return out


# --- the encoder fingerprint -----------------------------------------------------------------------


def test_fingerprint_follows_weights_and_output_settings_not_location_or_runtime_options(tmp_path, tiny):
    section = {"type": "t5", "from_pretrained": str(tiny.t5), "model_max_length": 16}
    base = encoder_fingerprint(section)
    copy = Path(shutil.copytree(tiny.t5, tmp_path / "elsewhere" / "t5"))
    assert encoder_fingerprint({**section, "from_pretrained": str(copy)}) == base
    assert (
        encoder_fingerprint({**section, "shardformer": True, "local_files_only": True, "cache_dir": "/c"})
        == base
    )
    assert encoder_fingerprint({**section, "model_max_length": 300}) != base
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte is within the last MiB
    weights.write_bytes(bytes(data))
    assert encoder_fingerprint({**section, "from_pretrained": str(copy)}) != base
    hub = {"type": "t5", "from_pretrained": "DeepFloyd/t5-v1_1-xxl"}
    assert encoder_fingerprint(hub) == encoder_fingerprint(dict(hub))
    assert encoder_fingerprint(hub) != encoder_fingerprint({**hub, "from_pretrained": "DeepFloyd/t5-v1_1-xl"})


# --- a build through Ray Data and the CLI ----------------------------------------------------------


def test_cli_build_equals_a_direct_encode_and_records_a_bad_clip(
    tmp_path, tiny, shared_ray, local_buckets, capsys
):
    cfg = media_and_buckets(tmp_path, tiny, clips=3, views=2)
    (tmp_path / "media" / "clip1.mp4").write_bytes(b"\0" * 4096)  # scanned fine, now undecodable

    assert cli_main(["precompute", str(tmp_path / "config.py"), "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3 samples x 2 view(s); 4 rows encoded, 0 reused, 1 samples left out" in summary

    features = open_features(tmp_path / "outputs" / "features")
    m = features.manifest
    assert (m.num_samples, m.num_encoded, m.num_reused, m.num_errors) == (3, 4, 0, 1)
    assert m.bucket_snapshot_id == Path(m.bucket_snapshot_path).name
    assert (m.dtype, m.transform_name, m.frame_interval, m.seed, m.views) == ("fp32", "resize_crop", 1, 3, 2)
    assert m.vae.fingerprint == encoder_fingerprint(cfg.vae.as_dict())
    assert m.text_encoder.fingerprint == encoder_fingerprint(cfg.text_encoder.as_dict())
    assert (m.vae.output_dim, m.text_encoder.output_dim, m.text_encoder.model_max_length) == (4, 32, 16)
    assert m.buckets[0].latent_shape == (4, 5, 18, 32)
    errors = features.errors().to_pylist()
    assert [e["path"] for e in errors] == [str(tmp_path / "media" / "clip1.mp4")] * 2  # both views
    assert errors[0]["bucket"] == "144p-5-0.56"

    rows = rows_of(features)
    good = [s for s in (0, 1, 2) if rows.get((s, 0), {}).get("path", "").endswith(("clip0.mp4", "clip2.mp4"))]
    assert list(features.samples) == good
    views = []
    for view in (0, 1):
        row = rows[(good[0], view)]
        stored = features.sample(good[0], view)
        latent, caption = direct_encode(cfg, row["path"], row["text"], view, row["reuse_key"])
        torch.testing.assert_close(stored["latent"], latent, rtol=1e-5, atol=1e-5)
        n = int(stored["mask"].sum())
        torch.testing.assert_close(stored["y"][0, :n], caption, rtol=1e-5, atol=1e-5)
        assert not stored["y"][0, n:].any()
        views.append(stored["latent"])
    assert not torch.equal(views[0], views[1])  # each view its own crop and noise
    empty, mask = features.empty_caption()
    assert empty.shape == (1, 16, 32) and int(mask.sum()) == 1  # "" is just the end-of-text token


# --- rebuilds, kills and full disks (encoded in this process) --------------------------------------


def test_a_rebuild_encodes_only_new_and_changed_clips(tmp_path, tiny, local_buckets):
    cfg = media_and_buckets(tmp_path, tiny, clips=3, views=2)
    first = precompute_stage(cfg, progress=False, num_actors=0)
    assert (first.manifest.num_encoded, first.manifest.num_reused) == (6, 0)
    before = {row["path"]: row["reuse_key"] for row in rows_of(open_features(first.path)).values()}

    add_clip(tmp_path / "media", "clip3", "a blue ball rolls")  # new
    (tmp_path / "media" / "clip0.txt").write_text("a green cube spins")  # caption changed
    rebucket(cfg, tmp_path)
    second = precompute_stage(cfg, progress=False, num_actors=0)

    m = second.manifest
    assert (m.num_samples, m.num_encoded, m.num_reused, m.reused_from) == (4, 4, 4, first.manifest.feature_id)
    features = open_features(tmp_path / "outputs" / "features")
    assert features.path == second.path and list(features.samples) == [0, 1, 2, 3]
    rows = rows_of(features)
    reused = {r["path"] for r in rows.values() if before.get(r["path"]) == r["reuse_key"]}
    assert sorted(Path(p).name for p in reused) == ["clip1.mp4", "clip2.mp4"]
    # a reused row's sample is its row in the new bucket snapshot
    for (sample, _), row in rows.items():
        assert features.sample(sample)["path"] == row["path"]

    third = precompute_stage(cfg, progress=False, num_actors=0)
    assert (third.manifest.num_encoded, third.manifest.num_reused) == (0, 8)


def test_a_build_that_dies_mid_write_leaves_current_and_no_partial_snapshot(
    tmp_path, tiny, local_buckets, monkeypatch
):
    cfg = media_and_buckets(tmp_path, tiny, clips=2)
    first = precompute_stage(cfg, progress=False, num_actors=0)
    add_clip(tmp_path / "media", "clip9", "a new clip")
    rebucket(cfg, tmp_path)

    def killed(table, path):
        raise KeyboardInterrupt  # as a Ctrl-C or SIGTERM handler would, mid-shard

    monkeypatch.setattr(precompute, "write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        precompute_stage(cfg, progress=False, num_actors=0)
    root = tmp_path / "outputs" / "features"
    assert sorted(p.name for p in root.iterdir()) == sorted([CURRENT_NAME, first.path.name])
    assert open_features(root).path == first.path


def test_disk_full_gives_one_line_and_keeps_current(tmp_path, tiny, local_buckets, monkeypatch):
    cfg = media_and_buckets(tmp_path, tiny, clips=2)
    first = precompute_stage(cfg, progress=False, num_actors=0)
    rebucket(cfg, tmp_path)

    def full(table, where, *args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    root = tmp_path / "outputs" / "features"
    with pytest.raises(StorageError) as raised:
        precompute_stage(cfg, progress=False, num_actors=0)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"feature snapshot {root}: no space left on device while writing ")
    assert message.endswith(f"CURRENT still names {first.path.name}; free space and build again")
    assert sorted(p.name for p in root.iterdir()) == sorted([CURRENT_NAME, first.path.name])


def test_only_the_features_the_config_asks_for_are_stored(tmp_path, tiny, local_buckets):
    cfg = media_and_buckets(tmp_path, tiny, clips=1)
    text_only = load_config(write_config(tmp_path, tiny, load_text_features=True))
    info = precompute_stage(text_only, progress=False, num_actors=0)
    assert (info.manifest.video_features, info.manifest.text_features, info.manifest.vae) == (
        False,
        True,
        None,
    )
    sample = open_features(info.path).sample(0)
    assert "latent" not in sample and sample["y"].shape == (1, 16, 32)
    both = precompute_stage(cfg, progress=False, num_actors=0)  # neither flag: both stored, nothing reused
    assert (both.manifest.video_features, both.manifest.text_features, both.manifest.num_reused) == (
        True,
        True,
        0,
    )


# --- one-line errors ------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path, tiny, capsys):
    (tmp_path / "media").mkdir()
    config = write_config(tmp_path, tiny)
    assert cli_main(["precompute", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "bucket snapshot" in lines[0] and "opensora bucket" in lines[0]

    assert cli_main(["precompute", str(config), "--output", "s3://bucket/features"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "only local paths" in lines[0]


def test_precompute_refuses_a_config_without_the_encoder_it_needs(tmp_path, tiny):
    config = write_config(tmp_path, tiny, load_video_features=True)
    text = config.read_text().replace("vae = dict(", "unused_vae = dict(")
    config.write_text(text)
    with pytest.raises(ConfigError, match="^vae: missing; precompute needs vae"):
        precompute.encode_settings(load_config(config))


def test_extract_config_loads(capsys):
    assert cli_main(["config", "show", "configs/opensora-v1-2/misc/extract.py"]) == 0
    assert "save_compressed_text_features = True" in capsys.readouterr().out


def test_frame_starts_depend_on_seed_view_and_path_only():
    a = clip_rng(3, 0, "/v/a.mp4").integers(0, 1 << 30, 4)
    assert np.array_equal(a, clip_rng(3, 0, "/v/a.mp4").integers(0, 1 << 30, 4))
    for other in (clip_rng(4, 0, "/v/a.mp4"), clip_rng(3, 1, "/v/a.mp4"), clip_rng(3, 0, "/v/b.mp4")):
        assert not np.array_equal(a, other.integers(0, 1 << 30, 4))
