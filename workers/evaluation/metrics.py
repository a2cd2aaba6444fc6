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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from workers.contract.user_errors import UserInputError

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

    higher_is_better = True  # accuracy, macro F1 and Matthews correlation alike

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
        return self.as_number(self.name, self.metric, self.metric.compute())

    @staticmethod
    def as_number(name: str, metric: Any, value: Any) -> float:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.item())
        if isinstance(value, (int, float)):
            return float(value)
        raise UserInputError(
            f"workload.metrics: {name} ({type(metric).__name__}) computes "
            f"{type(value).__name__} {getattr(value, 'shape', '')}, not one number; use its "
            "averaged form (e.g. average='macro')")

    def reset(self) -> None:
        self.metric.reset()


def is_metric_collection(obj: Any) -> bool:
    """A ``torchmetrics.MetricCollection`` (not a ``Mapping``: iterating it yields its keys)."""
    module = sys.modules.get("torchmetrics")
    return module is not None and isinstance(obj, module.MetricCollection)


class TorchMetricCollection:
    """A ``torchmetrics.MetricCollection`` whole: updated once per batch, so that its compute
    groups share one state as torchmetrics means them to, and computed by torchmetrics (each
    member syncs its own states across ranks, exactly as a single ``TorchMetric``). Its
    members are reported under the names the collection gives them (prefix and postfix
    included), after ``prefix`` (a ``metrics`` mapping's key)."""

    def __init__(self, collection: Any, prefix: str | None = None) -> None:
        self.collection = collection
        self.prefix = f"{prefix}_" if prefix else ""
        # Each member checked as a single metric is (exact reductions only).
        self.members = {self.prefix + key: TorchMetric(self.prefix + key, member)
                        for key, member in collection.items()}
        self.names = list(self.members)
        self.name = self.names[0] if self.names else self.prefix.rstrip("_")

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        first = next(iter(self.members.values()), None)  # a collection has no device itself
        if first is not None and first.metric.device != output.device:
            self.collection.to(output.device)
        self.collection.update(output.detach(), target.detach())

    def state(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64)

    def compute_many(self, state: torch.Tensor) -> dict[str, float]:
        values = self.collection.compute()  # a collective, as each member's compute is
        out = {}
        for key, value in values.items():
            name = self.prefix + key
            out[name] = TorchMetric.as_number(name, self.members[name].metric, value)
        return out

    def reset(self) -> None:
        self.collection.reset()


def reported_names(metric: Any) -> list[str]:
    """The names (after the split) one metric object reports: a collection's members, else
    its own name."""
    return list(getattr(metric, "names", None) or [metric.name])


def epoch_metric_names(metrics: Iterable[Any]) -> list[str]:
    """The names every epoch reports, given the validation metric objects."""
    return ["train_loss", "val_loss", *(f"val_{n}" for m in metrics for n in reported_names(m))]


def declared_directions(metric: Any) -> dict[str, tuple[bool, str]]:
    """name -> (higher is better, the class that says so), for the names whose metric object
    declares a direction (torchmetrics' ``higher_is_better``, or the same attribute on a
    workload's own metric); ``contract.direction`` resolves ``tracker.mode: auto`` with it."""
    if isinstance(metric, TorchMetricCollection):
        return {name: d for m in metric.members.values()
                for name, d in declared_directions(m).items()}
    inner = metric.metric if isinstance(metric, TorchMetric) else metric
    higher = getattr(inner, "higher_is_better", None)
    if isinstance(higher, bool):
        return {metric.name: (higher, type(inner).__name__)}
    return {}


def _entries(spec: Any) -> list[tuple[str | None, Any]]:
    """(name or None, item) for each entry of a workload's ``metrics``."""
    if spec is None:
        return []
    if is_metric_collection(spec):
        return [(None, spec)]
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"metrics: {type(spec).__name__} {spec!r} is not a list, a mapping of "
                         "names to metrics or a torchmetrics MetricCollection")
    return [(None, item) for item in spec]


def _metric_of(name: str | None, item: Any, num_classes: int | None) -> Any:
    """One entry as an object of this module's protocol (``num_classes``: a built-in's)."""
    if is_metric_collection(item):
        return TorchMetricCollection(item, name)
    if is_torchmetric(item):
        return TorchMetric(name or snake_case(type(item).__name__), item)
    if isinstance(item, str) and name is None:
        if item not in BUILTIN_METRICS:
            raise ValueError(f"metrics: unknown metric {item!r}; built-ins: "
                             f"{', '.join(BUILTIN_METRICS)}")
        if num_classes is None:
            raise ValueError(
                f"metrics: {item!r} needs integer class targets; this workload's are not")
        return ConfusionMetric(item, num_classes)
    if isinstance(item, Metric):
        if name is not None:
            item.name = name
        return item
    raise ValueError(
        f"metrics: {item!r} is neither a built-in name ({', '.join(BUILTIN_METRICS)}), "
        "a torchmetrics Metric or MetricCollection, nor an object with "
        "name/update/state/compute/reset")


def build_metrics(spec: Sequence[Any] | Mapping[str, Any] | None,
                  num_classes: int | None) -> list[Any]:
    """Metric objects from a workload's ``metrics``: a list of built-in names, objects of this
    module's protocol, torchmetrics metrics (named after their class) and collections, a
    mapping of names to such objects, or one ``MetricCollection``."""
    metrics = [_metric_of(name, item, num_classes) for name, item in _entries(spec)]
    _check_unique([n for m in metrics for n in reported_names(m)])
    return metrics


def spec_directions(spec: Any) -> dict[str, tuple[bool, str]]:
    """``declared_directions`` of a workload's ``metrics`` before its classes are known (the
    driver's, before any worker starts): the built-ins are all better higher."""
    declared: dict[str, tuple[bool, str]] = {}
    for name, item in _entries(spec):
        if isinstance(item, str) and name is None and item in BUILTIN_METRICS:
            declared[item] = (True, f"the built-in {item}")
        elif not isinstance(item, str):
            declared.update(declared_directions(_metric_of(name, item, None)))
    return declared


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names) or "loss" in names:
        raise ValueError(f"metrics: names must be unique and not 'loss', got {names}")


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
        if hasattr(metric, "compute_many"):  # a collection: a value per member
            values.update({f"{split}_{k}": v for k, v in metric.compute_many(piece).items()})
        else:
            values[f"{split}_{metric.name}"] = float(metric.compute(piece))
    return values
