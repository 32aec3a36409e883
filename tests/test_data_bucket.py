"""Bucket config parsing and the assignment rules of spec/buckets.md."""

import numpy as np
import pytest

from opensora_core.data.aspect import NUM_PIXELS, RATIO_TABLES, RESOLUTIONS
from opensora_core.data.bucket import BucketConfig, BucketKey, assign_buckets, bucket_of_sample, sample_draws
from opensora_core.errors import ConfigError


def assign_one(cfg_dict, t, h, w, frame_interval=1, key="a.mp4", seed=0, epoch=0):
    a = assign_buckets([t], [h], [w], [key], BucketConfig.from_dict(cfg_dict), frame_interval, seed, epoch)
    if a.resolution[0] is None:
        return None
    return (a.resolution[0], int(a.num_frames[0]), a.aspect_ratio[0], int(a.height[0]), int(a.width[0]))


# --- config parsing -----------------------------------------------------------------------------


def test_config_walks_resolutions_from_most_pixels():
    cfg = BucketConfig.from_dict({"240p": {16: (1.0, 8)}, "1080p": {1: (1.0, 4)}, "480p": {1: (1.0, 8)}})
    assert [rb.resolution for rb in cfg.resolutions] == ["1080p", "480p", "240p"]


def test_config_equal_pixels_keep_table_order():
    cfg = BucketConfig.from_dict({"4k": {1: (1.0, 1)}, "2880": {1: (1.0, 1)}})
    assert [rb.resolution for rb in cfg.resolutions] == ["2880", "4k"]


def test_config_accepts_t_prob_entries():
    cfg = BucketConfig.from_dict({"144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27)}})
    rb = cfg.resolutions[0]
    assert rb.image.batch_size == 475
    assert [(e.num_frames, e.keep_prob, e.t_prob, e.batch_size) for e in rb.videos] == [
        (102, 1.0, 0.33, 27),
        (51, 1.0, 1.0, 51),
    ]


def test_config_batch_sizes_skip_disabled_buckets():
    cfg = BucketConfig.from_dict({"480p": {1: (1.0, 52), 16: (0.5, 4), 32: (0.0, None)}})
    assert cfg.batch_sizes() == {("480p", 16): 4, ("480p", 1): 52}
    assert cfg.batch_size("480p", 32) is None


def test_config_round_trips_through_to_dict():
    raw = {"480p": {32: (0.0, None), 16: (0.5, 4), 1: (1.0, 52)}, "144p": {102: ((1.0, 0.33), 27)}}
    assert BucketConfig.from_dict(raw).to_dict() == raw


def test_config_accepts_digit_string_frame_keys_from_cli_overrides():
    cfg = BucketConfig.from_dict({"240p": {"16": (1.0, 8)}})
    assert cfg.batch_sizes() == {("240p", 16): 8}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"300p": {16: (1.0, 8)}}, r'bucket_config\["300p"\]: unknown resolution name; valid names: 144p'),
        ({"480p": {16: (1.5, 8)}}, r'bucket_config\["480p"\]\[16\]: keep_prob 1.5 must be within \[0, 1\]'),
        ({"480p": {16: (-0.1, 8)}}, r'bucket_config\["480p"\]\[16\]: keep_prob'),
        ({"480p": {16: ((1.0, 2.0), 8)}}, r'bucket_config\["480p"\]\[16\]: t_prob 2.0'),
        ({"480p": {16: (1.0, None)}}, r'bucket_config\["480p"\]\[16\]: .*batch_size must be a positive'),
        ({"480p": {16: (0.5, 0)}}, r'bucket_config\["480p"\]\[16\]: .*batch_size must be a positive'),
        ({"480p": {16.5: (1.0, 8)}}, r'bucket_config\["480p"\]\[16.5\]: num_frames keys must be'),
        ({"480p": {"16f": (1.0, 8)}}, r'bucket_config\["480p"\]\["16f"\]: num_frames keys must be'),
        ({"480p": {16: (1.0, 8, 3)}}, r'bucket_config\["480p"\]\[16\]: expected \(keep_prob, batch_size\)'),
        ({"480p": {16: 1.0}}, r'bucket_config\["480p"\]\[16\]: expected'),
        ({"480p": {16: ((1.0,), 8)}}, r'bucket_config\["480p"\]\[16\]: expected'),
        ({"480p": (1.0, 8)}, r'bucket_config\["480p"\]: expected a non-empty dict'),
        (
            {"480p": {16: (0.0, None)}, "240p": {1: (0.0, None)}},
            r"bucket_config: every bucket has keep_prob 0",
        ),
        ({}, r"bucket_config: expected a non-empty dict"),
    ],
)
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        BucketConfig.from_dict(raw)


