"""The mask kinds a config's `mask_ratios` may name, and the check that turns it into probabilities (no torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from opensora_core.errors import ConfigError

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


def check_mask_ratios(mask_ratios: Mapping[str, float]) -> dict[str, float]:
    """Probability per mask kind, in the config's order; "identity" takes what the others leave.

    Raises ConfigError naming the bad `mask_ratios` key.
    """
    ratios: dict[str, float] = {}
    for name, value in mask_ratios.items():
        if name not in MASK_NAMES:
            raise ConfigError(f"mask_ratios[{name!r}]: unknown mask; valid names: {', '.join(MASK_NAMES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"mask_ratios[{name!r}]={value!r}: must be a number in [0, 1]")
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
