"""BucketBatchSampler: one bucket per batch, per-bucket batch sizes, ranks, SP groups, resume."""

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from opensora_core.data.bucket import BucketConfig, assign_buckets
from opensora_core.data.bucket_build import bucket_columns
from opensora_core.data.manifest import Manifest, bucket_config_to_json
from opensora_core.data.sampler import BucketBatchSampler
from opensora_core.data.snapshot import Snapshot
from opensora_core.errors import ConfigError

CFG = BucketConfig.from_dict(
    {
        "240p": {1: (0.6, 5), 16: (1.0, 4), 51: (0.5, 3)},
        "144p": {1: (1.0, 7), 16: (1.0, 6)},
    }
)


def metadata(n=400, seed=0):
    rng = np.random.default_rng(seed)
    is_image = rng.random(n) < 0.4
    return pa.table(
        {
            "path": [f"/d/{i}.mp4" for i in range(n)],
            "num_frames": np.where(is_image, 1, rng.integers(2, 200, n)),
            "height": rng.choice([144, 240, 480, 720], n),
            "width": rng.choice([256, 426, 854, 1280], n),
        }
    )


def snapshot_of(meta, epoch=0, seed=3):
    """A snapshot drawn for (seed, epoch), as build_snapshot would store it (without Ray)."""
    full = bucket_columns(meta, CFG, 1, seed, epoch).drop_columns(["__bucket_order"])
    manifest = Manifest(
        snapshot_id="test", created_at="", config_hash="", metadata_fingerprint="", metadata_path="",
        seed=seed, epoch=epoch, frame_interval=1, bucket_config=bucket_config_to_json(CFG),
        num_samples=meta.num_rows, num_kept=full.num_rows - full["bucket_res"].null_count, buckets=(),
    )  # fmt: skip
    return Snapshot(Path("."), manifest, _full=full)


def row_of(item):
    return int(item.split("-")[0])


def shape_of(item):
    return tuple(int(x) for x in item.split("-")[1:])


def all_batches(sampler):
    return list(iter(sampler))


def test_batches_never_mix_buckets():
    snap = snapshot_of(metadata())
    table = snap.full_table()
    for batch in all_batches(BucketBatchSampler(snap)):
        buckets = {
            (table["bucket_res"][row_of(i)].as_py(), table["bucket_ar"][row_of(i)].as_py()) for i in batch
        }
        assert len(buckets) == 1
        assert len({shape_of(i) for i in batch}) == 1


def test_each_bucket_uses_its_batch_size():
    snap = snapshot_of(metadata())
    sizes = {(16, 240, 426): 4, (1, 240, 426): 5, (16, 144, 256): 6, (1, 144, 256): 7, (51, 240, 426): 3}
    for batch in all_batches(BucketBatchSampler(snap)):
        shape = shape_of(batch[0])
        if shape in sizes:
            assert len(batch) == sizes[shape]


