"""Training from a feature snapshot, without Ray: batches through the bucket sampler (failed clips sit
out, one view per epoch), the step from stored features against the step from raw video, the
driver's lineage refusals, and Open-Sora's feature configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feature_snapshots import encoder_sections, grey_media, write_bucket_snapshot, write_feature_snapshot
from mmengine import Config

from opensora_core.config import load_config
from opensora_core.config.schema import validate_config
from opensora_core.data.batches import FeatureBatches
from opensora_core.data.dataset import collate_fn
from opensora_core.errors import ConfigError
from opensora_core.features.dataset import FeatureDataset, view_of
from opensora_core.features.lineage import feature_input, sampling_config
from opensora_core.models.tiny_random import create_tiny_pretrained

FAILED = 3  # the clip that failed at precompute


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    pretrained = create_tiny_pretrained(root / "pretrained")
    snapshot = write_bucket_snapshot(grey_media(root / "media", 7), root / "buckets")
    vae, t5 = encoder_sections(pretrained)
    features = write_feature_snapshot(root / "features", snapshot, vae, t5, views=2, failed=(FAILED,))
    return {"root": root, "pretrained": pretrained, "snapshot": snapshot, "features": features}


def feature_config(data, **overrides) -> Config:
    vae, t5 = encoder_sections(data["pretrained"])
    return Config(
        dict(
            model=dict(
                type="STDiT3-XL/2",
                hidden_size=32,
                depth=1,
                num_heads=2,
                enable_flash_attn=False,
                enable_layernorm_kernel=False,
            ),
            vae=vae,
            text_encoder=t5,
            scheduler=dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal"),
            dataset=dict(type="VariableVideoTextDataset"),
            bucket_config={"144p": {2: (1.0, 2)}},
            load_video_features=True,
            load_text_features=True,
            feature_snapshot=str(data["root"] / "features"),
            dtype="fp32",
            seed=42,
        )  # fmt: skip
        | overrides
    )


def test_failed_clips_sit_out_and_every_other_row_is_batched(data):
    batches = FeatureBatches(
        str(data["snapshot"].path), str(data["features"].path), None, video_features=True,
        text_features=True, rank=0, world_size=1, seed=42, num_workers=0,
    )  # fmt: skip
    seen = []
    for epoch in range(2):
        batches.set_epoch(epoch)
        assert len(batches) == 3  # 6 rows with features, two to a batch
        for batch in batches:
            assert batch["latent"].shape == (2, 4, 2, 18, 32) and batch["y"].shape == (2, 1, 8, 32)
            assert batch["mask"].shape == (2, 8) and batches.bucket_of(batch) == "144p-2-0.56"
            seen += batch["index"].tolist()
    assert sorted(set(seen)) == [i for i in range(7) if i != FAILED]


def test_the_validation_split_sits_out_of_feature_training(data):
    from opensora_core.data.validation_split import held_out

    held = set(np.flatnonzero(held_out(data["snapshot"].full_table(), 0.5)).tolist())
    with_features = {i for i in range(7) if i != FAILED}
    assert held & with_features and with_features - held  # both sides of the split have features
    batches = FeatureBatches(
        str(data["snapshot"].path), str(data["features"].path), None, video_features=True,
        text_features=True, rank=0, world_size=1, seed=42, num_workers=0, val_fraction=0.5,
    )  # fmt: skip
    seen = [i for batch in batches for i in batch["index"].tolist()]
    assert len(batches) == len(with_features - held) // 2  # two to a batch, a last odd one left out
    assert set(seen) <= with_features - held and len(seen) == 2 * len(batches)


def test_each_epoch_reads_one_view_drawn_from_seed_epoch_and_sample(data):
    features = data["features"]
    dataset = FeatureDataset(features, video_features=True, text_features=True, seed=42)
    picks = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset["0-2-144-256"]
        view = view_of(42, epoch, 0, 2)
        assert torch.equal(item["latent"], features.sample(0, view)["latent"])
        picks.append(view)
    assert set(picks) == {0, 1}  # both crops are trained on over the epochs
    assert not torch.equal(features.sample(0, 0)["latent"], features.sample(0, 1)["latent"])


def test_text_features_only_decode_the_clip_and_take_the_stored_caption(data):
    batches = FeatureBatches(
        str(data["snapshot"].path), str(data["features"].path), {"transform_name": "resize_crop"},
        video_features=False, text_features=True, rank=0, world_size=1, seed=42, num_workers=0,
    )  # fmt: skip
    batch = next(iter(batches))
    assert batch["video"].shape == (2, 3, 2, 144, 256) and "latent" not in batch
    assert batch["y"].shape == (2, 1, 8, 32)


def test_a_step_from_stored_features_has_the_loss_of_the_step_from_raw_video(data, tmp_path):
    """The stored latents are the VAE's sample under the micro-batch seed, so both steps draw the same
    timesteps, noise and caption dropout (micro_batch_loss reseeds before the loss): the losses are equal."""
    from opensora_core.data.dataset import VariableVideoTextDataset
    from opensora_core.models.registry import build_model, build_text_encoder, build_vae
    from opensora_core.schedulers import build_scheduler
    from opensora_core.train.step import micro_batch_loss, micro_batch_seed

    vae_section, t5_section = encoder_sections(data["pretrained"])
    vae, t5 = build_vae(vae_section).eval(), build_text_encoder(t5_section)
    snapshot = data["snapshot"]
    raw = collate_fn([VariableVideoTextDataset(snapshot, seed=0)[f"{i}-2-144-256"] for i in (0, 1)])
    seed = micro_batch_seed(42, 0, 0)
    torch.manual_seed(seed)
    with torch.no_grad():
        latents = vae.encode(raw["video"])
    stored = write_feature_snapshot(tmp_path, snapshot, vae_section, t5_section, feature_id="same")
    # the rows hold the VAE's sample under the step's seed (the helper used its own seed)
    dataset = FeatureDataset(stored, video_features=True, text_features=True, seed=0)
    items = [dataset[f"{i}-2-144-256"] for i in (0, 1)]
    for item, latent in zip(items, latents, strict=True):
        item["latent"] = latent
    from_features = collate_fn(items)
    torch.manual_seed(0)
    model = build_model(
        dict(type="STDiT3-XL/2", hidden_size=32, depth=1, num_heads=2, enable_flash_attn=False,
             enable_layernorm_kernel=False, class_dropout_prob=0.5),
        in_channels=4, caption_channels=32, model_max_length=8,
    ).train()  # fmt: skip
    scheduler = build_scheduler(dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal"))
    args = dict(seed=seed, device=torch.device("cpu"), dtype=torch.float32)
    loss_raw, *_ = micro_batch_loss(model, scheduler, raw, vae=vae, text_encoder=t5, **args)
    loss_features, *_ = micro_batch_loss(model, scheduler, from_features, vae=None, text_encoder=None, **args)
    assert loss_features.item() == loss_raw.item()


def test_empty_caption_dropout_replaces_captions_with_the_stored_one(data):
    import random

    from opensora_core.train.step import EmptyCaptionDropout

    y, mask = data["features"].empty_caption()
    dropout = EmptyCaptionDropout(y, mask, prob=1.0)
    args = {"y": torch.randn(2, 1, 8, 32), "mask": torch.ones(2, 8, dtype=torch.int64)}
    out = dropout.apply(args, random.Random(0))
    assert torch.equal(out["y"], y[None].expand(2, -1, -1, -1)) and torch.equal(out["mask"][1], mask)
    kept = EmptyCaptionDropout(y, mask, prob=0.0).apply(args, random.Random(0))
    assert torch.equal(kept["y"], args["y"])


def check(data, cfg, **kwargs):
    return feature_input(validate_config(cfg, mode="train"), snapshot_dir=None, features=None, **kwargs)


def test_matching_features_pass_with_the_manifests_sizes(data):
    found = check(data, feature_config(data))
    assert (found.feature_id, found.in_channels, found.caption_channels, found.model_max_length) == (
        "f1",
        4,
        32,
        8,
    )
    assert found.bucket_snapshot_dir == str(data["snapshot"].path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "bucket",
            r"^feature snapshot f1 was made for bucket snapshot b1, but training reads bucket snapshot b2",
        ),
        (
            "vae",
            r"^vae: feature snapshot f1 was made with vae [0-9a-f]{16} \(VideoAutoencoderKL\), the config's is",
        ),
        ("t5", r"^text_encoder: feature snapshot f1 was made with text_encoder [0-9a-f]{16} \(t5\)"),
        ("max_length", r"^text_encoder.model_max_length=16: feature snapshot f1 stores captions of 8 tokens"),
        ("channels", r"^vae_out_channels=16: feature snapshot f1 stores latent channels 4"),
        ("caption_dim", r"^model.caption_channels=64: feature snapshot f1 stores caption width 32"),
        ("missing", r"no _manifest.json or CURRENT there; make one with `opensora precompute`"),
        ("synthetic", r"^synthetic_data: synthetic clips are raw video and captions, but this config trains"),
    ],
)
def test_features_of_another_lineage_are_refused_in_one_line_before_ray(data, monkeypatch, change, message):
    from opensora_core.parallel import launch
    from opensora_core.train import train

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started before the pre-flight refused")

    monkeypatch.setattr(launch, "connect_ray", no_ray)
    other = create_tiny_pretrained(data["root"] / "other", seed=1)
    snapshot_dir = None
    cfg = feature_config(data)
    if change == "bucket":
        snapshot_dir = str(
            write_bucket_snapshot(grey_media(data["root"] / "m2", 2), data["root"] / "b2", "b2").path
        )
    elif change == "vae":
        cfg.vae.from_pretrained = str(other.vae)
    elif change == "t5":
        cfg.text_encoder.from_pretrained = str(other.t5)
    elif change == "max_length":
        cfg.text_encoder.model_max_length = 16
    elif change == "channels":
        cfg.vae_out_channels = 16
    elif change == "caption_dim":
        cfg.model.caption_channels = 64
    elif change == "synthetic":
        cfg.synthetic_data = dict(num_batches=2, batch_size=1, num_frames=1, height=32, width=32)
    else:
        cfg.feature_snapshot = str(data["root"] / "nothing")
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg, snapshot_dir=snapshot_dir, output_dir=str(data["root"] / "runs"), mlflow_run_id=None)
    assert "\n" not in str(err.value)


def test_open_sora_feature_configs_load(data):
    stage1 = load_config("configs/opensora-v1-2/train/stage1_feat.py", {}, mode="train")
    assert stage1.dataset.type == "BatchFeatureDataset" and stage1.bucket_config is None
    assert (stage1.features.load_video_features, stage1.features.load_text_features) == (True, True)
    assert stage1.vae is None and stage1.text_encoder is None
    assert (stage1.raw.vae_out_channels, stage1.raw.model_max_length, stage1.raw.text_encoder_output_dim) == (
        4,
        300,
        4096,
    )
    feat = load_config("configs/opensora-v1-2/misc/feat.py", {}, mode="train")
    assert (feat.features.load_video_features, feat.features.load_text_features) == (False, True)
    assert (
        feat.dataset.options["dummy_text_feature"] is True and feat.model.options["skip_y_embedder"] is True
    )


def test_batch_feature_dataset_cannot_turn_a_feature_off():
    cfg = Config(
        dict(model=dict(type="STDiT3-XL/2"), scheduler=dict(type="rflow"), dataset=dict(type="BatchFeatureDataset"),
             load_text_features=False)
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match="^load_text_features=False: dataset.type='BatchFeatureDataset' reads"
    ):
        validate_config(cfg, mode="train")


def test_evaluation_takes_the_encoders_a_feature_config_lacks_from_the_manifest(data):
    cfg = feature_config(data, vae=None, text_encoder=None)
    cfg.model.skip_y_embedder = True
    filled = sampling_config(validate_config(cfg, mode="train"))
    vae, t5 = encoder_sections(data["pretrained"])
    assert filled.vae.as_dict() == vae and filled.text_encoder.as_dict() == t5
    assert filled.model.options["skip_y_embedder"] is False


def test_skip_y_embedder_with_text_features_trains_a_frozen_y_embedder(data):
    from opensora_core.train.job import train_job

    cfg = feature_config(data, vae=None, text_encoder=None, caption_dropout="empty")
    cfg.model.skip_y_embedder = True
    validated = validate_config(cfg, mode="train")
    stored = feature_input(validated, snapshot_dir=None, features=None)
    job = train_job(validated, snapshot_dir=None, output_dir="/runs/000", features=stored)
    assert job.vae is None and job.text_encoder is None
    assert (job.model["skip_y_embedder"], job.model["freeze_y_embedder"]) == (False, True)
    assert job.model["class_dropout_prob"] == 0.0 and job.empty_caption_prob == 0.1  # STDiT3's default
    assert stored.caption_dropout == "empty"


def test_opensora_train_takes_a_feature_snapshot_path(data, monkeypatch, tmp_path):
    from opensora_core import cli, stages

    calls = {}
    monkeypatch.setattr(stages, "run_training", lambda cfg, **kwargs: calls.update(kwargs) or _Result())
    argv = ["train", "configs/opensora-v1-2/train/stage1_feat.py", "--features", str(data["features"].path)]
    argv += ["--outputs", str(tmp_path)]  # its log file goes there, not into the repository
    assert cli.main(argv) == 0
    assert calls["features"] == str(data["features"].path) and calls["snapshot"] is None


class _Result:
    checkpoint, global_step, final_loss, elapsed = None, 0, None, 0.0
