"""Bucket snapshots and checkpoints on shared storage given as a URI (pyarrow.fs): `file://` URIs on
this disk, and pyarrow's in-memory filesystem as an object store that has no local path at all."""

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from test_data_snapshot import CFG, FRAME_INTERVAL, metadata_table
from test_train_checkpoint import MODEL_TYPE, Sampler, make_engine, one_process_group  # noqa: F401
from test_train_checkpoint import train as train_steps

from opensora_core import storage
from opensora_core.cli import main as cli_main
from opensora_core.data import publish
from opensora_core.data.bucket_build import build_snapshot
from opensora_core.data.bucket_report import REPORT_PLOT_NAME
from opensora_core.data.manifest import MANIFEST_NAME, bucket_config_hash
from opensora_core.data.snapshot import CURRENT_NAME, open_snapshot
from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.storage import Location
from opensora_core.train.checkpoint import (
    RUNNING_STATES,
    RunningStates,
    load_checkpoint,
    read_running_states,
    save_checkpoint,
)
from opensora_core.train.ema import create_ema

ray = pytest.importorskip("ray")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs/opensora-v1-2/train/demo.py"


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    """The session's local Ray (tests/conftest.py)."""
    shared_ray.ensure(trains=True)


@pytest.fixture
def meta(tmp_path) -> Path:
    path = tmp_path / "meta.parquet"
    pq.write_table(metadata_table(n=200), path)
    return path


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Local mirrors and staging directories inside the test's own folder, so leftovers show."""
    monkeypatch.setenv("OPENSORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "staging").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))


def build(meta: Path, root, epoch: int = 0):
    return build_snapshot(
        meta, root, CFG, FRAME_INTERVAL, 7, epoch,
        config_hash=bucket_config_hash(CFG, FRAME_INTERVAL), num_blocks=1, progress=False,
    )  # fmt: skip


def in_memory_store(prefix: str = "bucket/snapshots") -> Location:
    """A directory on pyarrow's in-memory filesystem: reachable only through pyarrow.fs calls."""
    return Location(pafs._MockFileSystem(), prefix, f"mock://{prefix}")


# --- bucket snapshots ----------------------------------------------------------------------------


def test_snapshot_built_to_a_file_uri_reads_back_the_same_rows_as_a_local_build(local_ray, meta, tmp_path):
    local = build(meta, tmp_path / "local")
    uri = f"file://{tmp_path}/shared/buckets"
    shared = build(meta, uri)

    assert isinstance(shared.path, Location) and str(shared.path) == f"{uri}/{shared.manifest.snapshot_id}"
    assert (tmp_path / "shared/buckets" / CURRENT_NAME).read_text() == shared.manifest.snapshot_id + "\n"
    opened = open_snapshot(uri)
    assert opened.manifest == shared.manifest
    assert opened.full_table().equals(open_snapshot(tmp_path / "local").full_table())
    assert opened.manifest.num_kept == local.manifest.num_kept > 0
    assert list((tmp_path / "staging").iterdir()) == []  # the local staging copy is gone


def test_a_snapshot_at_a_file_uri_opens_as_a_plain_parquet_dataset(local_ray, meta, tmp_path):
    import pandas as pd
    import pyarrow.dataset as pads

    uri = f"file://{tmp_path}/shared/buckets"
    info = build(meta, uri)
    expected = open_snapshot(uri).full_table()
    snapshot_uri = str(info.path)
    assert snapshot_uri.startswith("file://")

    frame = pd.read_parquet(snapshot_uri)
    assert len(frame) == info.manifest.num_samples == 200
    assert list(frame.columns) == expected.column_names
    dataset = pads.dataset(snapshot_uri, format="parquet")
    assert dataset.count_rows() == 200
    assert dataset.to_table().sort_by("path").equals(expected.sort_by("path"))


def test_snapshot_on_an_in_memory_object_store_is_built_switched_and_read(local_ray, meta):
    root = in_memory_store()
    first = build(meta, root)
    second = build(meta, root, epoch=1)

    assert (root / CURRENT_NAME).read_text().strip() == second.manifest.snapshot_id
    assert open_snapshot(root).manifest == second.manifest
    assert open_snapshot(root / first.manifest.snapshot_id).manifest.epoch == 0
    table = open_snapshot(root).table()
    assert table.num_rows == second.manifest.num_kept
    assert set(table["bucket_res"].to_pylist()) <= {"240p", "144p"}
    shards = [f for b in second.manifest.buckets for f in b.files]
    assert all((second.path / f).is_file() for f in shards)


def test_an_upload_that_dies_leaves_current_on_the_previous_snapshot(local_ray, meta, tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/buckets"
    first = build(meta, uri)

    def connection_lost(source, dest):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(publish, "upload_file", connection_lost)  # the manifest goes up last
    with pytest.raises(OSError, match="connection reset"):
        build(meta, uri, epoch=1)

    assert open_snapshot(uri).manifest == first.manifest
    partial = [p for p in (tmp_path / "buckets").iterdir() if p.is_dir() and p.name != first.path.name]
    assert len(partial) == 1 and not (partial[0] / MANIFEST_NAME).exists()  # shards up, no manifest
    assert list((tmp_path / "staging").iterdir()) == []


def test_opensora_bucket_writes_and_reports_a_snapshot_at_a_uri(local_ray, meta, tmp_path, capsys):
    uri = f"file://{tmp_path}/out/buckets"
    assert cli_main(["bucket", str(DEMO_CONFIG), "--meta", str(meta), "--output", uri]) == 0
    snapshot_id = (tmp_path / "out/buckets" / CURRENT_NAME).read_text().strip()
    assert capsys.readouterr().out.strip() == f"{uri}/{snapshot_id}"

    assert cli_main(["bucket", "--output", uri, "--report"]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"snapshot {snapshot_id}")
    assert f"plot: {uri}/{snapshot_id}/{REPORT_PLOT_NAME}" in report


def test_a_uri_pyarrow_cannot_open_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"storage URI 'nosuch://bucket/x': .*s3://bucket/prefix"):
        open_snapshot("nosuch://bucket/x")


def test_a_uri_with_no_snapshot_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no _manifest.json or CURRENT there"):
        open_snapshot(f"file://{tmp_path}/empty")


def test_join_keeps_a_query_string_at_the_end():
    uri = "s3://bucket/runs?region=eu-west-1&endpoint_override=127.0.0.1:9000"
    assert storage.join(uri, "buckets", "CURRENT") == (
        "s3://bucket/runs/buckets/CURRENT?region=eu-west-1&endpoint_override=127.0.0.1:9000"
    )


# --- checkpoints ---------------------------------------------------------------------------------


def save_and_upload(engine, ema, out: Path, step: int, upload_to):
    states = RunningStates(epoch=0, step=step, global_step=step, batch_size=2, model_type=MODEL_TYPE)
    return save_checkpoint(
        out,
        engine=engine,
        ema=ema,
        sampler_state={"seed": 1, "epoch": 0, "consumed_batches": step},
        states=states,
        config_text="lr = 0.01\n",
        rank=0,
        upload_to=upload_to,
    )


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_checkpoint_uploaded_to_a_file_uri_holds_every_file_of_the_local_save(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 2, 0)
    local = save_and_upload(engine, ema, tmp_path / "run", 2, f"file://{tmp_path}/shared/run")

    shared = tmp_path / "shared/run" / local.name
    assert files_under(shared) == files_under(local)
    assert read_running_states(f"file://{shared}").global_step == 2


def test_load_from_a_uri_resumes_exactly_like_the_local_checkpoint(tmp_path):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 3, 0)
    local = save_and_upload(engine, ema, tmp_path / "run", 3, f"file://{tmp_path}/shared")
    next_random = torch.rand(3)
    uninterrupted = train_steps(engine, ema, 3, 3)

    resumed = make_engine(123)
    resumed_ema = create_ema(resumed.module)
    sampler = Sampler()
    states = load_checkpoint(
        f"file://{tmp_path}/shared/{local.name}", resumed, resumed_ema, sampler, model_type=MODEL_TYPE
    )

    assert torch.equal(torch.rand(3), next_random)
    assert (states.global_step, sampler.state["consumed_batches"]) == (3, 3)
    assert train_steps(resumed, resumed_ema, 3, 3) == uninterrupted
    fetched = storage.cache_dir() / "file" / str(tmp_path / "shared" / local.name).lstrip("/")
    assert files_under(fetched) == files_under(local)  # loaded from the local mirror


