"""Samplers and the torch Dataset: determinism across ranks, workers and resumes; bad files at load time."""
from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedet.data import (DetectionDataset, DetectionRecord, InferenceSampler, TrainingBatchSampler,
                            TransformedDataset, build_transforms, collate)

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN_INPUT = {"min_size_train": [40, 48, 56], "max_size_train": 100, "horizontal_flip": 0.5,
               "crop": {"enabled": True, "probability": 0.5, "first_resize": [40, 50], "size": [20, 40]}}


def _ratios(n: int = 37, seed: int = 0) -> list[float]:
    g = np.random.default_rng(seed)
    return [float(r) for r in g.choice([0.6, 0.75, 1.0, 1.33, 1.5], size=n)]


def _take(sampler, n: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), n))


def test_training_sampler_is_deterministic_and_seed_dependent():
    ratios = _ratios()
    first = _take(TrainingBatchSampler(ratios, 4, seed=7), 25)
    assert first == _take(TrainingBatchSampler(ratios, 4, seed=7), 25)
    assert first != _take(TrainingBatchSampler(ratios, 4, seed=8), 25)
    assert all(len(b) == 4 for b in first)
    # Sample seeds differ between samples, also for the same index in different epochs.
    seeds = [s for b in first for _, s in b]
    assert len(set(seeds)) == len(seeds)


def test_training_sampler_covers_each_epoch_without_grouping():
    ratios = _ratios(n=24)
    batches = _take(TrainingBatchSampler(ratios, 6, seed=1, group_by_aspect_ratio=False), 8)
    epoch0 = [i for b in batches[:4] for i, _ in b]
    epoch1 = [i for b in batches[4:] for i, _ in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24)) and epoch0 != epoch1


def test_grouping_gives_one_orientation_per_batch_and_loses_nothing():
    ratios = _ratios()
    batches = _take(TrainingBatchSampler(ratios, 4, seed=3), 60)
    for batch in batches:
        assert len({ratios[i] >= 1.0 for i, _ in batch}) == 1
    counts = np.bincount([i for b in batches for i, _ in b], minlength=len(ratios))
    assert counts.min() >= 5 and counts.max() <= 8  # 240 draws over 37 images: every image used ~6.5 times


@pytest.mark.parametrize("group", [True, False])
def test_rank_slices_union_equals_single_process(group):
    ratios = _ratios()
    single = _take(TrainingBatchSampler(ratios, 8, seed=5, group_by_aspect_ratio=group), 30)
    ranks = [_take(TrainingBatchSampler(ratios, 8, seed=5, rank=r, world_size=2, group_by_aspect_ratio=group), 30)
             for r in range(2)]
    for i in range(30):
        assert ranks[0][i] + ranks[1][i] == single[i]  # keys (index, sample_seed) included
    four = [_take(TrainingBatchSampler(ratios, 8, seed=5, rank=r, world_size=4, group_by_aspect_ratio=group), 5)
            for r in range(4)]
    assert sum((four[r][3] for r in range(4)), []) == single[3]


def test_start_iteration_equals_consuming_batches():
    ratios = _ratios()
    for k in (0, 1, 13, 47):
        resumed = _take(TrainingBatchSampler(ratios, 4, seed=9, rank=1, world_size=2, start_iteration=k), 5)
        full = _take(TrainingBatchSampler(ratios, 4, seed=9, rank=1, world_size=2), k + 5)[k:]
        assert resumed == full


