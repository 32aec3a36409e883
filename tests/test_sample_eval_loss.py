"""eval-loss: Open-Sora's eval_loss.py at tiny sizes, per bucket and timestep, fixed noise, logged at each step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bucket_snapshots import write_snapshot
from conftest import grey_clip
from safetensors.torch import save_file

from opensora_core import cli
from opensora_core.data.scan import scan
from opensora_core.models.tiny_random import create_tiny_pretrained
from opensora_core.sample.eval_loss import eval_config, eval_loss_checkpoints, validation_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMESTEPS = 3


def write_config(directory: Path, pretrained, extra: str = "") -> Path:
    path = directory / f"eval_tiny{abs(hash(extra)) % 1000}.py"
    path.write_text(
        f"_base_ = [{str(REPO / 'configs/opensora-v1-2/misc/eval_loss.py')!r}]\n"
        'bucket_config = {"_delete_": True, "144p": {1: (None, 2), 17: (None, 2)}}\n'
        f"num_eval_timesteps = {TIMESTEPS}\nnum_workers = 0\ndtype = 'fp32'\n"
        "model = dict(_delete_=True, type='STDiT3-XL/2', hidden_size=32, depth=1, num_heads=2,\n"
        "             enable_flash_attn=False, enable_layernorm_kernel=False)\n"
        f"vae = dict(_delete_=True, type='VideoAutoencoderKL', from_pretrained={str(pretrained.vae)!r},\n"
        "           local_files_only=True)\n"
        f"text_encoder = dict(_delete_=True, type='t5', from_pretrained={str(pretrained.t5)!r},\n"
        "                    model_max_length=8, local_files_only=True)\n" + extra
    )
    return path


def write_checkpoint(run_dir: Path, cfg, step: int, seed: int) -> Path:
    import torch

    from opensora_core.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model.as_dict(), in_channels=4, caption_channels=32, model_max_length=8)
    checkpoint = run_dir / f"epoch0-global_step{step}"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint / "ema.safetensors")
    (checkpoint / "running_states.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_loss")
    clips = root / "clips"
    clips.mkdir()
    for i in range(3):
        grey_clip(clips / f"clip{i}.mp4", num_frames=20, height=144, width=256)
        (clips / f"clip{i}.txt").write_text(f"a grey clip {i}")
    meta = scan(clips, root / "meta.parquet", workers=1, progress=False).metadata_path
    pretrained = create_tiny_pretrained(root / "pretrained")
    config = write_config(root, pretrained, f"val_data_path = {str(meta)!r}\n")
    cfg, _ = eval_config(config)
    write_checkpoint(root / "run", cfg, 2, seed=1)
    write_checkpoint(root / "run", cfg, 4, seed=2)
    results = eval_loss_checkpoints(config, root / "run", progress=False)
    return {"root": root, "meta": meta, "pretrained": pretrained, "config": config, "results": results}


def test_every_checkpoint_gets_the_loss_of_each_bucket_at_evenly_spaced_timesteps(setup):
    first, second = setup["results"]
    assert (first.global_step, second.global_step) == (2, 4)
    assert first.timesteps == [250.0, 500.0, 750.0]
    assert list(first.per_timestep) == ["144p-17"]  # no image among the clips: 144p-1 has no sample
    assert first.samples == {"144p-17": 3}
    assert len(first.per_timestep["144p-17"]) == TIMESTEPS
    assert first.mean == pytest.approx(sum(first.per_timestep["144p-17"]) / TIMESTEPS)
    assert first.per_bucket != second.per_bucket  # other weights


def test_fixed_noise_and_timesteps_repeat_the_losses_exactly(setup, tmp_path):
    again = eval_loss_checkpoints(setup["config"], setup["root"] / "run", output_dir=tmp_path, progress=False)
    assert [r.per_timestep for r in again] == [r.per_timestep for r in setup["results"]]


def test_results_and_a_plot_per_resolution_are_written_beside_the_checkpoints(setup):
    out = setup["root"] / "run" / "eval_loss" / "step_000004"
    saved = json.loads((out / "eval_loss.json").read_text())
    assert saved["per_bucket"] == setup["results"][1].per_bucket
    assert (out / "loss_vs_timestep_144p.png").stat().st_size > 1000


def test_losses_go_to_mlflow_at_the_checkpoints_step_and_the_command_ends_with_a_summary(
    setup, tmp_path, monkeypatch, capsys
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("eval-loss", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment).info.run_id  # artifacts in the test's directory, not ./mlruns
    assert cli.main(["eval-loss", str(setup["config"]), "--checkpoint", str(setup["root"] / "run"),
                     "--output", str(tmp_path / "out"), "--mlflow-run-id", run]) == 0  # fmt: skip
    history = client.get_metric_history(run, "eval_loss/144p-17")
    assert [(m.step, m.value) for m in history] == [
        (r.global_step, r.per_bucket["144p-17"]) for r in setup["results"]
    ]
    assert [m.step for m in client.get_metric_history(run, "eval_loss/mean")] == [2, 4]
    artifacts = [a.path for a in client.list_artifacts(run, "eval_loss/step_000002")]
    assert "eval_loss/step_000002/loss_vs_timestep_144p.png" in artifacts
    err = capsys.readouterr().err
    assert (
        "eval-loss of 2 checkpoint(s) in " in err
        and f"over 3 held-out samples, under {tmp_path / 'out'}" in err
    )
    assert f"MLflow run: {run} in sqlite:///" in err
    [log] = [line.removeprefix("log: ") for line in err.splitlines() if line.startswith("log: ")]
    assert Path(log).parent == tmp_path / "logs" and Path(log).name.startswith("eval-loss-")


def test_val_fraction_splits_the_snapshot_by_path_hash(setup, tmp_path):
    import pyarrow.parquet as pq

    snapshot = write_snapshot(tmp_path / "s", pq.read_table(setup["meta"]), {"144p": {17: (1.0, 1)}})

    def split(fraction):
        cfg, _ = eval_config(write_config(tmp_path, setup["pretrained"], f"val_fraction = {fraction}\n"))
        return validation_table(cfg, snapshot).column("path").to_pylist()

    small, large = split(0.4), split(0.9999)
    assert split(0.4) == small  # the same rows every time
    assert set(small) <= set(large) and len(large) == 3  # a larger fraction only adds rows


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("val_fraction = 1e-12\n", "val_fraction=1e-12 of 3 samples: the validation split is empty"),
        (
            'bucket_config = {"_delete_": True, "999p": {17: (None, 2)}}\n',
            'bucket_config["999p"]: unknown resolution',
        ),
        ("val_fraction = None\n", "val_fraction=None: set it within (0, 1), or set val_data_path"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, tmp_path, capsys, extra, message):
    import pyarrow.parquet as pq

    snapshot = write_snapshot(tmp_path / "s", pq.read_table(setup["meta"]), {"144p": {17: (1.0, 1)}})
    config = write_config(tmp_path, setup["pretrained"], extra)
    argv = ["eval-loss", str(config), "--checkpoint", str(setup["root"] / "run"), "--snapshot", str(snapshot)]
    assert cli.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_two_ray_train_workers_give_exactly_the_losses_of_one(setup, shared_ray, tmp_path, monkeypatch):
    import torch

    shared_ray.ensure(trains=True)
    checkpoint = setup["root"] / "run" / "epoch0-global_step4"
    # 3 clips at batch size 2: two batches, one for each worker
    (on_two,) = eval_loss_checkpoints(
        setup["config"], checkpoint, output_dir=tmp_path / "two", num_workers=2, progress=False
    )
    # one worker, in this process: one thread, as each Ray worker of one CPU has (the float sums of a
    # matrix product follow the thread count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (alone,) = eval_loss_checkpoints(
            setup["config"], checkpoint, output_dir=tmp_path / "one", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    assert (on_two.global_step, on_two.samples) == (4, {"144p-17": 3})
    assert on_two.per_timestep == alone.per_timestep
    assert on_two.per_bucket == pytest.approx(setup["results"][1].per_bucket, rel=1e-6)  # two threads
    saved = json.loads((tmp_path / "two" / "step_000004" / "eval_loss.json").read_text())
    assert saved["per_bucket"] == alone.per_bucket
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["step_000004"]  # Ray's run state is removed
