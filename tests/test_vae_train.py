"""VAE training (Open-Sora's train_vae.py) through `opensora train`'s loop: config checks on the driver,
then tiny stage1 / stage3 runs on Ray Train + DeepSpeed (CPU, gloo), their checkpoints loaded as the
diffusion configs' OpenSoraVAE_V1_2, and an exact resume."""

from pathlib import Path

import pytest
import torch
from vae_media import write_vae_media

from opensora_core.config import load_config
from opensora_core.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
RELEASE_CONFIGS = [
    "inference/image.py",
    "inference/video.py",
    "train/stage1.py",
    "train/stage2.py",
    "train/stage3.py",
]
LOSS_PARTS = {"nll_loss", "kl_loss", "z_nll_loss"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_vae_media(tmp_path_factory.mktemp("vae-train"))


def tiny(media, stage: str, **options):
    """configs/vae/train/{stage}.py at 9 x 32 x 32 with the tiny VAEs, on one worker."""
    overrides = {
        "dataset.num_frames": 9,
        "dataset.image_size": (32, 32),
        "model.from_pretrained": None,
        "model.vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": str(media.pretrained.vae)},
        "model.vae_temporal": {"type": "VAE_Temporal_SD", "filters": 8, "num_res_blocks": 1, "num_groups": 4},
        "lpips_path": str(media.lpips),
        "dtype": "fp32",
        "num_workers": 0,
        "num_train_workers": 1,
        "lr": 1e-3,
        **options,
    }
    return load_config(REPO / f"configs/vae/train/{stage}.py", cfg_options=overrides, mode="train")


