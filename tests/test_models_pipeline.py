"""Every model, VAE, text encoder and scheduler type of Open-Sora v1.0-v1.2 through the real entry points.

Each stack is a pair of config files loaded with `load_config`: a training config that
`opensora_core.train.train` runs for two steps (Ray Train + DeepSpeed ZeRO-2, one CPU worker, synthetic
clips), whose checkpoint then loads back strictly and samples through `opensora sample`. The other presets
sample from a config file, and every config in configs/ builds all its components (the model on the meta
device at its published size).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest
import torch
from conftest import DATA, load_repository_config
from PIL import Image
from safetensors.torch import load_file

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.models.fixed_size import POSITION_TABLE_KEYS
from opensora_core.models.registry import build_model, build_text_encoder, build_vae
from opensora_core.models.tiny_random import TinyPretrained, create_tiny_pretrained
from opensora_core.models.vae_pipeline import V1_2_SCALE, V1_2_SHIFT
from opensora_core.train import TrainResult

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.py"))
T5_XXL_DIM = 4096  # caption_channels of the published configs' DeepFloyd/t5-v1_1-xxl
PROMPT = "a red ball rolls across the sand"
# Training runs at a time: Ray has 2 CPUs and each run's one worker takes one. More at once is no faster
# (a run is ~40 CPU-seconds, mostly starting Ray Train's actors and importing DeepSpeed / transformers).
CONCURRENT_RUNS = 2

# Tiny widths for every preset (STDiT2 needs hidden_size divisible by 3); fixed-size models also get the
# latent size they are built for.
TINY = dict(hidden_size=48, depth=1, num_heads=4, enable_flash_attn=False, enable_layernorm_kernel=False)
# Appended to every training config: two fp32 steps, then the final checkpoint.
TRAINING_RUN = """
dtype = "fp32"
plugin = "zero2"
epochs = 1
max_steps = 2
log_every = 1
ckpt_every = 0
"""


@dataclass(frozen=True)
class Stack:
    """One model + VAE + text encoder + scheduler as Open-Sora configs write it, at tiny sizes.

    `train` and `sample` are config files' text with `{t5}`, `{clip}`, `{vae}`, `{vae_v1_2}` and `{repo}`
    standing for paths (the tiny local weights, the repository); `frames` pixel frames of `size` are
    trained on and sampled (1: an image).
    """

    train: str
    sample: str
    frames: int
    size: tuple[int, int]
    files: dict[str, str] = field(default_factory=dict)  # further config files the two above inherit


def synthetic(frames: int, size: tuple[int, int]) -> str:
    return (
        f"synthetic_data = dict(num_batches=2, batch_size=2, num_frames={frames}, "
        f"height={size[0]}, width={size[1]})\n"
    )


def model_line(**model: Any) -> str:
    return f"model = {model!r}\n"


# v1.0-era stacks: fixed-size models on the frame-wise KL VAE, fixed-size clips (VideoTextDataset).
V1_0_TRAIN_BASE = (
    """
