"""Models that train and evaluate as usual but that ``orchestrator export`` must not keep:
``branch``, a block whose forward branches on a tensor's value (torch.export cannot trace
it); ``counter``, a model whose output depends on how many times it was called (Python state
that a trace bakes in as a constant, so the exported file disagrees with the model);
``plain``, neither."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset


class SignGate(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.linear(x)
        return -x


class Counter(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        self.calls = 0  # Python state: not in the state dict, not in a trace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


def build(kind: str = "branch", dim: int = 4, n: int = 40) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    y = (x[:, 0] > 0).long()
    inner = (SignGate(dim) if kind == "branch" else Counter(dim) if kind == "counter"
             else torch.nn.Linear(dim, dim))
    model = torch.nn.Sequential(torch.nn.Linear(dim, dim), inner, torch.nn.Linear(dim, 2))
    return SimpleNamespace(model=model, train_dataset=TensorDataset(x, y),
                           val_dataset=TensorDataset(x, y),
                           loss_fn=torch.nn.functional.cross_entropy)
