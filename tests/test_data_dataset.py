"""VideoTextDataset / VariableVideoTextDataset items, skipping broken files, and collate_fn."""

import numpy as np
import pyarrow as pa
import pytest
from conftest import grey_clip as write_video
from test_data_video_io import write_image

from opensora_core.data.dataset import VariableVideoTextDataset, VideoTextDataset, collate_fn, parse_index
from opensora_core.errors import ConfigError


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "a.mp4", num_frames=30, fps=24)
    write_video(root / "b.mp4", num_frames=20, fps=30)
    write_image(root / "c.png", 40, 30)
    write_image(root / "d.png", 20, 20, value=10)
    (root / "broken.mp4").write_bytes(b"\x00" * 500)
    (root / "broken.png").write_bytes(b"\x00" * 500)
    return root


def table(media, names):
    info = {
        "a.mp4": (30, 48, 64, 24.0, False),
        "b.mp4": (20, 48, 64, 30.0, False),
        "c.png": (1, 40, 30, None, True),
        "d.png": (1, 20, 20, None, True),
        "broken.mp4": (30, 48, 64, 24.0, False),
        "broken.png": (1, 40, 40, None, True),
    }
    rows = [info[n] for n in names]
    return pa.table(
        {
            "path": [str(media / n) for n in names],
            "text": [f"caption of {n}" for n in names],
            "num_frames": [r[0] for r in rows],
            "height": [r[1] for r in rows],
            "width": [r[2] for r in rows],
            "fps": [r[3] for r in rows],
            "is_image": [r[4] for r in rows],
        }
    )


def test_parse_index_reads_idx_t_h_w():
    assert parse_index("12-16-240-426") == (12, 16, 240, 426)


def test_variable_item_has_bucket_shape_and_fields(media):
    ds = VariableVideoTextDataset(table(media, ["a.mp4", "c.png"]), frame_interval=2)
    item = ds["0-8-32-48"]
    assert item["video"].shape == (3, 8, 32, 48)
    assert -1.0 <= item["video"].min().item() and item["video"].max().item() <= 1.0
    assert item["text"] == "caption of a.mp4"
    assert item["fps"] == 12  # 24 fps // frame_interval 2
    assert (item["num_frames"], item["height"], item["width"]) == (8, 32, 48)
    assert item["ar"] == pytest.approx(32 / 48)
    assert item["bucket"] == "8-32-48"


def test_variable_image_is_one_frame_at_120_fps(media):
    ds = VariableVideoTextDataset(table(media, ["a.mp4", "c.png"]))
    item = ds["1-1-24-24"]
    assert item["video"].shape == (3, 1, 24, 24)
    assert item["fps"] == 120


def test_broken_video_is_replaced_by_a_long_enough_video(media):
    ds = VariableVideoTextDataset(table(media, ["broken.mp4", "c.png", "b.mp4", "a.mp4"]))
    item = ds["0-25-32-32"]
    assert item["path"].endswith("a.mp4")  # b.mp4 has only 20 frames, images are not videos
    assert item["video"].shape == (3, 25, 32, 32)
    assert ds.skipped == 1


def test_broken_image_is_replaced_by_another_image(media):
    ds = VariableVideoTextDataset(table(media, ["broken.png", "a.mp4", "d.png"]))
    item = ds["0-1-16-16"]
    assert item["path"].endswith("d.png")
    assert ds.skipped == 1


def test_item_without_a_working_substitute_is_none(media):
    ds = VariableVideoTextDataset(table(media, ["broken.mp4", "b.mp4"]))
    assert ds["0-25-32-32"] is None
    assert ds.skipped == 1


def test_collate_drops_failed_items(media):
    ds = VariableVideoTextDataset(table(media, ["broken.mp4", "a.mp4", "b.mp4"]))
    pair = collate_fn([ds["1-4-16-16"], None, ds["2-4-16-16"]])
    assert pair["video"].shape == (2, 3, 4, 16, 16)
    assert pair["text"] == ["caption of a.mp4", "caption of b.mp4"]
    assert pair["num_dropped"] == 1
    batch = collate_fn([ds["1-4-16-16"], ds["0-4-16-16"], ds["2-4-16-16"]])
    assert batch["video"].shape == (3, 3, 4, 16, 16)
    assert batch["num_dropped"] == 0  # the broken one was replaced by a long-enough video
    assert collate_fn([None, None]) is None


def test_start_frame_depends_on_epoch(media):
    ds = VariableVideoTextDataset(table(media, ["a.mp4"]), seed=1)
    firsts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        firsts.add(round(ds["0-2-8-8"]["video"].mean().item(), 3))
    assert len(firsts) > 1


def test_fixed_dataset_repeats_images_to_num_frames(media):
    ds = VideoTextDataset(table(media, ["a.mp4", "c.png"]), num_frames=6, image_size=(16, 16))
    video, image = ds[0], ds[1]
    assert video["video"].shape == image["video"].shape == (3, 6, 16, 16)
    assert np.allclose(image["video"][:, 0].numpy(), image["video"][:, 5].numpy())
    assert image["fps"] == 120 and video["fps"] == 24


def test_fixed_dataset_center_transform_needs_square_size(media):
    with pytest.raises(ConfigError, match="crops squares only"):
        VideoTextDataset(table(media, ["a.mp4"]), image_size=(16, 32), transform_name="center")


def test_dataloader_with_bucket_sampler_yields_bucket_shaped_batches(tmp_path):
    from torch.utils.data import DataLoader

    from opensora_core.data.bucket import BucketConfig
    from opensora_core.data.sampler import BucketBatchSampler

    for i in range(3):
        write_video(tmp_path / f"v{i}.mp4", num_frames=12, height=144, width=256)
        write_image(tmp_path / f"i{i}.png", 192, 192)
    names = [f"v{i}.mp4" for i in range(3)] + [f"i{i}.png" for i in range(3)]
    meta = pa.table(
        {
            "path": [str(tmp_path / n) for n in names],
            "text": names,
            "num_frames": [12, 12, 12, 1, 1, 1],
            "height": [144, 144, 144, 192, 192, 192],
            "width": [256, 256, 256, 192, 192, 192],
            "is_image": [False] * 3 + [True] * 3,
        }
    )
    cfg = BucketConfig.from_dict({"144p": {1: (1.0, 3), 4: (1.0, 2)}})
    sampler = BucketBatchSampler(meta, cfg, frame_interval=2, seed=0, epoch=0)
    loader = DataLoader(
        VariableVideoTextDataset(meta, frame_interval=2), batch_sampler=sampler, collate_fn=collate_fn
    )
    shapes = sorted(tuple(batch["video"].shape) for batch in loader)
    assert shapes == [(2, 3, 4, 144, 256), (2, 3, 4, 144, 256), (3, 3, 1, 192, 192)]