dataset = dict(type="VideoTextDataset", data_path=None, num_frames=2, frame_interval=3, image_size=(32, 32))
vae = dict(type="VideoAutoencoderKL", from_pretrained="{vae}", micro_batch_size=4, local_files_only=True)
text_encoder = dict(type="t5", from_pretrained="{t5}", model_max_length=8, local_files_only=True)
scheduler = dict(type="iddpm", timestep_respacing="")
seed = 42
lr = 1e-4
grad_clip = 1.0
ema_decay = 0.99
grad_checkpoint = True
"""
    + TRAINING_RUN
    + synthetic(2, (32, 32))
)
V1_0_SAMPLE_BASE = """
vae = dict(type="VideoAutoencoderKL", from_pretrained="{vae}", micro_batch_size=4, local_files_only=True)
text_encoder = dict(type="t5", from_pretrained="{t5}", model_max_length=8, local_files_only=True)
num_frames = 2
fps = 8
image_size = (32, 32)
dtype = "fp32"
batch_size = 1
seed = 42
"""
CLIP = 'text_encoder = dict(_delete_=True, type="clip", from_pretrained="{clip}", model_max_length=77, local_files_only=True)\n'
V1_0_FILES = {"v1_0_train.py": V1_0_TRAIN_BASE, "v1_0_sample.py": V1_0_SAMPLE_BASE}
TRAIN_ON_V1_0 = '_base_ = ["./v1_0_train.py"]\n'
SAMPLE_ON_V1_0 = '_base_ = ["./v1_0_sample.py"]\n'


def fixed_size(type_name: str, input_size: tuple[int, int, int], **extra: Any) -> str:
    return model_line(type=type_name, input_size=input_size, **TINY | extra)


STACKS: dict[str, Stack] = {
    # (a) Open-Sora v1.1: STDiT2 on the KL VAE, T5, iddpm; the published configs as _base_
    "v1.1-STDiT2": Stack(
        train='_base_ = ["{repo}/configs/opensora-v1-1/train/stage1.py"]\n'
        + model_line(**TINY)
        + 'vae = dict(from_pretrained="{vae}")\n'
        + 'text_encoder = dict(from_pretrained="{t5}", model_max_length=8)\n'
        + TRAINING_RUN
        + synthetic(3, (32, 48)),
        sample='_base_ = ["{repo}/configs/opensora-v1-1/inference/sample.py"]\n'
        + model_line(**TINY)
        + 'vae = dict(from_pretrained="{vae}", local_files_only=True)\n'
        + 'text_encoder = dict(from_pretrained="{t5}", model_max_length=8, local_files_only=True)\n'
        + "scheduler = dict(num_sampling_steps=3)\n"
        + 'dtype = "fp32"\nnum_frames = 3\nimage_size = (32, 48)\n',
        frames=3,
        size=(32, 48),
    ),
    # (b) Open-Sora v1.2: STDiT3 on the v1.2 video VAE (4x in time), T5, rflow
    "v1.2-STDiT3": Stack(
        train='_base_ = ["{repo}/configs/opensora-v1-2/train/stage1.py"]\n'
        + model_line(**TINY)
        + 'vae = dict(from_pretrained="{vae_v1_2}")\n'
        + 'text_encoder = dict(from_pretrained="{t5}", model_max_length=8)\n'
        + TRAINING_RUN
        + synthetic(17, (32, 32)),
        sample='_base_ = ["{repo}/configs/opensora-v1-2/inference/sample.py"]\n'
        + model_line(**TINY)
        + 'vae = dict(from_pretrained="{vae_v1_2}")\n'
        + 'text_encoder = dict(from_pretrained="{t5}", model_max_length=8, local_files_only=True)\n'
        + "scheduler = dict(num_sampling_steps=2)\n"
        + 'dtype = "fp32"\nnum_frames = 17\nimage_size = (32, 32)\n',
        frames=17,
        size=(32, 32),
    ),
    # (c) v1.0 and the baselines, each built for latents of 2 x 4 x 4 (2 frames of 32 x 32)
    "v1.0-STDiT": Stack(
        train=TRAIN_ON_V1_0 + fixed_size("STDiT-XL/2", (2, 4, 4), space_scale=0.5),
        sample=SAMPLE_ON_V1_0
        + fixed_size("STDiT-XL/2", (2, 4, 4), space_scale=0.5)
        + 'scheduler = dict(type="iddpm", num_sampling_steps=2, cfg_scale=7.0)\n',
        frames=2,
        size=(32, 32),
        files=V1_0_FILES,
    ),
    # DiT and Latte condition on the pooled CLIP caption
    "DiT": Stack(
        train=TRAIN_ON_V1_0 + fixed_size("DiT-XL/2", (2, 4, 4)) + CLIP,
        sample=SAMPLE_ON_V1_0
        + fixed_size("DiT-XL/2", (2, 4, 4))
        + CLIP
        + 'scheduler = dict(type="dpm-solver", num_sampling_steps=2, cfg_scale=4.0)\n',
        frames=2,
        size=(32, 32),
        files=V1_0_FILES,
    ),
    # (d) iddpm-speed for training; two blocks so Latte's temporal block runs too
    "Latte": Stack(
        train=TRAIN_ON_V1_0
        + fixed_size("Latte-XL/2", (2, 4, 4), depth=2)
        + CLIP
        + 'scheduler = dict(_delete_=True, type="iddpm-speed")\n',
        sample=SAMPLE_ON_V1_0
        + fixed_size("Latte-XL/2", (2, 4, 4), depth=2)
        + CLIP
        + 'scheduler = dict(type="iddpm", num_sampling_steps=2, cfg_scale=4.0)\n',
        frames=2,
        size=(32, 32),
        files=V1_0_FILES,
    ),
    # PixArt is an image model: one-frame clips, a png sample
    "PixArt": Stack(
        train=TRAIN_ON_V1_0
        + fixed_size("PixArt-XL/2", (1, 4, 4))
        + "dataset = dict(num_frames=1)\n"
        + synthetic(1, (32, 32)),
        sample=SAMPLE_ON_V1_0
        + fixed_size("PixArt-XL/2", (1, 4, 4))
        + "num_frames = 1\n"
        + 'scheduler = dict(type="dpm-solver", num_sampling_steps=2, cfg_scale=4.5)\n',
        frames=1,
        size=(32, 32),
        files=V1_0_FILES,
    ),
}


# The other presets, at the same tiny widths: each is built from a config file and samples (random weights;
# its training step is the one the stacks above run). name -> (inference config, frames sampled).
PRESETS: dict[str, tuple[str, int]] = {
    # STDiT3-3B on VideoAutoencoderPipeline: the v1.2 VAE spelt out as its image and temporal VAEs
    "STDiT3-3B/2": (
        '_base_ = ["{repo}/configs/opensora-v1-2/inference/sample.py"]\n'
        + model_line(type="STDiT3-3B/2", from_pretrained=None, **TINY)
        + 'vae = dict(_delete_=True, type="VideoAutoencoderPipeline", from_pretrained="{vae_v1_2}",'
        ' vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="vae_2d", micro_batch_size=4),'
        ' vae_temporal=dict(type="VAE_Temporal_SD", filters=8, num_res_blocks=1, num_groups=4),'
        f" micro_frame_size=17, shift={V1_2_SHIFT}, scale={V1_2_SCALE})\n"
        + 'text_encoder = dict(from_pretrained="{t5}", model_max_length=8, local_files_only=True)\n'
        + 'scheduler = dict(num_sampling_steps=2)\ndtype = "fp32"\nnum_frames = 17\nimage_size = (32, 32)\n',
        17,
    ),
    "DiT-XL/2x2": (
        SAMPLE_ON_V1_0
        + fixed_size("DiT-XL/2x2", (2, 4, 4))
        + CLIP
        + 'scheduler = dict(type="dpm-solver", num_sampling_steps=2)\n',
        2,
    ),
    "Latte-XL/2x2": (
        SAMPLE_ON_V1_0
        + fixed_size("Latte-XL/2x2", (2, 4, 4), depth=2)
        + CLIP
        + 'scheduler = dict(type="iddpm", num_sampling_steps=2)\n',
        2,
    ),
    "PixArt-1B/2": (
        SAMPLE_ON_V1_0
        + fixed_size("PixArt-1B/2", (1, 4, 4))
        + 'num_frames = 1\nscheduler = dict(type="iddpm", num_sampling_steps=2)\n',
        1,
    ),
    "PixArtMS-XL/2": (
        SAMPLE_ON_V1_0
        + fixed_size("PixArtMS-XL/2", (1, 4, 4))
        + 'num_frames = 1\nscheduler = dict(type="dpm-solver", num_sampling_steps=2)\n',
        1,
    ),
    "PixArt-Sigma-XL/2": (
        SAMPLE_ON_V1_0
        + fixed_size("PixArt-Sigma-XL/2", (1, 4, 4), qk_norm=True)
        + 'num_frames = 1\nscheduler = dict(type="rflow", num_sampling_steps=2)\n',
        1,
    ),
}


# ---- shared set-up: tiny weights, one local Ray, every stack's training started in the background -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPretrained:
    return create_tiny_pretrained(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    """The session's local Ray (2 CPUs, no dashboard, tests/conftest.py) for every training run here,
    never a running cluster's; no MLflow.

    With an infra/local stack up, its dashboard agent holds port 52365; that Ray's agent then retries the
    port for ~10 s and runs without its HTTP server, which training does not use.
    """
    shared_ray.ensure(trains=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def write_files(folder: Path, tiny: TinyPretrained, files: dict[str, str]) -> None:
    """Config files with their `{t5}`-style placeholders filled in."""
    paths = {"repo": REPO, "t5": tiny.t5, "clip": tiny.clip, "vae": tiny.vae, "vae_v1_2": tiny.vae_v1_2}
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, text in files.items():
        for key, path in paths.items():
            text = text.replace(f"{{{key}}}", str(path))
        (folder / file_name).write_text(text)


def write_configs(root: Path, tiny: TinyPretrained, name: str) -> tuple[Path, Path]:
    """The stack's training and inference config files (and those they inherit) under root/name."""
    stack = STACKS[name]
    write_files(root / name, tiny, {**stack.files, "train.py": stack.train, "sample.py": stack.sample})
    return root / name / "train.py", root / name / "sample.py"


