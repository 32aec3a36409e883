"""Pre-flight check: a snapshot that gives no full step is refused on the driver before Ray starts, in one line;
kept buckets that can never fill a batch are named in a warning."""

import logging

import pytest
from bucket_snapshots import clip_table, write_snapshot
from mmengine import Config

from opensora_core import cli
from opensora_core.config.schema import validate_config
from opensora_core.data.sampler import BucketBatchSampler
from opensora_core.data.snapshot import open_snapshot
from opensora_core.errors import ConfigError
from opensora_core.parallel import launch
from opensora_core.train import train
from opensora_core.train.preflight import preflight, step_plan

# 7 + 3 clips in 240p (16 frames, images), 5 in 144p (16 frames)
CLIPS = [(40, 240, 426)] * 7 + [(1, 240, 426)] * 3 + [(40, 144, 256)] * 5


def bucket_config(bs_240_16=2, bs_240_1=2, bs_144_16=4):
    return {"240p": {16: (1.0, bs_240_16), 1: (1.0, bs_240_1)}, "144p": {16: (1.0, bs_144_16)}}


def training_config(buckets, **overrides) -> Config:
    return Config(
        dict(
            model=dict(type="STDiT3-XL/2", hidden_size=32, depth=1, num_heads=2),
            vae=dict(type="VideoAutoencoderKL", from_pretrained="vae-dir"),
            text_encoder=dict(type="t5", from_pretrained="t5-dir", model_max_length=8),
            scheduler=dict(type="rflow"),
            dataset=dict(type="VariableVideoTextDataset", data_path="clips"),
            bucket_config=buckets,
        )
        | overrides
    )


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: the check must refuse before it."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launch, "connect_ray", refuse)


@pytest.mark.parametrize(
    ("num_workers", "sp_size", "grad_accum"), [(1, 1, 1), (2, 1, 1), (2, 1, 2), (4, 2, 1)]
)
def test_steps_per_epoch_are_the_samplers(tmp_path, num_workers, sp_size, grad_accum):
    snapshot = open_snapshot(write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config()))
    plan = step_plan(snapshot.manifest, num_workers=num_workers, sp_size=sp_size, grad_accum=grad_accum)
    sampler = BucketBatchSampler(snapshot, num_replicas=num_workers, sp_size=sp_size, drop_last=True)
    assert plan.full_batches == 3 + 1 + 1
    assert plan.steps_per_epoch == len(sampler) // grad_accum


def test_no_full_step_is_refused_before_ray_starts_naming_the_starved_buckets(tmp_path, no_ray):
    # batch sizes as Open-Sora's stage1 for 11 clips: every bucket is short of a batch
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config(20, 475, 40))
    with pytest.raises(ConfigError) as err:
        train(
            training_config(bucket_config(20, 475, 40)),
            snapshot_dir=str(snapshot), output_dir=str(tmp_path / "runs"), mlflow_run_id=None, num_workers=2,
        )  # fmt: skip
    message = str(err.value)
    assert "\n" not in message
    assert (
        "no full training step; a step takes 2 full batches (2 data-parallel ranks), the buckets give 0"
        in message
    )
    assert "240p-16-0.56: 7 samples < batch size 20 x 2" in message
    assert "144p-16-0.56: 5 samples < batch size 40 x 2" in message
    assert 'bucket_config["240p"][16] batch size 3' in message
    assert "fewer training workers (num_train_workers)" in message
    assert not (tmp_path / "runs").exists()  # nothing written


def test_grad_accum_counts_in_a_step(tmp_path, no_ray):
    # 5 full batches on 2 ranks give 2 micro-batches each: grad_accum 3 leaves no step
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config())
    with pytest.raises(
        ConfigError, match=r"a step takes 6 full batches \(2 data-parallel ranks x grad_accum 3\)"
    ):
        train(
            training_config(bucket_config(), grad_accum=3),
            snapshot_dir=str(snapshot), output_dir=str(tmp_path / "runs"), mlflow_run_id=None, num_workers=2,
        )  # fmt: skip


def test_kept_buckets_that_never_fill_a_batch_are_named_in_a_warning(tmp_path, caplog):
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config(bs_240_1=4, bs_144_16=8))
    cfg = validate_config(training_config(bucket_config(bs_240_1=4, bs_144_16=8)), mode="train")
    with caplog.at_level(logging.WARNING, logger="opensora_core.train.preflight"):
        plan = preflight(cfg, snapshot_dir=str(snapshot), num_workers=1)
    assert plan.steps_per_epoch == 3
    warning = caplog.records[-1].getMessage()
    assert "2 kept bucket(s) can never fill a batch" in warning
    assert "144p-16-0.56 (5 samples < batch size 8)" in warning
    assert "240p-1-0.56 (3 samples < batch size 4)" in warning


def test_the_cli_refuses_in_one_line_with_exit_2(tmp_path, no_ray, capsys):
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config(20, 475, 40))
    config = tmp_path / "stage1.py"
    config.write_text(training_config(bucket_config(20, 475, 40), outputs=str(tmp_path / "out")).pretty_text)
    assert cli.main(["train", str(config), "--snapshot", str(snapshot), "--num-train-workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bucket snapshot ") and "\n" not in err
    assert not (tmp_path / "out").exists()
