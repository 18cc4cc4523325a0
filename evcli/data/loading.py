"""Deterministic, sharded, resumable loading for every method's data.

Datasets are indexed by ``(epoch, index)`` keys. Each sample's randomness is seeded by (run seed, epoch,
index) through :func:`seeded_rng`, and the batch order of an epoch by (seed, epoch), so a run gives the same
batches whatever the number of workers, and a resumed run continues with exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of integers (splitmix64 chain)."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        x = (x ^ (int(v) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x & ((1 << 63) - 1)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), Python and NumPy global RNGs inside the block, restoring them after."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) for one process, reshuffled per epoch from the run seed.

    Training: every rank takes an equal share of one seeded permutation and drops the incomplete last
    batch. Evaluation: no shuffle, ranks take ``index % world == rank`` and keep every sample once, so
    summed counts are exact.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, train: bool = True):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.train = seed, train
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_batch`` batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        if self.train:
            return (self.n // self.world) // self.batch_size
        mine = len(range(self.rank, self.n, self.world))
        return -(-mine // self.batch_size)

    def _indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.n, self.world))
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5A3))
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world
        return perm[: per_rank * self.world][self.rank :: self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self._indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


def make_loader(
    dataset: Dataset,
    sampler: ShardedBatchSampler,
    workers: int,
    pin_memory: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A DataLoader over a batch sampler of (epoch, index) keys (``collate_fn``: e.g. variable point counts)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        collate_fn=collate_fn,
    )
