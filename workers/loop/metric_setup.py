"""A run's metric objects, before training: the number of classes learned from the model's
output, the workload's metrics built for it, each tried on the first batch."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from workers.contract.user_errors import UserInputError
from workers.evaluation.metrics import TorchMetric, TorchMetricCollection, build_metrics
from workers.loop.batches import Batches, blamed_on, describe, logits_of
from workers.loop.devices import to_device
from workers.loop.loaders import first_batch, split_of


def is_class_label(target: Any) -> bool:
    if isinstance(target, bool):
        return False
    if isinstance(target, int):
        return True
    return isinstance(target, torch.Tensor) and target.ndim == 0 and not target.is_floating_point()



def classes_from(logits: torch.Tensor, target: Any) -> int | None:
    """Number of classes when targets are integer labels (from the logits' width), else None.
    ``logits`` and ``target``: a batch's."""
    first = (target.reshape(-1)[0] if isinstance(target, torch.Tensor) and target.ndim == 1
             else target)
    if not is_class_label(first):
        return None
    width = logits.shape[-1] if logits.ndim > 1 else 1
    return 2 if width == 1 else int(width)



def infer_num_classes(model: torch.nn.Module, dataset: Any, device: torch.device,
                      batches: Batches | None = None,
                      collate: Callable[[list[Any]], Any] = default_collate) -> int | None:
    """Number of classes when targets are integer labels (from the model's output width)."""
    # Without the workload's own: a mapping batch goes in without its target (a loss_fn's
    # rule); the loss is never computed here.
    batches = batches or Batches(loss_fn=lambda out, y: out)
    inputs, target = split_of(batches, first_batch(dataset, collate), "train")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = logits_of(batches.forward(model, to_device(inputs, device)))
    model.train(was_training)
    return classes_from(out, target)



def workload_metrics(workload: Any, num_classes: int | None) -> list[Any]:
    spec = getattr(workload, "metrics", None)
    if spec is None:
        spec = ["accuracy"] if num_classes is not None else []
    try:
        return build_metrics(spec, num_classes)
    except ValueError as exc:  # the workload's metrics: the user's to fix, never retried
        raise UserInputError(f"workload.{exc}") from None



def check_metrics(metrics: Sequence[Any], logits: torch.Tensor, target: Any) -> None:
    """The metrics tried on the first batch (``check_first_batch``'s logits and target) before
    training, each on a throwaway copy: one that cannot take them (a torchmetrics metric built
    for another number of classes) is one line naming it, not a first evaluation failed after
    an epoch; so is one whose value is not one number (a per-class vector). A value one batch
    is too small for (an error computing it) is left to the evaluations."""
    target = to_device(target, logits.device)
    for metric in metrics:
        parts = (metric.members if isinstance(metric, TorchMetricCollection)
                 else {metric.name: metric})
        for name, part in parts.items():
            try_metric(name, part, logits.detach(), target)



def one_process() -> bool:
    """A metric copy's ``distributed_available_fn``: its value on this rank's batch alone."""
    return False



def try_metric(name: str, metric: Any, logits: torch.Tensor, target: Any) -> None:
    inner = metric.metric if isinstance(metric, TorchMetric) else metric
    try:
        trial, undo = copy.deepcopy(metric), None
    except Exception:  # noqa: BLE001 - no length to check (the workers index it)
        trial, undo = metric, metric.reset
    if isinstance(trial, TorchMetric):  # computed without gathering from other ranks
        trial.metric.distributed_available_fn = one_process
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # one batch: a class missing, a sample too few
            with blamed_on(f"workload.metrics: {name} ({type(inner).__name__}) fails on the "
                           f"first batch's logits ({describe(logits)}) and target "
                           f"({describe(target)})"):
                trial.update(logits, target)
            try:
                value = trial.compute(trial.state())
            except UserInputError:
                raise  # not one number (``TorchMetric.as_number``)
            except Exception:  # noqa: BLE001 - no length to check (the workers index it)
                return
    finally:
        if undo is not None:
            undo()
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        TorchMetric.as_number(name, inner, value)  # raises: one line naming the metric
