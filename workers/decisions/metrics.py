"""Metrics whose global value is exact under data parallelism.

Every metric keeps sufficient statistics (sums, counts, a confusion matrix) as one float64
vector. Ranks concatenate their vectors, all-reduce them with SUM once per epoch and only
then compute the values, so the result equals a single-process evaluation of the whole set.

A user metric object follows the same protocol as the built-ins below: ``name``,
``update(output, target)``, ``state() -> 1-D float64 tensor`` (summable across ranks),
``compute(state) -> float`` and ``reset()``.

A ``torchmetrics.Metric`` is taken as it is (``TorchMetric``): torchmetrics combines its states
across ranks itself when it computes, summing sum-states and concatenating cat-states (AUROC's
predictions) over the unpadded shards, so it too equals a one-process computation. Metrics
with a state it would average across ranks (or reduce with a function of its own) are
refused: under uneven shards that average is not the whole set's value.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from workers.contract.errors import UserInputError

BUILTIN_METRICS = ("accuracy", "f1_macro", "mcc")


@runtime_checkable
class Metric(Protocol):
    name: str

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None: ...
    def state(self) -> torch.Tensor: ...
    def compute(self, state: torch.Tensor) -> float: ...
    def reset(self) -> None: ...


def predicted_labels(output: torch.Tensor) -> torch.Tensor:
    """Class predictions: argmax over logits (B, C), or logit > 0 for one output (B,) / (B, 1)."""
    if output.ndim == 1 or output.shape[-1] == 1:
        return (output.reshape(-1) > 0).long()
    return output.argmax(dim=-1)


class ConfusionMatrix:
    """A (C, C) count matrix, rows = true class, columns = predicted class."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = predicted_labels(output.detach()).reshape(-1).cpu()
        true = target.detach().reshape(-1).long().cpu()
        idx = true * self.num_classes + pred
        counts = torch.bincount(idx, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).double()


def accuracy_from(cm: torch.Tensor) -> float:
    total = cm.sum().item()
    return cm.trace().item() / total if total else float("nan")


def f1_macro_from(cm: torch.Tensor) -> float:
    """Mean F1 over classes that occur in the targets or the predictions (as scikit-learn)."""
    tp = cm.diagonal()
    support = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return f1[present].mean().item()


