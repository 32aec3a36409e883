"""Every file under configs/ runs the job its Open-Sora script does, at tiny sizes on CPU.

Each config is shrunk the way tests/test_models_pipeline.py shrinks its stacks (the file itself as
`_base_`, tiny widths, the tiny local weights, two fp32 steps) and mapped to its job: train (two steps on
Ray Train + DeepSpeed), sample (`opensora sample`), reconstruct (`opensora vae reconstruct`), precompute
(`opensora bucket`, then `opensora precompute`'s stage), search-bs (one one-step trial) or eval-loss (on a checkpoint
the walk trained). Configs whose shrunk settings coincide (same model class, scheduler, VAE, text encoder,
dataset, mask, features, sequence parallelism, ...) form a group and one of them runs for all; every config
must fall into a group that ran, so a new config under configs/ is walked the day it is added.

The mapping config -> job -> representative is written to `release_configs_walk.json` in the session's
base temp directory and printed by the mapping test (outside pytest's capture).
"""

from __future__ import annotations

import functools
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    EVAL_LOSS_CONFIGS,
    PRECOMPUTE_CONFIGS,
    SEARCH_CONFIGS,
    grey_clip,
    load_repository_config,
)
from mmengine.config import Config
from PIL import Image
from test_models_pipeline import CONCURRENT_RUNS, PROMPT, TINY, TRAINING_RUN, frame_count, synthetic
from vae_media import VaeMedia, write_vae_media

from opensora_core.cli import main as cli_main
from opensora_core.config import read_config
from opensora_core.models.registry import model_preset
from opensora_core.train.search_bs import load_trials

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.py"))
SIZE = (32, 32)  # pixel height, width of every tiny clip and sample
V1_2_FRAMES = 17  # one chunk of the v1.2 VAE (micro_frame_size)
KL_FRAMES = 2  # the frame-wise KL VAE: two frames, one for an image config
FEATURE_BUCKETS = '{"144p": {17: (1.0, 1)}}'  # the grey clips below: one 144p bucket
TRAIN_JOBS = ("train", "train-vae", "train-features")


@dataclass(frozen=True)
class Walked:
    """One config of configs/: its job and the group (equal shrunk settings) it falls in."""

    config: Path
    job: str
    key: tuple
    tiny: Path  # the shrunk config file


# ---- the job and group of each config ----------------------------------------------------------------


def job_of(config: Path, cfg: Any) -> str:
    """The job of the Open-Sora script the config is for: scripts/train.py, inference.py, inference_vae.py,
    train_vae.py, misc/extract_feat.py, misc/search_bs.py, or eval/loss/eval_loss.py."""
    if config in SEARCH_CONFIGS:
        return "search-bs"
    if config in EVAL_LOSS_CONFIGS:
        return "eval-loss"
    if config in PRECOMPUTE_CONFIGS:
        return "precompute"
    if cfg.is_vae_model:
        return "train-vae" if cfg.mode == "train" else "reconstruct"
    if cfg.mode == "sample":
        return "sample"
    if cfg.features.load_video_features or cfg.features.load_text_features:
        return "train-features"
    return "train"


def group_key(job: str, cfg: Any) -> tuple:
    """What decides which code a config's job runs once shrunk; widths, sizes and step counts do not."""
    raw = cfg.raw
    if cfg.is_vae_model:
        losses = ("use_real_rec_loss", "use_z_rec_loss", "use_image_identity_loss", "mixed_strategy")
        return (
            job,
            cfg.model.type,
            cfg.model.options.get("freeze_vae_2d"),
            bool(raw.get("discriminator")),
            cfg.sampling.num_frames == 1 if cfg.sampling else None,
            *(raw.get(k) for k in losses),
        )
    key = [
        job,
        model_preset(cfg.model.type).func.__name__,
        cfg.model.options.get("condition"),
        *(spec.type if spec is not None else None for spec in (cfg.vae, cfg.text_encoder, cfg.scheduler)),
    ]
    if cfg.mode == "train":
        masks = raw.get("mask_ratios") or raw.get("mask_ratio")
        f = cfg.features
        key += [cfg.dataset.type, bool(masks), f.load_video_features, f.load_text_features]
        key += [cfg.training.plugin]
    else:
        prompts = raw.get("prompt") or []
        key += [
            cfg.sampling.num_frames == 1,
            raw.get("reference_path") is not None or any("reference_path" in p for p in prompts),
            (raw.get("loop") or 1) > 1,
        ]
    return tuple(key)


# ---- shrinking a config to tiny sizes ----------------------------------------------------------------