def test_checkpoint_round_trips_through_an_in_memory_object_store(tmp_path):
    store = in_memory_store("bucket/runs/000-model")
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 2, 0)
    local = save_and_upload(engine, ema, tmp_path / "run", 2, store)
    uninterrupted = train_steps(engine, ema, 2, 2)

    resumed = make_engine(7)
    resumed_ema = create_ema(resumed.module)
    states = load_checkpoint(store / local.name, resumed, resumed_ema, Sampler(), model_type=MODEL_TYPE)
    assert states.global_step == 2
    assert train_steps(resumed, resumed_ema, 2, 2) == uninterrupted


def test_an_upload_cut_before_running_states_is_not_a_checkpoint(tmp_path, monkeypatch):
    engine = make_engine(0)
    ema = create_ema(engine.module)
    train_steps(engine, ema, 1, 0)

    def connection_lost(source, dest):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(storage, "upload_file", connection_lost)  # running_states.json goes up last
    with pytest.raises(OSError, match="connection reset"):
        save_and_upload(engine, ema, tmp_path / "run", 1, f"file://{tmp_path}/shared")

    uploaded = tmp_path / "shared/epoch0-global_step1"
    assert (uploaded / "model.safetensors").is_file() and not (uploaded / RUNNING_STATES).exists()
    with pytest.raises(CheckpointError, match=f"not a complete checkpoint \\(no {RUNNING_STATES}\\)"):
        load_checkpoint(f"file://{uploaded}", make_engine(0), None, None, model_type=MODEL_TYPE)
    assert json.loads((tmp_path / "run/epoch0-global_step1" / RUNNING_STATES).read_text())["global_step"] == 1


@pytest.mark.slow
def test_training_with_outputs_at_a_uri_copies_each_checkpoint_there(local_ray, tmp_path):
    from test_train_distributed import tiny_config

    from opensora_core.models.tiny_random import create_tiny_pretrained
    from opensora_core.sample.evaluate import find_checkpoints
    from opensora_core.train import train

    cfg = tiny_config(create_tiny_pretrained(tmp_path / "pretrained"), max_steps=1, epochs=1)
    uri = f"file://{tmp_path}/shared/outputs"
    result = train(cfg, snapshot_dir=None, output_dir=uri, mlflow_run_id=None, num_workers=1)

    assert result.exp_dir == f"{uri}/000-STDiT3-XL-2"
    assert result.checkpoint == f"{result.exp_dir}/epoch0-global_step1"
    assert read_running_states(result.checkpoint).global_step == 1
    mirror = storage.local_mirror(result.exp_dir)
    assert sorted(p.name for p in (tmp_path / "shared/outputs/000-STDiT3-XL-2").iterdir()) == [
        "epoch0-global_step1"
    ]
    assert files_under(tmp_path / "shared/outputs/000-STDiT3-XL-2/epoch0-global_step1") == files_under(
        mirror / "epoch0-global_step1"
    )
    assert find_checkpoints(result.exp_dir) == [mirror / "epoch0-global_step1"]
