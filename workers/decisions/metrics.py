"""Metrics whose global value is exact under data parallelism.

Every metric keeps sufficient statistics (sums, counts, a confusion matrix) as one float64
vector. Ranks concatenate their vectors, all-reduce them with SUM once per epoch and only
then compute the values, so the result equals a single-process evaluation of the whole set.

A user metric object follows the same protocol as the built-ins below: ``name``,
``update(output, target)``, ``state() -> 1-D float64 tensor`` (summable across ranks),
``compute(state) -> float`` and ``reset()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

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

    def state(self) -> torch.Tensor:
        return torch.tensor([self._sum, self._count], dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        total, count = state.tolist()
        return total / count if count else float("nan")


def build_metrics(spec: Sequence[Any] | None, num_classes: int | None) -> list[Any]:
    """Metric objects from a workload's ``metrics`` list (names or objects)."""
    metrics: list[Any] = []
    for item in spec or ():
        if isinstance(item, str):
            if num_classes is None:
                raise ValueError(
                    f"metric {item!r} needs integer class targets; this workload's are not"
                )
            metrics.append(ConfusionMetric(item, num_classes))
        elif isinstance(item, Metric):
            metrics.append(item)
        else:
            raise ValueError(
                f"metrics: {item!r} is neither a built-in name ({', '.join(BUILTIN_METRICS)}) "
                "nor an object with name/update/state/compute/reset"
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
