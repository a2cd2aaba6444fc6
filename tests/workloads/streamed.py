"""Ray Dataset workloads shaped as users write them, for the streaming tests.

``build``: the built-in Parquet digits (``workers.workloads.digits_parquet``) with its rows
turned into batches another way (``shape``), a worker that SIGKILLs its own process once
(``kill_after_steps``, unless ``marker`` exists), or one of the mistakes users make
(``mistake``); ``ray_data_streaming``: every split through Ray Data's stream, not read by the
workers themselves.

- ``columns``: the built-in's ``feature_columns`` and ``label_column``;
- ``collate``: a ``collate_fn`` over the column arrays, returning ``(inputs, target)``;
- ``mapping``: a ``collate_fn`` returning a mapping (``pixels``, ``labels``) and a model
  called as ``model(pixels=...)``, with BatchNorm and dropout.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch

from workers.workloads.digits_parquet import build as build_digits


class KillOnce(torch.nn.Module):
    """The model, whose process SIGKILLs itself after ``after`` training forwards."""

    def __init__(self, inner: torch.nn.Module, after: int | None, marker: str | None) -> None:
        super().__init__()
        self.inner, self.after, self.marker, self.steps = inner, after, marker, 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.training and self.after is not None:
            self.steps += 1
            if self.steps > self.after and not Path(self.marker).exists():
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(pixels)


def pixels_and_labels(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.stack(batch["pixels"]), dtype=torch.float32),
            torch.as_tensor(np.array(batch["label"])))


def as_mapping(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    pixels, labels = pixels_and_labels(batch)
    return {"pixels": pixels, "labels": labels}


def build(data_dir: str, shape: str = "columns", val_rows: int = 360, test_rows: int = 360,
          kill_after_steps: int | None = None, marker: str | None = None,
          mistake: str | None = None, batchnorm: bool = False, ray_data_streaming: bool = False,
          **digits: object):
    """``digits``: the built-in's other params (``hidden``, ``dropout``, ...)."""
    workload = build_digits(data_dir=data_dir, val_rows=val_rows, test_rows=test_rows, **digits)
    if batchnorm:
        workload.model = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
            torch.nn.Dropout(0.2), torch.nn.Linear(64, 10))
    workload.model = KillOnce(workload.model, kill_after_steps, marker)
    workload.ray_data_streaming = ray_data_streaming
    if shape in ("collate", "mapping"):
        del workload.feature_columns, workload.label_column
        workload.collate_fn = pixels_and_labels if shape == "collate" else as_mapping
    if mistake == "missing_column":
        workload.label_column = "digit"
    elif mistake == "empty_split":
        workload.val_dataset = workload.val_dataset.filter(lambda row: row["label"] > 99)
    elif mistake == "strings":
        workload.train_dataset = workload.train_dataset.map(
            lambda row: {**row, "pixels": "dark"})
    elif mistake == "no_labels":
        workload.collate_fn = lambda batch: {"pixels": pixels_and_labels(batch)[0]}
        del workload.feature_columns, workload.label_column
    return workload