def train_two_steps(config: Path, output_dir: Path) -> TrainResult:
    from opensora_core.train import train

    return train(
        load_config(config),
        snapshot_dir=None,
        output_dir=str(output_dir),
        mlflow_run_id=None,
        num_workers=1,
        use_gpu=False,
    )


@dataclass(frozen=True)
class StackRun:
    name: str
    train_config: Path
    sample_config: Path
    training: Future  # -> TrainResult

    @property
    def result(self) -> TrainResult:
        return self.training.result()


@pytest.fixture(scope="module")
def trainings(request, tmp_path_factory, tiny, local_ray) -> dict[str, StackRun]:
    """The selected stacks' training, queued at once and run CONCURRENT_RUNS at a time, so that a stack's
    checks and sampling (in this process) overlap the next stacks' training."""
    selected = {
        item.callspec.params.get("stack") for item in request.session.items if hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("stacks")
    pool = ThreadPoolExecutor(max_workers=CONCURRENT_RUNS, thread_name_prefix="train")
    runs = {}
    for name in (name for name in STACKS if name in selected):
        train_config, sample_config = write_configs(root, tiny, name)
        future = pool.submit(train_two_steps, train_config, root / name / "outputs")
        runs[name] = StackRun(name, train_config, sample_config, future)
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request, trainings) -> StackRun:
    """Module-scoped, so pytest runs each stack's tests together, in the order the stacks train."""
    return trainings[request.param]


