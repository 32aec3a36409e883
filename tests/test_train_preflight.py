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


# ---------------------------------------------------------------- the validation split sits out of training

HELD_OUT = 0.4  # holds out rows 1, 4 (144p-16), 7 (240p-1) and 10-13 (240p-16) of the snapshot's 15


def held_out_config(buckets, **overrides):
    return validate_config(training_config(buckets, val_fraction=HELD_OUT, **overrides), mode="train")


def test_training_batches_are_disjoint_from_the_eval_loss_split_and_together_they_are_the_snapshot(tmp_path):
    from opensora_core.data.batches import build_batches
    from opensora_core.sample.eval_loss import validation_table
    from opensora_core.train.job import train_job

    buckets = bucket_config(1, 1, 1)  # batch size 1: every training row is yielded
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), buckets)
    cfg = held_out_config(buckets)
    job = train_job(cfg, snapshot_dir=str(snapshot), output_dir=str(tmp_path / "run"))
    paths = open_snapshot(snapshot).full_table()["path"].to_pylist()
    trained = []
    for rank in range(2):  # what each of two training workers is given
        batches = build_batches(
            snapshot_dir=job.snapshot_dir, dataset=job.dataset, synthetic_data=None, rank=rank, world_size=2,
            seed=job.settings.seed, num_workers=0, val_fraction=job.settings.val_fraction,
        )  # fmt: skip
        trained += [paths[int(name.split("-")[0])] for batch in batches.sampler for name in batch]
    validation = validation_table(cfg, snapshot)["path"].to_pylist()
    assert len(trained) == len(set(trained)) == 8 and len(validation) == 7
    assert set(trained).isdisjoint(validation)
    assert set(trained) | set(validation) == set(paths)


def test_preflight_and_plan_count_only_the_training_rows(tmp_path, caplog):
    from opensora_core.train.preflight import training_plan

    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config())
    cfg = held_out_config(bucket_config())
    with caplog.at_level(logging.INFO, logger="opensora_core.train.preflight"):
        plan = preflight(cfg, snapshot_dir=str(snapshot), num_workers=1)
    held = [r.getMessage() for r in caplog.records if "held out" in r.getMessage()]
    assert held == [
        "val_fraction=0.4: 7 of 15 snapshot rows held out of training for eval-loss (7 of the 15 kept ones)"
    ]
    assert {b.key.id: b.count for b in plan.buckets} == {
        "144p-16-0.56": 3,
        "240p-1-0.56": 2,
        "240p-16-0.56": 3,
    }
    assert (plan.full_batches, plan.steps_per_epoch) == (2, 2)  # 5 and 5 with every row
    assert [b.key.id for b in plan.never_full()] == ["144p-16-0.56"]  # 3 samples < batch size 4
    sampler = BucketBatchSampler(
        open_snapshot(snapshot),
        drop_last=True,
        rows=[i for i in range(15) if i not in (1, 4, 7, 10, 11, 12, 13)],
    )
    assert len(sampler) == plan.steps_per_epoch
    # `opensora plan` counts the same rows
    assert training_plan(open_snapshot(snapshot), cfg.training, num_workers=1) == plan


def test_a_separate_val_data_path_holds_nothing_of_the_snapshot_out(tmp_path):
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config())
    cfg = held_out_config(bucket_config(), val_data_path=str(tmp_path / "val.parquet"))
    assert cfg.training.val_fraction is None
    assert preflight(cfg, snapshot_dir=str(snapshot), num_workers=1).full_batches == 5


def test_a_hold_out_that_leaves_no_full_step_is_refused_in_one_line(tmp_path, no_ray):
    # 2 ranks need 2 full batches: all 15 rows give 3 at batch sizes 4 / 2 / 4, the 8 training rows give 1
    snapshot = write_snapshot(tmp_path / "s", clip_table(CLIPS), bucket_config(4, 2, 4))
    with pytest.raises(ConfigError, match="no full training step; a step takes 2 full batches") as err:
        train(
            training_config(bucket_config(4, 2, 4), val_fraction=HELD_OUT),
            snapshot_dir=str(snapshot), output_dir=str(tmp_path / "runs"), mlflow_run_id=None, num_workers=2,
        )  # fmt: skip
    assert "240p-16-0.56: 3 samples < batch size 4 x 2" in str(err.value)  # 7 samples before the hold-out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", [1.5, 1, -0.1, "a quarter"])
def test_a_val_fraction_outside_0_1_is_refused_when_the_config_loads(value):
    with pytest.raises(ConfigError, match=r"^val_fraction=.*: set it within \(0, 1\), or set val_data_path$"):
        validate_config(training_config(bucket_config(), val_fraction=value), mode="train")
