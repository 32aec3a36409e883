"""The whole product path: real Prefect server + worker, MLflow server and Ray head; `train/v1.2` end to end."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "infra" / "local"
PREFECT = REPO / ".venv" / "bin" / "prefect"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="infra/local targets Linux"),
]


def client_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_"))}
    env["OPENSORA_STATE_DIR"] = str(state_dir)
    env.update(json.loads((state_dir / "env.json").read_text()))
    return env


@pytest.fixture(scope="module")
def stack(service_stack):
    """The session's shared stack (tests/conftest.py), up: (state dir, environment `up` ran with)."""
    service_stack.ensure_up()
    return service_stack.state_dir, service_stack.env


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo config pointed at freshly generated demo media and tiny weights in a temp dir."""
    from opensora_core.data.demo_data import make_demo_data
    from opensora_core.models.tiny_random import create_tiny_pretrained

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data")
    weights = create_tiny_pretrained(root / "data" / "pretrained")
    config = root / "e2e.py"
    config.write_text(
        f'_base_ = ["{REPO / "configs/opensora-v1-2/train/demo.py"}"]\n'
        f'dataset = dict(data_path="{root / "data"}")\n'
        f'vae = dict(from_pretrained="{weights.vae}")\n'
        f'text_encoder = dict(from_pretrained="{weights.t5}")\n'
        f'outputs = "{root / "outputs"}"\n'
        "max_steps = 4\nckpt_every = 2\n"
    )
    return config


@pytest.fixture(scope="module")
def pipeline_run(stack, demo_config: Path) -> dict:
    """Deploy prefect.yaml and run `train/v1.2` on the demo config, waiting for the result."""
    state_dir, env = stack
    deploy = subprocess.run([str(LOCAL / "deploy")], env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, f"deploy failed:\n{deploy.stdout}\n{deploy.stderr}"
    cenv = client_env(state_dir)
    run = subprocess.run(
        [str(PREFECT), "deployment", "run", "train/v1.2", "--param", f"config={demo_config}", "--watch"],
        env=cenv,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )
    return {"returncode": run.returncode, "output": run.stdout + run.stderr, "env": cenv}


def prefect_api(env: dict[str, str], path: str, body: dict) -> list | dict:
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_train_deployment_run_completes(pipeline_run: dict) -> None:
    assert pipeline_run["returncode"] == 0, pipeline_run["output"][-6000:]
    assert "Completed" in pipeline_run["output"]


def test_prefect_shows_the_four_stages_as_task_runs(pipeline_run: dict) -> None:
    env = pipeline_run["env"]
    # the shared stack's server also holds the other e2e modules' flow runs: this deployment's flow only
    flow_runs = prefect_api(env, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}, "limit": 5})
    completed = [r for r in flow_runs if r["state_type"] == "COMPLETED"]
    assert completed, [r["state_type"] for r in flow_runs]
    task_runs = prefect_api(
        env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [completed[0]["id"]]}}, "limit": 50}
    )
    names = {r["task_key"].split("-")[0] for r in task_runs} | {r["name"].split("-")[0] for r in task_runs}
    assert {"scan", "bucket", "plan", "train", "evaluate"} <= names
    assert all(r["state_type"] == "COMPLETED" for r in task_runs)


def test_prefect_flow_run_is_named_after_config_and_snapshot_and_links_to_everything(
    pipeline_run: dict,
) -> None:
    env = pipeline_run["env"]
    _, runs = pipeline_runs(pipeline_run)
    flow_run = prefect_request(env, "GET", f"/flow_runs/{runs['pipeline'].data.tags['prefect_flow_run_id']}")
    snapshot = runs["bucket"].data.tags["bucket_snapshot"]
    assert flow_run["name"] == f"e2e@{snapshot}"  # the config file's name and the snapshot it built

    artifacts = prefect_api(
        env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}
    )
    by_key = {a["key"]: a for a in artifacts if a["key"]}
    tables, links = (
        ("bucket-report", "training-plan"),
        ("mlflow-pipeline-run", "mlflow-train-run", "ray-dashboard"),
    )
    assert set(tables) | set(links) <= set(by_key)
    assert {by_key[k]["type"] for k in tables} == {"table"} and {by_key[k]["type"] for k in links} == {
        "markdown"
    }
    report = json.loads(by_key["bucket-report"]["data"])
    assert report and {"resolution", "frames", "samples", "batch"} <= set(report[0])
    assert snapshot in by_key["bucket-report"]["description"]
    assert json.loads(by_key["training-plan"]["data"])[0]["bucket"]

    assert by_key["mlflow-pipeline-run"]["data"].endswith(f"/runs/{runs['pipeline'].info.run_id})")
    assert by_key["mlflow-train-run"]["data"].endswith(f"/runs/{runs['train'].info.run_id})")
    assert by_key["ray-dashboard"]["data"].endswith(f"({env['RAY_API_SERVER_ADDRESS']})")
    with urllib.request.urlopen(env["RAY_API_SERVER_ADDRESS"] + "/api/gcs_healthz", timeout=30) as response:
        assert response.status == 200  # the link leads to the running dashboard


def test_mlflow_holds_config_params_loss_series_and_the_sample(pipeline_run: dict) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = pipeline_run["env"]["MLFLOW_TRACKING_URI"]
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("opensora")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.type"] == "STDiT3-XL/2"
    assert parent.data.params["model.hidden_size"] == "64"
    assert any(a.path == "config" for a in client.list_artifacts(parent.info.run_id))

    children = {
        r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"scan", "bucket", "plan", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["plan"].data.metrics["plan/steps_per_epoch"] >= 1

    loss = client.get_metric_history(children["train"].info.run_id, "loss")
    assert len(loss) >= 2
    assert all(m.value == m.value and m.value > 0 for m in loss)  # finite, positive

    eval_run = children["evaluate"].info.run_id
    step_dirs = client.list_artifacts(eval_run, "eval")
    files = [f.path for d in step_dirs for f in client.list_artifacts(eval_run, d.path)]
    assert any(path.endswith(".mp4") for path in files), files
    local = client.download_artifacts(eval_run, next(p for p in files if p.endswith(".mp4")))
    assert Path(local).stat().st_size > 1000

    # Every checkpoint is evaluated and logged to the training run under its own step.
    train_run = children["train"].info.run_id
    steps = sorted(m.step for m in client.get_metric_history(train_run, "eval/sampling_seconds"))
    assert steps and len(steps) == len(set(steps)), steps
    train_eval = sorted(d.path for d in client.list_artifacts(train_run, "eval") if d.path != "eval/strips")
    assert train_eval == [f"eval/step_{step:06d}" for step in steps]
    assert sorted(d.path for d in step_dirs if d.path != "eval/strips") == train_eval


def pipeline_runs(pipeline_run: dict):
    """(MlflowClient, {stage: child run}) of the pipeline run this module made."""
    os.environ["MLFLOW_TRACKING_URI"] = pipeline_run["env"]["MLFLOW_TRACKING_URI"]
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("opensora").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("stage") == "pipeline")
    children = {
        r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    return client, {"pipeline": parent, **children}


def test_mlflow_training_run_has_system_metrics_bucket_losses_and_throughput(pipeline_run: dict) -> None:
    client, runs = pipeline_runs(pipeline_run)
    metrics = runs["train"].data.metrics
    # MLflow's own system metrics (no GPU here: CPU and memory)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert metrics["system/system_memory_usage_megabytes"] > 0
    # one loss series per (resolution, num_frames) of the snapshot's buckets, no bucket index series
    manifest = json.loads(
        Path(client.download_artifacts(runs["bucket"].info.run_id, "buckets/manifest.json")).read_text()
    )
    groups = {f"loss/{b['resolution']}-{b['num_frames']}" for b in manifest["buckets"]}
    bucket_losses = {k for k in metrics if k.startswith("loss/")}
    assert bucket_losses and bucket_losses <= groups, (bucket_losses, groups)
    assert "bucket" not in metrics and not any(k.startswith("bucket.") for k in runs["train"].data.tags)
    assert metrics["tokens_per_s"] > 0 and metrics["samples_per_s"] > 0


def test_final_checkpoint_is_a_model_version_with_the_run_s_lineage(pipeline_run: dict) -> None:
    client, runs = pipeline_runs(pipeline_run)
    train = runs["train"]
    tags = train.data.tags
    manifest = json.loads(
        Path(client.download_artifacts(runs["bucket"].info.run_id, "buckets/manifest.json")).read_text()
    )
    lineage = {k: v for k, v in tags.items() if k.startswith("lineage.")}
    assert (
        lineage["lineage.bucket_snapshot"]
        == manifest["snapshot_id"]
        == runs["bucket"].data.tags["bucket_snapshot"]
    )
    assert lineage["lineage.metadata_fingerprint"] == manifest["metadata_fingerprint"]
    assert lineage["lineage.bucket_config_hash"] == manifest["config_hash"]
    assert len(lineage["lineage.config_hash"]) == 16 and lineage["lineage.code_commit"]
    # each checkpoint under its step, the last one also as the latest
    final = tags["checkpoint.latest"]
    assert final == tags[f"checkpoint.global_step{Path(final).name.split('global_step')[1]}"]
    assert sum(k.startswith("checkpoint.global_step") for k in tags) >= 2

    versions = client.search_model_versions(f"run_id = '{train.info.run_id}'")
    assert len(versions) == 1
    version = versions[0]
    assert tags["registered_model"] == f"{version.name}/{version.version}"
    assert version.name == "opensora-e2e"  # the config's name
    assert {k: version.tags[k] for k in lineage} == lineage
    assert version.tags["checkpoint_uri"] == final
    # a local checkpoint: the server takes no path outside the run's artifacts, so the version's source
    # is the run's reference to it, which names the checkpoint and its files (not a copy of them)
    assert version.source == f"runs:/{train.info.run_id}/checkpoints/{Path(final).name}"
    reference = json.loads(
        Path(
            client.download_artifacts(train.info.run_id, f"checkpoints/{Path(final).name}/checkpoint.json")
        ).read_text()
    )
    assert reference["uri"] == final
    assert reference["files"]["ema.safetensors"] == (Path(final) / "ema.safetensors").stat().st_size
    assert [a.path for a in client.list_artifacts(train.info.run_id, f"checkpoints/{Path(final).name}")] == [
        f"checkpoints/{Path(final).name}/checkpoint.json"
    ]


def test_each_eval_prompt_has_a_strip_with_a_frame_per_checkpoint(
    pipeline_run: dict, demo_config: Path
) -> None:
    from PIL import Image

    from opensora_core.config import load_config
    from opensora_core.sample.evaluate import STRIP_HEIGHT, EvalSettings

    client, runs = pipeline_runs(pipeline_run)
    train_run = runs["train"].info.run_id
    prompts = EvalSettings.from_config(load_config(demo_config)).prompts
    strips = sorted(a.path for a in client.list_artifacts(train_run, "eval/strips"))
    assert strips == [f"eval/strips/prompt_{i:04d}.png" for i in range(len(prompts))]
    checkpoints = len(client.get_metric_history(train_run, "eval/sampling_seconds"))
    with Image.open(client.download_artifacts(train_run, strips[0])) as strip:
        width, height = EvalSettings.from_config(load_config(demo_config)).image_size[::-1]
        frame_width = round(width * STRIP_HEIGHT / height)
        assert strip.width == checkpoints * frame_width + (checkpoints + 1) * 4


def prefect_request(
    env: dict[str, str], method: str, path: str, body: dict | None = None
) -> dict | list | None:
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def wait_for_final_state(env: dict[str, str], flow_run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = prefect_request(env, "GET", f"/flow_runs/{flow_run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run['state_type']}"
        time.sleep(3)


def test_scheduled_bucket_rebuild_runs_on_the_worker_then_reports_unchanged(
    pipeline_run: dict, demo_config: Path
) -> None:
    """prefect.yaml's hourly `buckets/rebuild`: the server's scheduler queues its runs; two ticks, fired now."""
    env = pipeline_run["env"]
    deployment = prefect_request(env, "GET", "/deployments/name/buckets/rebuild")
    crons = [(s["schedule"].get("cron"), s["active"]) for s in deployment["schedules"]]
    assert ("0 * * * *", True) in crons

    # The scheduler service (a loop in the Prefect server) creates the upcoming runs by itself.
    deadline = time.monotonic() + 180
    while True:
        scheduled = prefect_request(
            env,
            "POST",
            "/flow_runs/filter",
            {
                "deployments": {"id": {"any_": [deployment["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 5,
            },
        )
        if len(scheduled) >= 2:
            break
        assert time.monotonic() < deadline, f"the scheduler queued {len(scheduled)} runs of buckets/rebuild"
        time.sleep(5)
    for run in scheduled:  # on the hour, as the cron says
        assert run["expected_start_time"][14:19] == "00:00", run["expected_start_time"]

    # Bring the next two ticks forward to now, pointed at this test's data; the worker runs them in turn.
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    import mlflow

    statuses = []
    for run in scheduled[:2]:
        prefect_request(env, "PATCH", f"/flow_runs/{run['id']}", {"parameters": {"config": str(demo_config)}})
        now = datetime.datetime.now(datetime.UTC).isoformat()
        prefect_request(
            env,
            "POST",
            f"/flow_runs/{run['id']}/set_state",
            {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": now}}, "force": True},
        )
        final = wait_for_final_state(env, run["id"])
        assert final["state_type"] == "COMPLETED", final["state"]
        tagged = mlflow.MlflowClient().search_runs(
            [mlflow.get_experiment_by_name("opensora").experiment_id],
            filter_string=f"tags.prefect_flow_run_id = '{run['id']}'",
        )
        assert len(tagged) == 1
        statuses.append(tagged[0].data.tags["bucket_rebuild"])
    # The first tick finds what the pipeline run built (or builds it); the second has nothing to do.
    assert statuses[0] in ("unchanged", "rebuilt")
    assert statuses[1] == "unchanged"
