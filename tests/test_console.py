"""What a user sees on the console: a progress bar, warnings to act on and a summary; Ray's and the
libraries' logs in the command's log file (`--verbose` shows them too).

One demo-sized `opensora train` runs as a user runs it, in a subprocess with its own local Ray; the
routing itself is checked in-process on records shaped as Ray hands them to the driver.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rich.progress import Progress

from opensora_core import console
from opensora_core.cli import _config_args, _shows_logs, build_parser
from opensora_core.train.progress import TrainingBar

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "opensora-v1-2" / "train" / "demo.py"
# Ray and library internals a 2-step demo train printed before the console was routed
INTERNALS = ("PreemptionWatcher", "TrainController", "Running Dataset", "Total Progress", "Warning:")
MAX_CONSOLE_LINES = 14  # log path, scan summary (6), our preflight warning, the bar, summary (3), result


@pytest.fixture
def routed(tmp_path):
    """Routing as the CLI sets it up once Ray is imported (connect_ray routes again after `ray.init`); undone
    afterwards."""
    import ray.data  # noqa: F401 (installs Ray Data's console handler, which the routing takes away)

    def start(verbose: bool) -> Path:
        console.start(verbose=verbose)
        console.log_to(tmp_path, "test")
        return console.open_log()

    yield start
    console.stop()


def ray_batch(*lines: str, actor: str = "TrainController") -> dict:
    """Lines of a Ray worker's output as Ray's log monitor hands them to the driver."""
    return {"pid": 4242, "actor_name": actor, "is_err": True, "lines": list(lines), "ip": "127.0.0.1"}


def test_ray_internals_go_to_the_log_file_only(routed, capsys):
    path = routed(verbose=False)
    logging.getLogger("ray.data").info("Running Dataset: bucket-build")
    console.relay_worker_lines(ray_batch("Started training worker group of size 2"))
    err = capsys.readouterr().err
    assert err == ""
    text = path.read_text()
    assert "INFO ray.data: Running Dataset: bucket-build" in text
    assert "(TrainController pid=4242) Started training worker group of size 2" in text


def test_our_workers_warnings_reach_the_console_at_their_level(routed, capsys):
    path = routed(verbose=False)
    console.relay_worker_lines(
        ray_batch(
            "WARNING opensora_core.train.loop: rank 1: a batch failed to load",
            "INFO opensora_core.train.loop: epoch 0 step 1 global_step 1 loss 2.87255",
            actor="RayTrainWorker",
        )
    )
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "WARNING opensora_core.train.loop: (RayTrainWorker pid=4242) rank 1: a batch failed to load"
    ]
    assert "INFO opensora_core.train.loop: (RayTrainWorker pid=4242) epoch 0 step 1" in path.read_text()


def test_verbose_shows_the_internals_on_the_console_too(routed, capsys):
    path = routed(verbose=True)
    logging.getLogger("ray.data").info("Running Dataset: bucket-build")
    console.relay_worker_lines(ray_batch("Started training worker group of size 2"))
    err = capsys.readouterr().err
    assert "INFO ray.data: Running Dataset: bucket-build" in err
    assert "INFO worker_output: (TrainController pid=4242) Started training worker group of size 2" in err
    assert "Started training worker group" in path.read_text()


def test_records_before_the_log_file_opens_are_written_to_it(tmp_path):
    console.start(verbose=False)
    try:
        logging.getLogger("opensora_core.config").info("loaded before the output directory is known")
        path = console.log_to(tmp_path, "test")
        assert not path.exists()  # until there is something to keep: a refused command writes nothing
        assert console.open_log() == path
        assert "loaded before the output directory is known" in path.read_text()
    finally:
        console.stop()


def test_verbose_is_a_switch_on_every_command_and_open_soras_level_on_sample():
    parser = build_parser()
    train = parser.parse_args(["train", "cfg.py", "--verbose"])
    assert _shows_logs(train) and "verbose" not in _config_args(train)
    assert not _shows_logs(parser.parse_args(["scan", "media", "--output", "m.parquet"]))
    sample = parser.parse_args(["sample", "cfg.py", "--verbose", "2"])
    assert _shows_logs(sample) and _config_args(sample)["verbose"] == 2  # still Open-Sora's config key
    assert not _shows_logs(parser.parse_args(["sample", "cfg.py", "--verbose", "1"]))


def test_training_bar_counts_max_steps_and_shows_the_last_logged_loss():
    with Progress(disable=True) as bar:
        drawn = TrainingBar(bar, max_steps=12, epochs=4)
        drawn.show({})  # before rank 0's first step: nothing
        drawn.show({"epoch": 1, "step": 2, "steps_per_epoch": 5, "global_step": 7})
        drawn.show(
            {"epoch": 1, "step": 2, "steps_per_epoch": 5, "global_step": 7, "loss": 0.5, "samples_per_s": 3}
        )
        task = bar.tasks[0]
        assert (task.completed, task.total, task.description) == (7, 12, "train epoch 2/4")
        assert task.fields == {"loss": "loss 0.5000", "samples": "3.0 samples/s"}


def test_training_bar_without_max_steps_counts_the_epoch():
    with Progress(disable=True) as bar:
        drawn = TrainingBar(bar, max_steps=None, epochs=3)
        drawn.show({"epoch": 0, "step": 4, "steps_per_epoch": 4, "global_step": 4})
        drawn.show({"epoch": 1, "step": 1, "steps_per_epoch": 6, "global_step": 5})
        task = bar.tasks[0]
        assert (task.completed, task.total, task.description) == (1, 6, "train epoch 2/3")


@pytest.mark.slow
def test_demo_train_console_is_quiet_and_its_log_file_holds_the_internals(tmp_path):
    """`opensora train` of the demo config for 2 steps, stdout and stderr together as a terminal shows them."""
    from opensora_core.data.demo_data import make_demo_data
    from opensora_core.models.tiny_random import create_tiny_pretrained

    make_demo_data(tmp_path / "demo_data")
    create_tiny_pretrained(tmp_path / "demo_data" / "pretrained")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "OPENSORA_"))}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "opensora_core.cli", "train", str(DEMO_CONFIG), "--cfg-options", "max_steps=2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(lines) <= MAX_CONSOLE_LINES, done.stdout
    for noise in (*INTERNALS, "DeprecationWarning", "FutureWarning", "RayTrainWorker"):
        assert noise not in done.stdout, noise
    assert re.search(r"^train epoch 1/4 .* 2/2 .*steps/s.* loss \d\.\d{4} .*samples/s$", done.stdout, re.M)
    assert "trained to global step 2 in " in done.stdout
    assert json.loads(lines[-1])["global_step"] == 2

    [log_path] = [Path(tmp_path, line.removeprefix("log: ")) for line in lines if line.startswith("log: ")]
    log = log_path.read_text()
    assert log_path.parent == tmp_path / "outputs" / "demo" / "logs"
    assert "(TrainController pid=" in log and "Started training worker group of size 2" in log
    assert "Starting execution of Dataset bucket-build" in log  # its readable name
    assert re.search(
        r"opensora_core.train.loop: \(RayTrainWorker pid=\d+\) epoch 0 step 2 global_step 2", log
    )
    assert "all_gather_into_tensor" not in log  # DeepSpeed's one deprecation is filtered in the workers
