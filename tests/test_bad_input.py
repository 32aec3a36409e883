"""Bad media, each a test: what the scan records and what training does when a file fails at read time.

Complements test_scan_probe.py / test_scan_folder.py (zero-byte, truncated, text-as-mp4, audio-only,
permissions, symlinks, names, CSV duplicates) with the cases they leave out: a header that promises
more frames than the data holds, a 1-frame video, a video of absurd size, empty captions, and a file
that breaks after the scan (skipped, logged and counted in MLflow by a real training run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import GREY_LEVEL as LEVEL
from conftest import grey_clip
from mmengine import Config

from opensora_core.data.bucket import BucketConfig, assign_table
from opensora_core.data.dataset import VariableVideoTextDataset, collate_fn
from opensora_core.data.probe import ProbeError, probe
from opensora_core.data.scan import errors_path_for, scan
from opensora_core.data.video_io import read_clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cut_short(full: Path, path: Path) -> Path:
    """Keep the header and index (which still declare every frame) and half the frame data."""
    data = full.read_bytes()
    mdat = data.index(b"mdat")
    path.write_bytes(data[: mdat + (len(data) - mdat) // 2])
    return path


def frames_readable(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def run_scan(input: Path, output: Path):
    return scan(input, output, workers=1, progress=False)


def rows_by_name(meta: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(meta).to_pylist()}


def errors_by_name(meta: Path) -> dict[str, str]:
    return {Path(r["path"]).name: r["error"] for r in pq.read_table(errors_path_for(meta)).to_pylist()}


@pytest.fixture(scope="module")
def lying(tmp_path_factory) -> Path:
    """A 30-frame clip cut in half after its index: the header still says 30 frames, 15 decode."""
    root = tmp_path_factory.mktemp("lying")
    full = grey_clip(root / "full.mp4", 30, faststart=True)
    path = cut_short(full, root / "lying.mp4")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 30
    assert frames_readable(path) == 15
    return path


# ---------------------------------------------------------------------------------------------
# a header that lies about its frame count


def test_header_declaring_frames_the_data_lacks_is_a_truncated_error(lying: Path) -> None:
    with pytest.raises(ProbeError) as info:
        probe(lying)
    assert (
        info.value.reason
        == "corrupt: truncated: the header declares 30 frames, the data ends before the last"
    )


def test_scan_records_the_lying_header_in_the_errors_table(lying: Path, tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "lying.mp4").write_bytes(lying.read_bytes())
    grey_clip(root / "good.mp4", 10)
    meta = tmp_path / "meta.parquet"
    result = run_scan(root, meta)
    assert list(rows_by_name(meta)) == ["good.mp4"]
    assert errors_by_name(meta)["lying.mp4"].startswith("corrupt: truncated:")
    assert result.errors_by_reason == {"corrupt": 1}


@pytest.mark.parametrize("backend", ["auto", "av"])
def test_clip_within_the_frames_that_decode_is_read_in_full(lying: Path, backend: str) -> None:
    # A file cut short after the scan: the read falls back to the frames that are really there.
    clip = read_clip(lying, 8, 1, np.random.default_rng(0), backend=backend)
    assert clip.frames.shape == (8, 48, 64, 3)
    assert clip.indices.max() < 15
    levels = clip.frames.reshape(8, -1).mean(axis=1) / LEVEL
    assert np.all(np.abs(levels - clip.indices) < 1.5)  # the frames are the ones the indices name


def test_clip_longer_than_the_frames_that_decode_is_a_media_error(lying: Path) -> None:
    from opensora_core.errors import MediaError

    with pytest.raises(MediaError, match=r"lying.mp4: video too short: has 15 frames, needs at least 16"):
        read_clip(lying, 16, 1, np.random.default_rng(0))


def test_dataset_replaces_a_lying_file_with_a_clip_of_the_bucket_shape(lying: Path, tmp_path: Path) -> None:
    good = grey_clip(tmp_path / "good.mp4", 30)
    table = pa.table(
        {
            "path": [str(lying), str(good)],
            "text": ["cut short", "whole"],
            "num_frames": [30, 30],  # what the header said when the file was scanned
            "is_image": [False, False],
        }
    )
    ds = VariableVideoTextDataset(table)
    item = ds["0-20-32-32"]  # 20 frames: more than the 15 the file still holds
    assert item["path"] == str(good)
    assert tuple(item["video"].shape) == (3, 20, 32, 32)
    assert ds.skipped == 1


# ---------------------------------------------------------------------------------------------
# one frame, huge frames


def test_one_frame_video_is_a_video_of_one_frame(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    grey_clip(root / "still.mp4", 1)
    meta = tmp_path / "meta.parquet"
    run_scan(root, meta)
    row = rows_by_name(meta)["still.mp4"]
    assert (row["num_frames"], row["is_image"], row["codec"]) == (1, False, "mpeg4")
    assert row["fps"] == 24.0


def test_one_frame_video_takes_the_image_bucket_and_loads_as_one_frame(tmp_path: Path) -> None:
    path = grey_clip(tmp_path / "still.mp4", 1, height=144, width=256)
    info = probe(path)
    table = pa.table(
        {
            "path": [str(path)],
            "num_frames": [info.num_frames],
            "height": [info.height],
            "width": [info.width],
            "is_image": [info.is_image],
        }
    )
    cfg = BucketConfig.from_dict({"144p": {1: (1.0, 4), 16: (1.0, 2)}})
    assignment = assign_table(table, cfg, frame_interval=1, seed=0, epoch=0)
    key = assignment.key(0)
    assert (key.resolution, key.num_frames) == ("144p", 1)  # T == 1 sorts as an image (spec/buckets.md)

    h, w = key.size
    item = VariableVideoTextDataset(table)[f"0-1-{h}-{w}"]
    assert tuple(item["video"].shape) == (3, 1, h, w)
    assert item["fps"] == 24  # the video's own rate, not the 120 given to images


def test_video_with_an_absurd_frame_size_is_rejected_at_scan(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    # PNG frames in a .mov: a real stream 40000 pixels wide that costs a few KB to write
    with av.open(str(root / "wide.mov"), "w") as container:
        stream = container.add_stream("png", rate=24)
        stream.width, stream.height, stream.pix_fmt = 40_000, 16, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 40_000, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    grey_clip(root / "good.mp4", 4)
    meta = tmp_path / "meta.parquet"
    result = run_scan(root, meta)
    assert errors_by_name(meta) == {"wide.mov": "bad dimensions: 40000x16; valid sides are 1..16384"}
    assert list(rows_by_name(meta)) == ["good.mp4"]
    assert result.errors_by_reason == {"bad dimensions": 1}


# ---------------------------------------------------------------------------------------------
# empty captions count as missing ones


def test_empty_or_blank_sidecar_caption_counts_as_missing(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    for name, caption in (("empty", ""), ("blank", " \n\t\n"), ("said", "a grey fade")):
        grey_clip(root / f"{name}.mp4", 4)
        (root / f"{name}.txt").write_text(caption)
    grey_clip(root / "none.mp4", 4)
    meta = tmp_path / "meta.parquet"
    result = run_scan(root, meta)
    texts = {name: row["text"] for name, row in rows_by_name(meta).items()}
    assert texts == {"blank.mp4": "", "empty.mp4": "", "none.mp4": "", "said.mp4": "a grey fade"}
    assert result.n_missing_caption == 3
    assert "3 without caption" in result.summary()


def test_empty_or_blank_csv_caption_counts_as_missing(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        grey_clip(tmp_path / f"{name}.mp4", 4)
    csv = tmp_path / "data.csv"
    csv.write_text('path,text\na.mp4,\nb.mp4,"   "\nc.mp4,a grey fade\nd.mp4,""\n')
    meta = tmp_path / "meta.parquet"
    result = run_scan(csv, meta)
    texts = {name: row["text"] for name, row in rows_by_name(meta).items()}
    assert texts == {"a.mp4": "", "b.mp4": "", "c.mp4": "a grey fade", "d.mp4": ""}
    assert result.n_missing_caption == 3


# ---------------------------------------------------------------------------------------------
# failures at read time: logged per file, counted across DataLoader workers


def test_each_file_that_fails_to_load_logs_one_warning_naming_it(tmp_path: Path, caplog) -> None:
    good = grey_clip(tmp_path / "good.mp4", 10)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 500)
    table = pa.table({"path": [str(broken), str(good)], "num_frames": [10, 10], "is_image": [False, False]})
    with caplog.at_level(logging.WARNING, logger="opensora_core.data.dataset"):
        item = VariableVideoTextDataset(table)["0-4-32-32"]
    assert item["path"] == str(good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(broken) in warnings[0]


def test_skipped_count_includes_failures_in_dataloader_worker_processes(tmp_path: Path) -> None:
    good = grey_clip(tmp_path / "good.mp4", 10)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 500)
    table = pa.table(
        {"path": [str(broken), str(good), str(broken)], "num_frames": [10] * 3, "is_image": [False] * 3}
    )
    ds = VariableVideoTextDataset(table)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=[["0-4-32-32", "1-4-32-32"], ["2-4-32-32"]], num_workers=2, collate_fn=collate_fn
    )
    batches = list(loader)
    assert [len(b["path"]) for b in batches] == [2, 1]  # each broken file was replaced by good.mp4
    assert ds.skipped == 2


# ---------------------------------------------------------------------------------------------
# a real training run over a snapshot holding a file that broke after the scan


@pytest.fixture(scope="module")
def ray_env(shared_ray, tmp_path_factory):
    """The session's local Ray (tests/conftest.py) and an MLflow SQLite store private to this module."""
    shared_ray.ensure(trains=True)
    root = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield root


