"""Ray Train + DeepSpeed ZeRO-2 on CPU workers (gloo): a tiny STDiT3 trained end to end.

One local Ray (2 CPUs) serves three short runs of the same config, each logging to its own MLflow run:
two ZeRO-2 workers; one worker accumulating two micro-batches (the same global batch in one
process); and the two-worker run resumed from its step-2 checkpoint.
"""

from pathlib import Path

import pytest
from mmengine import Config

from opensora_core.models.tiny_random import create_tiny_pretrained

pytestmark = pytest.mark.slow

STEPS = 4  # 3 steps per epoch on 2 workers: the run crosses an epoch boundary
# fp32 sums in another order (gloo all-reduce vs local accumulation) change losses in the 7th digit
LOSS_TOLERANCE = 1e-5


def tiny_config(pretrained, **overrides) -> Config:
    return Config(
        dict(
            model=dict(
                type="STDiT3-XL/2",
                hidden_size=32,
                depth=1,
                num_heads=2,
                enable_flash_attn=False,
                enable_layernorm_kernel=False,
                freeze_y_embedder=True,
            ),
            vae=dict(type="VideoAutoencoderKL", from_pretrained=str(pretrained.vae), local_files_only=True),
            text_encoder=dict(
                type="t5", from_pretrained=str(pretrained.t5), model_max_length=8, local_files_only=True
            ),
            scheduler=dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal"),
            mask_ratios={"random": 0.2, "quarter_head": 0.2, "image_head": 0.2},
            # the clips' shape; the batches are synthetic_data's, no media is read
            dataset=dict(type="VideoTextDataset", num_frames=2, image_size=(32, 32)),
            synthetic_data=dict(num_batches=6, batch_size=2, num_frames=2, height=32, width=32),
            dtype="fp32",
            plugin="zero2",
            grad_clip=1.0,
            lr=1e-3,
            warmup_steps=2,
            ema_decay=0.9,
            adam_eps=1e-15,
            seed=42,
            epochs=5,
            max_steps=STEPS,
            log_every=1,
            ckpt_every=2,
        )
        | overrides
    )


@pytest.fixture(scope="module")
def env(shared_ray, tmp_path_factory):
    """The session's local Ray (2 CPUs, tests/conftest.py) and an MLflow store private to this module;
    the training launcher forwards MLFLOW_TRACKING_URI and OPENSORA_CACHE to the workers."""
    import mlflow

    shared_ray.ensure(trains=True)
    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("OPENSORA_CACHE", str(root / "cache"))
        mp.delenv("RAY_ADDRESS", raising=False)
        experiment = mlflow.MlflowClient().create_experiment(
            "train-tests", artifact_location=str(root / "artifacts")
        )
        yield {
            "root": root,
            "experiment": experiment,
            "pretrained": create_tiny_pretrained(root / "pretrained"),
        }


