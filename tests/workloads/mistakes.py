"""Workloads with one mistake each, as users make them (``build(mistake=...)``)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset

# Each mistake, and what the one line that reports it says.
EXPECTED = {
    "build_raises": "raised ModuleNotFoundError: No module named 'a_package_these_workers_lack'",
    "wrong_input": "workload.model: it cannot take a batch of {features: tensor(",
    "collate_fails": "workload.collate_fn: it fails on the first sample (KeyError",
    "no_logits": "is neither a tensor nor has logits",
    "no_loss": "has no 'loss'",
    "averaged_metric": "cannot be synced exactly across workers: its state(s) value (mean)",
    "not_an_optimizer": "workload.optimizer: returned a list, not a torch.optim.Optimizer",
    # the config's mistake, found once the workers know the run's steps
    "warmup_too_long": "train.warmup_steps: 1000 is more than this run's 9 optimizer steps (3 "
                       "per epoch on each worker",
}
TRAIN = {"epochs": 3, "batch_size": 16}  # the run each mistake is found in
TRAIN_OF = {"warmup_too_long": {"schedule": "cosine", "warmup_steps": 1000}}


class Scores(torch.nn.Module):
    """Returns a mapping without logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.linear(x)}


def averaged_metric():
    """A torchmetrics metric whose state torchmetrics would average across ranks."""
    import torchmetrics

    class MeanOfBatchMeans(torchmetrics.Metric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("value", default=torch.tensor(0.0), dist_reduce_fx="mean")

        def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
            self.value = (preds.argmax(1) == target).float().mean()

        def compute(self) -> torch.Tensor:
            return self.value

    return MeanOfBatchMeans()


def build(mistake: str, calls: str | None = None) -> SimpleNamespace:
    """``calls``: a file that gets one line per call (each worker's build, each retry)."""
    if calls:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    data = TensorDataset(x, y)
    work = SimpleNamespace(model=torch.nn.Linear(4, 2), train_dataset=data, val_dataset=data,
                           loss_fn=torch.nn.functional.cross_entropy)
    if mistake == "build_raises":
        import a_package_these_workers_lack  # noqa: F401
    if mistake == "wrong_input":  # mapping batches, but the model takes one tensor named x
        rows = [{"features": x[i], "labels": y[i]} for i in range(len(y))]
        work.train_dataset = work.val_dataset = rows
    if mistake == "collate_fails":
        def collate(samples):
            raise KeyError("text")
        work.collate_fn = collate
    if mistake == "no_logits":
        work.model = Scores()
    if mistake == "no_loss":
        work.loss_fn = None
    if mistake == "averaged_metric":
        work.metrics = {"acc": averaged_metric()}
    if mistake == "not_an_optimizer":  # the parameters, not an optimizer over them
        work.optimizer = lambda model: list(model.parameters())
    if mistake == "never_reports":  # engine: loop, a loop that forgets ctx.report
        work.loop = never_reports
    return work


def never_reports(ctx) -> None:  # noqa: ANN001 - the project's context
    for _epoch in ctx.epochs():
        for _batch in ctx.train_loader:
            pass
