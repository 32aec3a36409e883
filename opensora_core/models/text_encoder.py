"""Text encoders (T5, CLIP): prompts -> caption features [B, 1, L, D], plus the model's null caption for CFG."""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from opensora_core.errors import CheckpointError, ConfigError
from opensora_core.models.registry import check_num_classes

log = logging.getLogger(__name__)


@functools.cache
def _log_shardformer_ignored() -> None:
    log.info("text_encoder.shardformer=True is ignored here: T5 runs as a plain transformers model")


class LearnedNullCaption:
    """The null caption for classifier-free guidance is the diffusion model's learned `y_embedding`.

    Text encoders are not nn.Modules on purpose: samplers attach the diffusion model's `y_embedder`
    to them (for `null`), and that must not become a submodule of the text encoder.
    """

    y_embedder: nn.Module | None = None  # set to the diffusion model's y_embedder before `null`

    def null(self, n: int) -> Tensor:
        """The learned null caption [n, 1, L, D] of the diffusion model (classifier-free guidance)."""
        if self.y_embedder is None:
            raise RuntimeError(
                "set text_encoder.y_embedder = model.y_embedder before asking for null captions"
            )
        return self.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


class T5Encoder(LearnedNullCaption):
    """Frozen transformers T5 encoder and its tokenizer, loaded with `from_pretrained` from a local directory."""

    def __init__(
        self,
        from_pretrained: str,
        *,
        model_max_length: int = 120,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        shardformer: bool = False,
        subfolder: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        if shardformer:
            _log_shardformer_ignored()
        kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only}
        if subfolder:
            kwargs["subfolder"] = subfolder
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(from_pretrained, **kwargs)
            self.model: nn.Module = T5EncoderModel.from_pretrained(from_pretrained, **kwargs)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"text_encoder.from_pretrained={from_pretrained}: cannot load a T5 encoder and tokenizer ({err})"
            ) from err
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_max_length = model_max_length
        self.output_dim: int = self.model.config.d_model
        self.y_embedder: nn.Module | None = None  # set to the diffusion model's y_embedder before `null`

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """{"y": [B, 1, L, D] features, "mask": [B, L] (1 = real token)} with L = model_max_length."""
        tokens = self.tokenizer(
            list(texts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        y = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return {"y": y[:, None], "mask": mask}


class ClipEncoder(LearnedNullCaption):
    """Frozen transformers CLIP text model and CLIPTokenizer from a local directory (Open-Sora's `clip`).

    The caption is CLIP's pooled embedding (the end-of-text token's state) as a single token,
    y = [B, 1, 1, D]; there is no mask since that token is always real. As in Open-Sora, prompts are
    padded to `model_max_length` and run without an attention mask: CLIP's causal attention keeps the
    padding from reaching the pooled token. Meant for the class-style caption embedders of DiT / Latte,
    whose null caption is one token too.
    """

    def __init__(
        self,
        from_pretrained: str,
        *,
        model_max_length: int = 77,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import CLIPTextModel, CLIPTokenizer

        kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only}
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(from_pretrained, **kwargs)
            self.model: nn.Module = CLIPTextModel.from_pretrained(from_pretrained, **kwargs)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"text_encoder.from_pretrained={from_pretrained}: cannot load a CLIP text model and tokenizer ({err})"
            ) from err
        positions = self.model.config.max_position_embeddings
        if model_max_length > positions:
            raise ConfigError(
                f"text_encoder.model_max_length={model_max_length}: the CLIP model at {from_pretrained} "
                f"has {positions} positions; use at most {positions}"
            )
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_max_length = model_max_length
        self.output_dim: int = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """{"y": [B, 1, 1, D]}: each prompt's pooled CLIP embedding."""
        tokens = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.model_max_length,
            padding="max_length",
            return_tensors="pt",
        )
        pooled = self.model(input_ids=tokens["input_ids"].to(self.device)).pooler_output
        return {"y": pooled[:, None, None]}


class ClassEncoder:
    """Open-Sora's `classes` text encoder: each prompt is a class id, the model embeds labels itself.

    For class-conditional DiT / Latte (`model.condition="label_<num_classes>"`): a prompt file such as
    Open-Sora's imagenet_id.txt holds one id per line, a training clip's caption is its id. `y` is a
    LongTensor [B] of ids; the null label for guidance is `num_classes`, the label embedder's extra row.
    There are no weights, no token length and no caption width.
    """

    output_dim = None
    model_max_length = None

    def __init__(
        self,
        num_classes: int,
        *,
        model_max_length: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.num_classes = check_num_classes(num_classes)
        self.device = torch.device(device)
        self.y_embedder: nn.Module | None = None  # samplers set it; labels need no learned null caption

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """{"y": [B] class ids}; a prompt that is not an id in [0, num_classes) is a one-line ConfigError."""
        return {"y": torch.tensor([self.class_id(t) for t in texts], dtype=torch.long, device=self.device)}

    def null(self, n: int) -> Tensor:
        """n null labels (id `num_classes`), for classifier-free guidance."""
        return torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)

    def class_id(self, text: str) -> int:
        value = str(text).strip()
        if not value.lstrip("-").isdigit() or not 0 <= int(value) < self.num_classes:
            raise ConfigError(
                f"prompt or caption {text!r}: text_encoder.type='classes' takes a class id, "
                f"an integer in [0, {self.num_classes})"
            )
        return int(value)
