"""infra/ray/: the Ray cluster launcher config and the KubeRay RayJob pass the checks `ray up` and the
Kubernetes API server would make, and run our `opensora train` on every GPU they declare.

`kubectl apply --dry-run=client` needs an API server even for discovery, so CI checks schemas instead:
Ray's own cluster schema and validator, the Kubernetes API schema (kubernetes-validate) for pod
templates and the volume claim, and the RayJob CRD's types for the RayJob's own fields.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY_DIR = REPO / "infra" / "ray"
IMAGE_REPO_DIR = "/home/ray/opensora"  # where infra/ray/Dockerfile puts this repository
SHARED = "/mnt/shared"  # the shared storage, at the same path on every node
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for

INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {"type": "object"}  # checked against the Kubernetes API schema on its own

# The RayJob CRD (ray.io/v1, ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go), reduced to the fields our manifest may use, with their CRD types and enums.
# A field not listed here is rejected: add it, with its type, when the manifest starts using it.
WORKER_GROUP_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "minReplicas", "maxReplicas", "template"],
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "numOfHosts": {**INT32, "minimum": 1},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
    },
}
RAYJOB_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": STRING_MAP},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "backoffLimit": INT32,
                "activeDeadlineSeconds": INT32,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": INT32,
                "suspend": {"type": "boolean"},
                "metadata": STRING_MAP,
                "submitterPodTemplate": POD_TEMPLATE,
                "rayClusterSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "authOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "mode": {"enum": ["disabled", "token"]},
                                "secretName": {"type": "string"},
                            },
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["template"],
                            "properties": {
                                "rayStartParams": STRING_MAP,
                                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "template": POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP_SCHEMA},
                    },
                },
            },
        },
    },
}


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load((RAY_DIR / "cluster.yaml").read_text())


def load_rayjob_file() -> dict[str, dict[str, Any]]:
    """The documents of rayjob.yaml by kind."""
    documents = [d for d in yaml.safe_load_all((RAY_DIR / "rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in documents}


def pod_templates(job: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = job["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def worker_group(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def worker_container(job: dict[str, Any]) -> dict[str, Any]:
    return worker_group(job)["template"]["spec"]["containers"][0]


def validate_cluster(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it calls the cloud: Ray's defaults filled in, then Ray's schema.
    Returns the config with Ray's defaults, as `ray up` would use it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def validate_rayjob(job: dict[str, Any]) -> None:
    """What the API server and KubeRay's webhook check: the RayJob's fields against the CRD's types,
    each pod template against the Kubernetes API (strict: unknown fields are errors)."""
    jsonschema.Draft202012Validator(RAYJOB_SCHEMA).validate(job)
    for name, template in pod_templates(job):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
    for group in job["spec"]["rayClusterSpec"].get("workerGroupSpecs", []):
        replicas = group.get("replicas", group["minReplicas"])
        if not group["minReplicas"] <= replicas <= group["maxReplicas"]:
            raise ValueError(
                f"workerGroupSpecs[{group['groupName']}]: replicas must lie in [minReplicas, maxReplicas]"
            )


def test_cluster_config_passes_ray_up_validation():
    prepared = validate_cluster(load_cluster())
    nodes = prepared["available_node_types"]
    assert {name: (n["min_workers"], n["max_workers"], n["resources"]) for name, n in nodes.items()} == {
        "head": (0, 0, {"CPU": 16, "GPU": 0}),  # Ray gives the head no workers of its own type
        "gpu_h100x8": (2, 4, {"CPU": 192, "GPU": 8}),
    }
    assert (prepared["head_node_type"], prepared["max_workers"]) == ("head", 4)


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        pytest.param(
            lambda c: c["available_node_types"]["gpu_h100x8"].update(min_worker=2),
            "'min_worker' was unexpected",
            id="misspelled-node-type-key",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_h100x8"]["resources"].update(GPU="8"),
            "'8' is not of type 'integer'",
            id="gpu-count-as-string",
        ),
        pytest.param(
            lambda c: c["docker"].update(image_name="x"), "'image_name' was unexpected", id="docker-typo"
        ),
    ],
)
def test_cluster_config_validation_rejects_mistakes(mistake: Callable[[dict], None], message: str):
    config = load_cluster()
    mistake(config)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        validate_cluster(config)


def test_cluster_trains_on_the_gpu_workers_only():
    types = load_cluster()["available_node_types"]
    assert types["head"]["resources"]["GPU"] == 0  # the head's GPU is the evaluator's, not Ray Train's
    assert types["gpu_h100x8"]["resources"]["GPU"] == 8
    assert types["gpu_h100x8"]["min_workers"] >= 1


def test_cluster_nodes_start_ray_with_token_auth():
    config = load_cluster()
    starts = [
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c
    ]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path


def test_rayjob_passes_crd_and_kubernetes_schema_checks():
    documents = load_rayjob_file()
    assert set(documents) == {"PersistentVolumeClaim", "RayJob"}
    validate_rayjob(documents["RayJob"])
    kubernetes_validate.validate(documents["PersistentVolumeClaim"], K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        pytest.param(
            lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
            "0 is not of type 'string'",
            id="rayStartParams-value-not-a-string",
        ),
        pytest.param(
            lambda j: j["spec"].update(shutdownAfterJobFinish=True),
            "'shutdownAfterJobFinish' was unexpected",
            id="misspelled-rayjob-field",
        ),
        pytest.param(
            lambda j: j["spec"].update(submissionMode="Batch"),
            "'Batch' is not one of",
            id="unknown-submission-mode",
        ),
        pytest.param(
            lambda j: worker_group(j).update(replicas="2"),
            "'2' is not of type 'integer'",
            id="replicas-as-string",
        ),
        pytest.param(
            lambda j: worker_container(j).update(volumeMount=[]),
            "'volumeMount' was unexpected",
            id="misspelled-container-field",
        ),
        pytest.param(
            lambda j: worker_container(j)["resources"]["limits"].update({"nvidia.com/gpu": [8]}),
            "is not valid under any of the given schemas",
            id="gpu-limit-not-a-quantity",
        ),
        pytest.param(
            lambda j: worker_group(j).update(replicas=3), "replicas must lie in", id="more-replicas-than-max"
        ),
    ],
)
def test_rayjob_validation_rejects_mistakes(mistake: Callable[[dict], None], message: str):
    job = load_rayjob_file()["RayJob"]
    mistake(job)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_rayjob(job)


def test_rayjob_entrypoint_trains_on_every_gpu_of_the_cluster(monkeypatch, capsys):
    from opensora_core import cli, console, stages

    job = load_rayjob_file()["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["opensora", "train"]
    assert argv[2].startswith(IMAGE_REPO_DIR + "/")
    assert f"WORKDIR {IMAGE_REPO_DIR}\n" in (RAY_DIR / "Dockerfile").read_text()
    # Run the real CLI up to the launch; the config path inside the image is this checkout here.
    launched: dict[str, Any] = {}

    def capture_launch(cfg: Any, **kwargs: Any) -> Any:
        launched.update(cfg=cfg, **kwargs)
        return type(
            "Result", (), {"checkpoint": None, "global_step": 0, "final_loss": None, "elapsed": 0.0}
        )()

    monkeypatch.setattr(stages, "run_training", capture_launch)
    # the command's log file belongs under the cluster's shared storage (outputs), not on this machine
    monkeypatch.setattr(console, "log_to", lambda directory, command: None)
    assert cli.main([arg.replace(IMAGE_REPO_DIR, str(REPO)) for arg in argv[1:]]) == 0

    cfg = launched["cfg"]
    gpus = sum(
        group["replicas"]
        * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus == 16
    assert (launched["num_workers"] or cfg.training.num_train_workers) == gpus
    assert cfg.training.outputs == f"{SHARED}/outputs"
    assert cfg.dataset.options["data_path"] == f"{SHARED}/data"
    assert cfg.raw.vae.from_pretrained.startswith(SHARED + "/")
    assert cfg.raw.text_encoder.from_pretrained.startswith(SHARED + "/")


def test_every_node_sees_the_shared_storage_at_the_same_path():
    documents = load_rayjob_file()
    claim = documents["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, template in pod_templates(documents["RayJob"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert (
                volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            ), name
    cluster = load_cluster()
    assert f"-v {SHARED}:{SHARED}" in cluster["docker"]["run_options"]
    assert any(f"mountpoint -q {SHARED}" in c for c in cluster["initialization_commands"])


def test_manifests_use_one_ray_version():
    image = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu")
    cluster_version = image.fullmatch(load_cluster()["docker"]["image"]).group(1)
    dockerfile_version = image.search((RAY_DIR / "Dockerfile").read_text()).group(1)
    job = load_rayjob_file()["RayJob"]
    assert cluster_version == dockerfile_version == job["spec"]["rayClusterSpec"]["rayVersion"]
    images = {c["image"] for _, t in pod_templates(job) for c in t["spec"]["containers"]}
    assert len(images) == 1  # head and workers run the same build of infra/ray/Dockerfile
