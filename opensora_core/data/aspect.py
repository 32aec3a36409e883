"""Resolution names, their pixel counts and aspect-ratio tables (Open-Sora v1.2), and lookups on them.

The tables live in `aspect_ratios.json` beside this module; that file is the only copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType

from opensora_core.errors import ConfigError


def _load_tables() -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    raw = json.loads(resources.files("opensora_core.data").joinpath("aspect_ratios.json").read_text())
    return {
        name: (int(entry["pixels"]), {key: (int(hw[0]), int(hw[1])) for key, hw in entry["ratios"].items()})
        for name, entry in raw.items()
    }


_TABLES = _load_tables()

# Resolution names in table order (this order breaks ties between equal pixel counts).
RESOLUTIONS: tuple[str, ...] = tuple(_TABLES)
NUM_PIXELS: Mapping[str, int] = MappingProxyType({name: px for name, (px, _) in _TABLES.items()})
# name -> {ratio key "h/w" -> (target height, target width)}, key order as in the table.
RATIO_TABLES: Mapping[str, Mapping[str, tuple[int, int]]] = MappingProxyType(
    {name: MappingProxyType(table) for name, (_, table) in _TABLES.items()}
)

# "H:W" names users write (e.g. in inference configs) -> key of the 17-ratio tables.
ASPECT_RATIO_MAP: Mapping[str, str] = MappingProxyType(
    {
        "3:8": "0.38",
        "9:21": "0.43",
        "12:25": "0.48",
        "1:2": "0.50",
        "9:17": "0.53",
        "27:50": "0.54",
        "9:16": "0.56",
        "5:8": "0.62",
        "2:3": "0.67",
        "3:4": "0.75",
        "1:1": "1.00",
        "4:3": "1.33",
        "3:2": "1.50",
        "16:9": "1.78",
        "17:9": "1.89",
        "2:1": "2.00",
        "50:27": "2.08",
    }
)

# Frame-count names (clip lengths at 24 fps) -> frames.
NUM_FRAMES_MAP: Mapping[str, int] = MappingProxyType(
    {
        "1x": 51,
        "2x": 102,
        "4x": 204,
        "8x": 408,
        "16x": 816,
        "2s": 51,
        "4s": 102,
        "8s": 204,
        "16s": 408,
        "32s": 816,
    }
)


def check_resolution(name: str, *, key: str = "resolution") -> str:
    """Return `name` if it is a known resolution, else raise ConfigError naming `key`."""
    if name not in NUM_PIXELS:
        raise ConfigError(f"{key}: unknown resolution {name!r}; valid names: {', '.join(RESOLUTIONS)}")
    return name


def get_num_pixels(name: str) -> int:
    """Nominal pixel count of a resolution name, e.g. "240p" -> 102240."""
    return NUM_PIXELS[check_resolution(name)]


def get_ratio_table(name: str) -> Mapping[str, tuple[int, int]]:
    """Aspect-ratio table of a resolution: ratio key "h/w" -> (height, width)."""
    return RATIO_TABLES[check_resolution(name)]


def get_closest_ratio(height: float, width: float, ratios: Mapping[str, object]) -> str:
    """Key of `ratios` whose value (the key read as a float) is closest to height / width.

    Ties go to the key that comes first in `ratios`, so results follow the table order.
    """
    ar = height / width
    return min(ratios, key=lambda k: abs(float(k) - ar))


def get_image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) for a resolution and an aspect ratio given as "H:W" (e.g. "9:16") or a table key."""
    table = get_ratio_table(resolution)
    key = ASPECT_RATIO_MAP.get(aspect_ratio, aspect_ratio)
    if key not in table:
        valid = [name for name, k in ASPECT_RATIO_MAP.items() if k in table] or list(table)
        raise ConfigError(
            f"aspect_ratio {aspect_ratio!r} is not in the {resolution!r} table; valid: {', '.join(valid)}"
        )
    return table[key]


def get_num_frames(value: str | int) -> int:
    """Frame count from a name in NUM_FRAMES_MAP ("4s" -> 102) or an integer (string)."""
    if isinstance(value, str) and value in NUM_FRAMES_MAP:
        return NUM_FRAMES_MAP[value]
    if isinstance(value, bool):
        value = str(value)  # fall through to the error below: True is not a frame count
    try:
        frames = int(value)
    except (TypeError, ValueError):
        frames = -1
    if frames < 1 or (isinstance(value, float) and not float(value).is_integer()):
        raise ConfigError(
            f"num_frames {value!r}: expected a positive integer or one of {', '.join(NUM_FRAMES_MAP)}"
        )
    return frames
