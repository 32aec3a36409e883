"""A torch Dataset over a feature snapshot, indexed like `VariableVideoTextDataset` ("idx-T-H-W").

Each item holds what the train step would otherwise compute: `latent` [C, T', H', W'] (video
features) or the decoded `video` (text features only, through VariableVideoTextDataset), and the
caption as `y` [1, L, D] with its `mask` [L] (text features) or as `text` (video features only),
plus the conditioning stored with the features (num_frames, height, width, fps, ar), `bucket`
and `index`. `collate_fn` (opensora_core.data.dataset) stacks them.

With `views` > 1 encodings per clip, the view of sample i in epoch e is drawn from (seed, e, i):
each epoch sees one of the clip's crops, the same one on any number of workers and after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from opensora_core.data.dataset import VariableVideoTextDataset, parse_index
from opensora_core.features.store import FeatureSnapshot

CONDITION_FIELDS = ("num_frames", "height", "width", "fps", "ar")


def view_of(seed: int, epoch: int, sample: int, views: int) -> int:
    """Which of a clip's `views` encodings epoch `epoch` trains on."""
    if views == 1:
        return 0
    return int(np.random.default_rng([seed & 0xFFFFFFFF, epoch, sample]).integers(views))


class FeatureDataset(Dataset):
    """Stored features by "idx-T-H-W" (idx = row of the bucket snapshot's full table).

    `video` is the dataset that decodes clips when the features hold no latents (None with video
    features). A clip it replaced by a substitute takes the substitute's caption features; a row
    without features gives None, which collate_fn drops.
    """

    def __init__(
        self,
        features: FeatureSnapshot,
        *,
        video_features: bool,
        text_features: bool,
        seed: int,
        video: VariableVideoTextDataset | None = None,
    ) -> None:
        if not video_features and video is None:
            raise ValueError("FeatureDataset: without video features it needs the dataset that decodes clips")
        self.features = features
        self.video_features = video_features
        self.text_features = text_features
        self.video = None if video_features else video
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.features.samples)

    @property
    def skipped(self) -> int:
        """Clips that failed to decode (text features only: latents never fail to load)."""
        return self.video.skipped if self.video is not None else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.video is not None:
            self.video.set_epoch(epoch)

    def __getitem__(self, index: str | Sequence[int]) -> dict[str, Any] | None:
        idx, t, h, w = parse_index(index)
        if self.video is not None:
            item = self.video[index]
            if item is None or not self.features.has(item["index"]):
                return None
            idx = item["index"]
        else:
            item = {"index": idx, "bucket": f"{t}-{h}-{w}"}
        stored = self.features.sample(idx, view_of(self.seed, self.epoch, idx, self.features.manifest.views))
        if self.video_features:
            item["latent"] = stored["latent"]
            item.update({k: stored[k] for k in CONDITION_FIELDS})
            item["path"] = stored["path"]
        if self.text_features:
            item["y"] = stored["y"]
            if "mask" in stored:
                item["mask"] = stored["mask"]
        else:
            item["text"] = stored["text"] or ""
        return item
