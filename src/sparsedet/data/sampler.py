"""Deterministic batch samplers for training (infinite, resumable) and inference (sharded).

Training batches are a pure function of (seed, iteration): epoch ``e`` is a permutation of all
indices drawn from a generator seeded by (seed, e); global batches are cut from that endless stream
(optionally per aspect-ratio group); each process takes its slice of every global batch. Each key
carries a per-sample augmentation seed derived from (seed, epoch, position in the epoch), so the
whole training input is the same for any number of processes, DataLoader workers, or after a resume.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class TrainingBatchSampler(torch.utils.data.Sampler):
    """Endless per-process batches of ``(index, sample_seed)`` keys, for
    ``DataLoader(dataset, batch_sampler=...)`` with a :class:`TransformedDataset`.

    Args:
        aspect_ratios: width / height of every record (``DetectionDataset.aspect_ratios()``).
        global_batch_size: images per iteration over all processes.
        seed: the run's seed.
        rank, world_size: this process and the number of processes; each yields
            ``global_batch_size // world_size`` keys per batch, the contiguous slice
            ``[rank * b, (rank + 1) * b)`` of the global batch.
        group_by_aspect_ratio: every global batch holds only landscape (w >= h) or only portrait
            images (detectron2's grouping: a buffer per group, a batch is emitted when one fills;
            leftovers carry over into the next epoch).
        start_iteration: skip the first k global batches (resume), by index arithmetic only.

    Raises:
        ValueError: ``global_batch_size`` not divisible by ``world_size``, bad rank, no records.
    """

    def __init__(self, aspect_ratios: Sequence[float], global_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, group_by_aspect_ratio: bool = True, start_iteration: int = 0):
        if len(aspect_ratios) == 0:
            raise ValueError("TrainingBatchSampler: the dataset has no images")
        if global_batch_size <= 0 or world_size <= 0 or global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        # group 0: landscape or square (w >= h), 1: portrait
        groups = (ratios < 1.0) if group_by_aspect_ratio else np.zeros(len(ratios), dtype=bool)
        self.groups = groups.astype(np.int64).tolist()
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_iteration = start_iteration

    def _epoch_order(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(len(self.groups), generator=generator).numpy()

    def _global_batches(self) -> Iterator[list[tuple[int, int, int]]]:
        """Global batches of (epoch, position in epoch, index), forever."""
        buffers: dict[int, list[tuple[int, int, int]]] = {}  # group -> items waiting for a batch
        epoch = 0
        while True:
            order = self._epoch_order(epoch).tolist()
            for position, index in enumerate(order):
                # One buffer per group; leftovers carry over into the next epoch, so no image is
                # dropped and batch boundaries do not depend on epoch boundaries.
                buffer = buffers.setdefault(int(self.groups[index]), [])
                buffer.append((epoch, position, index))
                if len(buffer) == self.global_batch_size:
                    yield buffer
                    buffers[int(self.groups[index])] = []
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, stop = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for iteration, batch in enumerate(self._global_batches()):
            if iteration < self.start_iteration:
                continue  # resume: skipped without building keys or loading images
            yield [(index, _mix(self.seed, epoch, position)) for epoch, position, index in batch[start:stop]]


class InferenceSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...`` of ``size``: disjoint shards covering every index
    once over all ranks (no padding, so no image is evaluated twice)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
