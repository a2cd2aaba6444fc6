"""Training on one rank's shard, one optimizer step at a time.

``train_steps`` yields after each optimizer step, so the engine's loop reads top to bottom:
a step, maybe an evaluation, maybe a save, maybe a stop (``engines.torch_engine.run_epoch``);
``train_epoch`` is the whole pass, for loops that evaluate only at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from workers.evaluation.metrics import MeanLoss
from workers.loop.batches import Batches, as_batches, batch_size
from workers.loop.devices import to_device
from workers.loop.optim import Stepper
from workers.loop.precision import forward_loss


@dataclass(frozen=True)
class Step:
    """An optimizer step just taken."""

    batches: int  # the loader's batches trained in this pass so far
    epoch_ends: bool  # the epoch's last step: the loader's last batch (a stream's: agreed)


def micro_batches(loader: Any, stepper: Stepper) -> Iterator[tuple[Any, int, bool]]:
    """(batch, micro-batches in its optimizer step, whether it is the step's last): from the
    loader's length, or as a stream's ranks agree on them (``iterable.TrainStream``)."""
    agreed = getattr(loader, "micro_batches", None)
    if agreed is not None:
        return agreed(stepper.accum)
    count = len(loader)
    return ((batch, *stepper.group(index, count)) for index, batch in enumerate(loader))


def train_steps(
    model: torch.nn.Module,
    loader: Any,
    batches: Batches | Callable[[Any, Any], torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | Stepper,
    device: torch.device,
    precision: str = "fp32",
    loss: MeanLoss | None = None,
) -> Iterator[Step]:
    """One pass over this rank's training shard, a ``Step`` after each optimizer step (the
    caller may evaluate there, leaving the model in training mode, and stop the pass by
    leaving the loop). ``optimizer``: a ``Stepper`` (schedule, accumulation, clipping), or a
    plain optimizer stepped once per batch. ``loss``: the running loss, as sufficient
    statistics, that each batch adds to (the caller's, which it may reset between steps)."""
    batches = as_batches(batches)
    stepper = optimizer if isinstance(optimizer, Stepper) else Stepper(optimizer)
    model.train()
    loss = loss if loss is not None else MeanLoss()
    # A stream's epoch ends where its ranks agree it does (``iterable.TrainStream.ended``).
    agreed = getattr(loader, "micro_batches", None) is not None
    in_epoch = None if agreed else len(loader)
    stepper.optimizer.zero_grad(set_to_none=True)
    for index, (batch, in_step, last) in enumerate(micro_batches(loader, stepper)):
        x, y = batches.split(batch)
        y = to_device(y, device)
        with stepper.micro_batch(model, last):
            _, batch_loss = forward_loss(model, batches, to_device(x, device), y, device,
                                         precision)
            (batch_loss / in_step if in_step > 1 else batch_loss).backward()
        if last:
            stepper.step(model)
        loss.add_batch(batch_loss.item(), batch_size(y))
        if last:
            done = index + 1
            yield Step(done, loader.ended if agreed else done == in_epoch)


def train_epoch(
    model: torch.nn.Module,
    loader: Any,
    batches: Batches | Callable[[Any, Any], torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | Stepper,
    device: torch.device,
    precision: str = "fp32",
    loss: MeanLoss | None = None,
) -> MeanLoss:
    """The whole pass of ``train_steps``; the running loss as sufficient statistics (``loss``,
    added to, or a new one)."""
    loss = loss if loss is not None else MeanLoss()
    for _ in train_steps(model, loader, batches, optimizer, device, precision, loss):
        pass
    return loss
