"""Handwritten digits (8x8, 10 classes, 1797 images bundled with scikit-learn), an MLP."""

from __future__ import annotations

import torch

from workers.contract.workload import Workload
from workers.workloads._tabular import mlp, split_standardize


def build(
    hidden: int = 64,
    dropout: float = 0.0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Workload:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    train, val, test = split_standardize(
        x, y, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed
    )
    return Workload(
        model=mlp(64, hidden, 10, dropout),
        train_dataset=train,
        val_dataset=val,
        test_dataset=test,
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", "f1_macro", "mcc"],
    )
