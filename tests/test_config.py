"""The config system: MMEngine files as written in the spec, Open-Sora's CLI names, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_repository_config

from opensora_core.cli import build_parser
from opensora_core.cli import main as cli_main
from opensora_core.config import load_config, read_config
from opensora_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.py"))


def parse(argv: list[str]) -> dict:
    ns = build_parser().parse_args(argv)
    return {k: v for k, v in vars(ns).items() if k not in ("command", "func", "config")}


def write(tmp_path: Path, text: str, name: str = "cfg.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TRAIN_BASE = """
dataset = dict(type="VariableVideoTextDataset", data_path="data", frame_interval=1)
bucket_config = {"240p": {16: (1.0, 8)}}
model = dict(type="STDiT3-XL/2")
scheduler = dict(type="rflow")
"""


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_every_config_in_the_repository_loads_and_validates(config: Path) -> None:
    cfg = load_repository_config(config)
    family = (
        config.parts[3] if config.parts[1] == "legacy" else config.parts[1]
    )  # configs/[legacy/<tag>/]<family>
    published = {
        "opensora": "STDiT-XL/2",
        "opensora-v1-1": ("STDiT2-XL/2", "PixArt"),  # train/image_rflow.py trains PixArt
        "opensora-v1-2": "STDiT3-XL/2",
        "dit": "DiT-XL/2",
        "latte": "Latte-XL/2",
        "pixart": "PixArt",
    }
    if family == "vae":  # Open-Sora's configs/vae: a VAE is the model, there is no scheduler
        assert cfg.is_vae_model and cfg.scheduler is None
    else:
        assert cfg.model.type.startswith(published[family])
    assert cfg.mode == ("sample" if "inference" in config.parts else "train")


def test_published_v12_stage1_keeps_tuple_entries_and_int_frame_keys() -> None:
    cfg = read_config(REPO / "configs/opensora-v1-2/train/stage1.py")
    assert cfg.bucket_config["144p"][102] == ((1.0, 0.33), 27)
    assert set(cfg.bucket_config["144p"]) == {1, 51, 102, 204, 408}
    assert cfg.mask_ratios["intepolate"] == 0.005
    assert cfg.warmup_steps == 1000 and cfg.ema_decay == 0.99 and cfg.adam_eps == 1e-15


def test_base_inheritance_with_delete_replaces_the_bucket_config(tmp_path: Path) -> None:
    stage1 = REPO / "configs/opensora-v1-1/train/stage1.py"
    child = write(
        tmp_path,
        f'_base_ = ["{stage1}"]\nbucket_config = {{"_delete_": True, "240p": {{16: (1.0, 16)}}, "480p": {{32: (0.0, None)}}}}\n',
    )
    cfg = read_config(child)
    assert set(cfg.bucket_config) == {"240p", "480p"}
    assert cfg.bucket_config["480p"][32] == (0.0, None)
    assert cfg.model.type == "STDiT2-XL/2"  # inherited from stage1.py
    assert cfg.lr == 2e-05


def test_base_inheritance_merges_a_child_bucket_dict_into_the_base(tmp_path: Path) -> None:
    write(tmp_path, TRAIN_BASE, "base.py")
    child = write(tmp_path, '_base_ = ["./base.py"]\nbucket_config = {"144p": {1: (1.0, 4)}}\n', "child.py")
    cfg = load_config(child)
    assert set(cfg.raw.bucket_config) == {"240p", "144p"}


def test_ckpt_path_sets_model_from_pretrained() -> None:
    args = parse(["train", "configs/opensora-v1-2/train/stage1.py", "--ckpt-path", "/w/model.safetensors"])
    cfg = load_config(REPO / "configs/opensora-v1-2/train/stage1.py", args)
    assert cfg.model.from_pretrained == "/w/model.safetensors"


def test_data_path_sets_dataset_data_path() -> None:
    args = parse(["train", "configs/opensora-v1-2/train/stage1.py", "--data-path", "meta.csv"])
    cfg = load_config(REPO / "configs/opensora-v1-2/train/stage1.py", args)
    assert cfg.dataset.options["data_path"] == "meta.csv"


def test_training_args_set_top_level_keys() -> None:
    argv = [
        "train",
        "x.py",
        "--seed",
        "7",
        "--batch-size",
        "3",
        "--lr",
        "0.5",
        "--load",
        "ck",
        "--wandb",
        "true",
    ]
    cfg = load_config(REPO / "configs/opensora-v1-2/train/stage1.py", parse(argv))
    assert (cfg.training.seed, cfg.training.batch_size, cfg.training.lr) == (7, 3, 0.5)
    assert cfg.training.load == "ck" and cfg.training.wandb is True


def test_flash_attn_and_layernorm_args_go_to_the_model_only() -> None:
    argv = ["train", "x.py", "--flash-attn", "false", "--layernorm-kernel", "False"]
    cfg = load_config(REPO / "configs/opensora-v1-2/train/stage1.py", parse(argv))
    assert cfg.model.options["enable_flash_attn"] is False
    assert cfg.model.options["enable_layernorm_kernel"] is False
    assert "flash_attn" not in cfg.raw and "layernorm_kernel" not in cfg.raw


def test_sampling_args_map_to_scheduler_and_top_level() -> None:
    argv = [
        "sample", "x.py", "--num-sampling-steps", "12", "--cfg-scale", "4.5", "--image-size", "144", "256",
        "--num-frames", "4s", "--prompt", "a cat", "a dog", "--sample-name", "demo", "--num-sample", "2",
        "--mask-strategy", "0", "0,0,0,-1,1", "--reference-path", "a.png", "b.mp4", "--loop", "2",
    ]  # fmt: skip
    cfg = load_config(REPO / "configs/opensora-v1-2/inference/sample.py", parse(argv))
    assert cfg.scheduler.options["num_sampling_steps"] == 12
    assert cfg.scheduler.options["cfg_scale"] == 4.5
    assert cfg.sampling.image_size == (144, 256)
    assert cfg.sampling.num_frames == 102  # "4s"
    assert cfg.raw.prompt == ["a cat", "a dog"]
    assert cfg.raw.sample_name == "demo" and cfg.raw.num_sample == 2 and cfg.raw.loop == 2
    assert cfg.raw.mask_strategy == ["0", "0,0,0,-1,1"]
    assert cfg.raw.reference_path == ["a.png", "b.mp4"]


def test_prompt_as_path_flag_is_only_set_when_given() -> None:
    path = REPO / "configs/opensora-v1-2/inference/sample.py"
    assert "prompt_as_path" not in load_config(path, parse(["sample", "x.py"])).raw
    assert load_config(path, parse(["sample", "x.py", "--prompt-as-path"])).raw.prompt_as_path is True


def test_cfg_options_override_nested_keys_with_python_literals() -> None:
    cfg = load_config(
        REPO / "configs/opensora-v1-2/train/demo.py",
        cfg_options=["model.depth=1", "bucket_config.144p.17=(0.5, 3)", "outputs=/tmp/o"],
    )
    assert cfg.model.options["depth"] == 1
    assert cfg.raw.bucket_config["144p"][17] == (0.5, 3)
    assert cfg.training.outputs == "/tmp/o"


def test_cfg_options_without_equals_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(REPO / "configs/opensora-v1-2/train/demo.py", cfg_options=["model.depth"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            'model = dict(type="STDiT9-XL/2")',
            r"model.type='STDiT9-XL/2' is unknown; valid types: .*STDiT3-XL/2",
        ),
        ('vae = dict(type="MyVAE")', r"vae.type='MyVAE' is unknown; valid types: .*VideoAutoencoderKL"),
        ('text_encoder = dict(type="bert")', r"text_encoder.type='bert' is unknown; valid types: t5, clip"),
        ('scheduler = dict(type="ddim")', r"scheduler.type='ddim' is unknown; valid types: .*rflow"),
        (
            'dataset = dict(type="ImageNet")',
            r"dataset.type='ImageNet' is unknown; valid types: VariableVideoTextDataset",
        ),
        ('bucket_config = {"240p": {16: (1.5, 8)}}', r'bucket_config\["240p"\]\[16\].*keep_prob.*\[0, 1\]'),
        ('bucket_config = {"240p": {16: (-0.1, 8)}}', r'bucket_config\["240p"\]\[16\].*keep_prob'),
        ('bucket_config = {"240p": {16: (0.5, None)}}', r'bucket_config\["240p"\]\[16\].*batch'),
        ('bucket_config = {"250p": {16: (1.0, 8)}}', r"250p.*240p"),
        ('dtype = "fp8"', r"dtype='fp8' is unknown; valid values: fp32, fp16, bf16"),
        ('plugin = "zero9"', r"plugin='zero9'.*zero2"),
        ("lr = -1.0", r"lr=-1.0: must be > 0"),
        ("epochs = 0", r"epochs=0: must be >= 1"),
        ("num_train_workers = 2\nsp_size = 3", r"sp_size=3 must divide num_train_workers=2"),
        ("num_train_workers = 3\nsp_size = 3", r"sp_size=3 must divide model.num_heads=16"),
        ('mask_ratios = {"identity": 0.5, "quarter_nope": 0.5}', r"mask_ratios.*quarter_nope"),
    ],
)
def test_bad_training_values_raise_one_line_errors_naming_the_key(
    tmp_path: Path, edit: str, message: str
) -> None:
    path = write(tmp_path, TRAIN_BASE + edit + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ('resolution = "241p"\naspect_ratio = "9:16"', r"resolution='241p' is unknown; valid: .*240p"),
        ('resolution = "240p"\naspect_ratio = "7:5"', r"aspect_ratio='7:5' is unknown; valid: .*9:16"),
        ('resolution = "256"\naspect_ratio = "9:16"', r"aspect_ratio '9:16' is not in the '256' table"),
        ("image_size = (0, 426)", r"image_size=\(0, 426\)"),
        ("resolution = None", r"image_size: missing"),
    ],
)
def test_bad_sampling_values_raise_one_line_errors(tmp_path: Path, edit: str, message: str) -> None:
    text = (REPO / "configs/opensora-v1-2/inference/sample.py").read_text() + edit + "\n"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.py.*does not exist"):
        load_config(tmp_path / "does-not-exist.py")


def test_config_with_a_python_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cfg.py"):
        load_config(write(tmp_path, "model = dict(type=\n"))


def test_config_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        ["config", "show", str(REPO / "configs/opensora-v1-2/train/stage1.py"), "--ckpt-path", "w.pt"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "from_pretrained='w.pt'" in out
    assert "STDiT3-XL/2" in out


def test_cli_reports_a_config_error_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_BASE + 'bucket_config = {"240p": {16: (1.5, 8)}}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "opensora_core.cli", "config", "show", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bucket_config" in errors[0]
    assert "Traceback" not in proc.stderr


def test_training_config_with_a_sampling_only_scheduler_is_rejected_on_load(tmp_path):
    config = tmp_path / "train.py"
    config.write_text(
        f'_base_ = ["{REPO / "configs/opensora-v1-2/train/demo.py"}"]\n'
        'scheduler = dict(type="dpm-solver", num_sampling_steps=20, _delete_=True)\n'
    )
    with pytest.raises(ConfigError, match=r"scheduler.type='dpm-solver' only samples; .*rflow"):
        load_config(str(config), {}, mode="train")