# --- rules, one at a time -----------------------------------------------------------------------


def test_resolution_opens_at_exactly_80_percent_of_its_pixels():
    assert 284 * 288 * 5 == NUM_PIXELS["240p"] * 4
    cfg = {"240p": {1: (1.0, 8)}}
    assert assign_one(cfg, 1, 284, 288)[0] == "240p"


def test_resolution_closed_below_80_percent_of_its_pixels():
    assert assign_one({"240p": {1: (1.0, 8)}}, 1, 283, 289) is None


def test_video_needs_strictly_more_than_t_times_frame_interval_frames():
    cfg = {"240p": {16: (1.0, 8)}}
    assert assign_one(cfg, 32, 240, 426, frame_interval=2) is None
    assert assign_one(cfg, 33, 240, 426, frame_interval=2) == ("240p", 16, "0.56", 240, 426)


def test_video_takes_largest_fitting_frame_count():
    cfg = {"240p": {16: (1.0, 8), 32: (1.0, 4), 64: (1.0, 2)}}
    assert assign_one(cfg, 50, 240, 426)[1] == 32
    assert assign_one(cfg, 65, 240, 426)[1] == 64


def test_image_goes_to_the_one_frame_entry():
    cfg = {"240p": {1: (1.0, 8), 16: (1.0, 8)}}
    assert assign_one(cfg, 1, 240, 426) == ("240p", 1, "0.56", 240, 426)


def test_image_skips_resolution_without_one_frame_entry():
    cfg = {"480p": {16: (1.0, 8)}, "240p": {1: (1.0, 8)}}
    assert assign_one(cfg, 1, 720, 1280)[:2] == ("240p", 1)


def test_video_never_goes_to_the_one_frame_entry():
    assert assign_one({"240p": {1: (1.0, 8)}}, 10, 240, 426) is None


def test_too_short_video_falls_through_to_smaller_resolution():
    cfg = {"480p": {64: (1.0, 8)}, "240p": {16: (1.0, 8)}}
    assert assign_one(cfg, 40, 720, 1280)[:2] == ("240p", 16)


def test_keep_prob_zero_falls_through_to_next_resolution():
    cfg = {"480p": {16: (0.0, None)}, "240p": {16: (1.0, 8)}}
    assert assign_one(cfg, 40, 720, 1280)[:2] == ("240p", 16)


def test_unkept_t_moves_on_to_next_resolution_not_next_length():
    # t is chosen first (32, disabled); not kept -> 240p, never 480p/16.
    cfg = {"480p": {16: (1.0, 4), 32: (0.0, None)}, "240p": {16: (1.0, 8)}}
    assert assign_one(cfg, 40, 720, 1280)[:2] == ("240p", 16)


def test_keep_prob_one_keeps_at_largest_open_resolution():
    cfg = {"480p": {16: (1.0, 4)}, "240p": {16: (1.0, 8)}}
    assert assign_one(cfg, 40, 720, 1280) == ("480p", 16, "0.56", 480, 854)


def test_t_prob_zero_entry_is_passed_over_for_next_shorter():
    cfg = {"240p": {16: (1.0, 8), 64: ((1.0, 0.0), 2)}}
    assert assign_one(cfg, 100, 240, 426)[1] == 16


