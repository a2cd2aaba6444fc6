"""Regression with float targets (no project import): a small MLP with BatchNorm on a noisy
non-linear function, mean squared error, torchmetrics' R2 and mean absolute error."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset


def make(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * torch.randn(n, generator=gen)
    return TensorDataset(x, y.unsqueeze(1))  # targets (N, 1), float


def build(hidden: int = 32) -> SimpleNamespace:
    from torchmetrics import MeanAbsoluteError, R2Score

    model = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.BatchNorm1d(hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    return SimpleNamespace(model=model, train_dataset=make(200, 1), val_dataset=make(101, 2),
                           test_dataset=make(57, 3), loss_fn=torch.nn.functional.mse_loss,
                           metrics=[R2Score(), MeanAbsoluteError()])