@pytest.mark.parametrize("name", RELEASE_CONFIGS)
def test_release_vae_configs_load_as_vae_models(name):
    cfg = load_config(REPO / "configs/vae" / name)
    assert cfg.is_vae_model and cfg.scheduler is None and cfg.text_encoder is None
    assert cfg.mode == ("train" if name.startswith("train") else "sample")
    assert cfg.vae_loss.perceptual_loss_weight == 0.1 and cfg.vae_loss.kl_loss_weight == 1e-6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model.bogus": 1}, "model.bogus is not a VideoAutoencoderPipeline option"),
        ({"mixed_strategy": "mixed_sometimes"}, "mixed_strategy='mixed_sometimes' is unknown"),
        (
            {"discriminator": {"type": "DISCRIMINATOR_3D"}},
            "discriminator.type='DISCRIMINATOR_3D' is not supported",
        ),
        ({"lecam_loss_weight": 0.1}, "lecam_loss_weight=0.1: Open-Sora v1.2's train_vae.py cannot use it"),
        ({"dataset.type": "VariableVideoTextDataset"}, "dataset.type='VariableVideoTextDataset' is unknown"),
    ],
)
def test_bad_vae_keys_are_refused_in_one_line(media, options, message):
    with pytest.raises(ConfigError) as err:
        tiny(media, "stage1", **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def refused_before_ray(media, tmp_path, monkeypatch, **options) -> str:
    from opensora_core.parallel import launch
    from opensora_core.train import train

    monkeypatch.setattr(launch, "connect_ray", lambda *_: pytest.fail("Ray started"))
    with pytest.raises((ConfigError, CheckpointError)) as err:
        train(
            tiny(media, "stage1", **options), snapshot_dir=None, clips=str(media.media / "meta.parquet"),
            output_dir=str(tmp_path), mlflow_run_id=None, num_workers=1,
        )  # fmt: skip
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def scanned(media):
    from opensora_core.data.scan import scan

    scan(media.media, media.media / "meta.parquet", progress=False)


def test_perceptual_loss_without_local_lpips_weights_is_refused_before_ray(
    media, scanned, tmp_path, monkeypatch
):
    message = refused_before_ray(media, tmp_path, monkeypatch, lpips_path=None)
    assert message.startswith("perceptual_loss_weight=0.1: needs lpips_path")
    message = refused_before_ray(media, tmp_path, monkeypatch, lpips_path=str(tmp_path / "vgg.pth"))
    assert message.startswith("lpips_path=") and "no such file" in message


def test_missing_image_vae_weights_and_too_few_clips_are_refused_before_ray(
    media, scanned, tmp_path, monkeypatch
):
    message = refused_before_ray(
        media,
        tmp_path,
        monkeypatch,
        **{"model.vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "nowhere"}},
    )
    assert message.startswith("model.vae_2d.from_pretrained='nowhere': no local AutoencoderKL")
    message = refused_before_ray(media, tmp_path, monkeypatch, batch_size=4)
    assert "3 of 3 files give a 9-frame clip" in message


# ---------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def env(shared_ray, media, scanned, tmp_path_factory):
    import mlflow

    shared_ray.ensure(trains=True)
    root = tmp_path_factory.mktemp("vae-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("RAY_ADDRESS", raising=False)
        experiment = mlflow.MlflowClient().create_experiment(
            "vae-train-tests", artifact_location=str(root / "artifacts")
        )
        yield {"root": root, "experiment": experiment}


def run(env, media, cfg, name):
    import mlflow

    from opensora_core.train import train

    run_id = mlflow.MlflowClient().create_run(env["experiment"], run_name=name).info.run_id
    result = train(
        cfg, snapshot_dir=None, clips=str(media.media / "meta.parquet"), output_dir=str(env["root"] / name),
        mlflow_run_id=run_id, num_workers=1,
    )  # fmt: skip
    return result, run_id


def history(run_id, name) -> list[float]:
    import mlflow

    return [
        m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, name), key=lambda m: m.step)
    ]


STAGE3 = {
    "discriminator": {"type": "NLayerDiscriminator", "ndf": 4, "n_layers": 2},
    "discriminator_start": 1,  # step 0 trains without the GAN term, the others with it
    "max_steps": 3,
    "ckpt_every": 2,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def stage3(env, media):
    return run(env, media, tiny(media, "stage3", **STAGE3), "stage3")


def test_stage1_trains_and_its_checkpoint_is_a_v1_2_vae_for_diffusion(env, media):
    from opensora_core.models.registry import build_vae

    cfg = tiny(media, "stage1", max_steps=2, ckpt_every=2, log_every=1, mixed_image_ratio=0.5)
    result, run_id = run(env, media, cfg, "stage1")
    assert result.global_step == 2
    for name in LOSS_PARTS | {"loss", "image_identity_loss"}:
        assert len(history(run_id, name)) == 2, name
    assert all(v > 0 for v in history(run_id, "z_nll_loss"))
    # the fixed-size clips are one loss group; tokens are the latent positions the clips encode to
    assert history(run_id, "loss/32x32-9") == pytest.approx(history(run_id, "loss"))
    assert all(v > 0 for v in history(run_id, "tokens_per_s"))
    import mlflow

    (version,) = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    assert version.name == "opensora-stage1" and version.tags["checkpoint_uri"] == result.checkpoint

    diffusion = load_config(
        REPO / "configs/opensora-v1-2/train/stage1.py",
        cfg_options={"vae.from_pretrained": result.checkpoint, "text_encoder.from_pretrained": "unused"},
    )
    assert diffusion.vae.type == "OpenSoraVAE_V1_2"
    vae = build_vae(diffusion.vae.as_dict())
    z = vae.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1)
    assert z.shape == (1, 4, 3, 4, 4) and torch.isfinite(z).all()


def test_stage3_with_a_discriminator_logs_every_loss(stage3):
    result, run_id = stage3
    assert result.global_step == 3
    for name in LOSS_PARTS | {"adversarial_loss", "disc_loss"}:
        assert len(history(run_id, name)) == 3, name
    assert history(run_id, "adversarial_loss")[0] == 0  # before discriminator_start
    assert history(run_id, "disc_loss")[0] == 0 and history(run_id, "disc_loss")[1] > 0
    checkpoint = Path(result.exp_dir) / "epoch0-global_step2"
    assert (checkpoint / "discriminator.safetensors").is_file() and (checkpoint / "ds_discriminator").is_dir()


def test_resumed_stage3_repeats_the_uninterrupted_step_3(env, media, stage3):
    step2 = Path(stage3[0].exp_dir) / "epoch0-global_step2"
    result, run_id = run(env, media, tiny(media, "stage3", **STAGE3, load=str(step2)), "stage3-resumed")
    assert result.global_step == 3
    for name in ("loss", "disc_loss", "adversarial_loss", "nll_loss"):
        assert history(run_id, name) == pytest.approx(history(stage3[1], name)[2:], rel=1e-6, abs=0), name
