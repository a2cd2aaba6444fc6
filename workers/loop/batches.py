"""Batches and model outputs as users write them, turned into what the loops need.

A batch is an ``(input, target)`` pair, or a mapping (a Hugging Face batch: ``input_ids``,
``attention_mask``, ``labels``). For a mapping the model is called as ``model(**inputs)`` and
the target is ``batch[label_key]``; the target is left in the inputs only when the model
computes its own loss (``loss_fn`` is None), as Hugging Face models do from ``labels``.

An output is a tensor, a tuple or list (its first element), a mapping (``"logits"``) or an
object with ``logits``; the model's own loss is ``output.loss`` (or ``output["loss"]``).
Metrics are computed on the logits, the loss is the one that is trained and recorded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from workers.contract.user_errors import UserInputError

DEFAULT_LABEL_KEY = "labels"


def describe(obj: Any) -> str:
    """A batch or output in one short phrase: its structure, its tensors' shapes."""
    if isinstance(obj, torch.Tensor):
        return f"tensor{tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__}(" + ", ".join(describe(o) for o in obj[:4]) + (
            ", ..." if len(obj) > 4 else "") + ")"
    return type(obj).__name__


def forward_parameters(model: torch.nn.Module) -> str:
    """``forward``'s parameters, as an error message names them."""
    inner = getattr(model, "module", model)  # DDP's wrapped module
    try:
        return ", ".join(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):
        return "?"


def logits_of(output: Any) -> torch.Tensor:
    """The tensor metrics are computed on."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise UserInputError(f"workload.model: its output ({describe(output)}) is neither a tensor "
                         "nor has logits; return a tensor, a tuple whose first element is one, "
                         "or a mapping/object with 'logits'")


def own_loss(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise UserInputError(
            f"workload.loss_fn: none is given, so the model must compute its own loss, but its "
            f"output ({describe(output)}) has no 'loss'; give the workload a loss_fn, or pass "
            "the labels to the model (a mapping batch with the label key)")
    return loss


@dataclass(frozen=True)
class Batches:
    """How one workload's batches go through its model. ``loss_fn``: ``loss_fn(logits,
    target)``, mean over the batch; None: the model's own ``output.loss``."""

    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None
    label_key: str = DEFAULT_LABEL_KEY
    collate_fn_given: bool = False  # the workload's collate_fn makes the batches

    @classmethod
    def of(cls, workload: Any) -> Batches:
        return cls(getattr(workload, "loss_fn", None),
                   getattr(workload, "label_key", None) or DEFAULT_LABEL_KEY,
                   getattr(workload, "collate_fn", None) is not None)

    def split(self, batch: Any, split: str | None = None) -> tuple[Any, Any]:
        """(the model's inputs, the target). ``split``: the split whose first batch this is,
        named by an error (None: a batch of a running loop). An error begins with the key it is
        about: ``label_key``, ``collate_fn`` (when the workload's makes the batches), else the
        split's dataset, whose samples the default collate stacked."""
        which = f"{split}_dataset's first batch" if split else "a batch"
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise UserInputError(
                    f"workload.label_key: {which} is a mapping without the label key "
                    f"{self.label_key!r} (its keys: {', '.join(map(str, batch))}); set the "
                    "workload's label_key to the target's key")
            inputs = (dict(batch) if self.loss_fn is None else
                      {k: v for k, v in batch.items() if k != self.label_key})
            return inputs, batch[self.label_key]
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return batch[0], batch[1]
        neither = f"neither an (input, target) pair nor a mapping with {self.label_key!r}"
        if self.collate_fn_given:
            raise UserInputError(f"workload.collate_fn: it made {which} {describe(batch)}, "
                                 f"{neither}")
        raise UserInputError(f"{f'workload.{split}_dataset: ' if split else ''}a batch "
                             f"({describe(batch)}) is {neither}; make its samples (input, "
                             "target) pairs or mappings, or give a collate_fn")

    @staticmethod
    def forward(model: torch.nn.Module, inputs: Any) -> Any:
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        if self.loss_fn is None:
            return own_loss(output)
        return self.loss_fn(logits_of(output), target)


def as_batches(loss: Batches | Callable[[Any, Any], torch.Tensor] | None) -> Batches:
    """A ``Batches``, or one made from a bare ``loss_fn`` (None: the model's own loss)."""
    return loss if isinstance(loss, Batches) else Batches(loss)


def batch_size(target: Any) -> int:
    """Samples in a batch: the target's first dimension."""
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.ndim else 1
    return len(target)


@contextmanager
def blamed_on(what: str) -> Iterator[None]:
    """What the user's code raises inside becomes one line: ``what``, then the error."""
    try:
        yield
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the user's code raised
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserInputError(f"{what} ({type(exc).__name__}: {first[:200]})") from None


def check_first_batch(model: torch.nn.Module, batches: Batches, batch: Any,
                      device: torch.device, to_device: Callable[[Any, torch.device], Any],
                      split: str = "train") -> tuple[torch.Tensor, Any]:
    """One batch through the model before training: a batch the model cannot take, an output
    without logits or a missing loss is one line naming what was passed, not an epoch lost.
    Returns the batch's (logits, target), from which the loop learns the number of classes
    (and on which the loop tries its metrics: ``steps.check_metrics``). ``split``: whose
    first batch it is."""
    inputs, target = batches.split(batch, split)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with blamed_on(f"workload.model: it cannot take a batch of {describe(inputs)}; "
                           f"its forward takes ({forward_parameters(model)})"):
                output = batches.forward(model, to_device(inputs, device))
            logits = logits_of(output)
            with blamed_on(f"workload.loss_fn: it fails on the model's logits "
                           f"({describe(logits)}) and the target ({describe(target)})"):
                loss = batches.loss(output, to_device(target, device))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise UserInputError(f"workload.loss_fn: it returned {describe(loss)}, not one "
                                     "number (the mean over the batch)")
    finally:
        model.train(was_training)
    return logits, target
