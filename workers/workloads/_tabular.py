"""Shared pieces of the built-in tabular workloads."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def split_standardize(
    x: np.ndarray, y: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """A fixed, seeded, stratified split; features standardised with the train split's stats."""
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
        stratify=y_rest,
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-6] = 1.0  # a feature constant in train (a blank pixel) must not blow up

    def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        standardized = torch.tensor((features - mean) / std, dtype=torch.float32)
        return TensorDataset(standardized, torch.tensor(labels, dtype=torch.long))

    return dataset(x_train, y_train), dataset(x_val, y_val), dataset(x_test, y_test)


def mlp(n_in: int, hidden: int, n_out: int, dropout: float = 0.0) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, n_out),
    )
