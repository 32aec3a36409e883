"""The scheduled `buckets` flow: builds when the data or config changed, records "unchanged" otherwise."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from opensora_core.data import bucket_build
from opensora_core.data.snapshot import CURRENT_NAME, open_snapshot

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.buckets import REBUILT, UNCHANGED, rebuild_buckets  # noqa: E402

CONFIG = "configs/opensora-v1-2/train/demo.py"


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server (SQLite) for the module: about 20 s to start on 2 cores."""
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def local_runs(prefect_api, monkeypatch):
    """No MLflow server here, and the Ray Data step (tested in test_data_snapshot) runs in-process."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def assign_locally(keys, cfg, frame_interval, seed, epoch, *args):
        return bucket_build.bucket_indices(keys, cfg, frame_interval, seed, epoch)

    monkeypatch.setattr(bucket_build, "_assign_in_ray", assign_locally)


def metadata(n=40, mtime=1):
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "path": [f"/data/{i:03d}.mp4" for i in range(n)],
            "text": [f"caption {i}" for i in range(n)],
            "num_frames": rng.integers(1, 60, n),
            "height": rng.choice([144, 240], n),
            "width": rng.choice([256, 426], n),
            "file_size": np.full(n, 1000),
            "mtime_ns": np.full(n, mtime),
        }
    )


def run(tmp_path, **kwargs):
    return rebuild_buckets(
        config=CONFIG,
        data_path=str(tmp_path / "meta.parquet"),
        cfg_options=[f"outputs={tmp_path / 'out'}"],
        **kwargs,
    )


def snapshot_dirs(tmp_path):
    return [p.name for p in (tmp_path / "out" / "buckets").iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
def test_first_run_builds_then_unchanged_data_is_not_rebuilt(tmp_path, local_runs):
    pq.write_table(metadata(), tmp_path / "meta.parquet")
    first = run(tmp_path)
    assert first["status"] == REBUILT
    assert first["reason"] == f"no current snapshot under {tmp_path / 'out' / 'buckets'}"
    assert open_snapshot(tmp_path / "out" / "buckets").path.as_posix() == first["snapshot"]

    second = run(tmp_path)
    assert second["status"] == UNCHANGED
    assert second["snapshot"] == first["snapshot"]
    assert set(snapshot_dirs(tmp_path)) == {CURRENT_NAME, first["snapshot"].rsplit("/", 1)[1]}


@pytest.mark.slow
def test_changed_metadata_builds_a_new_snapshot(tmp_path, local_runs):
    pq.write_table(metadata(), tmp_path / "meta.parquet")
    first = run(tmp_path)
    pq.write_table(metadata(mtime=2), tmp_path / "meta.parquet")  # every file touched
    second = run(tmp_path)
    assert second["status"] == REBUILT
    assert second["reason"].startswith("metadata_fingerprint ")
    assert second["snapshot"] != first["snapshot"]
    assert open_snapshot(tmp_path / "out" / "buckets").path.as_posix() == second["snapshot"]


@pytest.mark.slow
def test_changed_bucket_config_builds_a_new_snapshot(tmp_path, local_runs):
    pq.write_table(metadata(), tmp_path / "meta.parquet")
    run(tmp_path)
    changed = rebuild_buckets(
        config=CONFIG,
        data_path=str(tmp_path / "meta.parquet"),
        cfg_options=[f"outputs={tmp_path / 'out'}", "bucket_config.144p.17=(1.0, 3)"],
    )
    assert changed["status"] == REBUILT
    assert changed["reason"].startswith("config_hash ")
    assert open_snapshot(tmp_path / "out" / "buckets").manifest.batch_sizes[("144p", 17)] == 3


@pytest.mark.slow
def test_force_rebuilds_an_up_to_date_snapshot(tmp_path, local_runs):
    pq.write_table(metadata(), tmp_path / "meta.parquet")
    run(tmp_path)
    forced = run(tmp_path, force=True)
    assert forced["status"] == REBUILT
    assert forced["reason"] == "forced"


def test_prefect_yaml_schedules_the_rebuild_deployment():
    deployments = {d["name"]: d for d in yaml.safe_load(open("prefect.yaml"))["deployments"]}
    rebuild = deployments["rebuild"]
    assert rebuild["entrypoint"] == "flows/buckets.py:rebuild_buckets"
    assert rebuild["schedules"][0]["cron"] == "0 * * * *"
    assert rebuild["parameters"]["config"] == CONFIG
    assert rebuild_buckets.name == "buckets"


@pytest.mark.slow
def test_a_snapshot_on_shared_storage_is_built_and_its_report_logged_to_mlflow(
    tmp_path, local_runs, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the local store's artifacts go to ./mlruns
    pq.write_table(metadata(), tmp_path / "meta.parquet")
    result = rebuild_buckets(
        config=str(Path(__file__).resolve().parents[1] / CONFIG),
        data_path=str(tmp_path / "meta.parquet"),
        cfg_options=[f"outputs=file://{tmp_path / 'shared'}"],
    )
    assert result["status"] == REBUILT
    assert result["snapshot"].startswith(f"file://{tmp_path / 'shared' / 'buckets'}/")
    client = mlflow.MlflowClient()
    (run,) = [r for r in client.search_runs(client.get_experiment_by_name("opensora").experiment_id)
              if r.data.tags.get("stage") == "bucket"]  # fmt: skip
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "buckets")) == [
        "buckets/manifest.json",
        "buckets/report.png",
    ]
