"""Tiny random-weight T5 and CLIP text encoders (+ tokenizers), an AutoencoderKL, an Open-Sora v1.2
video VAE and an LPIPS network, written to disk for tests and the CPU demo.

They load through the libraries' real `from_pretrained(..., local_files_only=True)`, so the whole pipeline
runs offline; their outputs are noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Words the tiny tokenizer knows whole; anything else falls back to single characters.
WORDS = """
a an the and or of in on at to from with over under near by into through across along behind above below
is are was be being moves drifts flies runs walks falls rises spins floats swims jumps rolls turns slowly
fast quickly gently camera view shot close wide aerial drone pan zoom left right up down forward back
red orange yellow green blue purple pink white black gray brown golden silver bright dark light colorful
square circle triangle ball box line dot shape cube sphere star gradient background pattern texture
sky sea ocean wave waves beach sand mountain mountains river lake forest tree trees flower flowers grass
cloud clouds sun moon rain snow fire water city street road car cars building buildings bridge night day
sunset sunrise morning evening dog cat bird birds fish horse person man woman people child group crowd
small large big tiny old new young beautiful calm busy quiet loud soft hard warm cold empty full
video scene image frame motion score aesthetic still moving static smooth
""".split()
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()")


@dataclass(frozen=True)
class TinyPretrained:
    """Where the tiny models live: point `text_encoder.from_pretrained` / `vae.from_pretrained` here."""

    root: Path
    t5: Path
    vae: Path
    clip: Path  # text_encoder type "clip"
    vae_v1_2: Path  # vae type "OpenSoraVAE_V1_2"


T5_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
CLIP_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
VAE_V1_2_FILES = ("config.json", "model.safetensors", "vae_2d/config.json")

# Three 2x downsamples (factor 8, like SD's VAE) at a few thousand parameters.
TINY_AUTOENCODER_KL = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
}


def create_tiny_pretrained(root: Path, *, seed: int = 0) -> TinyPretrained:
    """Write root/{t5,vae,clip,vae_v1_2} unless they are already complete; return their paths."""
    root = Path(root)
    paths = TinyPretrained(
        root=root, t5=root / "t5", vae=root / "vae", clip=root / "clip", vae_v1_2=root / "vae_v1_2"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _write_once(paths.t5, T5_FILES, _save_tiny_t5)
        _write_once(paths.vae, VAE_FILES, _save_tiny_vae)
        # Seeded apart, so each is the same whether or not the others were already on disk.
        torch.manual_seed(seed + 1)
        _write_once(paths.clip, CLIP_FILES, _save_tiny_clip)
        torch.manual_seed(seed + 2)
        _write_once(paths.vae_v1_2, VAE_V1_2_FILES, _save_tiny_vae_v1_2)
    return paths


def _write_once(target: Path, required: tuple[str, ...], save) -> None:
    """Save into a temporary sibling and rename it into place, so a half-written directory never counts."""
    if all((target / name).is_file() for name in required):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def build_tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram over whole words, then characters) built offline; pad=0, eos=1, unk=2."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    # Whole words score higher than spelling them out, so known words stay one token.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [(f"▁{w}", -2.0) for w in dict.fromkeys(WORDS)]
    vocab += [(c, -6.0) for c in CHARACTERS]
    backend = Tokenizer(Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def _save_tiny_t5(directory: Path) -> None:
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # the T5 v1.1 layout DeepFloyd/t5-v1_1-xxl uses
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _save_tiny_vae(directory: Path) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(**TINY_AUTOENCODER_KL).save_pretrained(directory)


def build_tiny_clip_tokenizer():
    """A CLIP BPE tokenizer built offline: every byte is a token, and merges make WORDS whole tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = dict.fromkeys([*alphabet, *(f"{c}</w>" for c in alphabet)])
    merges: dict[tuple[str, str], None] = {}
    for word in dict.fromkeys(WORDS):
        pieces = [*word[:-1], f"{word[-1]}</w>"]
        while len(pieces) > 1:  # merge left to right: w, wo, wor, word</w>
            merges[(pieces[0], pieces[1])] = None
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab[pieces[0]] = None
    vocab.update(dict.fromkeys(["<|startoftext|>", "<|endoftext|>"]))
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=list(merges))


def _save_tiny_clip(directory: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _save_tiny_vae_v1_2(directory: Path) -> None:
    """Open-Sora v1.2's pipeline layout (17-frame chunks, 4x time, v1.2 shift / scale) at tiny widths."""
    from opensora_core.models.vae import VideoAutoencoderKL
    from opensora_core.models.vae_pipeline import V1_2_SCALE, V1_2_SHIFT, VideoAutoencoderPipeline
    from opensora_core.models.vae_temporal import VAE_Temporal_SD

    pipeline = VideoAutoencoderPipeline(
        VideoAutoencoderKL(config=TINY_AUTOENCODER_KL, micro_batch_size=4),
        VAE_Temporal_SD(filters=8, num_res_blocks=1, num_groups=4),
        micro_frame_size=17,
        shift=V1_2_SHIFT,
        scale=V1_2_SCALE,
    )
    pipeline.save_pretrained(directory)


# LPIPS at a few channels per VGG16 stage: the same topology and key names as the real one.
TINY_LPIPS_WIDTHS = (4, 8, 8, 8, 8)


def create_tiny_lpips(path: Path, *, seed: int = 0) -> Path:
    """Write a random-weight LPIPS state dict to `path` (a .safetensors file) for `lpips_path`."""
    from safetensors.torch import save_file

    from opensora_core.models.lpips import LPIPS

    path = Path(path)
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # LPIPS's lin weights are non-negative (a weighted sum of squared differences)
            model = LPIPS(TINY_LPIPS_WIDTHS)
            for i in range(len(TINY_LPIPS_WIDTHS)):
                getattr(model, f"lin{i}").model[1].weight.data.abs_()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
    return path