def test_every_kept_sample_appears_and_padding_repeats_bucket_heads():
    snap = snapshot_of(metadata())
    seen = Counter(row_of(i) for batch in all_batches(BucketBatchSampler(snap, shuffle=False)) for i in batch)
    kept = {i for i, r in enumerate(snap.full_table()["bucket_res"].to_pylist()) if r is not None}
    assert set(seen) == kept
    sampler = BucketBatchSampler(snap, shuffle=False)
    for key, rows in sampler.bucket_rows().items():
        bs = CFG.batch_size(key.resolution, key.num_frames)
        padded = np.resize(rows, -(-len(rows) // bs) * bs)  # the bucket repeated from its start
        assert [seen[r] for r in rows] == [int((padded == r).sum()) for r in rows]


def test_drop_last_yields_only_full_batches_of_distinct_samples():
    snap = snapshot_of(metadata())
    items = [i for batch in all_batches(BucketBatchSampler(snap, drop_last=True)) for i in batch]
    assert len(items) == len(set(items))


def test_same_seed_and_epoch_repeat_the_order():
    snap = snapshot_of(metadata())
    assert all_batches(BucketBatchSampler(snap, epoch=0)) == all_batches(BucketBatchSampler(snap, epoch=0))


def test_new_epoch_reshuffles():
    snap = snapshot_of(metadata())
    sampler = BucketBatchSampler(snap)
    first = all_batches(sampler)
    sampler.set_epoch(1)
    assert all_batches(sampler) != first


def test_ranks_split_the_batches_evenly():
    snap = snapshot_of(metadata())
    whole = all_batches(BucketBatchSampler(snap, num_replicas=1, rank=0))
    per_rank = [all_batches(BucketBatchSampler(snap, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    assert len(BucketBatchSampler(snap, num_replicas=3, rank=0)) == len(per_rank[0])
    dealt = [batch for step in zip(*per_rank, strict=True) for batch in step]
    assert dealt[: len(whole)] == whole  # padding only appends copies of the first batches
    assert dealt[len(whole) :] == whole[: len(dealt) - len(whole)]


def test_ranks_of_one_sp_group_get_identical_batches():
    snap = snapshot_of(metadata())
    ranks = [all_batches(BucketBatchSampler(snap, num_replicas=4, rank=r, sp_size=2)) for r in range(4)]
    assert ranks[0] == ranks[1] and ranks[2] == ranks[3]
    assert ranks[0] != ranks[2]


def test_sp_size_must_divide_world_size():
    with pytest.raises(ConfigError, match="sp_size=3 must divide the number of ranks"):
        BucketBatchSampler(snapshot_of(metadata()), num_replicas=4, rank=0, sp_size=3)


def test_resume_mid_epoch_continues_where_it_stopped():
    snap = snapshot_of(metadata())
    sampler = BucketBatchSampler(snap, num_replicas=2, rank=1, epoch=0)
    full = all_batches(sampler)
    it = iter(sampler)
    for _ in range(5):
        next(it)
    state = sampler.state_dict()
    assert state == {"seed": 3, "epoch": 0, "consumed_batches": 10}
    resumed = BucketBatchSampler(snap, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert all_batches(resumed) == full[5:]


def test_state_dict_uses_the_callers_step_count():
    sampler = BucketBatchSampler(snapshot_of(metadata()), num_replicas=4, rank=0)
    assert sampler.state_dict(step=3)["consumed_batches"] == 12


def test_resume_with_fewer_ranks_skips_the_batches_already_trained():
    snap = snapshot_of(metadata())
    whole = all_batches(BucketBatchSampler(snap))
    resumed = BucketBatchSampler(snap, num_replicas=2, rank=0)
    resumed.load_state_dict({"seed": 3, "epoch": 0, "consumed_batches": 8})
    assert all_batches(resumed)[0] == whole[8]


def test_snapshot_epoch_is_used_as_stored():
    snap = snapshot_of(metadata(), epoch=0)
    table = snap.full_table()
    drawn = {row_of(i): shape_of(i) for batch in all_batches(BucketBatchSampler(snap)) for i in batch}
    for row, shape in drawn.items():
        stored = tuple(table[c][row].as_py() for c in ("bucket_frames", "bucket_height", "bucket_width"))
        assert stored == shape


def test_other_epoch_is_redrawn_with_assign_buckets():
    meta = metadata()
    snap = snapshot_of(meta, epoch=0)
    a = assign_buckets(
        meta["num_frames"].to_numpy(), meta["height"].to_numpy(), meta["width"].to_numpy(),
        meta["path"].to_pylist(), CFG, 1, 3, 5,
    )  # fmt: skip
    sampler = BucketBatchSampler(snap, epoch=5, drop_last=True)
    drawn = {row_of(i): shape_of(i) for batch in all_batches(sampler) for i in batch}
    assert (len(drawn), len(all_batches(sampler))) == (315, 70)  # 70 full batches, no row twice
    for row, shape in drawn.items():
        assert shape == (int(a.num_frames[row]), int(a.height[row]), int(a.width[row]))
    # The redraw equals what a snapshot built for epoch 5 would give.
    assert all_batches(sampler) == all_batches(BucketBatchSampler(snapshot_of(meta, epoch=5), drop_last=True))


def test_plain_table_needs_config_and_frame_interval():
    with pytest.raises(ConfigError, match="needs bucket_cfg and frame_interval"):
        BucketBatchSampler(metadata())


def test_each_epoch_has_its_own_number_of_batches_and_len_follows_set_epoch():
    # keep_prob < 1 redraws the buckets every epoch, so an epoch's full batches are its own: the training
    # loop takes len() after set_epoch (with one count for all epochs the demo ran out of batches in epoch 1)
    sampler = BucketBatchSampler(snapshot_of(metadata()), drop_last=True)
    lengths = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        lengths.append(len(sampler))
        assert len(all_batches(sampler)) == lengths[-1]
    assert len(set(lengths)) > 1, lengths


def test_without_redraw_every_epoch_keeps_the_stored_buckets_and_only_the_given_rows():
    """Training from features: the clips were encoded at their stored bucket's size, so no epoch redraws,
    and rows without features (here every third one) never reach a batch."""
    snap = snapshot_of(metadata(), epoch=0)
    table = snap.full_table()
    rows = np.arange(0, table.num_rows)[np.arange(table.num_rows) % 3 != 0]
    sampler = BucketBatchSampler(snap, drop_last=True, redraw=False, rows=rows)
    redrawn = BucketBatchSampler(snap, drop_last=True, rows=rows)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        redrawn.set_epoch(epoch)
        drawn = {row_of(i): shape_of(i) for batch in all_batches(sampler) for i in batch}
        assert drawn and all(row % 3 != 0 for row in drawn)
        for row, shape in drawn.items():
            stored = tuple(table[c][row].as_py() for c in ("bucket_frames", "bucket_height", "bucket_width"))
            assert stored == shape
    # with redraws (keep_prob < 1) epoch 2 would have put the same rows into other buckets
    kept, redrawn_kept = sampler.bucket_rows(), redrawn.bucket_rows()
    assert kept.keys() != redrawn_kept.keys() or any(
        not np.array_equal(kept[k], redrawn_kept[k]) for k in kept
    )