def frames_for(cfg: Any, image: bool) -> int:
    if cfg.vae is None or cfg.vae.type == "OpenSoraVAE_V1_2":
        return V1_2_FRAMES  # the v1.2 VAE, or features stored by it (misc/extract.py's)
    return 1 if image else KL_FRAMES


@functools.cache
def as_written(config: Path) -> Config:
    """configs/`config` as its file has it, before earlier releases' names are read as today's."""
    return Config.fromfile(str(REPO / config))


def model_override(config: Path, cfg: Any) -> str:
    """The tiny widths of test_models_pipeline (two blocks for Latte, whose temporal block is the second),
    no weights; the release's other model options stay."""
    model: dict[str, Any] = {"from_pretrained": None, **TINY}
    if cfg.model.type.startswith("Latte"):
        model["depth"] = 2
    if "enable_flashattn" in (
        as_written(config).get("model") or {}
    ):  # v1.0's name: set it too, or it would turn flash attention back on
        model["enable_flashattn"] = False
    return f"model = {model!r}\n"


def encoder_overrides(cfg: Any, media: VaeMedia) -> str:
    weights = media.pretrained
    lines = ""
    if cfg.vae is not None:
        local = {"VideoAutoencoderKL": weights.vae, "OpenSoraVAE_V1_2": weights.vae_v1_2}[cfg.vae.type]
        lines += f"vae = dict(from_pretrained={str(local)!r}, local_files_only=True)\n"
    if cfg.text_encoder is not None and cfg.text_encoder.type != "classes":
        local = {"t5": (weights.t5, 8), "clip": (weights.clip, 77)}[cfg.text_encoder.type]
        lines += (
            f"text_encoder = dict(from_pretrained={str(local[0])!r}, model_max_length={local[1]}, "
            "local_files_only=True)\n"
        )
    return lines


def train_overrides(config: Path, cfg: Any, root: Path) -> str:
    """Two fp32 steps on synthetic clips of the dataset's frames (1 for an image config) at SIZE."""
    image = cfg.dataset.options.get("num_frames") == 1
    frames = frames_for(cfg, image)
    text = TRAINING_RUN + f"plugin = {cfg.training.plugin!r}\nnum_workers = 0\nload = None\nwandb = False\n"
    text += f"outputs = {str(root / 'outputs')!r}\n"
    if not (cfg.features.load_video_features or cfg.features.load_text_features):
        text += synthetic(frames, SIZE)  # with features, the feature snapshot (and its bucket snapshot)
    sizes = f"num_frames={frames}, image_size={SIZE!r}"
    written = as_written(config)
    if written.get("dataset") is None and "data_path" in written:  # v1.0's top-level dataset keys
        text += f"num_frames = {frames}\nimage_size = {SIZE!r}\n"
    elif cfg.dataset.type == "VideoTextDataset":
        text += f"dataset = dict({sizes})\n"
    if cfg.dataset.type == "BatchFeatureDataset":  # the stored features' sizes: the tiny VAE and T5
        text += "vae_out_channels = 4\ntext_encoder_output_dim = 32\nmodel_max_length = 8\n"
    if cfg.features.load_video_features or cfg.features.load_text_features:
        text += buckets(cfg, FEATURE_BUCKETS)
    return text


def sample_overrides(cfg: Any, root: Path, reference: Path) -> str:
    image = cfg.sampling.num_frames == 1
    frames = frames_for(cfg, image)
    if (cfg.raw.get("loop") or 1) > 1:  # a long video: each loop continues from condition_frame_length frames
        frames = max(frames, cfg.raw.condition_frame_length + 2)
    text = f"num_frames = {frames}\nimage_size = {SIZE!r}\ndtype = 'fp32'\nprompt_path = None\n"
    text += f"save_dir = {str(root / 'samples')!r}\nscheduler = dict(num_sampling_steps=2)\n"
    prompts = cfg.raw.get("prompt") or []
    if cfg.text_encoder.type == "classes":
        text += "prompt = ['1', '7']\n"  # class ids, as a prompt file's lines
    elif cfg.raw.get("reference_path") is not None:  # v1.1.0's sample-ref: references beside the prompts
        text += f"prompt = [{PROMPT!r}]\nreference_path = [{str(reference)!r}]\nmask_strategy = ['0']\n"
    elif any("reference_path" in p for p in prompts):  # v1.2.0's: each prompt names its references
        text += (
            f"prompt = [{PROMPT + json.dumps({'reference_path': str(reference), 'mask_strategy': '0'})!r}]\n"
        )
    else:
        text += f"prompt = [{PROMPT!r}]\n"
    return text


