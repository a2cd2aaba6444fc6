"""Workloads with one mistake each, as users make them (``build(mistake=...)``)."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import TensorDataset, default_collate

# Each mistake, and what the one line that reports it says.
EXPECTED = {
    "build_raises": "raised ModuleNotFoundError: No module named 'a_package_these_workers_lack'",
    "wrong_input": "workload.model: it cannot take a batch of {features: tensor(",
    "collate_fails": "workload.collate_fn: it fails on the first sample (KeyError",
    "no_logits": "is neither a tensor nor has logits",
    "no_loss": "has no 'loss'",
    "averaged_metric": "cannot be synced exactly across workers: its state(s) value (mean)",
    "not_an_optimizer": "workload.optimizer: returned a list, not a torch.optim.Optimizer",
    "loss_class": "workload.loss_fn: it returned CrossEntropyLoss, not one number",
    # the config's mistake, found once the workers know the run's steps
    "warmup_too_long": "train.warmup_steps: 1000 is more than this run's 9 optimizer steps (3 "
                       "per epoch on each worker (its batches / train.grad_accum_steps 1) x "
                       "train.epochs 3); use at most 9",
    "warmup_over_max_steps": "train.warmup_steps: 1000 is more than this run's 5 optimizer "
                             "steps (train.max_steps: 5); use at most 5",
    "warmup_over_stream": "train.warmup_steps: 1000 is more than this run's 4 optimizer steps "
                          "(train.max_steps: 4); use at most 4",
    # metrics tried on the first batch (issue 37), and the other metrics mistakes
    "metric_for_3_classes": "workload.metrics: multiclass_accuracy (MulticlassAccuracy) fails "
                            "on the first batch's logits (tensor(1, 2)) and target (tensor(1,)) "
                            "(ValueError: ",
    "collection_for_3_classes": "workload.metrics: acc (MulticlassAccuracy) fails on the first "
                                "batch's logits (tensor(1, 2))",
    "own_metric_fails": "workload.metrics: hits (Hits) fails on the first batch's logits "
                        "(tensor(1, 2)) and target (tensor(1,)) (IndexError: no class 5)",
    "metric_vector": "workload.metrics: multiclass_f1_score (MulticlassF1Score) computes Tensor "
                     "torch.Size([2]), not one number",
    "metric_unknown": "workload.metrics: unknown metric 'auc'; built-ins: accuracy, f1_macro, mcc",
    "metrics_a_string": "workload.metrics: str 'accuracy' is not a list",
    "metric_without_update": "workload.metrics: namespace(name='recall') is neither a built-in",
    "metric_names_twice": "workload.metrics: names must be unique and not 'loss', got "
                          "['accuracy', 'accuracy']",
    # batches that are no (input, target) pair: the key that makes them named first
    "label_key_missing": "workload.label_key: train_dataset's first batch is a mapping without "
                         "the label key 'labels' (its keys: features, y)",
    "collate_not_a_pair": "workload.collate_fn: it made train_dataset's first batch "
                          "tuple(tensor(1, 4), tensor(1,), tensor(1,)), neither an (input, "
                          "target) pair",
}
TRAIN = {"epochs": 3, "batch_size": 16}  # the run each mistake is found in
TRAIN_OF = {"warmup_too_long": {"schedule": "cosine", "warmup_steps": 1000},
            "warmup_over_max_steps": {"schedule": "cosine", "warmup_steps": 1000,
                                      "max_steps": 5},
            "warmup_over_stream": {"warmup_steps": 1000, "max_steps": 4}}
# Mistakes the driver finds, building the workload before any worker starts.
ON_THE_DRIVER = {
    "empty_val": "workload.val_dataset: the dataset is empty (its len() is 0); every split "
                 "needs at least one sample",
    "empty_test": "workload.test_dataset: the dataset is empty (its len() is 0)",
    "empty_train": "workload.train_dataset: the dataset is empty (its len() is 0)",
    "dict_without_val": "workload.entrypoint: tests.workloads.mistakes:build returned a mapping "
                        "without val_dataset (needs model, train_dataset, val_dataset)",
}


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
    if mistake == "loss_class":  # the class, not an instance of it
        work.loss_fn = torch.nn.CrossEntropyLoss
    if mistake == "not_an_optimizer":  # the parameters, not an optimizer over them
        work.optimizer = lambda model: list(model.parameters())
    if mistake == "never_reports":  # engine: loop, a loop that forgets ctx.report
        work.loop = never_reports
    return issue_37(work, mistake, x, y)


class Hits:
    """A metric of the project's protocol whose update fails on a label it does not know."""

    name = "hits"

    def __init__(self) -> None:
        self.reset()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise IndexError("no class 5")

    def state(self) -> torch.Tensor:
        return self.counts

    def compute(self, state: torch.Tensor) -> float:
        return float(state[0])

    def reset(self) -> None:
        self.counts = torch.zeros(1, dtype=torch.float64)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)


def issue_37(work: SimpleNamespace, mistake: str, x: torch.Tensor, y: torch.Tensor) -> Any:
    """The mistakes of issue 37: metrics, batches, warmup, empty splits, a dict."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    metrics = {"metric_for_3_classes": [MulticlassAccuracy(num_classes=3)],
               "collection_for_3_classes": MetricCollection({"acc": MulticlassAccuracy(3)}),
               "own_metric_fails": [Hits()],
               "metric_vector": [MulticlassF1Score(num_classes=2, average=None)],
               "metric_unknown": ["auc"], "metrics_a_string": "accuracy",
               "metric_without_update": [SimpleNamespace(name="recall")],
               "metric_names_twice": ["accuracy", "accuracy"]}
    if mistake in metrics:
        work.metrics = metrics[mistake]
    if mistake == "label_key_missing":  # the target under "y", label_key left at "labels"
        work.train_dataset = work.val_dataset = [
            {"features": x[i], "y": y[i]} for i in range(len(y))]
    if mistake == "collate_not_a_pair":  # (input, target, weight): one too many
        work.collate_fn = lambda samples: (*default_collate(samples), torch.ones(len(samples)))
    if mistake == "warmup_over_stream":
        work.train_dataset = Stream(work.train_dataset)
    if mistake.startswith("empty_"):  # a split of no samples (len() 0)
        setattr(work, f"{mistake.removeprefix('empty_')}_dataset", TensorDataset(x[:0], y[:0]))
    if mistake in ("as_dict", "dict_without_val"):  # build returning a dict (issue 37)
        as_dict = dict(vars(work))
        if mistake == "dict_without_val":
            del as_dict["val_dataset"]
        return as_dict
    return work


def never_reports(ctx) -> None:
    for _epoch in ctx.epochs():
        for _batch in ctx.train_loader:
            pass
