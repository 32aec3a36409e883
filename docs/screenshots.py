"""Take the README's two screenshots: the MLflow training run and the Prefect flow run of the last demo.

Run after `make demo` (the services still up), with Debian's chromium and playwright-core:
    apt-get install -y chromium nodejs npm pngquant && npm install --prefix /tmp/pw playwright-core@1
    NODE_PATH=/tmp/pw/node_modules .venv/bin/python docs/screenshots.py
It finds the newest `train/v1.2` pipeline run in MLflow, opens its training run and its Prefect flow
run (docs/screenshots.js waits for each single-page app to render), and writes docs/mlflow-run.png and
docs/prefect-flow-run.png at 1280x800. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def newest_pipeline(client) -> tuple[str, str, str]:
    """(experiment id, training run id, Prefect flow run id) of the newest pipeline run in MLflow."""
    experiment = client.get_experiment_by_name("opensora")
    parents = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'pipeline'", order_by=["attributes.start_time DESC"]
    )
    if not parents:
        raise SystemExit("no pipeline run in MLflow: run `make demo` first")
    parent = parents[0]
    train = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'train'",
    )[0]
    return experiment.experiment_id, train.info.run_id, parent.data.tags["prefect_flow_run_id"]


def screenshot(url: str, out: Path) -> None:
    """`url` at 1280x800 through docs/screenshots.js (Playwright driving Debian's chromium), then
    quantised with pngquant when it is there."""
    if shutil.which("chromium") is None or shutil.which("node") is None:
        raise SystemExit("needs chromium and node: apt-get install -y chromium nodejs npm pngquant")
    subprocess.run(["node", str(REPO / "docs/screenshots.js"), url, str(out)], check=True, timeout=180)
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--output", str(out), "64", str(out)])
    print(f"{out.relative_to(REPO)}: {out.stat().st_size // 1024} KiB  ({url})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=os.environ.get("OPENSORA_STATE_DIR", REPO / ".state"), type=Path)
    args = parser.parse_args()
    env = json.loads((args.state / "env.json").read_text())
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    import mlflow

    experiment_id, train_run, flow_run = newest_pipeline(mlflow.MlflowClient())
    mlflow_ui = env["MLFLOW_TRACKING_URI"].rstrip("/")
    prefect_ui = env["PREFECT_API_URL"].removesuffix("/api")
    screenshot(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{train_run}", REPO / "docs/mlflow-run.png")
    screenshot(f"{prefect_ui}/runs/flow-run/{flow_run}", REPO / "docs/prefect-flow-run.png")


if __name__ == "__main__":
    main()