def test_training_sampler_errors():
    with pytest.raises(ValueError, match="not divisible"):
        TrainingBatchSampler(_ratios(), 6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2"):
        TrainingBatchSampler(_ratios(), 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no images"):
        TrainingBatchSampler([], 4, seed=0)


@pytest.mark.parametrize("size, world_size", [(10, 3), (2, 4), (7, 1)])
def test_inference_sampler_shards_cover_everything_once(size, world_size):
    shards = [list(InferenceSampler(size, r, world_size)) for r in range(world_size)]
    assert sorted(sum(shards, [])) == list(range(size))
    assert [len(InferenceSampler(size, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]


# ------------------------------------------------------------------------------- the Dataset
def _write_dataset(folder: Path, n: int = 6) -> DetectionDataset:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    records = []
    for i in range(n):
        height, width = (48, 64) if i % 2 else (64, 48)
        path = folder / f"img{i}.png"
        Image.fromarray(g.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 44.0, 30.0]])
        records.append(DetectionRecord(path, 100 + i, height, width, boxes, torch.tensor([i % 3, 1])))
    return DetectionDataset(records, ["a", "b", "c"], [1, 2, 3], source=str(folder))


def _same(a, b) -> bool:
    return (torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
            and torch.equal(a[1]["labels"], b[1]["labels"]) and a[1]["image_id"] == b[1]["image_id"]
            and a[1]["orig_size"] == b[1]["orig_size"])


def test_transformed_dataset_same_key_same_sample(tmp_path):
    data = TransformedDataset(_write_dataset(tmp_path), build_transforms(TRAIN_INPUT, train=True))
    image, target = data[(2, 12345)]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["image_id"] == 102 and target["orig_size"] == (64, 48)
    assert _same(data[(2, 12345)], (image, target))
    differs = [not _same(data[(2, seed)], (image, target)) for seed in range(1, 9)]
    assert any(differs)  # other seeds give other augmentations
    # The caller's RNG streams are untouched (num_workers=0 runs this in the training process).
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    data[(1, 99)]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_eval_dataset_is_deterministic_without_seed(tmp_path):
    data = TransformedDataset(_write_dataset(tmp_path), build_transforms({"min_size_test": 32, "max_size_test": 60},
                                                                         train=False))
    image, target = data[1]
    assert tuple(image.shape[1:]) == (32, 43) and target["orig_size"] == (48, 64)
    assert torch.allclose(target["boxes"][0], torch.tensor([4.0, 6.0, 30.0, 40.0]) * torch.tensor(
        [43 / 64, 32 / 48, 43 / 64, 32 / 48]), atol=1e-4)


def test_dataloader_workers_do_not_change_samples(tmp_path):
    dataset = _write_dataset(tmp_path)
    data = TransformedDataset(dataset, build_transforms(TRAIN_INPUT, train=True))
    sampler = TrainingBatchSampler(dataset.aspect_ratios(), 2, seed=4)

    def load(workers: int):
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
        return list(itertools.islice(loader, 4))

    serial, parallel = load(0), load(2)
    for (images_a, targets_a), (images_b, targets_b) in zip(serial, parallel):
        assert len(images_a) == len(images_b) == 2
        for sample_a, sample_b in zip(zip(images_a, targets_a), zip(images_b, targets_b)):
            assert _same(sample_a, sample_b)
    # ... and they are exactly the samples of the sampler's keys.
    first_keys = next(iter(sampler))
    for (image, target), key in zip(zip(*serial[0]), first_keys):
        assert _same((image, target), data[key])
    # Grouping: each batch holds records of one orientation (odd ids are the landscape ones).
    for _, targets in serial:
        assert len({t["image_id"] % 2 for t in targets}) == 1


def test_unreadable_image_at_load_time_gives_the_next_sample(tmp_path, caplog):
    dataset = _write_dataset(tmp_path)
    broken = dataset.records[2].image_path
    broken.write_bytes(broken.read_bytes()[:60])  # truncated after the header was checked
    dataset.records[4].image_path.unlink()
    data = TransformedDataset(dataset, build_transforms(TRAIN_INPUT, train=True))
    with caplog.at_level(logging.WARNING, logger="sparsedet.data"):
        image, target = data[(2, 7)]
    assert target["image_id"] == 103 and _same((image, target), data[(3, 7)])
    assert "img2.png" in caplog.text and data.load_failures == 1
    image, target = data[4]
    assert target["image_id"] == 105 and "img4.png" in caplog.text
    # The last index wraps around to the first.
    data.dataset.records[5].image_path.unlink()
    assert data[5][1]["image_id"] == 100


def test_collate():
    images, targets = collate([(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.zeros(3, 6, 5), {"image_id": 2})])
    assert [im.shape[1] for im in images] == [4, 6] and [t["image_id"] for t in targets] == [1, 2]