# ---- 1. training through Ray Train + DeepSpeed ---------------------------------------------------------


def configured_model(config: Path, weights: Path) -> torch.nn.Module:
    """The config's model, sized by its VAE and text encoder as training builds it, loading `weights`."""
    cfg = load_config(config)
    text_encoder = build_text_encoder(cfg.text_encoder.as_dict())
    vae = build_vae(cfg.vae.as_dict())
    return build_model(
        {**cfg.model.as_dict(), "from_pretrained": str(weights)},
        in_channels=vae.out_channels,
        caption_channels=text_encoder.output_dim,
        model_max_length=text_encoder.model_max_length,
    )


def test_stack_trains_two_steps_with_a_finite_loss(stack: StackRun) -> None:
    result = stack.result
    assert result.global_step == 2
    assert math.isfinite(result.final_loss)
    assert Path(result.checkpoint).name == "epoch0-global_step2"
    assert {"model.safetensors", "ema.safetensors", "config.py"} <= {
        p.name for p in Path(result.checkpoint).iterdir()
    }


def test_stack_checkpoint_loads_back_strictly_through_the_registry(stack: StackRun) -> None:
    checkpoint = Path(stack.result.checkpoint)
    for weights in (checkpoint, checkpoint / "model.safetensors"):  # the directory gives the EMA weights
        file = checkpoint / "ema.safetensors" if weights.is_dir() else weights
        saved = load_file(file)
        model = configured_model(stack.train_config, weights)
        state = model.state_dict()
        assert set(state) == set(saved)
        for key in saved:
            if key not in POSITION_TABLE_KEYS:  # fixed-size models keep their own sin-cos tables
                assert torch.equal(state[key], saved[key]), key
    # the output layer starts at zero: two optimizer steps moved it
    assert load_file(checkpoint / "model.safetensors")["final_layer.linear.weight"].abs().sum() > 0


