"""Open-Sora's conditioning language, as pure functions: `mask_strategy` strings, JSON appended to a
prompt, `|i|` loop prompts, and applying a strategy to latents plus a per-frame edit mask.

A strategy is ";"-separated groups of up to six comma fields
`loop, reference, reference_start, target_start, length, edit_rate`; missing trailing fields take
the defaults 0, 0, 0, 0, 1, 0.0 (so "0" puts the first frame of reference 0 at latent frame 0, kept
as it is). Starts count from the end when negative; every index is in latent frames.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from opensora_core.errors import ConfigError

FIELDS = ("loop", "reference", "reference_start", "target_start", "length", "edit_rate")
DEFAULTS = ("0", "0", "0", "0", "1", "0")
PROMPT_JSON_KEYS = ("reference_path", "mask_strategy")
LOOP_MARK = re.compile(r"\|(\d+)\|")


@dataclass(frozen=True)
class MaskOp:
    """One insertion: frames of reference `reference` go to `target_start` in loop `loop`."""

    loop: int = 0
    reference: int = 0
    reference_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_rate: float = 0.0


def _where(prompt_index: int | None, key: str) -> str:
    return f"prompt {prompt_index}: {key}" if prompt_index is not None else key


def is_empty(value: object) -> bool:
    """None, "" and the string "None" (how a CLI list spells a missing entry) mean no value."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "None"))


def parse_mask_strategy(text: str | None, *, prompt_index: int | None = None) -> list[MaskOp]:
    """A mask_strategy string -> its insertions; ConfigError naming the prompt and the bad group."""
    if is_empty(text):
        return []
    if not isinstance(text, str):
        raise ConfigError(f"{_where(prompt_index, 'mask_strategy')}={text!r}: expected a string")
    ops = []
    for group in text.split(";"):
        fields = [f.strip() for f in group.split(",")]
        where = f"{_where(prompt_index, 'mask_strategy')}={text!r}, group {group.strip()!r}"
        if len(fields) > len(FIELDS) or any(f == "" for f in fields):
            raise ConfigError(f"{where}: expected 1 to 6 comma-separated numbers ({', '.join(FIELDS)})")
        fields += DEFAULTS[len(fields) :]
        try:
            ints = [int(f) for f in fields[:5]]
            edit_rate = float(fields[5])
        except ValueError:
            raise ConfigError(
                f"{where}: {', '.join(FIELDS[:5])} must be integers and edit_rate a number"
            ) from None
        loop, reference, _, _, length = ints
        if loop < 0 or reference < 0 or length < 1:
            raise ConfigError(f"{where}: loop and reference must be >= 0 and length >= 1")
        if not 0.0 <= edit_rate <= 1.0:
            raise ConfigError(f"{where}: edit_rate must be between 0 and 1")
        ops.append(MaskOp(*ints, edit_rate=edit_rate))
    return ops


def parse_reference_paths(value: str | None) -> list[str]:
    """A reference_path entry -> its paths (";"-separated; reference index = position)."""
    if is_empty(value):
        return []
    return [p.strip() for p in str(value).split(";") if p.strip()]


def split_prompt_json(prompt: str, *, prompt_index: int | None = None) -> tuple[str, dict[str, str]]:
    """Split `text{"reference_path": ..., "mask_strategy": ...}` into the text and the JSON's values."""
    brace = prompt.find("{")
    if brace < 0:
        return prompt, {}
    text, blob = prompt[:brace].rstrip(), prompt[brace:]
    try:
        values = json.loads(blob)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{_where(prompt_index, 'prompt')}: text after '{{' is not valid JSON ({err.msg}); "
            f'expected {{"reference_path": ..., "mask_strategy": ...}}'
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{_where(prompt_index, 'prompt')}: appended JSON must be an object")
    unknown = sorted(set(values) - set(PROMPT_JSON_KEYS))
    if unknown:
        raise ConfigError(
            f"{_where(prompt_index, 'prompt')}: unknown JSON key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(PROMPT_JSON_KEYS)}"
        )
    for key, value in values.items():
        if not (value is None or isinstance(value, str)):
            raise ConfigError(f"{_where(prompt_index, key)}={value!r}: expected a string")
    return text, values


def loop_prompts(prompt: str) -> dict[int, str]:
    """`|0| text |2| other` -> {0: "text", 2: "other"}; a prompt without marks is {0: prompt}."""
    parts = LOOP_MARK.split(prompt)
    if len(parts) == 1:
        return {0: prompt.strip()}
    found = {0: parts[0].strip()} if parts[0].strip() else {}
    for index, text in zip(parts[1::2], parts[2::2], strict=True):
        found[int(index)] = text.strip()
    return found


def prompt_for_loop(prompts: dict[int, str], loop: int) -> str:
    """The text of the last `|i|` segment with i <= loop (the first segment before that)."""
    eligible = [i for i in prompts if i <= loop]
    return prompts[max(eligible)] if eligible else prompts[min(prompts)]


def nearest_aligned(value: int, align: int, size: int) -> int:
    """Round `value` to a multiple of `align`, never past the last whole multiple inside `size`."""
    base, rest = divmod(value, align)
    if rest > align / 2 and base < size // align - 1:
        base += 1
    return base * align


def apply_mask_strategy(
    z: Tensor,
    references: Sequence[Sequence[Tensor]],
    strategies: Sequence[Sequence[MaskOp]],
    *,
    loop: int = 0,
    align: int | None = None,
) -> Tensor | None:
    """Write reference latents into `z` [B, C, T, H, W] in place; return the mask [B, T] or None.

    `references[i]` are sample i's reference latents [C, T_ref, H, W]; only ops of this `loop` apply.
    The mask is 1 where frames are generated and the op's edit rate where a reference was inserted
    (0 = kept as is). None when no op applies, so unconditioned sampling stays unchanged.
    """
    mask = torch.ones(z.shape[0], z.shape[2], dtype=torch.float32, device=z.device)
    applied = False
    for i, ops in enumerate(strategies):
        for op in ops:
            if op.loop != loop:
                continue
            refs = references[i] if i < len(references) else []
            if op.reference >= len(refs):
                raise ConfigError(
                    f"prompt {i}: mask_strategy uses reference {op.reference}, "
                    f"but reference_path has {len(refs)} path(s)"
                )
            ref = refs[op.reference]
            ref_len, z_len = ref.shape[1], z.shape[2]
            ref_start = op.reference_start + ref_len if op.reference_start < 0 else op.reference_start
            target = op.target_start + z_len if op.target_start < 0 else op.target_start
            if align is not None:
                ref_start = nearest_aligned(ref_start, align, ref_len)
                target = nearest_aligned(target, align, z_len)
            if not (0 <= ref_start < ref_len and 0 <= target < z_len):
                raise ConfigError(
                    f"prompt {i}: mask_strategy group {op}: start outside the reference "
                    f"({ref_len} latent frames) or the target ({z_len} latent frames)"
                )
            length = min(op.length, z_len - target, ref_len - ref_start)
            z[i, :, target : target + length] = ref[:, ref_start : ref_start + length].to(z)
            mask[i, target : target + length] = op.edit_rate
            applied = True
    return mask if applied else None
