"""The mask kinds a config's `mask_ratios` may name, and the check that turns it into probabilities (no torch)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from opensora_core.errors import ConfigError

log = logging.getLogger(__name__)

# Open-Sora v1.2's names, including its spelling "intepolate".
MASK_NAMES = (
    "identity",
    "quarter_random",
    "quarter_head",
    "quarter_tail",
    "quarter_head_tail",
    "image_random",
    "image_head",
    "image_tail",
    "image_head_tail",
    "random",
    "intepolate",
)

# The names earlier releases used, and the current mask with the same meaning. v1.1.0's MaskGenerator took
# "mask_"-prefixed names; the v1.0-era configs (still shipped in v1.1.0/v1.2.0 as opensora/train/*-mask.py and
# *-spee.py) name five masks that hid 1 to 4 latent frames, which is v1.1's quarter mask at 16 latent frames.
LEGACY_MASK_NAMES = {
    "mask_no": "identity",
    "mask_random": "quarter_random",
    "mask_head": "quarter_head",
    "mask_tail": "quarter_tail",
    "mask_head_tail": "quarter_head_tail",
    **{f"mask_{name}": name for name in MASK_NAMES if name.startswith(("quarter_", "image_"))},
}


def check_mask_ratios(mask_ratios: Mapping[str, float]) -> dict[str, float]:
    """Probability per mask kind, in the config's order; "identity" takes what the others leave.

    Raises ConfigError naming the bad `mask_ratios` key.
    """
    ratios: dict[str, float] = {}
    legacy = {key: LEGACY_MASK_NAMES[key] for key in mask_ratios if key in LEGACY_MASK_NAMES}
    if legacy:
        read_as = ", ".join(f"{key} → {name}" for key, name in legacy.items())
        log.info(
            "mask_ratios: an earlier Open-Sora release's mask names, read as the current ones: %s", read_as
        )
    for key, value in mask_ratios.items():
        name = legacy.get(key, key)
        if name not in MASK_NAMES:
            raise ConfigError(
                f"mask_ratios[{key!r}]: unknown mask; valid names: {', '.join(MASK_NAMES)} "
                f"(or an earlier release's: {', '.join(LEGACY_MASK_NAMES)})"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"mask_ratios[{key!r}]={value!r}: must be a number in [0, 1]")
        if name in ratios:
            raise ConfigError(f"mask_ratios[{key!r}]: names mask {name!r} a second time")
        ratios[name] = float(value)
    if "identity" not in ratios:
        rest = 1.0 - sum(ratios.values())
        if rest < -1e-6:
            raise ConfigError(
                f"mask_ratios: the ratios sum to {sum(ratios.values()):.6g} > 1, "
                "leaving nothing for mask_ratios['identity']"
            )
        ratios["identity"] = max(rest, 0.0)
    total = sum(ratios.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(f"mask_ratios: the ratios sum to {total:.6g}; they must sum to 1")
    return ratios
