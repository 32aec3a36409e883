"""Config errors through the `opensora` command line: exit code 2, one line on stderr naming the key and
what would be valid, and nothing written (no scan, no snapshot, no run directory, no samples).

Each test runs the CLI in-process from a fresh working directory holding only the config, a small
media folder and (for --load) a checkpoint, and compares the files there before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from opensora_core.cli import main as cli_main
from opensora_core.data.demo_data import write_video
from opensora_core.train.checkpoint import RUNNING_STATES, RunningStates

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/opensora-v1-2/train/demo.py"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path with `media/` (one captioned clip big enough for 144p): relative outputs land here."""
    media = tmp_path / "media"
    media.mkdir()
    frames = np.random.default_rng(0).integers(0, 256, (20, 144, 256, 3), dtype=np.uint8)
    write_video(media / "clip.mp4", frames, fps=24)
    (media / "clip.txt").write_text("noise")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_config(workdir: Path, extra: str) -> Path:
    path = workdir / "cfg.py"
    path.write_text(f'_base_ = ["{DEMO}"]\noutputs = "outputs"\ndata_path = "media"\n{extra}\n')
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(argv: list[str], workdir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `opensora ARGV`; asserts that it wrote nothing under `workdir`."""
    before = files_under(workdir)
    code = cli_main(argv)
    assert files_under(workdir) == before
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        pytest.param(
            'bucket_config = {"144p": {1: (0.0, None), 17: (0.0, None)}, "_delete_": True}',
            [],
            "error: bucket_config: every bucket has keep_prob 0, so no sample would be kept",
            id="bucket-config-keeps-nothing",
        ),
        pytest.param(
            "sp_size = 2",
            ["--num-train-workers", "3"],
            "error: sp_size=2 must divide num_train_workers=3; valid sp_size values: [1, 3]",
            id="sp-size-does-not-divide-the-workers-given-on-the-command-line",
        ),
        pytest.param(
            "num_train_workers = 4\nsp_size = 4\nmodel = dict(num_heads=6)",
            [],
            "error: sp_size=4 must divide model.num_heads=6; valid sp_size values: [1, 2, 3, 6]",
            id="sp-size-does-not-divide-the-heads",
        ),
        pytest.param(
            "eval_image_size = (8, 8)",
            [],
            "error: eval_image_size=(8, 8): expected (height, width), two integers >= 16 "
            "(the VAE downsamples 8x, the model takes 2x2 latent patches)",
            id="eval-image-size-smaller-than-one-patch",
        ),
    ],
)
def test_train_with_a_bad_key_exits_2_with_one_line_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], extra: str, args: list[str], message: str
) -> None:
    config = train_config(workdir, extra)
    code, err = run_cli(["train", str(config), "--data-path", "media", *args], workdir, capsys)
    assert code == 2
    assert err == [message]


def test_train_loading_a_checkpoint_of_another_model_type_exits_2_before_scanning(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = workdir / "old-run" / "epoch0-global_step6"
    checkpoint.mkdir(parents=True)
    states = RunningStates(epoch=0, step=6, global_step=6, batch_size=4, model_type="STDiT2-XL/2")
    (checkpoint / RUNNING_STATES).write_text(json.dumps(asdict(states)))
    config = train_config(workdir, "")
    code, err = run_cli(
        ["train", str(config), "--data-path", "media", "--load", str(checkpoint)], workdir, capsys
    )
    assert code == 2
    assert err == [
        f"error: load={checkpoint}: checkpoint of model 'STDiT2-XL/2', but model.type is 'STDiT3-XL/2'"
    ]


def test_train_loading_a_missing_checkpoint_exits_2_naming_it(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = train_config(workdir, "")
    code, err = run_cli(["train", str(config), "--data-path", "media", "--load", "nowhere"], workdir, capsys)
    assert code == 2
    assert err == ["error: nowhere: checkpoint directory does not exist"]


def test_sample_with_an_image_size_below_one_patch_exits_2_and_writes_no_sample(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = workdir / "sample.py"
    config.write_text(
        f'_base_ = ["{REPO / "configs/opensora-v1-2/inference/sample.py"}"]\nsave_dir = "samples"\n'
    )
    code, err = run_cli(
        ["sample", str(config), "--image-size", "8", "12", "--prompt", "a cat"], workdir, capsys
    )
    assert code == 2
    assert err == [
        "error: image_size=(8, 12): expected (height, width), two integers >= 16 "
        "(the VAE downsamples 8x, the model takes 2x2 latent patches)"
    ]


def test_train_config_error_is_one_stderr_line_from_the_installed_command(workdir: Path) -> None:
    """The same through a real process: no log lines or traceback around the error."""
    config = train_config(workdir, "sp_size = 3")
    before = files_under(workdir)
    proc = subprocess.run(
        [sys.executable, "-m", "opensora_core.cli", "train", str(config), "--data-path", "media"],
        capture_output=True,
        text=True,
        cwd=workdir,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: sp_size=3 must divide num_train_workers=2; valid sp_size values: [1, 2]"
    ]
    assert files_under(workdir) == before