def mcc_from(cm: torch.Tensor) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 where it is undefined, as sklearn."""
    t = cm.sum(dim=1)  # true counts per class
    p = cm.sum(dim=0)  # predicted counts per class
    c = cm.trace()
    s = cm.sum()
    cov_ytyp = c * s - (t * p).sum()
    cov_ypyp = s * s - (p * p).sum()
    cov_ytyt = s * s - (t * t).sum()
    denom = math.sqrt(cov_ytyt.item() * cov_ypyp.item())
    return cov_ytyp.item() / denom if denom else 0.0


_FROM_CM = {"accuracy": accuracy_from, "f1_macro": f1_macro_from, "mcc": mcc_from}


class ConfusionMetric:
    """A built-in metric computed from a confusion matrix (shared maths, own state)."""

    def __init__(self, name: str, num_classes: int) -> None:
        if name not in _FROM_CM:
            raise ValueError(f"unknown metric {name!r}; built-ins: {', '.join(BUILTIN_METRICS)}")
        self.name = name
        self._cm = ConfusionMatrix(num_classes)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._cm.update(output, target)

    def state(self) -> torch.Tensor:
        return self._cm.matrix.reshape(-1)

    def compute(self, state: torch.Tensor) -> float:
        n = self._cm.num_classes
        return _FROM_CM[self.name](state.reshape(n, n))

    def reset(self) -> None:
        self._cm.reset()


class MeanLoss:
    """Sum of per-sample losses and the sample count: the exact mean over the whole split."""

    name = "loss"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0.0

    def add_batch(self, batch_mean_loss: float, batch_size: int) -> None:
        self._sum += float(batch_mean_loss) * batch_size
        self._count += batch_size

    def add_state(self, total: float, count: float) -> None:
        """Sums carried over from elsewhere (a preempted step's, restored)."""
        self._sum += total
        self._count += count

    def state(self) -> torch.Tensor:
        return torch.tensor([self._sum, self._count], dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        total, count = state.tolist()
        return total / count if count else float("nan")


def snake_case(name: str) -> str:
    """``MulticlassAUROC`` -> ``multiclass_auroc``, ``BinaryF1Score`` -> ``binary_f1_score``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def is_torchmetric(obj: Any) -> bool:
    """Without importing torchmetrics: a Metric exists only if its module was imported."""
    module = sys.modules.get("torchmetrics")
    return module is not None and isinstance(obj, module.Metric)


# "none": stacked per rank for the metric to merge itself (as PearsonCorrCoef does, exactly).
EXACT_REDUCTIONS = ("sum", "cat", "max", "min", "none")


class TorchMetric:
    """A ``torchmetrics.Metric`` under this module's protocol. Its states travel in no packed
    vector (``state`` is empty): ``compute`` is torchmetrics' own, which gathers them from
    every rank (a collective: every rank computes every metric, in the same order)."""

    def __init__(self, name: str, metric: Any) -> None:
        from workers.compat import torchmetric_reductions

        inexact = {state: how for state, how in torchmetric_reductions(metric).items()
                   if how not in EXACT_REDUCTIONS}
        if inexact:
            raise ValueError(
                f"metrics: {name} ({type(metric).__name__}) cannot be synced exactly across "
                f"workers: its state(s) {', '.join(f'{k} ({v})' for k, v in inexact.items())} "
                "would be averaged or reduced by a function of its own; use a metric whose "
                "states are sums or concatenations")
        self.name = name
        self.metric = metric

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self.metric.device != output.device:
            self.metric.to(output.device)
        self.metric.update(output.detach(), target.detach())

    def state(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        value = self.metric.compute()
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.item())
        if isinstance(value, (int, float)):
            return float(value)
        raise UserInputError(
            f"workload.metrics: {self.name} ({type(self.metric).__name__}) computes "
            f"{type(value).__name__} {getattr(value, 'shape', '')}, not one number; use its "
            "averaged form (e.g. average='macro')")

    def reset(self) -> None:
        self.metric.reset()


def build_metrics(spec: Sequence[Any] | Mapping[str, Any] | None,
                  num_classes: int | None) -> list[Any]:
    """Metric objects from a workload's ``metrics``: a list of built-in names, objects of this
    module's protocol and torchmetrics metrics (named after their class), or a mapping of
    names to such objects."""
    metrics: list[Any] = []
    named = spec.items() if isinstance(spec, Mapping) else ((None, item) for item in spec or ())
    for name, item in named:
        if is_torchmetric(item):
            metrics.append(TorchMetric(name or snake_case(type(item).__name__), item))
        elif isinstance(item, str) and name is None:
            if num_classes is None:
                raise ValueError(
                    f"metrics: {item!r} needs integer class targets; this workload's are not"
                )
            metrics.append(ConfusionMetric(item, num_classes))
        elif isinstance(item, Metric):
            if name is not None:
                item.name = name
            metrics.append(item)
        else:
            raise ValueError(
                f"metrics: {item!r} is neither a built-in name ({', '.join(BUILTIN_METRICS)}), "
                "a torchmetrics Metric, nor an object with name/update/state/compute/reset"
            )
    names = [m.name for m in metrics]
    if len(set(names)) != len(names) or "loss" in names:
        raise ValueError(f"metrics: names must be unique and not 'loss', got {names}")
    return metrics


def pack_states(loss: MeanLoss, metrics: Sequence[Any]) -> tuple[torch.Tensor, list[int]]:
    """One float64 vector for a single all-reduce, and the length of each piece."""
    parts = [loss.state()] + [m.state().double().reshape(-1).cpu() for m in metrics]
    return torch.cat(parts), [p.numel() for p in parts]


def unpack_compute(
    split: str, summed: torch.Tensor, sizes: list[int], loss: MeanLoss, metrics: Sequence[Any]
) -> dict[str, float]:
    """Global metric values, named ``<split>_<metric>``, from the all-reduced vector."""
    pieces = torch.split(summed.double().cpu(), sizes)
    values = {f"{split}_loss": loss.compute(pieces[0])}
    for metric, piece in zip(metrics, pieces[1:], strict=True):
        values[f"{split}_{metric.name}"] = float(metric.compute(piece))
    return values
