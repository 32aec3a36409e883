"""Resolution names, aspect tables and lookups (spec/aspect-ratios.json, opensora-reference §1)."""

import pytest

from opensora_core.data.aspect import (
    ASPECT_RATIO_MAP,
    NUM_FRAMES_MAP,
    NUM_PIXELS,
    RATIO_TABLES,
    RESOLUTIONS,
    get_closest_ratio,
    get_image_size,
    get_num_frames,
    get_num_pixels,
)
from opensora_core.errors import ConfigError


def test_resolution_names_follow_table_order():
    assert RESOLUTIONS == (
        "144p", "256", "240p", "360p", "512", "480p", "720p",
        "1024", "1080p", "2k", "2048", "2880", "4k",
    )  # fmt: skip


def test_pixel_counts_match_open_sora():
    assert NUM_PIXELS["144p"] == 36864
    assert NUM_PIXELS["240p"] == 102240
    assert NUM_PIXELS["480p"] == 409920
    assert get_num_pixels("2880") == get_num_pixels("4k") == 8294400


def test_ratio_tables_hold_published_entries():
    assert RATIO_TABLES["240p"]["0.56"] == (240, 426)
    assert RATIO_TABLES["240p"]["0.67"] == (262, 393)
    assert RATIO_TABLES["480p"]["1.33"] == (740, 555)
    assert RATIO_TABLES["720p"]["2.08"] == (1386, 666)
    assert RATIO_TABLES["256"]["0.25"] == (128, 512)
    assert RATIO_TABLES["512"]["0.5"] == (352, 704)
    assert len(RATIO_TABLES["480p"]) == 17
    assert len(RATIO_TABLES["1024"]) == 40


def test_aspect_ratio_map_names_table_keys():
    assert ASPECT_RATIO_MAP["9:16"] == "0.56"
    assert ASPECT_RATIO_MAP["1:1"] == "1.00"
    assert set(ASPECT_RATIO_MAP.values()) == set(RATIO_TABLES["240p"])


def test_num_frames_names():
    assert NUM_FRAMES_MAP["4s"] == 102
    assert get_num_frames("2x") == 102
    assert get_num_frames("16s") == 408
    assert get_num_frames("51") == 51
    assert get_num_frames(17) == 17


def test_unknown_num_frames_name_lists_valid_names():
    with pytest.raises(ConfigError, match="4s"):
        get_num_frames("5 seconds")


def test_get_image_size_from_hw_name_or_key():
    assert get_image_size("240p", "9:16") == (240, 426)
    assert get_image_size("720p", "1:1") == (960, 960)
    assert get_image_size("240p", "1.78") == (426, 240)


def test_get_image_size_unknown_resolution_lists_names():
    with pytest.raises(ConfigError, match="valid names: 144p, 256, 240p"):
        get_image_size("300p", "9:16")


def test_get_image_size_unknown_ratio_lists_valid_ratios():
    with pytest.raises(ConfigError, match="9:16"):
        get_image_size("240p", "7:5")


def test_closest_ratio_picks_nearest_key():
    assert get_closest_ratio(720, 1280, RATIO_TABLES["240p"]) == "0.56"
    assert get_closest_ratio(1080, 1080, RATIO_TABLES["256"]) == "1.0"


def test_closest_ratio_ties_go_to_first_key():
    assert get_closest_ratio(2, 1, {"1.0": 0, "3.0": 0}) == "1.0"
    assert get_closest_ratio(2, 1, {"3.0": 0, "1.0": 0}) == "3.0"
    # 7/8 is exactly between 0.75 and 1.00 in the 240p table.
    assert get_closest_ratio(700, 800, RATIO_TABLES["240p"]) == "0.75"
