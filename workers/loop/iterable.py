"""A torch ``IterableDataset`` (a stream: no ``__len__``, no ``__getitem__``) as a split.

Shares. Every rank iterates the whole stream and keeps its share: after ``start`` items (the
ones a resume mid-epoch skips), item ``start + i`` goes to rank ``i % W``. Within a rank, its
items are cut into chunks of ``batch_size``, and chunk ``c`` goes to the rank's DataLoader
worker process ``c % n`` (``torch.utils.data.get_worker_info``). The loader takes a batch from
each worker in turn, so it yields the rank's share in the stream's order, in the same batches
whatever the number of worker processes. Every process reads the whole stream (skipping an
item still makes it): ``train.loader_workers: auto`` gives one per rank, which reads it off the
training process without reading it twice. The stream must yield the whole split wherever it
is iterated, in the same order (do not split it by ``get_worker_info`` yourself).

Steps. Two ranks' shares differ by at most one item, their batches by at most one; DDP needs
every rank to make as many optimizer steps, or its all-reduce waits forever. Before each
optimizer step the ranks agree (one all-reduce MIN of the micro-batches each has for it): the
epoch ends where the shortest share ends. Only a rank whose share holds one item more than
another's can be left with a last batch, of that one item: at most ``W - 1`` items of an epoch
are not trained.

Positions. After k batches of B on each of W ranks, the stream's first ``start + k*B*W``
items are trained: a mid-epoch checkpoint records that number (``consumed``, as
``loop.stream.EpochSampler`` records its own) and a resume skips that many items of the epoch's
stream. That holds when the stream yields the same items in the same order when iterated again:
seed it, and reshuffle it by epoch in a ``set_epoch(epoch)`` of its own, which is called before
every epoch (in every process that iterates it).

Validation and test: each rank scores its share (``i % W``), nothing dropped, nothing padded,
so the all-reduced sufficient statistics are those of the whole split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from workers.contract.user_errors import UserInputError

# Schedules whose curve is laid out over the run's total optimizer steps.
SIZED_SCHEDULES = ("linear", "cosine", "one_cycle", "step")


def is_iterable(dataset: Any) -> bool:
    """A torch stream (which a DataLoader iterates, never indexes)."""
    return isinstance(dataset, IterableDataset)


def first_item(dataset: Any, split: str) -> Any:
    """The stream's first item (the stream iterated once, from its start)."""
    item = next(iter(dataset), StopIteration)
    if item is StopIteration:
        raise UserInputError(f"workload.{split}_dataset: the IterableDataset yields no items")
    return item


def check_iterable_run(cfg: Any, workload: Any) -> None:
    """A run whose training split is a stream of unknown length cannot size a schedule over
    its total steps: refused in one line, before any worker starts (and again on the workers).
    ``cfg``: the run's ``RunConfig``."""
    if cfg.engine != "torch" or cfg.train.max_steps or not is_iterable(
            getattr(workload, "train_dataset", None)):
        return
    if getattr(workload, "scheduler", None) is not None:
        return  # the workload's own: called with total_steps=None
    kind = cfg.schedule
    if kind in SIZED_SCHEDULES and not (kind == "step" and cfg.train.step_size):
        extra = " or train.step_size" if kind == "step" else ""
        raise UserInputError(
            f"train.schedule: {kind} is laid out over the run's total optimizer steps, which "
            "an IterableDataset as workload.train_dataset (a stream of unknown length) does "
            f"not give; set train.max_steps{extra}, or use train.schedule: constant")


class RankShare(IterableDataset):
    """One rank's share of a stream, split further between its loader's worker processes."""

    def __init__(self, dataset: Any, rank: int, world_size: int, batch_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size = batch_size
        # (epoch, start) in shared memory: persistent loader workers keep the copy of this
        # object made when they started, and read these where each epoch's pass begins.
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Before a pass: the epoch (passed on to the stream's own ``set_epoch``) and the
        stream's items to skip (trained before a resume)."""
        self.position[0], self.position[1] = epoch, start

    def __iter__(self) -> Iterator[Any]:
        epoch, start = (int(v) for v in self.position.tolist())
        reshuffle = getattr(self.dataset, "set_epoch", None)
        if epoch and callable(reshuffle):
            reshuffle(epoch)
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        for index, item in enumerate(self.dataset):
            i = index - start
            if i < 0 or i % self.world_size != self.rank:
                continue
            if (i // self.world_size // self.batch_size) % workers == worker:
                yield item


def fewest_on_any_rank(count: int, device: torch.device) -> int:
    """The smallest ``count`` among the ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class TrainStream:
    """A rank's training loader over a stream, as the torch loop uses one: ``sampler`` (this
    object) with ``set_epoch(epoch, consumed)`` and ``position_after``, as
    ``loop.stream.EpochSampler`` has them, but no length. ``micro_batches(accum)`` yields the
    batches every rank agreed on, each with its optimizer step's size and whether it is the
    step's last; ``ended`` says, once a step's batches are out, whether it is the epoch's last
    (the next step is agreed on before that one trains)."""

    def __init__(self, loader: DataLoader, share: RankShare, device: torch.device) -> None:
        self.loader, self.share, self.device = loader, share, device
        self.batch_size, self.world_size = share.batch_size, share.world_size
        self.epoch, self.consumed, self.ended = 1, 0, False
        self.sampler = self

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed
        self.share.set_epoch(epoch, consumed)

    def position_after(self, batches: int, batch_size: int) -> int:
        """``consumed`` once every rank trained ``batches`` more batches this epoch."""
        return self.consumed + batches * batch_size * self.world_size

    def _agreed(self, batches: Iterator[Any], accum: int) -> list[Any]:
        """The next step's micro-batches, as many as the rank with the fewest has (a rank's
        last, when another rank has none left, is dropped)."""
        taken: list[Any] = []
        while len(taken) < accum and (batch := next(batches, None)) is not None:
            taken.append(batch)
        return taken[:fewest_on_any_rank(len(taken), self.device)]

    def micro_batches(self, accum: int) -> Iterator[tuple[Any, int, bool]]:
        """(batch, micro-batches in its step, whether it is the step's last)."""
        batches = iter(self.loader)
        step = self._agreed(batches, accum)
        self.ended = not step
        while step:
            following = self._agreed(batches, accum) if len(step) == accum else []
            self.ended = not following
            for index, batch in enumerate(step):
                yield batch, len(step), index == len(step) - 1
            step = following

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch, _, _ in self.micro_batches(1))


def say_resumed(epoch: int, consumed: int) -> None:
    """The one line (rank 0) that says what a resume restored of the stream's position."""
    logging.getLogger(__name__).warning(
        "resuming epoch %s of an IterableDataset training split: its first %s items (trained "
        "before the stop) are read and skipped; the stream must yield them in the same order",
        epoch, consumed)
