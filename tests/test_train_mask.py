"""MaskGenerator: Open-Sora's mask_ratios names, identity = 1 - sum, validation, mask shapes."""

import random
from collections import Counter

import pytest
import torch

from opensora_core.errors import ConfigError
from opensora_core.train.mask import MASK_NAMES, MaskGenerator

V12_STAGE1 = {
    "random": 0.05,
    "intepolate": 0.005,
    "quarter_random": 0.005,
    "quarter_head": 0.005,
    "quarter_tail": 0.005,
    "quarter_head_tail": 0.005,
    "image_random": 0.025,
    "image_head": 0.05,
    "image_tail": 0.025,
    "image_head_tail": 0.025,
}


def test_identity_gets_the_rest_of_the_probability():
    gen = MaskGenerator(V12_STAGE1)
    assert gen.mask_ratios["identity"] == pytest.approx(0.8)
    assert list(gen.mask_ratios)[-1] == "identity"


def test_kinds_are_drawn_with_the_configured_frequencies():
    gen = MaskGenerator({"image_head": 0.2, "quarter_tail": 0.3})
    rng = random.Random(0)
    counts = Counter(gen.pick(rng) for _ in range(20000))
    assert counts["image_head"] / 20000 == pytest.approx(0.2, abs=0.015)
    assert counts["quarter_tail"] / 20000 == pytest.approx(0.3, abs=0.015)
    assert counts["identity"] / 20000 == pytest.approx(0.5, abs=0.015)


def test_same_rng_seed_gives_same_masks():
    gen = MaskGenerator(V12_STAGE1)
    x = torch.zeros(64, 4, 8, 2, 2)
    assert torch.equal(gen.get_masks(x, random.Random(3)), gen.get_masks(x, random.Random(3)))


def test_masks_are_bool_batch_by_latent_frames():
    masks = MaskGenerator({"random": 1.0}).get_masks(torch.zeros(5, 4, 7, 2, 2), random.Random(0))
    assert masks.shape == (5, 7) and masks.dtype == torch.bool
    assert bool(masks.any(dim=1).all())  # "random" always keeps at least one generated frame


def always(name, num_frames=8, seed=0):
    return MaskGenerator({name: 1.0}).get_mask(num_frames, random.Random(seed))


def test_image_masks_condition_single_frames():
    assert always("image_head").tolist() == [False] + [True] * 7
    assert always("image_tail").tolist() == [True] * 7 + [False]
    assert always("image_head_tail").tolist() == [False] + [True] * 6 + [False]
    assert (~always("image_random")).sum() == 1


def test_quarter_masks_condition_up_to_a_quarter_of_the_frames():
    for seed in range(50):
        head = always("quarter_head", 12, seed)
        n = int((~head).sum())
        assert 1 <= n <= 3 and not head[:n].any() and head[n:].all()
        tail = always("quarter_tail", 12, seed)
        n = int((~tail).sum())
        assert 1 <= n <= 3 and tail[: 12 - n].all()
        both = always("quarter_head_tail", 12, seed)
        assert not both[0] and not both[-1]


def test_intepolate_conditions_every_other_frame():
    mask = always("intepolate", 8)
    assert mask.tolist() in ([False, True] * 4, [True, False] * 4)


def test_single_frame_is_never_conditioned():
    for name in MASK_NAMES:
        assert always(name, 1).tolist() == [True]


def test_short_clips_with_quarter_masks_do_not_fail():
    assert (~always("quarter_random", 2)).sum() == 1


def test_unknown_name_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"mask_ratios\['quarter_middle'\]"):
        MaskGenerator({"quarter_middle": 0.1})


def test_ratio_outside_unit_interval_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mask_ratios\['image_head'\]=1.5"):
        MaskGenerator({"image_head": 1.5})


def test_ratios_that_do_not_sum_to_one_are_a_config_error():
    with pytest.raises(ConfigError, match="sum to 0.9"):
        MaskGenerator({"identity": 0.5, "image_head": 0.4})
    with pytest.raises(ConfigError, match="identity"):
        MaskGenerator({"image_head": 0.7, "image_tail": 0.6})


# v1.1.0's configs/opensora-v1-1/train/stage1.py and v1.0-era configs/opensora/train/16x256x256-mask.py.
V11_STAGE1 = {
    "mask_no": 0.75,
    "mask_quarter_random": 0.025,
    "mask_quarter_head": 0.025,
    "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05,
    "mask_image_random": 0.025,
    "mask_image_head": 0.025,
    "mask_image_tail": 0.025,
    "mask_image_head_tail": 0.05,
}
V10_MASK = {"mask_no": 0.7, "mask_random": 0.15, "mask_head": 0.05, "mask_tail": 0.05, "mask_head_tail": 0.05}


def test_earlier_release_names_read_as_the_current_masks(caplog):
    with caplog.at_level("INFO", logger="opensora_core.train.mask_ratios"):
        v11 = MaskGenerator(V11_STAGE1).mask_ratios
        v10 = MaskGenerator(V10_MASK).mask_ratios
    assert v11 == pytest.approx(
        {name.removeprefix("mask_").replace("no", "identity"): p for name, p in V11_STAGE1.items()}
    )
    assert v10 == pytest.approx(
        {
            "identity": 0.7,
            "quarter_random": 0.15,
            "quarter_head": 0.05,
            "quarter_tail": 0.05,
            "quarter_head_tail": 0.05,
        }
    )
    assert "mask_head → quarter_head" in caplog.text


def test_a_legacy_and_a_current_name_of_one_mask_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"mask_ratios\['mask_image_head'\]: names mask 'image_head' a second time"
    ):
        MaskGenerator({"image_head": 0.1, "mask_image_head": 0.1})