def test_t_prob_one_entry_is_taken():
    cfg = {"240p": {16: (1.0, 8), 64: ((1.0, 1.0), 2)}}
    assert assign_one(cfg, 100, 240, 426)[1] == 64


def test_equal_pixel_resolutions_tried_in_table_order():
    cfg = {"4k": {1: (1.0, 1)}, "2880": {1: (1.0, 1)}}
    assert assign_one(cfg, 1, 2160, 3840)[0] == "2880"


def test_aspect_key_is_closest_in_chosen_table():
    cfg = {"256": {1: (1.0, 8)}, "240p": {16: (1.0, 8)}}
    assert assign_one(cfg, 1, 300, 1200) == ("256", 1, "0.25", 128, 512)
    assert assign_one(cfg, 20, 1080, 600) == ("240p", 16, "1.78", 426, 240)


def test_aspect_key_tie_goes_to_first_table_key():
    assert assign_one({"240p": {1: (1.0, 8)}}, 1, 700, 800) == ("240p", 1, "0.75", 276, 368)


def test_small_sample_sits_out():
    assert assign_one({"480p": {1: (1.0, 8)}}, 1, 240, 426) is None


def test_bucket_key_orders_and_names_buckets():
    key = BucketKey.from_names("240p", 16, "0.56")
    assert key.id == "240p-16-0.56"
    assert key.size == (240, 426)
    assert BucketKey.from_names("144p", 51, "1.00") < key


# --- against an independent per-row reference ---------------------------------------------------


def reference_bucket(t, h, w, cfg_dict, frame_interval):
    """Slow spec reading, valid when every probability is 0 or 1."""
    names = sorted(cfg_dict, key=lambda n: (-NUM_PIXELS[n], RESOLUTIONS.index(n)))
    for name in names:
        if h * w < 0.8 * NUM_PIXELS[name]:
            continue
        entries = cfg_dict[name]
        chosen = None
        if t == 1:
            probs = entries.get(1, (0.0, None))[0]
            if (probs[0] if isinstance(probs, tuple) else probs) == 1.0:  # t_prob plays no part for images
                chosen = 1
        else:
            for frames in sorted((f for f in entries if f != 1), reverse=True):
                probs = entries[frames][0]
                keep, t_prob = probs if isinstance(probs, tuple) else (probs, 1.0)
                if t_prob == 0.0:
                    continue
                if t > frames * frame_interval:
                    chosen = frames if keep == 1.0 else None
                    break
        if chosen is None:
            continue
        table = RATIO_TABLES[name]
        best = min(table, key=lambda k: abs(float(k) - h / w))
        return (name, chosen, best, *table[best])
    return None


def random_config(rng):
    names = rng.choice(RESOLUTIONS, size=rng.integers(1, 6), replace=False)
    cfg = {}
    for name in names:
        entries = {}
        for frames in rng.choice([1, 2, 4, 16, 32, 51, 64, 102, 204], size=rng.integers(1, 5), replace=False):
            keep = float(rng.choice([0.0, 1.0]))
            probs = (keep, float(rng.choice([0.0, 1.0]))) if rng.random() < 0.3 else keep
            entries[int(frames)] = (probs, int(rng.integers(1, 64)) if keep else None)
        cfg[str(name)] = entries
    first = next(iter(cfg))
    cfg[first][1] = (1.0, 8)  # something is always kept
    return cfg


def test_vectorised_assignment_matches_reference_rows():
    rng = np.random.default_rng(7)
    n = 2000
    is_image = rng.random(n) < 0.3
    frames = np.where(is_image, 1, rng.integers(2, 900, n))
    height = rng.integers(64, 4400, n)
    width = rng.integers(64, 4400, n)
    keys = [f"clip_{i}.mp4" for i in range(n)]
    for trial in range(5):
        cfg_dict = random_config(rng)
        frame_interval = int(rng.integers(1, 4))
        a = assign_buckets(
            frames, height, width, keys, BucketConfig.from_dict(cfg_dict), frame_interval, 3, trial
        )
        for i in range(n):
            got = None
            if a.resolution[i] is not None:
                got = (
                    a.resolution[i],
                    int(a.num_frames[i]),
                    a.aspect_ratio[i],
                    int(a.height[i]),
                    int(a.width[i]),
                )
            assert got == reference_bucket(
                int(frames[i]), int(height[i]), int(width[i]), cfg_dict, frame_interval
            )