# ---- 2. sampling through `opensora sample` -------------------------------------------------------------


def frame_count(path: Path) -> int:
    if path.suffix == ".png":
        return 1
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def frame_size(path: Path) -> tuple[int, int]:
    """(height, width) of a png or of an mp4's video stream."""
    if path.suffix == ".png":
        with Image.open(path) as image:
            return image.height, image.width
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.height, stream.width


def sample_once(config: Path, save_dir: Path, *args: str) -> Path:
    """`opensora sample CONFIG --prompt ... *args` -> the one file it wrote."""
    code = cli_main(
        ["sample", str(config), "--prompt", PROMPT, "--save-dir", str(save_dir), "--sample-name", "s"]
        + ["--verbose", "0", *args]
    )
    assert code == 0
    files = list(save_dir.iterdir())
    assert len(files) == 1
    return files[0]


def test_stack_samples_from_its_checkpoint_through_the_cli(stack: StackRun, tmp_path: Path) -> None:
    spec = STACKS[stack.name]
    sample = sample_once(stack.sample_config, tmp_path / "out", "--ckpt-path", stack.result.checkpoint)
    assert sample.name == ("s_0000.png" if spec.frames == 1 else "s_0000.mp4")
    assert frame_count(sample) == spec.frames
    assert frame_size(sample) == spec.size


@pytest.mark.parametrize("type_name", PRESETS)
def test_other_preset_samples_from_a_config_file(
    type_name: str, tiny: TinyPretrained, tmp_path: Path
) -> None:
    text, frames = PRESETS[type_name]
    write_files(tmp_path, tiny, {**V1_0_FILES, "sample.py": text})
    sample = sample_once(tmp_path / "sample.py", tmp_path / "out")
    assert frame_count(sample) == frames
    assert frame_size(sample) == (32, 32)


def test_every_model_type_is_trained_or_sampled_here(tmp_path: Path) -> None:
    from opensora_core.config import read_config
    from opensora_core.models.registry import MODEL_TYPES

    nowhere = TinyPretrained(*(tmp_path / name for name in ("root", "t5", "vae", "clip", "vae_v1_2")))
    trained = {read_config(write_configs(tmp_path, nowhere, name)[0]).model.type for name in STACKS}
    assert trained.isdisjoint(PRESETS)
    assert trained | set(PRESETS) == set(MODEL_TYPES)


# ---- 3. every config in configs/ builds all its components ----------------------------------------------


