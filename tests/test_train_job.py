"""The TrainJob the workers get: the schema's settings and defaults, absolute paths, picklable."""

import pickle

import pytest
from mmengine import Config

from opensora_core.config.schema import validate_config
from opensora_core.errors import ConfigError
from opensora_core.train.job import TrainJob, train_job


def minimal_config(**overrides) -> Config:
    return Config(
        dict(
            model=dict(type="STDiT3-XL/2", hidden_size=32, depth=1, num_heads=2),
            vae=dict(type="VideoAutoencoderKL", from_pretrained="vae-dir"),
            text_encoder=dict(type="t5", from_pretrained="t5-dir", model_max_length=8),
            scheduler=dict(type="rflow"),
            dataset=dict(type="VideoTextDataset", num_frames=2, image_size=(32, 32)),
        )
        | overrides
    )


def test_unset_settings_take_the_schemas_defaults():
    job = train_job(minimal_config(), snapshot_dir=None, output_dir="/runs/000")
    assert job.settings == validate_config(minimal_config(), mode="train").training
    assert (job.settings.epochs, job.settings.num_workers, job.settings.grad_accum) == (1000, 4, 1)
    assert (job.settings.seed, job.settings.log_every, job.settings.ema_decay) == (1024, 10, 0.9999)


def test_set_settings_and_run_keys_reach_the_job():
    cfg = minimal_config(
        epochs=5, num_workers=1, grad_accum=2, max_steps=4, mask_ratios={"random": 0.5}, seed=42,
        synthetic_data=dict(num_batches=6, batch_size=2, num_frames=2, height=32, width=32),
    )  # fmt: skip
    job = train_job(
        cfg, snapshot_dir=None, output_dir="/runs/000", mlflow_run_id="abc", checkpoint_uri="s3://b/r"
    )
    assert (job.settings.epochs, job.settings.num_workers, job.settings.grad_accum) == (5, 1, 2)
    assert (job.settings.max_steps, job.settings.seed) == (4, 42)
    assert job.mask_ratios == {"random": 0.5}
    assert job.synthetic_data == dict(num_batches=6, batch_size=2, num_frames=2, height=32, width=32)
    assert (job.output_dir, job.mlflow_run_id, job.checkpoint_uri) == ("/runs/000", "abc", "s3://b/r")
    assert job.model_type == "STDiT3-XL/2"
    assert "epochs = 5" in job.config_text


def test_grad_accum_below_one_is_refused():
    with pytest.raises(ConfigError, match="grad_accum=0: must be >= 1"):
        train_job(minimal_config(grad_accum=0), snapshot_dir=None, output_dir="/runs/000")


def test_local_pretrained_and_load_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae-dir").mkdir()
    job = train_job(
        minimal_config(load="ckpt/epoch0-global_step2"), snapshot_dir=None, output_dir="/runs/000"
    )
    assert job.vae["from_pretrained"] == str(tmp_path / "vae-dir")
    assert job.text_encoder["from_pretrained"] == "t5-dir"  # not a local path: a hub name stays as it is
    assert job.settings.load == str(tmp_path / "ckpt/epoch0-global_step2")


def test_job_pickles_to_an_equal_job():
    job = train_job(minimal_config(mask_ratios={"random": 0.5}), snapshot_dir="/snap", output_dir="/runs/000")
    copy = pickle.loads(pickle.dumps(job))
    assert isinstance(copy, TrainJob) and copy == job
    assert all(type(section) is dict for section in (copy.model, copy.vae, copy.scheduler, copy.dataset))


def test_a_config_without_a_vae_is_refused_before_any_worker_starts():
    cfg = minimal_config(vae=None)
    with pytest.raises(ConfigError, match="^vae: missing"):
        train_job(cfg, snapshot_dir=None, output_dir="/runs/000")