# --- the per-sample rule (bucket_of_sample) against the vectorised one, draws included ----------

# configs/opensora-v1-2/train/stage3.py's bucket_config: fractional keep_probs and t_probs at every size
STAGE3 = {
    "144p": {1: (1.0, 475), 51: (1.0, 51), 102: (1.0, 27), 204: (1.0, 13), 408: (1.0, 6)},
    "256": {1: (1.0, 297), 51: (0.5, 20), 102: (0.5, 10), 204: (0.5, 5), 408: ((0.5, 0.5), 2)},
    "240p": {1: (1.0, 297), 51: (0.5, 20), 102: (0.5, 10), 204: (0.5, 5), 408: ((0.5, 0.4), 2)},
    "360p": {1: (1.0, 141), 51: (0.5, 8), 102: (0.5, 4), 204: (0.5, 2), 408: ((0.5, 0.3), 1)},
    "512": {1: (1.0, 141), 51: (0.5, 8), 102: (0.5, 4), 204: (0.5, 2), 408: ((0.5, 0.2), 1)},
    "480p": {1: (1.0, 89), 51: (0.5, 5), 102: (0.5, 3), 204: ((0.5, 0.5), 1), 408: (0.0, None)},
    "720p": {1: (0.3, 36), 51: (0.2, 2), 102: (0.1, 1), 204: (0.0, None)},
    "1024": {1: (0.3, 36), 51: (0.1, 2), 102: (0.1, 1), 204: (0.0, None)},
    "1080p": {1: (0.1, 5)},
    "2048": {1: (0.05, 5)},
}
SMALL = {
    "240p": {1: (0.5, 8), 16: (1.0, 4), 51: ((0.5, 0.5), 2), 102: (0.0, None)},
    "144p": {1: (1.0, 16), 16: (0.5, 8)},
}
EQUAL_PIXELS = {  # 2880 and 4k have equal pixel counts: tried in table order
    "4k": {1: (0.5, 1), 16: ((0.6, 0.5), 1)},
    "2880": {1: (0.5, 1), 16: ((0.7, 0.5), 1), 4: (0.4, 1)},
    "144p": {1: (1.0, 8), 2: (0.8, 8)},
}


def fractional_config(rng):
    """A random bucket_config whose keep_probs and t_probs are anywhere in [0, 1]."""
    cfg = {}
    for name in rng.choice(RESOLUTIONS, size=rng.integers(1, 7), replace=False):
        entries = {}
        for frames in rng.choice([1, 2, 4, 16, 32, 51, 64, 102, 204], size=rng.integers(1, 6), replace=False):
            keep = float(rng.choice([0.0, 1.0, rng.random()]))
            probs = (keep, float(rng.choice([0.0, 1.0, rng.random()]))) if rng.random() < 0.4 else keep
            entries[int(frames)] = (probs, int(rng.integers(1, 64)) if keep else None)
        cfg[str(name)] = entries
    cfg[next(iter(cfg))][1] = (1.0, 8)  # something is always kept
    return cfg