def run(env, name, num_workers, **overrides):
    import mlflow

    from opensora_core.train import train

    run_id = mlflow.MlflowClient().create_run(env["experiment"], run_name=name).info.run_id
    result = train(
        tiny_config(env["pretrained"], **overrides),
        snapshot_dir=None,
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


@pytest.fixture(scope="module")
def one_worker(env):
    return run(env, "one-worker", 1, grad_accum=2)


@pytest.fixture(scope="module")
def resumed(env, two_workers):
    result, _ = two_workers
    step2 = Path(result.exp_dir) / "epoch0-global_step2"
    return run(env, "resumed", 2, load=str(step2))


def test_two_zero2_workers_match_one_process_with_the_same_global_batch(two_workers, one_worker):
    distributed, single = losses(two_workers[1]), losses(one_worker[1])
    assert len(distributed) == STEPS
    assert distributed == pytest.approx(single, rel=LOSS_TOLERANCE, abs=0)


def test_checkpoints_every_ckpt_every_steps_and_at_the_end(two_workers):
    result, _ = two_workers
    exp_dir = Path(result.exp_dir)
    assert exp_dir.name == "000-STDiT3-XL-2"
    saved = sorted(p.name for p in exp_dir.iterdir() if p.name.startswith(("epoch", ".tmp")))
    assert saved == ["epoch0-global_step2", "epoch1-global_step4"]
    assert result.checkpoint == str(exp_dir / "epoch1-global_step4")
    assert result.global_step == STEPS
    assert result.final_loss == pytest.approx(losses(two_workers[1])[-1])
    assert {"model.safetensors", "ema.safetensors", "ds", "sampler.json", "config.py"} <= {
        p.name for p in Path(result.checkpoint).iterdir()
    }


def test_checkpoint_weights_load_into_the_configured_model(env, two_workers):
    import torch
    from safetensors.torch import load_file

    from opensora_core.models.registry import build_model, load_model_weights

    model = build_model(
        dict(tiny_config(env["pretrained"]).model), in_channels=4, caption_channels=32, model_max_length=8
    )
    for name in ("model.safetensors", "ema.safetensors"):
        saved = load_file(Path(two_workers[0].checkpoint) / name)
        load_model_weights(model, Path(two_workers[0].checkpoint) / name, type_name="STDiT3-XL/2")
        loaded = model.state_dict()
        assert sorted(loaded) == sorted(saved)
        assert all(torch.equal(loaded[key], saved[key]) for key in saved), name


def test_mlflow_run_has_step_metrics_bucket_loss_and_checkpoint_tags(two_workers):
    import mlflow

    result, run_id = two_workers
    data = mlflow.MlflowClient().get_run(run_id).data
    metrics = {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time", "loss/32x32-2"}
    assert metrics <= set(data.metrics) and "bucket" not in data.metrics
    lrs = [
        m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, "lr"), key=lambda m: m.step)
    ]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])  # warmup_steps=2, then constant
    # one bucket: its series is the step loss
    assert [
        m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "loss/32x32-2")
    ] == pytest.approx(losses(run_id))
    assert data.tags["checkpoint.latest"] == result.checkpoint
    assert {"lineage.config_hash", "lineage.code_commit"} <= set(data.tags)  # synthetic clips: no snapshot


def test_resumed_run_repeats_the_uninterrupted_losses(two_workers, resumed):
    uninterrupted, after_resume = losses(two_workers[1]), losses(resumed[1])
    assert len(after_resume) == STEPS - 2
    assert after_resume == pytest.approx(uninterrupted[2:], rel=1e-6, abs=0)
    assert resumed[0].global_step == STEPS


def test_a_one_worker_checkpoint_resumes_on_two_workers(env, one_worker, two_workers):
    """The one-worker run (plugin zero2, run as ZeRO stage 1) and the two-worker run train on the same
    global batches; resumed on two workers, the one-worker checkpoint (its optimizer state in one piece)
    continues with the two-worker run's losses: DeepSpeed re-splits it through a universal checkpoint."""
    step2 = Path(one_worker[0].exp_dir) / "epoch0-global_step2"
    result, run_id = run(env, "one-to-two", 2, load=str(step2))
    assert losses(run_id) == pytest.approx(losses(two_workers[1])[2:], rel=LOSS_TOLERANCE, abs=0)
    assert result.global_step == STEPS
    universal = env["root"] / "cache" / "universal"  # the machine's copy: made, then removed once loaded
    assert universal.is_dir() and not list(universal.iterdir())


def test_checkpoint_of_another_model_type_is_refused_before_launch(env, two_workers):
    from opensora_core.errors import CheckpointError
    from opensora_core.train import train

    cfg = tiny_config(env["pretrained"], load=two_workers[0].checkpoint)
    cfg.model.type = "STDiT3-3B/2"
    with pytest.raises(CheckpointError, match="STDiT3-XL/2"):
        train(
            cfg, snapshot_dir=None, output_dir=str(env["root"] / "refused"), mlflow_run_id=None, num_workers=2
        )