@pytest.fixture(scope="module")
def skip_run(ray_env, tmp_path_factory):
    """One Ray Train worker, 2 steps of batch 3 over a snapshot of 3 clips, one of them broken after the
    scan; returns the result and the run's samples_skipped history as (step, value)."""
    import mlflow

    from opensora_core.data.bucket_build import build_snapshot
    from opensora_core.models.tiny_random import create_tiny_pretrained
    from opensora_core.train import train

    root = tmp_path_factory.mktemp("skip")
    media = root / "media"
    media.mkdir()
    for name in ("a", "b", "broken"):
        grey_clip(media / f"{name}.mp4", 6, height=144, width=256)
        (media / f"{name}.txt").write_text(f"clip {name}")
    meta = root / "meta.parquet"
    assert run_scan(media, meta).n_ok == 3
    (media / "broken.mp4").write_bytes(b"\x00" * 2000)  # breaks after the scan: found at read time
    bucket_cfg = {"144p": {4: (1.0, 3)}}
    snapshot = build_snapshot(
        meta,
        root / "buckets",
        BucketConfig.from_dict(bucket_cfg),
        frame_interval=1,
        seed=0,
        epoch=0,
        config_hash="test",
        progress=False,
    )
    assert snapshot.manifest.num_kept == 3
    pretrained = create_tiny_pretrained(root / "pretrained")
    client = mlflow.MlflowClient()
    run_id = client.create_run(
        client.create_experiment("bad-input", artifact_location=str(root / "artifacts"))
    ).info.run_id
    cfg = Config(
        dict(
            model=dict(
                type="STDiT3-XL/2",
                hidden_size=32,
                depth=1,
                num_heads=2,
                enable_flash_attn=False,
                enable_layernorm_kernel=False,
            ),
            vae=dict(type="VideoAutoencoderKL", from_pretrained=str(pretrained.vae), local_files_only=True),
            text_encoder=dict(
                type="t5", from_pretrained=str(pretrained.t5), model_max_length=8, local_files_only=True
            ),
            scheduler=dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal"),
            dataset=dict(type="VariableVideoTextDataset", frame_interval=1, transform_name="resize_crop"),
            bucket_config=bucket_cfg,
            num_workers=1,  # a DataLoader worker process does the decoding
            dtype="fp32",
            plugin="zero2",
            lr=1e-4,
            seed=42,
            epochs=5,
            max_steps=2,  # one step per epoch: the broken file is read once in each
            log_every=1,
            ckpt_every=0,
        )
    )
    result = train(
        cfg,
        snapshot_dir=str(snapshot.path),
        output_dir=str(root / "out"),
        mlflow_run_id=run_id,
        num_workers=1,
    )
    history = client.get_metric_history(run_id, "samples_skipped")
    return result, [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.slow
def test_training_skips_a_file_that_fails_to_decode_instead_of_crashing(skip_run) -> None:
    result, _ = skip_run
    assert result.global_step == 2
    assert result.final_loss is not None and np.isfinite(result.final_loss)


@pytest.mark.slow
def test_skipped_files_are_counted_in_the_mlflow_run(skip_run) -> None:
    _, history = skip_run
    assert history == [(1, 1.0), (2, 2.0)]  # cumulative: the broken file failed once per step


@pytest.mark.slow
def test_bucket_build_that_keeps_no_sample_exits_2_and_writes_no_snapshot(
    ray_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`opensora bucket` over data that no bucket of the config can take: a config error, no snapshot."""
    from opensora_core.cli import main as cli_main

    media = tmp_path / "media"
    media.mkdir()
    grey_clip(media / "small.mp4", 20)  # 48x64: under 0.8 x the pixels of 144p
    meta = tmp_path / "meta.parquet"
    run_scan(media, meta)
    config = tmp_path / "cfg.py"
    config.write_text(
        f'_base_ = ["{CONFIGS / "opensora-v1-2/train/demo.py"}"]\n'
        'bucket_config = {"144p": {1: (1.0, 4), 17: (1.0, 2)}, "_delete_": True}\n'
    )
    monkeypatch.chdir(tmp_path)
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    code = cli_main(["bucket", str(config), "--meta", str(meta), "--output", "buckets"])
    err = capsys.readouterr().err.splitlines()
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")} == before
    assert code == 2
    errors = [line for line in err if line.startswith("error: ")]  # Ray Data logs its progress around it
    assert len(errors) == 1 and errors[0].startswith("error: bucket_config: keeps none of the 1 samples")
    assert not any("Traceback" in line for line in err)