def samples_near_every_threshold(rng, cfg, frame_interval, n):
    """(frames, height, width): random sizes, plus sizes right at 80 % of each resolution's pixels and
    frame counts right at t x frame_interval, where the rule's comparisons decide."""
    is_image = rng.random(n) < 0.3
    frames = np.where(is_image, 1, rng.integers(0, 900, n))
    height, width = rng.integers(1, 4400, n), rng.integers(1, 4400, n)
    lengths = [e.num_frames * frame_interval for rb in cfg.resolutions for e in rb.videos]
    edge = rng.random(n) < 0.4
    if lengths:
        frames[edge] = rng.choice(lengths, int(edge.sum())) + rng.integers(0, 2, int(edge.sum()))
    for i in np.flatnonzero(rng.random(n) < 0.3):  # H x W exactly 4/5 of a resolution's pixels, or one less
        pixels = NUM_PIXELS[rng.choice([rb.resolution for rb in cfg.resolutions])]
        area = -(-4 * pixels // 5) - int(rng.integers(0, 2))
        divisors = [d for d in range(16, 4400) if area % d == 0] or [1]
        height[i] = rng.choice(divisors)
        width[i] = area // height[i]
    return frames, height, width


@pytest.mark.parametrize("config", ["stage3", "small", "equal_pixels", "random"])
def test_vectorised_assignment_follows_the_per_sample_rule_and_its_draws(config):
    rng = np.random.default_rng(["stage3", "small", "equal_pixels", "random"].index(config))
    cfgs = {"stage3": [STAGE3], "small": [SMALL], "equal_pixels": [EQUAL_PIXELS]}.get(config)
    n = 1500
    for trial, cfg_dict in enumerate(cfgs or [fractional_config(rng) for _ in range(3)]):
        cfg = BucketConfig.from_dict(cfg_dict)
        frame_interval = int(rng.integers(1, 4))
        frames, height, width = samples_near_every_threshold(rng, cfg, frame_interval, n)
        keys = [f"/data/{config}/{trial}/clip_{i:05d}.mp4" for i in range(n)]
        seed, epoch = int(rng.integers(0, 2**40)), int(rng.integers(0, 100))
        a = assign_buckets(frames, height, width, keys, cfg, frame_interval, seed, epoch)
        for i in range(n):
            draw = sample_draws(keys[i], seed, epoch)
            want = bucket_of_sample(int(frames[i]), int(height[i]), int(width[i]), cfg, frame_interval, draw)
            assert a.key(i) == want, (keys[i], int(frames[i]), int(height[i]), int(width[i]))
            if want is not None:
                assert (int(a.height[i]), int(a.width[i])) == want.size
        assert 0 < int(a.kept.sum()) < n


def test_per_sample_rule_reads_the_spec_on_one_clip():
    cfg = BucketConfig.from_dict({"480p": {16: (1.0, 4)}, "240p": {51: (1.0, 2), 16: (1.0, 8)}})
    never = lambda resolution, t, purpose: 0.99  # noqa: E731  every draw high: only probability 1 keeps
    # 40 frames of 240x426: too few pixels for 480p, too short for 51 (40 <= 51), long enough for 16
    assert bucket_of_sample(40, 240, 426, cfg, 1, never) == BucketKey.from_names("240p", 16, "0.56")
    assert bucket_of_sample(16, 240, 426, cfg, 1, never) is None  # 16 frames are not more than 16
    assert bucket_of_sample(1, 240, 426, cfg, 1, never) is None  # no `1` entry anywhere


# --- randomness ---------------------------------------------------------------------------------


def draw_rows(n):
    return np.full(n, 100), np.full(n, 720), np.full(n, 1280), [f"v{i}.mp4" for i in range(n)]


def within_binomial(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_fractional_keep_prob_keeps_that_share():
    frames, h, w, keys = draw_rows(20000)
    cfg = BucketConfig.from_dict({"480p": {16: (0.3, 4)}, "240p": {16: (1.0, 8)}})
    a = assign_buckets(frames, h, w, keys, cfg, 1, seed=11, epoch=0)
    assert within_binomial(int((a.resolution == "480p").sum()), 20000, 0.3)
    assert int((a.resolution == "240p").sum()) == 20000 - int((a.resolution == "480p").sum())


def test_t_prob_sends_that_share_to_the_longer_length():
    frames, h, w, keys = draw_rows(20000)
    cfg = BucketConfig.from_dict({"240p": {16: (1.0, 8), 51: ((1.0, 0.33), 4)}})
    a = assign_buckets(frames, h, w, keys, cfg, 1, seed=5, epoch=2)
    assert within_binomial(int((a.num_frames == 51).sum()), 20000, 0.33)
    assert set(np.unique(a.num_frames).tolist()) == {16, 51}


def test_draws_repeat_for_same_seed_and_epoch():
    frames, h, w, keys = draw_rows(500)
    cfg = BucketConfig.from_dict({"480p": {16: (0.5, 4)}, "240p": {16: (1.0, 8)}})
    a = assign_buckets(frames, h, w, keys, cfg, 1, seed=1, epoch=4)
    b = assign_buckets(frames, h, w, keys, cfg, 1, seed=1, epoch=4)
    assert (a.resolution_index == b.resolution_index).all()


def test_draws_change_with_epoch_and_seed():
    frames, h, w, keys = draw_rows(2000)
    cfg = BucketConfig.from_dict({"480p": {16: (0.5, 4)}, "240p": {16: (1.0, 8)}})
    base = assign_buckets(frames, h, w, keys, cfg, 1, seed=1, epoch=0).resolution_index
    other_epoch = assign_buckets(frames, h, w, keys, cfg, 1, seed=1, epoch=1).resolution_index
    other_seed = assign_buckets(frames, h, w, keys, cfg, 1, seed=2, epoch=0).resolution_index
    # Independent draws agree on about half the rows.
    assert within_binomial(int((base == other_epoch).sum()), 2000, 0.5)
    assert within_binomial(int((base == other_seed).sum()), 2000, 0.5)


def test_assignment_is_the_same_whatever_the_chunking():
    rng = np.random.default_rng(3)
    n = 3000
    frames = np.where(rng.random(n) < 0.3, 1, rng.integers(2, 400, n))
    h, w = rng.integers(100, 2000, n), rng.integers(100, 2000, n)
    keys = np.array([f"dir/{i}.mp4" for i in range(n)], dtype=object)
    cfg = BucketConfig.from_dict(
        {
            "144p": {1: (0.5, 64), 51: (0.7, 16), 102: ((0.6, 0.33), 8)},
            "240p": {1: (0.4, 32), 51: ((0.5, 0.5), 8), 102: ((0.3, 0.2), 4)},
            "480p": {1: (0.3, 16), 51: (0.2, 2)},
        }
    )
    whole = assign_buckets(frames, h, w, keys, cfg, 2, seed=9, epoch=3)
    cuts = [0, 1, 17, 900, 901, 2500, n]
    parts = [
        assign_buckets(frames[a:b], h[a:b], w[a:b], keys[a:b], cfg, 2, 9, 3)
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    for field in ("resolution_index", "num_frames", "aspect_index", "height", "width"):
        assert (np.concatenate([getattr(p, field) for p in parts]) == getattr(whole, field)).all()


def test_key_hashes_depend_only_on_each_key(monkeypatch):
    import pyarrow as pa

    from opensora_core.data import stable_hash
    from opensora_core.data.stable_hash import key_hashes

    keys = ["", "a", "/data/clip_0001.mp4", "/données/é.mp4", "x" * 300, "a\x00"]
    whole = key_hashes(keys)
    assert len(set(whole.tolist())) == len(keys)  # "a" and "a\x00" differ too
    assert (key_hashes(pa.array(keys, pa.large_string())) == whole).all()
    assert (key_hashes(pa.chunked_array([keys[:2], keys[2:]])) == whole).all()
    assert (key_hashes(pa.array(keys).slice(2)) == whole[2:]).all()
    assert (key_hashes(keys[::-1]) == whole[::-1]).all()
    # hashing in chunks smaller than one key gives the same values
    monkeypatch.setattr(stable_hash, "_HASH_CHUNK_BYTES", 7)
    stable_hash._base_powers.cache_clear()
    try:
        assert (key_hashes(keys) == whole).all()
    finally:
        stable_hash._base_powers.cache_clear()