def vae_overrides(cfg: Any, media: VaeMedia, root: Path) -> str:
    """test_vae_train's / test_vae_reconstruct's tiny VAE settings."""
    frames = 1 if cfg.dataset.options.get("num_frames") == 1 else 9
    text = f"dtype = 'fp32'\nlpips_path = {str(media.lpips)!r}\nnum_workers = 0\n"
    text += f"dataset = dict(num_frames={frames}, image_size={SIZE!r})\n"
    if cfg.mode == "sample":
        return text + f"model = dict(from_pretrained={str(media.pretrained.vae_v1_2)!r})\n"
    return (
        text
        + TRAINING_RUN
        + f"outputs = {str(root / 'outputs')!r}\nnum_train_workers = 1\nlr = 1e-3\n"
        + "model = dict(from_pretrained=None,\n"
        + f"  vae_2d=dict(_delete_=True, type='VideoAutoencoderKL', from_pretrained={str(media.pretrained.vae)!r}),\n"
        + "  vae_temporal=dict(_delete_=True, type='VAE_Temporal_SD', filters=8, num_res_blocks=1, num_groups=4))\n"
    )


def misc_overrides(job: str, cfg: Any, root: Path, clips: Path) -> str:
    text = f"dtype = 'fp32'\nnum_workers = 0\noutputs = {str(root / 'outputs')!r}\n"
    if job == "precompute":
        return text + buckets(cfg, FEATURE_BUCKETS) + f"dataset = dict(data_path={str(clips)!r})\n"
    if job == "eval-loss":  # Open-Sora's (None, batch size) entries; the clips scanned as its val data
        return (
            text
            + buckets(cfg, '{"144p": {17: (None, 1)}}')
            + "num_eval_timesteps = 2\n"
            + f"val_data_path = {str(clips / 'meta.parquet')!r}\n"
        )
    # search-bs: one bucket, one batch size to try, in the config's own form (v1.2's (guess, variance) or
    # v1.1's (keep_prob, (min, max))); v1.1's base bucket was a command-line argument, here the `base` key
    if cfg.raw.get("base") is not None:
        return text + buckets(cfg, '{"144p": {17: (1, 0)}}') + 'base = ("144p", 17)\nbase_step_time = None\n'
    return text + buckets(cfg, '{"144p": {2: (1.0, (1, 2))}}') + 'base = ("144p", 2)\n'


def buckets(cfg: Any, entries: str) -> str:
    """`bucket_config = entries`, in place of the release's buckets where it has some."""
    replace = '"_delete_": True, ' if cfg.raw.get("bucket_config") is not None else ""
    return f"bucket_config = {{{replace}{entries[1:]}\n"


def shrink(config: Path, media: VaeMedia, root: Path, clips: Path) -> Walked:
    """configs/`config` at tiny sizes, written under root; its job and group."""
    cfg = load_repository_config(config)
    job = job_of(config, cfg)
    folder = root / str(config.with_suffix("")).replace("/", "__")
    folder.mkdir(parents=True)
    text = f"_base_ = [{str(REPO / config)!r}]\n"
    if job == "reconstruct" or job == "train-vae":
        text += vae_overrides(cfg, media, folder)
    else:
        text += model_override(config, cfg) + encoder_overrides(cfg, media)
        if job in ("train", "train-features"):
            text += train_overrides(config, cfg, folder)
        elif job == "sample":
            text += sample_overrides(cfg, folder, media.media / "still.png")
        else:
            text += misc_overrides(job, cfg, folder, clips)
    tiny = folder / "tiny.py"
    tiny.write_text(text)
    shrunk = load_repository_config_at(tiny, config)
    return Walked(config, job, group_key(job, shrunk), tiny)


def load_repository_config_at(tiny: Path, config: Path) -> Any:
    """The shrunk file, loaded as configs/`config` is (its command's loader)."""
    from opensora_core.config import load_config
    from opensora_core.sample.eval_loss import eval_config
    from opensora_core.train.search_bs import search_config

    if config in SEARCH_CONFIGS:
        return search_config(tiny)[0]
    if config in EVAL_LOSS_CONFIGS:
        return eval_config(tiny)[0]
    return load_config(tiny, needs_scheduler=config not in PRECOMPUTE_CONFIGS)