def released(type_name: str) -> dict[str, Any]:
    return json.loads((DATA / "state-dicts.json").read_text())["models"][type_name]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_repository_config_builds_every_component(config: Path, tiny: TinyPretrained) -> None:
    from opensora_core.models.registry import model_preset
    from opensora_core.schedulers import build_scheduler, scheduler_class

    cfg = load_repository_config(config)
    if (
        cfg.is_vae_model
    ):  # configs/vae: the VAE is the model; test_vae_train / test_vae_reconstruct build them
        assert cfg.model.type in ("OpenSoraVAE_V1_2", "VideoAutoencoderPipeline")
        return
    if cfg.vae is None:  # Open-Sora's stage1_feat.py: trained from stored features, it names their sizes
        raw = cfg.raw
        with torch.device("meta"):
            model = build_model(
                {k: v for k, v in cfg.model.as_dict().items() if k != "from_pretrained"},
                in_channels=raw.vae_out_channels,
                caption_channels=raw.text_encoder_output_dim,
                model_max_length=raw.model_max_length,
            )
        assert type(model) is model_preset(cfg.model.type).func
        assert cfg.text_encoder is None and cfg.features.load_video_features
        return
    vae_options = cfg.vae.options
    vae_cfg = cfg.vae.as_dict()
    if (
        cfg.vae.type == "VideoAutoencoderPipeline"
    ):  # v1.2's VAE spelled out: the tiny 2D VAE, a new temporal one
        vae_cfg = {**vae_cfg, "vae_2d": {**vae_cfg["vae_2d"], "from_pretrained": str(tiny.vae)}}
        vae_cfg["vae_temporal"] = {**vae_cfg["vae_temporal"], "from_pretrained": None}
        vae_cfg.pop("from_pretrained", None)
    else:
        local = {"VideoAutoencoderKL": tiny.vae, "OpenSoraVAE_V1_2": tiny.vae_v1_2}
        vae_cfg["from_pretrained"] = str(local[cfg.vae.type])
    vae = build_vae(vae_cfg)
    assert vae.out_channels == 4
    if cfg.vae.type in ("OpenSoraVAE_V1_2", "VideoAutoencoderPipeline"):  # chunking follows the config
        if vae_options.get("micro_frame_size") is not None:
            assert vae.micro_frame_size == vae_options["micro_frame_size"]
    else:
        assert vae.micro_batch_size == vae_options.get("micro_batch_size")
    te_type = cfg.text_encoder.type
    te_local = {
        "t5": {"from_pretrained": str(tiny.t5)},
        "clip": {"from_pretrained": str(tiny.clip)},
        "classes": {},
    }
    text_encoder = build_text_encoder({**cfg.text_encoder.as_dict(), **te_local[te_type]})
    assert (
        type(text_encoder).__name__
        == {"t5": "T5Encoder", "clip": "ClipEncoder", "classes": "ClassEncoder"}[te_type]
    )
    if te_type != "classes":
        assert text_encoder.model_max_length == cfg.text_encoder.options.get("model_max_length", 77)
    if cfg.scheduler is not None:  # misc/extract.py, for bucket and precompute, names none
        assert type(build_scheduler(cfg.scheduler.as_dict())) is scheduler_class(cfg.scheduler.type)

    published_t5 = te_type == "t5" and "t5-v1_1-xxl" in cfg.text_encoder.from_pretrained
    model_cfg = {k: v for k, v in cfg.model.as_dict().items() if k != "from_pretrained"}
    with torch.device("meta"):
        model = build_model(
            model_cfg,
            in_channels=vae.out_channels,
            caption_channels=T5_XXL_DIM if published_t5 else text_encoder.output_dim,
            model_max_length=text_encoder.model_max_length,
        )
    assert type(model) is model_preset(cfg.model.type).func
    if (
        published_t5 and "hidden_size" not in model_cfg and cfg.model.type.startswith(("STDiT2", "STDiT3"))
    ):  # released layout
        entry = released(cfg.model.type)
        layout = [[key, list(t.shape)] for key, t in model.state_dict().items()]
        assert layout == [[key, shape] for key, shape, _ in entry["state_dict"]]
        assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
