"""Breast cancer (569 samples, 30 features, 37% malignant), bundled with scikit-learn.

Imbalanced binary classification: Matthews correlation (``val_mcc``) is the natural monitor,
since accuracy rewards predicting the majority class.
"""

from __future__ import annotations

import torch

from workers.contract.workload import Workload
from workers.workloads._tabular import mlp, split_standardize


def build(
    hidden: int = 16,
    dropout: float = 0.0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Workload:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    # sklearn labels malignant as 0; make malignant the positive class (1).
    y = 1 - y
    train, val, test = split_standardize(
        x, y, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed
    )
    return Workload(
        model=mlp(30, hidden, 2, dropout),
        train_dataset=train,
        val_dataset=val,
        test_dataset=test,
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", "f1_macro", "mcc"],
    )
