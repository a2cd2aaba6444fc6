"""A test workload whose model has parameters a training step does not use.

A small classifier (BatchNorm, dropout) with:
- ``aux_head``: an auxiliary head that ``forward`` never calls (a leftover pretraining head);
- ``frozen``: a layer with ``requires_grad=False`` (it is used, but never trains);
- LayerDrop over ``blocks``: in training each block is skipped with probability
  ``layerdrop`` (drawn from torch's global RNG, which the engines seed differently on each
  rank, so ranks skip different blocks); in evaluation every block runs.

Odd split sizes (203 train, 101 val, 57 test by default). ``params: true`` also gives an
``optimizer(model)`` with a parameter group per submodule (it needs the plain model, not a
DDP wrapper). No project imports.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import TensorDataset

FEATURES, CLASSES = 8, 3


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, H)
        return torch.relu(self.fc(h))


class LayerDropNet(nn.Module):
    def __init__(self, hidden: int, blocks: int, layerdrop: float, dropout: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(FEATURES, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(), nn.Dropout(dropout))
        self.frozen = nn.Linear(hidden, hidden)
        self.frozen.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(blocks))
        self.head = nn.Linear(hidden, CLASSES)
        self.aux_head = nn.Linear(hidden, CLASSES)  # never called by forward
        self.layerdrop = layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, C)
        h = self.stem(x)
        h = h + torch.tanh(self.frozen(h))
        for block in self.blocks:
            if self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop:
                continue  # skipped in this step: its parameters get no gradient
            h = h + block(h)
        return self.head(h)


def _split(n: int, gen: torch.Generator, teacher: torch.Tensor) -> TensorDataset:
    x = torch.randn(n, FEATURES, generator=gen)  # (N, F)
    noise = 0.5 * torch.randn(n, CLASSES, generator=gen)
    y = (x @ teacher + noise).argmax(dim=1)  # (N,)
    return TensorDataset(x, y)


def build(hidden: int = 16, blocks: int = 3, layerdrop: float = 0.3, dropout: float = 0.1,
          n_train: int = 203, n_val: int = 101, n_test: int = 57, params: bool = False,
          seed: int = 0) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    train, val, test = (_split(n, gen, teacher) for n in (n_train, n_val, n_test))
    model = LayerDropNet(hidden, blocks, layerdrop, dropout)
    workload = SimpleNamespace(model=model, train_dataset=train, val_dataset=val,
                               test_dataset=test, loss_fn=nn.functional.cross_entropy)
    if params:
        def optimizer(model: LayerDropNet) -> torch.optim.Optimizer:
            # Submodules by name: this fails on a DDP wrapper (it has only ``module``).
            return torch.optim.AdamW([
                {"params": model.stem.parameters()},
                {"params": model.blocks.parameters(), "weight_decay": 0.0},
                {"params": [*model.head.parameters(), *model.aux_head.parameters()]},
                {"params": model.frozen.parameters()},
            ], lr=0.01)

        workload.optimizer = optimizer
    return workload
