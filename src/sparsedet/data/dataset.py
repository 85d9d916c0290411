"""A torch Dataset over a DetectionDataset: decode, transform, and reproducible augmentation.

Training keys are ``(index, sample_seed)`` pairs from ``TrainingBatchSampler``: the RNGs are seeded
from ``sample_seed`` before the random transforms, so a sample's augmentation depends only on its
key — not on the number of DataLoader workers, which worker gets it, or whether the run resumed.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .image_io import read_image
from .records import DetectionDataset

logger = logging.getLogger("sparsedet.data")

Transform = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class TransformedDataset(torch.utils.data.Dataset):
    """Images and targets of a :class:`DetectionDataset` after a transform.

    ``dataset[key]`` with ``key`` an int index (evaluation: no seeding) or a tuple
    ``(index, sample_seed)`` (training) returns ``(image, target)``:

    - image: (3, h, w) uint8 RGB, transformed;
    - target: ``{"boxes": (M, 4) float32 xyxy in the transformed pixels, "labels": (M,) int64,
      "image_id": int, "orig_size": (H, W) of the file (EXIF orientation applied)}``.

    An image that cannot be read at load time is logged (naming the file) and replaced by the next
    index's sample, so one bad file does not kill a long run; ``load_failures`` counts them (per
    process: each DataLoader worker has its own copy).
    """

    def __init__(self, dataset: DetectionDataset, transform: Optional[Transform] = None):
        self.dataset = dataset
        self.transform = transform
        self.load_failures = 0

    def __len__(self) -> int:
        return len(self.dataset.records)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Tensor, dict]:
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        index = int(index)
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            sample = self._load(position, seed)
            if sample is not None:
                return sample
        raise RuntimeError(f"no image of {self.dataset.source} could be read")

    def _load(self, index: int, seed: Optional[int]) -> Optional[tuple[Tensor, dict]]:
        record = self.dataset.records[index]
        try:
            image = read_image(record.image_path)
        except (FileNotFoundError, ValueError) as err:
            self.load_failures += 1
            logger.warning("skipping unreadable image (using the next one instead): %s", err)
            return None
        if record.crop is not None:  # a part of the file (VisDrone training quadrants)
            x0, y0, x1, y1 = record.crop
            image = image[..., y0:y1, x0:x1]
        if tuple(image.shape[-2:]) != (record.height, record.width):
            self.load_failures += 1
            logger.warning("skipping %s (using the next one instead): decoded size %dx%d differs from the "
                           "annotated %dx%d", record.image_path, image.shape[-2], image.shape[-1],
                           record.height, record.width)
            return None
        boxes, labels = record.boxes, record.labels
        if self.transform is not None:
            if seed is None:
                image, boxes, labels = self.transform(image, boxes, labels)
            else:
                image, boxes, labels = self._seeded(seed, image, boxes, labels)
        target = {"boxes": boxes.to(torch.float32), "labels": labels.to(torch.int64),
                  "image_id": record.image_id, "orig_size": (record.height, record.width)}
        return image, target

    def _seeded(self, seed: int, image: Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Runs the transform with torch/python/numpy RNGs seeded from ``seed``, restoring the
        caller's RNG states afterwards (with ``num_workers=0`` this runs in the training process,
        whose RNG must not depend on the data)."""
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.transform(image, boxes, labels)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``: images keep their own sizes (the
    model pads them)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