# ---- shared set-up ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> VaeMedia:
    """The tiny weights (T5, CLIP, KL VAE, v1.2 VAE, LPIPS) and the VAE jobs' clips and still."""
    return write_vae_media(tmp_path_factory.mktemp("walk-media"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three captioned 144p grey clips, scanned: the feature cache's and eval-loss's data."""
    from opensora_core.data.scan import scan

    folder = tmp_path_factory.mktemp("walk-clips")
    for i in range(3):
        grey_clip(folder / f"clip{i}.mp4", num_frames=20, height=144, width=256)
        (folder / f"clip{i}.txt").write_text(f"a grey clip {i}")
    scan(folder, folder / "meta.parquet", workers=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def walk(tmp_path_factory, media, clips) -> dict[tuple, list[Walked]]:
    """Every config shrunk, grouped by key (each group's configs in path order: the first runs)."""
    root = tmp_path_factory.mktemp("walk")
    groups: dict[tuple, list[Walked]] = {}
    for config in ALL_CONFIGS:
        walked = shrink(config, media, root, clips)
        groups.setdefault(walked.key, []).append(walked)
    mapping = [
        {"config": str(w.config), "job": w.job, "representative": str(group[0].config)}
        for group in groups.values()
        for w in group
    ]
    report = tmp_path_factory.getbasetemp() / "release_configs_walk.json"
    report.write_text(json.dumps(sorted(mapping, key=lambda m: m["config"]), indent=1))
    return groups


def representatives(walk: dict[tuple, list[Walked]], *jobs: str) -> list[Walked]:
    return [group[0] for group in walk.values() if group[0].job in jobs]


def test_every_config_maps_to_a_job_and_a_group(walk, capsys) -> None:
    walked = {w.config: w for group in walk.values() for w in group}
    assert set(walked) == set(ALL_CONFIGS)
    jobs = {w.job for w in walked.values()}
    assert jobs == {*TRAIN_JOBS, "sample", "reconstruct", "precompute", "search-bs", "eval-loss"}
    for key, group in walk.items():  # a group's configs share their job and shrunk settings
        assert {w.job for w in group} == {key[0]}
    with capsys.disabled():
        print(f"\nrelease configs walked: {len(walked)} configs in {len(walk)} groups")
        for config, w in sorted(walked.items()):
            rep = walk[w.key][0].config
            print(f"  {config} -> {w.job}" + ("" if rep == config else f" (as {rep})"))


# ---- the jobs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    """The session's Ray, for this module's trainings alone; no MLflow."""
    shared_ray.ensure(trains=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="module")
def features(walk, local_ray, clips) -> Path:
    """misc/extract.py's job: `opensora bucket`, then `opensora precompute`'s stage encoding in this
    process (its Ray Data actor pool, tested in test_features_precompute, takes a minute to start on 2
    cores) -> the feature snapshot root."""
    from opensora_core.config import load_config
    from opensora_core.stages import precompute_stage

    (extract,) = representatives(walk, "precompute")
    outputs = extract.tiny.parent / "outputs"
    meta = str(clips / "meta.parquet")
    assert cli_main(["bucket", str(extract.tiny), "--meta", meta, "--output", str(outputs / "buckets")]) == 0
    cfg = load_config(extract.tiny, mode="train", needs_scheduler=False)  # as `opensora precompute` loads it
    info = precompute_stage(cfg, progress=False, num_actors=0)
    assert info.path.parent == outputs / "features"
    return outputs / "features"


def train_two_steps(walked: Walked, media: VaeMedia, features: Path | None) -> Any:
    from opensora_core.config import load_config
    from opensora_core.train import train

    cfg = load_config(walked.tiny)
    return train(
        cfg,
        snapshot_dir=None,
        output_dir=str(walked.tiny.parent / "runs"),
        mlflow_run_id=None,
        num_workers=cfg.training.sp_size,  # one data-parallel rank
        use_gpu=False,
        clips=str(media.media / "meta.parquet") if walked.job == "train-vae" else None,
        features=str(features) if walked.job == "train-features" else None,
    )


@pytest.fixture(scope="module")
def vae_clips(media) -> None:
    from opensora_core.data.scan import scan

    scan(media.media, media.media / "meta.parquet", workers=1, progress=False)


@pytest.fixture(scope="module")
def trainings(request, walk, media, vae_clips, local_ray) -> dict[Path, Any]:
    """Each training group's representative, two steps, CONCURRENT_RUNS at a time; the feature cache is
    encoded while the first ones train, then the groups that train from it are queued."""
    with ThreadPoolExecutor(max_workers=CONCURRENT_RUNS, thread_name_prefix="walk") as pool:
        futures = {
            w.config: pool.submit(train_two_steps, w, media, None)
            for w in representatives(walk, "train", "train-vae")
        }
        features = request.getfixturevalue("features")
        for w in representatives(walk, "train-features"):
            futures[w.config] = pool.submit(train_two_steps, w, media, features)
        return {config: outcome(future) for config, future in futures.items()}


def outcome(future: Future) -> Any:
    """The training's result, or the error it raised: one group's failure fails only its own check."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - reported by the test, per config
        return err


@pytest.mark.slow
def test_each_training_config_trains_two_steps(trainings) -> None:
    failed = {
        str(config): str(result) for config, result in trainings.items() if isinstance(result, Exception)
    }
    assert not failed
    for config, result in trainings.items():
        assert result.global_step == 2, config
        assert math.isfinite(result.final_loss), config
        assert Path(result.checkpoint).name == "epoch0-global_step2", config


@pytest.mark.slow
def test_each_inference_config_samples(walk) -> None:
    for w in representatives(walk, "sample"):
        out = w.tiny.parent / "samples"
        assert cli_main(["sample", str(w.tiny), "--save-dir", str(out), "--verbose", "0"]) == 0, w.config
        files = sorted(out.iterdir())
        assert files, w.config
        cfg = load_repository_config_at(w.tiny, w.config)
        for file in files:
            assert file.suffix == (".png" if cfg.sampling.num_frames == 1 else ".mp4"), w.config
            if file.suffix == ".png":
                with Image.open(file) as image:
                    assert (image.height, image.width) == SIZE, w.config
            else:
                assert frame_count(file) >= cfg.sampling.num_frames, w.config


@pytest.mark.slow
def test_each_vae_inference_config_reconstructs(walk, media, tmp_path, monkeypatch) -> None:
    import mlflow

    from opensora_core.tracking import EXPERIMENT

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # artifacts in the test's directory, not ./mlruns
    mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    for w in representatives(walk, "reconstruct"):
        out = w.tiny.parent / "reconstructed"
        args = [
            "vae",
            "reconstruct",
            str(w.tiny),
            "--data",
            str(media.media),
            "--output",
            str(out),
            "--quiet",
        ]
        assert cli_main(args) == 0, w.config
        assert (out / "quality.csv").is_file(), w.config


@pytest.mark.slow
def test_the_feature_cache_holds_every_clip(features) -> None:
    from opensora_core.features.store import open_features

    manifest = open_features(features).manifest
    assert (manifest.num_samples, manifest.num_errors) == (3, 0)


@pytest.mark.slow
def test_each_batch_size_search_config_runs_one_trial(walk) -> None:
    for w in representatives(walk, "search-bs"):
        output = w.tiny.parent / "fitted.py"
        args = [
            "search-bs",
            str(w.tiny),
            "--output",
            str(output),
            "--warmup-steps",
            "0",
            "--active-steps",
            "1",
        ]
        assert cli_main(args) == 0, w.config
        fitted = read_config(output).bucket_config  # the one bucket at the one batch size, measured once
        assert [dict(frames) for frames in fitted.values()] in ([{17: (1.0, 1)}], [{2: (1.0, 1)}]), w.config
        trials = load_trials(output.with_suffix(".trials.jsonl"))  # measured, then settled by a second look
        assert [(t.batch_size, t.repeat, t.fits) for t in trials] == [(1, 0, True), (1, 1, True)], w.config


@pytest.mark.slow
def test_eval_loss_config_evaluates_a_checkpoint_the_walk_trained(walk, trainings) -> None:
    (evaluated,) = representatives(walk, "eval-loss")
    (stage1,) = (
        g for g in walk.values() if Path("configs/opensora-v1-2/train/stage1.py") in {w.config for w in g}
    )
    trained = trainings[stage1[0].config]  # the model eval_loss.py names, trained by the walk
    out = evaluated.tiny.parent / "eval"
    args = ["eval-loss", str(evaluated.tiny), "--checkpoint", trained.checkpoint, "--output", str(out)]
    assert cli_main(args) == 0
    assert any(out.iterdir())


def test_extract_config_loads_for_precompute_only() -> None:
    """misc/extract.py has Open-Sora's keys, so no scheduler: bucket and precompute load it, train refuses it."""
    from opensora_core.config import load_config
    from opensora_core.errors import ConfigError

    extract = REPO / "configs/opensora-v1-2/misc/extract.py"
    assert "scheduler" not in as_written(Path("configs/opensora-v1-2/misc/extract.py"))
    assert load_config(extract, mode="train", needs_scheduler=False).scheduler is None
    with pytest.raises(ConfigError, match="^scheduler: missing; expected scheduler = dict"):
        load_config(extract, mode="train")
