"""Command-line arguments of Open-Sora's train and inference scripts, with the spec's names."""

from __future__ import annotations

import argparse


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments both training and inference accept."""
    parser.add_argument("config", help="MMEngine-style .py config (running it executes its code)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--ckpt-path", help="checkpoint to load (sets model.from_pretrained)")
    parser.add_argument("--batch-size", type=int, help="batch size")
    parser.add_argument("--outputs", help="output directory")
    parser.add_argument("--flash-attn", type=str2bool, help="sets model.enable_flash_attn")
    parser.add_argument("--layernorm-kernel", type=str2bool, help="sets model.enable_layernorm_kernel")
    parser.add_argument("--resolution", help='resolution name, e.g. "240p"')
    parser.add_argument("--data-path", help="dataset path (sets dataset.data_path)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        metavar="KEY=VALUE",
        help="override any key, e.g. model.depth=2 'bucket_config.144p.1=(1.0, 4)'",
    )


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--wandb", type=str2bool, nargs="?", const=True, help="also log to Weights & Biases")
    parser.add_argument("--load", help="checkpoint directory to resume from")
    parser.add_argument(
        "--start-from-scratch", action="store_true", help="with --load: reset the data position"
    )
    parser.add_argument("--warmup-steps", type=int, help="linear LR warmup steps")


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save-dir", help="where samples are written")
    parser.add_argument("--sample-name", help="samples are named {sample_name}_{index}")
    parser.add_argument("--start-index", type=int, help="first prompt index")
    parser.add_argument("--end-index", type=int, help="prompt index to stop before")
    parser.add_argument("--num-sample", type=int, help="samples per prompt, suffixed -0, -1, ...")
    parser.add_argument("--prompt-as-path", action="store_true", help="name each sample after its prompt")
    parser.add_argument("--verbose", type=int, help="verbosity level")
    parser.add_argument("--prompt-path", help="text file with one prompt per line")
    parser.add_argument("--prompt", nargs="+", help="prompt strings (take priority over --prompt-path)")
    parser.add_argument("--llm-refine", type=str2bool, help="refine prompts with an LLM")
    parser.add_argument("--prompt-generator", help="prompt generator")
    parser.add_argument("--num-frames", help='number of frames, or a name such as "4s"')
    parser.add_argument("--fps", type=int, help="frames per second (condition)")
    parser.add_argument("--save-fps", type=int, help="fps of the written video")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="image size")
    parser.add_argument("--frame-interval", type=int, help="frame interval")
    parser.add_argument("--aspect-ratio", help='aspect ratio "H:W", e.g. "9:16"')
    parser.add_argument("--watermark", type=str2bool, help="add a watermark")
    parser.add_argument("--num-sampling-steps", type=int, help="sets scheduler.num_sampling_steps")
    parser.add_argument("--cfg-scale", type=float, help="sets scheduler.cfg_scale")
    parser.add_argument("--loop", type=int, help="loops for long video generation")
    parser.add_argument("--condition-frame-length", type=int, help="frames carried between loops")
    parser.add_argument("--reference-path", nargs="+", help="reference image/video per prompt")
    parser.add_argument("--mask-strategy", nargs="+", help="mask strategy per prompt")
    parser.add_argument("--aes", type=float, help="aesthetic score appended to prompts")
    parser.add_argument("--flow", type=float, help="motion score appended to prompts")
    parser.add_argument("--camera-motion", help="camera motion appended to prompts")
