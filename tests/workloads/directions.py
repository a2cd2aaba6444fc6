"""Workloads whose monitored metric is better LOWER though its name says nothing of a loss, or
whose metrics come as a torchmetrics MetricCollection (no project import):

- ``regression``: float targets, an MLP with BatchNorm and dropout that overfits a small noisy
  set (val_mse falls, then rises), ``metrics={"mse": MeanSquaredError()}``: ``val_mse``;
- ``language_model``: next-token prediction over fixed-length token sequences, logits
  (B, T, V), ``metrics={"perplexity": Perplexity()}``: ``val_perplexity``;
- ``collection``: 3 classes, ``metrics=MetricCollection({acc, prec, rec}, prefix="cls_",
  compute_groups=True)``: ``val_cls_acc``, ``val_cls_prec``, ``val_cls_rec``;
- ``undeclared``: a metric object of the workload's own, named ``custom``, that declares no
  direction (``val_custom`` cannot be placed by tracker.mode auto).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset

VOCAB, LENGTH = 11, 12


def regression_data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.4 * torch.randn(n, generator=gen)
    return TensorDataset(x, y.unsqueeze(1))


def token_data(n: int, seed: int) -> TensorDataset:
    """Sequences where the next token is mostly (3 * token + 1) mod V: (inputs, targets)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.zeros(n, LENGTH + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
    for t in range(LENGTH):
        noise = torch.randint(0, VOCAB, (n,), generator=gen)
        keep = torch.rand(n, generator=gen) < 0.7
        seqs[:, t + 1] = torch.where(keep, (3 * seqs[:, t] + 1) % VOCAB, noise)
    return TensorDataset(seqs[:, :-1], seqs[:, 1:])


class TinyLM(torch.nn.Module):
    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.drop = torch.nn.Dropout(0.1)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(torch.relu(self.mix(self.drop(self.embed(tokens)))))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def class_data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    y = torch.bucketize(x[:, 0] + 0.7 * x[:, 1] + 0.6 * torch.randn(n, generator=gen),
                        torch.tensor([-0.6, 0.6]))
    return TensorDataset(x, y)


class Custom:
    """A metric of the workload's own (sums, mergeable): the mean absolute logit."""

    name = "custom"

    def __init__(self) -> None:
        self.reset()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.total += output.detach().abs().sum().item()
        self.count += output.numel()

    def state(self) -> torch.Tensor:
        return torch.tensor([self.total, self.count], dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        return (state[0] / state[1]).item()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0.0


def build(kind: str = "regression", hidden: int = 48) -> SimpleNamespace:
    from torchmetrics import MeanSquaredError, MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassPrecision,
        MulticlassRecall,
    )
    from torchmetrics.text import Perplexity

    if kind == "language_model":
        return SimpleNamespace(model=TinyLM(), train_dataset=token_data(203, 1),
                               val_dataset=token_data(101, 2), test_dataset=token_data(57, 3),
                               loss_fn=lm_loss, metrics={"perplexity": Perplexity()})
    mlp = torch.nn.Sequential(torch.nn.Linear(6 if kind == "regression" else 5, hidden),
                              torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                              torch.nn.Dropout(0.1), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 1 if kind == "regression"
                                                               else 3))
    if kind == "regression":
        return SimpleNamespace(model=mlp, train_dataset=regression_data(61, 1),
                               val_dataset=regression_data(101, 2),
                               test_dataset=regression_data(57, 3),
                               loss_fn=torch.nn.functional.mse_loss,
                               metrics={"mse": MeanSquaredError()})
    metrics = (MetricCollection({"acc": MulticlassAccuracy(3), "prec": MulticlassPrecision(3),
                                 "rec": MulticlassRecall(3)}, prefix="cls_",
                                compute_groups=True)
               if kind == "collection" else [Custom()])
    return SimpleNamespace(model=mlp, train_dataset=class_data(203, 1),
                           val_dataset=class_data(101, 2), test_dataset=class_data(57, 3),
                           loss_fn=torch.nn.functional.cross_entropy, metrics=metrics)
