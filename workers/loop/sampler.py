"""Where each rank's training data comes from, and where the stream stands mid-epoch.

Every epoch is one permutation of the training set (seeded by the run's seed and the
epoch), the same on every rank. The ranks take it strided: rank r the positions r, r+W,
r+2W, ... (as ``DistributedSampler``, padded at the end with the permutation's first samples
so that every rank has as many batches). After k batches of b samples on each of W ranks the
first ``W*k*b`` positions of the permutation are trained, whatever the ranks: a resume
records that one number (``consumed``) and continues with the rest of the permutation,
strided over however many ranks there are now. No sample is trained twice in an epoch and
none is skipped, even when an elastic run resumes on a different number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(size, generator=generator).tolist()


def rest_of_epoch(size: int, seed: int, epoch: int, consumed: int, rank: int,
                  world_size: int) -> list[int]:
    """This rank's sample indices for the epoch after ``consumed`` positions were trained."""
    rest = epoch_permutation(size, seed, epoch)[consumed:]
    if not rest:
        return []
    padding = (-len(rest)) % world_size
    rest = rest + (rest * (padding // len(rest) + 1))[:padding]
    return rest[rank::world_size]


class EpochSampler(Sampler[int]):
    """A rank's sampler: ``set_epoch(epoch, consumed)`` before each epoch; ``consumed`` is
    the number of the permutation's positions trained already (0: a whole epoch)."""

    def __init__(self, size: int, rank: int, world_size: int, seed: int) -> None:
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch, self.consumed = 1, 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def indices(self) -> list[int]:
        return rest_of_epoch(self.size, self.seed, self.epoch, self.consumed, self.rank,
                             self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        rest = max(0, self.size - self.consumed)
        return math.ceil(rest / self.world_size)

    def batches_per_epoch(self, batch_size: int) -> int:
        """A whole epoch's batches on each rank."""
        return math.ceil(math.ceil(self.size / self.world_size) / batch_size)

    def position_after(self, batches: int, batch_size: int) -> int:
        """``consumed`` once every rank trained ``batches`` more batches of ``batch_size``
        this epoch (the whole permutation, when that is its end)."""
        return min(self.size, self.consumed + batches * batch_size * self.world_size)
