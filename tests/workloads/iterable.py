"""A workload whose training split is a generator-style torch ``IterableDataset`` (no
``__len__``, no ``__getitem__``), as users write a stream; it imports nothing of the project.

Three Gaussian blobs in 8 dimensions, seeded. ``train_dataset``: 203 items (an odd number, so
the ranks' shares differ), reshuffled each epoch by its own ``set_epoch`` (seeded by the epoch:
every process iterating it yields the same order). ``val_dataset`` (101 rows) and
``test_dataset`` (57 rows): streams too unless ``iterable_eval=False`` (map-style tensors).
The model has BatchNorm and dropout. ``first_item="tensor"``: a stream whose items are bare
tensors, not ``(input, target)`` pairs (a mistake the run refuses, naming the split).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.data import IterableDataset, TensorDataset

FEATURES, CLASSES = 8, 3


class Stream(IterableDataset):
    """``(x, y)`` items of two tensors, in a seeded order (reshuffled by epoch when
    ``shuffle``). ``bare``: yields ``x`` alone."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int, shuffle: bool = False,
                 bare: bool = False) -> None:
        self.x, self.y, self.seed, self.shuffle, self.bare = x, y, seed, shuffle, bare
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = self.x.shape[0]
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(
            self.seed * 1000 + self.epoch)).tolist() if self.shuffle else range(n))
        for i in order:
            yield self.x[i] if self.bare else (self.x[i], self.y[i])


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)  # (N,)
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(7))
    x = centres[y] + 1.2 * torch.randn(n, FEATURES, generator=gen)  # (N, F): overlapping
    return x, y


def build(n_train: int = 203, n_val: int = 101, n_test: int = 57, seed: int = 0,
          iterable_eval: bool = True, first_item: str = "pair", hidden: int = 32):
    x, y = blobs(n_train, seed)
    vx, vy = blobs(n_val, seed + 1)
    tx, ty = blobs(n_test, seed + 2)
    if iterable_eval:
        val, test = Stream(vx, vy, seed), Stream(tx, ty, seed)
    else:
        val, test = TensorDataset(vx, vy), TensorDataset(tx, ty)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.Linear(hidden, CLASSES))
    return SimpleNamespace(
        model=model,
        train_dataset=Stream(x, y, seed, shuffle=True, bare=first_item == "tensor"),
        val_dataset=val, test_dataset=test,
        loss_fn=torch.nn.functional.cross_entropy,
    )
