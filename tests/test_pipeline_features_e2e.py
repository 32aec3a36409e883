"""`train/v1.2` from features through the real services: scan → bucket → precompute → train → evaluate.

The config asks for features (`load_video_features` / `load_text_features`), so the flow runs the
precompute task between bucket and train; the training workers read the stored latents and captions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline_e2e import LOCAL, PREFECT, REPO, client_env, prefect_api

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="infra/local targets Linux"),
]


@pytest.fixture(scope="module")
def features_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo config on freshly written demo media, training from features for two steps."""
    from opensora_core.data.demo_data import make_demo_data
    from opensora_core.models.tiny_random import create_tiny_pretrained

    root = tmp_path_factory.mktemp("demo-features")
    make_demo_data(root / "data")
    weights = create_tiny_pretrained(root / "data" / "pretrained")
    config = root / "e2e_features.py"
    config.write_text(
        f'_base_ = ["{REPO / "configs/opensora-v1-2/train/demo.py"}"]\n'
        f'dataset = dict(data_path="{root / "data"}")\n'
        f'vae = dict(from_pretrained="{weights.vae}")\n'
        f'text_encoder = dict(from_pretrained="{weights.t5}")\n'
        f'outputs = "{root / "outputs"}"\n'
        "load_video_features = True\nload_text_features = True\n"
        "max_steps = 2\nckpt_every = 2\n"
    )
    return config


@pytest.fixture(scope="module")
def features_run(service_stack, features_config: Path) -> dict:
    service_stack.ensure_up()
    deploy = subprocess.run(
        [str(LOCAL / "deploy")], env=service_stack.env, capture_output=True, text=True, timeout=300
    )
    assert deploy.returncode == 0, f"deploy failed:\n{deploy.stdout}\n{deploy.stderr}"
    env = client_env(service_stack.state_dir)
    run = subprocess.run(
        [str(PREFECT), "deployment", "run", "train/v1.2", "--param", f"config={features_config}", "--watch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )
    return {"returncode": run.returncode, "output": run.stdout + run.stderr, "env": env}


def test_the_flow_precomputes_then_trains_from_the_features(
    features_run: dict, features_config: Path
) -> None:
    assert features_run["returncode"] == 0, features_run["output"][-6000:]
    env = features_run["env"]
    flow_runs = prefect_api(env, "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}, "limit": 20})
    ours = [r for r in flow_runs if r["parameters"].get("config") == str(features_config)]
    assert len(ours) == 1 and ours[0]["state_type"] == "COMPLETED", [r["state_type"] for r in ours]
    task_runs = prefect_api(
        env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [ours[0]["id"]]}}, "limit": 50}
    )
    names = [r["name"].split("-")[0] for r in task_runs]
    assert {"scan", "bucket", "precompute", "train", "evaluate"} <= set(names), names
    assert all(r["state_type"] == "COMPLETED" for r in task_runs)

    # The feature snapshot on disk is the one MLflow names, made for the bucket snapshot it names.
    from opensora_core.features.store import open_features

    features = open_features(features_config.parent / "outputs" / "features")
    manifest = features.manifest
    assert manifest.num_errors == 0 and manifest.num_encoded == manifest.num_samples > 0

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("opensora")
    parent = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{ours[0]['id']}'"
    )[0]
    children = {
        r.data.tags["stage"]: r
        for r in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
    }
    assert set(children) == {"scan", "bucket", "precompute", "plan", "train", "evaluate"}
    precompute, train = children["precompute"], children["train"]
    assert precompute.data.tags["feature_snapshot"] == manifest.feature_id
    assert precompute.data.tags["bucket_snapshot"] == manifest.bucket_snapshot_id
    assert precompute.data.metrics["rows_encoded"] == manifest.num_encoded
    assert {a.path for a in client.list_artifacts(precompute.info.run_id, "features")} >= {
        "features/manifest.json"
    }
    assert train.data.tags["feature_snapshot"] == manifest.feature_id
    assert parent.data.tags["feature_snapshot"] == manifest.feature_id
    loss = client.get_metric_history(train.info.run_id, "loss")
    assert len(loss) == 2 and all(m.value == m.value and m.value > 0 for m in loss)
    # evaluation sampled the checkpoint with the VAE and text encoder built again
    assert client.get_metric_history(train.info.run_id, "eval/sampling_seconds")
