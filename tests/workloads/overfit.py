"""A test workload whose validation loss improves for a few epochs, then worsens.

Two Gaussian blobs; the small training set has a share of its labels flipped, so a wide MLP
first learns the signal and then memorises the noise (overconfident on validation).
Optionally fails once, mid-training, to exercise restarts: after ``fail_after_steps``
training steps the model raises (``fail_with: raise``) or its process SIGKILLs itself
(``fail_with: sigkill``), unless ``marker`` exists (it is created just before).
``step_seconds``: each training batch also sleeps this long (a run slow enough to signal).
``record_samples``: a directory where each process records, one line per training batch, the
indices of the samples it trained on (every split's inputs then carry their index as a last
column, which the model drops).
``kill_writing_epoch``: the process writing that epoch's ``model.safetensors`` SIGKILLs itself
between the temporary file and the rename, once (``marker`` + ``.write``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _blobs(
    n: int, gen: torch.Generator, dim: int, separation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, dim, generator=gen) + (y.float() * 2 - 1).unsqueeze(1) * separation
    return x, y


class FailOnce(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, fail_after_steps: int | None, marker: str | None,
                 nan_after_steps: int | None = None, fail_with: str = "raise",
                 step_seconds: float = 0.0, record_samples: str | None = None):
        super().__init__()
        self.step_seconds = step_seconds
        self.record_samples = record_samples
        self.fail_with = fail_with
        self.nan_after_steps = nan_after_steps
        self.trained_steps = 0
        self.inner = inner
        self.fail_after_steps = fail_after_steps
        self.marker = marker
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record_samples:  # the last column is each sample's index, not a feature
            x, index = x[:, :-1], x[:, -1]
            if self.training:
                with open(Path(self.record_samples) / f"{os.getpid()}.txt", "a") as f:
                    f.write(" ".join(str(int(i)) for i in index.tolist()) + "\n")
        if self.training:
            self.trained_steps += 1
            time.sleep(self.step_seconds)
        if self.nan_after_steps is not None and self.trained_steps > self.nan_after_steps:
            return self.inner(x) * float("nan")  # diverged: NaN losses, NaN weights
        if self.training and self.fail_after_steps is not None:
            self.steps += 1
            if self.steps > self.fail_after_steps and not Path(self.marker).exists():
                Path(self.marker).touch()
                if self.fail_with == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure (tests/workloads/overfit.py)")
        return self.inner(x)


def _kill_before_rename(epoch_tag: str, marker: str) -> None:
    """In this process, the first rename of a temporary file onto ``model.safetensors`` in a
    checkpoint directory of that epoch is replaced by a SIGKILL of the process: the temporary
    file is written and fsynced, the final name never appears."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        target = Path(dst)
        if (target.name == "model.safetensors" and epoch_tag in target.parent.name
                and not Path(marker).exists()):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def build(
    n_train: int = 32,
    n_val: int = 101,
    dim: int = 16,
    separation: float = 0.5,
    noise: float = 0.3,
    hidden: int = 256,
    fail_after_steps: int | None = None,
    marker: str | None = None,
    with_test: bool = True,
    norm: bool = False,
    dropout: float = 0.0,
    nan_after_steps: int | None = None,
    fail_with: str = "raise",
    kill_writing_epoch: int | None = None,
    step_seconds: float = 0.0,
    record_samples: str | None = None,
) -> SimpleNamespace:
    """``norm``: BatchNorm after each hidden layer (buffers that training updates per rank);
    ``dropout``: after each hidden layer; ``nan_after_steps``: outputs are NaN from then on,
    as in a diverged run."""
    if kill_writing_epoch is not None:
        _kill_before_rename(f"epoch{kill_writing_epoch:04d}", f"{marker}.write")
    gen = torch.Generator().manual_seed(1234)
    x_train, y_train = _blobs(n_train, gen, dim, separation)
    flip = torch.rand(n_train, generator=gen) < noise
    y_train = torch.where(flip, 1 - y_train, y_train)
    x_val, y_val = _blobs(n_val, gen, dim, separation)
    x_test, y_test = _blobs(n_val, gen, dim, separation)
    if record_samples:  # each sample carries its index, which the model records and drops
        Path(record_samples).mkdir(parents=True, exist_ok=True)
        def indexed(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, torch.arange(len(x), dtype=x.dtype).unsqueeze(1)], dim=1)
        x_train, x_val, x_test = indexed(x_train), indexed(x_val), indexed(x_test)
    def block(n_in: int) -> list[torch.nn.Module]:
        return [torch.nn.Linear(n_in, hidden),
                *([torch.nn.BatchNorm1d(hidden)] if norm else []),
                torch.nn.ReLU(), *([torch.nn.Dropout(dropout)] if dropout else [])]

    model = torch.nn.Sequential(*block(dim), *block(hidden), torch.nn.Linear(hidden, 2))
    return SimpleNamespace(
        model=FailOnce(model, fail_after_steps, marker, nan_after_steps, fail_with,
                       step_seconds, record_samples),
        train_dataset=torch.utils.data.TensorDataset(x_train, y_train),
        val_dataset=torch.utils.data.TensorDataset(x_val, y_val),
        test_dataset=torch.utils.data.TensorDataset(x_test, y_test) if with_test else None,
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=["accuracy", "mcc"],
    )
