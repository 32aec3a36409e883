"""Open-Sora's stage1_feat.py at tiny size on Ray Train + DeepSpeed (CPU, gloo), from a feature snapshot.

The config has no vae / text_encoder sections, so a worker that built either would fail: the runs
train on stored latents and captions only. One local Ray (tests/conftest.py) serves three runs: two
workers for 4 steps (2 per epoch), and its step-2 checkpoint resumed on two workers and on one
worker accumulating two micro-batches (the same global batches).
"""

from pathlib import Path

import pytest
from feature_snapshots import encoder_sections, grey_media, write_bucket_snapshot, write_feature_snapshot

from opensora_core.config.load import read_config
from opensora_core.models.tiny_random import create_tiny_pretrained

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
LOSS_TOLERANCE = 1e-5  # gloo's all-reduce sums in another order than local accumulation


@pytest.fixture(scope="module")
def env(shared_ray, tmp_path_factory):
    import mlflow

    shared_ray.ensure(trains=True)
    root = tmp_path_factory.mktemp("train-features")
    pretrained = create_tiny_pretrained(root / "pretrained")
    snapshot = write_bucket_snapshot(grey_media(root / "media", 9), root / "buckets")
    vae, t5 = encoder_sections(pretrained)
    features = write_feature_snapshot(root / "features", snapshot, vae, t5, failed=(8,))  # 8 rows: 4 batches
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("OPENSORA_CACHE", str(root / "cache"))
        mp.delenv("RAY_ADDRESS", raising=False)
        experiment = mlflow.MlflowClient().create_experiment(
            "train-features-tests", artifact_location=str(root / "artifacts")
        )
        yield {"root": root, "experiment": experiment, "features": features}


def stage1_feat(env, **overrides):
    """configs/opensora-v1-2/train/stage1_feat.py at tiny size, on the module's feature snapshot."""
    cfg = read_config(REPO / "configs/opensora-v1-2/train/stage1_feat.py")
    cfg.merge_from_dict(
        dict(
            model=dict(
                hidden_size=32, depth=1, num_heads=2, enable_flash_attn=False, enable_layernorm_kernel=False
            ),
            vae_out_channels=4,
            model_max_length=8,
            text_encoder_output_dim=32,
            dtype="fp32",
            grad_checkpoint=False,
            num_workers=0,
            lr=1e-3,
            seed=42,
            epochs=5,
            max_steps=STEPS,
            log_every=1,
            ckpt_every=2,
            outputs=str(env["root"] / "outputs"),
        )  # fmt: skip
    )
    cfg.merge_from_dict(overrides)
    return cfg


def run(env, name, num_workers, **overrides):
    import mlflow

    from opensora_core.train import train

    run_id = mlflow.MlflowClient().create_run(env["experiment"], run_name=name).info.run_id
    result = train(
        stage1_feat(env, **overrides),
        snapshot_dir=None,  # the bucket snapshot the features were made for
        features=str(env["root"] / "features"),
        output_dir=str(env["root"] / name),
        mlflow_run_id=run_id,
        num_workers=num_workers,
    )
    return result, run_id


def losses(run_id) -> list[float]:
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def two_workers(env):
    return run(env, "two-workers", 2)


def test_stage1_feat_trains_on_two_workers_without_encoders(two_workers, env):
    import mlflow

    result, run_id = two_workers
    assert result.global_step == STEPS and len(losses(run_id)) == STEPS
    assert all(loss > 0 for loss in losses(run_id))
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert tags["feature_snapshot"] == env["features"].manifest.feature_id
    assert tags["lineage.feature_snapshot"] == env["features"].manifest.feature_id
    assert tags["lineage.bucket_snapshot"] == env["features"].manifest.bucket_snapshot_id
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert "loss/144p-2" in metrics and "bucket" not in metrics


def test_resumed_from_features_repeats_the_uninterrupted_losses(env, two_workers):
    step2 = Path(two_workers[0].exp_dir) / "epoch0-global_step2"
    result, run_id = run(env, "resumed", 2, load=str(step2))
    assert losses(run_id) == pytest.approx(losses(two_workers[1])[2:], rel=1e-6, abs=0)
    assert result.global_step == STEPS


def test_resumed_on_one_worker_accumulating_two_micro_batches(env, two_workers):
    step2 = Path(two_workers[0].exp_dir) / "epoch0-global_step2"
    result, run_id = run(env, "one-worker", 1, load=str(step2), grad_accum=2)
    assert losses(run_id) == pytest.approx(losses(two_workers[1])[2:], rel=LOSS_TOLERANCE, abs=0)
    assert result.global_step == STEPS