def test_a_users_error_in_a_worker_reaches_the_caller_as_itself(env):
    from opensora_core.errors import CheckpointError
    from opensora_core.train import train

    cfg = tiny_config(env["pretrained"])
    cfg.vae.from_pretrained = str(env["root"] / "no-such-vae")
    with pytest.raises(CheckpointError, match="no-such-vae"):
        train(
            cfg, snapshot_dir=None, output_dir=str(env["root"] / "broken"), mlflow_run_id=None, num_workers=1
        )


@pytest.fixture(scope="module")
def sequence_parallel(env):
    """2 workers as one SP group (dp_size 1) accumulating 2 micro-batches: one_worker's global batch."""
    return run(env, "sequence-parallel", 2, plugin="zero2-seq", sp_size=2, grad_accum=2)


def test_sp2_run_matches_one_process_with_the_same_global_batch(sequence_parallel, one_worker):
    split, single = losses(sequence_parallel[1]), losses(one_worker[1])
    assert len(split) == STEPS
    assert split == pytest.approx(single, rel=LOSS_TOLERANCE, abs=0)
    assert sequence_parallel[0].global_step == STEPS


def test_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(env, two_workers):
    """Rank 1 dies as the step-4 checkpoint starts (rank 0 is half-way through writing it); Ray Train
    restarts both workers from the step-2 checkpoint and the run finishes with whole checkpoints only."""
    import mlflow

    from opensora_core.parallel.launch import run_training
    from opensora_core.train import new_experiment_dir
    from opensora_core.train.job import train_job

    marker = env["root"] / "killed.marker"

    def train_loop_killing_rank1_once(job):
        # runs in the Ray worker: a fresh process per attempt, so `calls` restarts with it
        import os

        from opensora_core.train import loop

        original, calls = loop.save_checkpoint, []

        def save_or_die(*args, **kwargs):
            calls.append(kwargs["states"].global_step)
            if kwargs["rank"] == 1 and len(calls) == 2 and not marker.exists():
                marker.write_text(f"killed rank 1 at global step {calls[-1]}\n")
                os._exit(1)
            return original(*args, **kwargs)

        loop.save_checkpoint = save_or_die
        loop.train_loop_per_worker(job)

    run_id = mlflow.MlflowClient().create_run(env["experiment"], run_name="killed").info.run_id
    cfg = tiny_config(env["pretrained"])
    exp_dir = new_experiment_dir(env["root"] / "killed", cfg.model.type)
    job = train_job(cfg, snapshot_dir=None, output_dir=str(exp_dir), mlflow_run_id=run_id)
    result = run_training(
        train_loop_killing_rank1_once,
        job,
        num_workers=2,
        use_gpu=False,
        ray_address=None,
        storage_path=str(exp_dir.parent),
        run_name=exp_dir.name,
        max_failures=1,
    )

    assert result.error is None
    assert marker.read_text() == "killed rank 1 at global step 4\n"
    assert result.checkpoint.path == str(exp_dir / "epoch1-global_step4")
    saved = sorted(p.name for p in exp_dir.iterdir() if p.name.startswith(("epoch", ".tmp")))
    assert saved == ["epoch0-global_step2", "epoch1-global_step4"]  # the half-written .tmp- is gone
    for name in saved:
        assert (exp_dir / name / "running_states.json").is_file()
    # the first attempt logged steps 1-4, the restart steps 3-4 again: each time the uninterrupted loss
    uninterrupted = losses(two_workers[1])
    logged = sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, "loss"))
    assert [step for step, _ in logged] == [1, 2, 3, 3, 4, 4]
    assert [value for _, value in logged] == pytest.approx(
        [uninterrupted[step - 1] for step, _ in logged], rel=LOSS_TOLERANCE, abs=0
    )
