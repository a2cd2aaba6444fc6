"""``engine: torch``: the project's own epoch loop on every Ray Train rank.

Per optimizer step (``loop.training.train_steps``): advance the clock; when it evaluates,
this rank's validation shard -> one all-reduce of every split's sufficient statistics ->
identical metrics on all ranks -> the ``CheckpointManager`` (rank 0's tracker, checkpoint
policy, ``ray.train.report``); on a stop request, a save of this step; then maybe stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch.utils.data import DataLoader

from workers.checkpoint.manager import CheckpointManager, Position
from workers.contract.config import monitor_mode
from workers.contract.user_errors import UserInputError
from workers.decisions.tracker import require_monitor
from workers.decisions.weights import Weights, better_weights, with_both
from workers.evaluation.collectives import broadcast_buffers, most_on_any_rank
from workers.evaluation.metrics import MeanLoss, epoch_metric_names
from workers.loop.batches import Batches, check_first_batch
from workers.loop.devices import model_device, to_device
from workers.loop.ema import EmaState, WeightsEma
from workers.loop.iterable import (
    RankShare,
    TrainStream,
    check_iterable_run,
    is_iterable,
    say_resumed,
)
from workers.loop.loaders import (
    collate_of,
    first_batch,
    loader_workers,
    make_loader,
    shard,
    split_of,
)
from workers.loop.metric_setup import check_metrics, classes_from, workload_metrics
from workers.loop.optim import Stepper, make_optimizer, make_stepper
from workers.loop.parquet_shards import eval_stream, train_stream
from workers.loop.preempt import StopRequests
from workers.loop.ray_data import StreamedEval, joined, rows_collate
from workers.loop.runtime import Worker, start_worker
from workers.loop.sampler import EpochSampler
from workers.loop.scoring import accumulate, global_metrics
from workers.loop.sharding import (
    LocalState,
    ShardedState,
    fully_shard_model,
    load_full_optimizer_state,
    load_local_optimizer_state,
    loader_first_batch,
    loss_probe,
    unused_parameters_named,
    wrap_ddp,
)
from workers.loop.training import Step, train_epoch, train_steps


class EpochPositions(Protocol):
    """What the torch loop asks of a training loader's ``sampler``: an ``EpochSampler``, or a
    stream's loader itself (``StreamedTrain``, ``TrainStream``)."""

    def set_epoch(self, epoch: int, consumed: int = 0) -> None: ...

    def position_after(self, batches: int, batch_size: int) -> int: ...


class SizedEpochs(EpochPositions, Protocol):
    def batches_per_epoch(self, batch_size: int) -> int: ...


class SizedTrainLoader(Protocol):
    """A training loader whose batches per epoch every rank knows: a DataLoader over an
    ``EpochSampler``, or a ``StreamedTrain`` (a ``TrainStream`` has no length)."""

    @property
    def sampler(self) -> SizedEpochs: ...

    @property
    def batch_size(self) -> int: ...

    def __len__(self) -> int: ...


@dataclass
class TorchParts:
    """What the torch loop trains with, on one rank."""

    model: torch.nn.Module  # DDP-wrapped when world_size > 1; sharded in place under fsdp
    plain: torch.nn.Module  # the module evaluated (the unwrapped one under DDP)
    stepper: Stepper  # the optimizer, its schedule, accumulation and clipping
    clock: Clock  # optimizer steps: where the run stands, when it evaluates
    train_loader: SizedTrainLoader | TrainStream
    val_loader: DataLoader | StreamedEval
    metrics: list[Any]
    batches: Batches  # how a batch goes through the model: inputs, target, logits, loss
    state: LocalState | ShardedState  # how a save reads the whole model and optimizer
    val_forwards: int = 0  # fsdp: forward calls every rank makes per validation pass
    padding_input: Any = None  # fsdp: the input of the extra ones
    ema: WeightsEma | None = None  # train.ema_decay: the EMA of the weights (``with_ema``)


def setup(worker: Worker) -> TorchParts:
    cfg, workload = worker.cfg, worker.workload
    plain = workload.model
    batches = Batches.of(workload)
    # One batch through the model first: a batch it cannot take is one line, not an epoch.
    logits, target = check_first_batch(plain, batches, sample_batch(worker, "train"),
                                       model_device(plain), to_device)
    metrics = workload_metrics(workload, classes_from(logits, target))
    check_metrics(metrics, logits, target)  # on that batch too: a metric it fails is one line
    # Before the first epoch, not after it: a misspelt monitor costs seconds, not an epoch.
    require_monitor(cfg.tracker.monitor, epoch_metric_names(metrics))
    train_loader, val_loader = train_split(worker), val_split(worker)
    if cfg.scaling.strategy == "fsdp":
        blocks = cfg.scaling.fsdp_blocks or getattr(workload, "fsdp_blocks", None)
        model = fully_shard_model(plain, blocks, worker.device, worker.world_size,
                                  cfg.train.precision)
        optimizer = make_optimizer(cfg, workload, model)
        if worker.restored.optimizer_state is not None:
            load_full_optimizer_state(model, optimizer, worker.restored.optimizer_state)
        padding_input, _ = batches.split(sample_batch(worker, "val"))
        # A stream's length is known to no rank ahead: its evaluation is joined batch by batch.
        forwards = (0 if unsized(val_loader)  # else a DataLoader over a map-style dataset
                    else most_on_any_rank(len(cast(DataLoader, val_loader)), worker.device))
        return TorchParts(model, model, *steps_of(worker, optimizer, train_loader),
                          train_loader, val_loader, metrics, batches,
                          ShardedState(model, optimizer), forwards, padding_input)
    model = wrap_ddp(plain, worker, loss_probe(
        batches, lambda: first_train_batch(worker, train_loader), cfg.autocast_precision))
    optimizer = make_optimizer(cfg, workload, plain)
    if worker.restored.optimizer_state is not None:
        load_local_optimizer_state(optimizer, worker.restored.optimizer_state)
    return TorchParts(model, plain, *steps_of(worker, optimizer, train_loader),
                      train_loader, val_loader, metrics, batches, LocalState(plain, optimizer))


def streamed(worker: Worker, split: str) -> bool:
    """Whether ``split`` is a Ray Dataset, which Ray Train shards to the workers."""
    return bool(worker.ray_datasets and split in worker.ray_datasets["rows"])


def unsized(loader: Any) -> bool:
    """Whether no rank knows ahead how many batches its share of an evaluated split holds
    (a Ray Dataset's, an ``IterableDataset``'s)."""
    return isinstance(loader, StreamedEval) or is_iterable(getattr(loader, "dataset", None))


def first_train_batch(worker: Worker, loader: Any) -> Any:
    """This rank's first training batch, for ``wrap_ddp``'s probe (a stream's: its first
    rows)."""
    if isinstance(loader, DataLoader) and not is_iterable(loader.dataset):
        return loader_first_batch(loader)
    return sample_batch(worker, "train")


def sample_batch(worker: Worker, split: str) -> Any:
    """A batch of the split's first rows, collated as its loader collates them (a stream's:
    read by the driver, whose CPUs the training does not hold); one that is not an (input,
    target) pair or a mapping is refused in one line naming the split."""
    if streamed(worker, split):
        assert worker.ray_datasets is not None  # streamed(): the driver passed them
        batch = rows_collate(worker.workload, split)(worker.ray_datasets["samples"][split])
    else:
        batch = first_batch(getattr(worker.workload, f"{split}_dataset"),
                            collate_of(worker.workload), split)
    split_of(Batches.of(worker.workload), batch, split)
    return batch


def train_split(worker: Worker) -> SizedTrainLoader | TrainStream:
    """This rank's training shard, standing where the run continues (``Restored``)."""
    cfg, workload, restored = worker.cfg, worker.workload, worker.restored
    if is_iterable(workload.train_dataset):
        share = RankShare(workload.train_dataset, worker.rank, worker.world_size,
                          cfg.train.batch_size)
        loader = TrainStream(make_loader(
            share, cfg.train.batch_size, collate_of(workload),
            workers=split_loader_workers(worker, workload.train_dataset), device=worker.device,
            options=getattr(workload, "loader_options", None)), share, worker.device)
        loader.set_epoch(restored.start_epoch, restored.consumed)
        if restored.consumed and worker.is_rank_zero:
            say_resumed(restored.start_epoch, restored.consumed)
        return loader
    if streamed(worker, "train"):
        assert worker.ray_datasets is not None  # streamed(): the driver passed them
        rows_loader = train_stream(worker.ray_datasets, rows_collate(workload, "train"),
                                   batch_size=cfg.train.batch_size, rank=worker.rank,
                                   world_size=worker.world_size, seed=cfg.seed)
        rows_loader.set_epoch(restored.start_epoch, restored.consumed)
        return rows_loader
    sampler = EpochSampler(len(workload.train_dataset), worker.rank, worker.world_size,
                          cfg.seed)
    sampler.set_epoch(restored.start_epoch, restored.consumed)
    # A DataLoader over that EpochSampler, with a batch size (torch types neither).
    return cast(SizedTrainLoader, make_loader(
        workload.train_dataset, cfg.train.batch_size, collate_of(workload),
        workers=split_loader_workers(worker, workload.train_dataset), device=worker.device,
        sampler=sampler, options=getattr(workload, "loader_options", None)))


def val_split(worker: Worker) -> DataLoader | StreamedEval:
    """This rank's share of the validation set: each sample on exactly one rank."""
    cfg, workload = worker.cfg, worker.workload
    if streamed(worker, "val"):
        assert worker.ray_datasets is not None  # streamed(): the driver passed them
        return eval_stream(worker.ray_datasets, "val", rows_collate(workload, "val"),
                           batch_size=cfg.train.batch_size, rank=worker.rank,
                           world_size=worker.world_size)
    dataset = workload.val_dataset
    share = (RankShare(dataset, worker.rank, worker.world_size, cfg.train.batch_size)
             if is_iterable(dataset) else shard(dataset, worker.rank, worker.world_size))
    return make_loader(share, cfg.train.batch_size,
                       collate_of(workload), workers=split_loader_workers(worker, dataset),
                       device=worker.device, options=getattr(workload, "loader_options", None))


def split_loader_workers(worker: Worker, dataset: Any) -> int:
    return loader_workers(worker.cfg.train.loader_workers, dataset,
                          worker.cfg.scaling.cpus_per_worker)


def steps_of(worker: Worker, optimizer: torch.optim.Optimizer,
             loader: SizedTrainLoader | TrainStream) -> tuple[Stepper, Clock]:
    """The optimizer's steps, sized from the real number of them (this rank's batches per
    epoch / grad_accum_steps, times the epochs; or train.max_steps), and restored where the
    run stopped (mid-epoch too: ``loader``'s sampler stands at the restored position)."""
    cfg, restored = worker.cfg, worker.restored
    if isinstance(loader, TrainStream):
        return stream_steps_of(worker, optimizer)
    accum = cfg.train.grad_accum_steps
    per_epoch = math.ceil(loader.sampler.batches_per_epoch(loader.batch_size) / accum)
    stepper = make_stepper(cfg, worker.workload, optimizer,
                           cfg.train.max_steps or per_epoch * cfg.train.epochs, per_epoch)
    done = restored.global_step if restored.global_step is not None else \
        per_epoch * (restored.start_epoch - 1)
    if cfg.train.max_steps:
        left = max(0, cfg.train.max_steps - done)
    else:  # the rest of the epoch in flight, then whole epochs
        left = max(0, math.ceil(len(loader) / accum) + per_epoch * (cfg.train.epochs
                                                                    - restored.start_epoch))
    stepper.restore(restored.extras, done, left)
    stepper.mutate(restored.lr_scale, restored.weight_decay)  # pbt: another trial's, perturbed
    return stepper, Clock(done, done + left, cfg.train.eval_every_n_steps)


def stream_steps_of(worker: Worker, optimizer: torch.optim.Optimizer) -> tuple[Stepper, Clock]:
    """``steps_of`` for a stream, whose steps per epoch no rank knows: train.max_steps bounds
    the run, else its epochs do (the clock has no last step then)."""
    cfg, restored = worker.cfg, worker.restored
    check_iterable_run(cfg, worker.workload)  # the driver checked it too; a tune trial's
    total = cfg.train.max_steps
    stepper = make_stepper(cfg, worker.workload, optimizer, total, None)
    done = restored.global_step or 0
    left = None if total is None else max(0, total - done)
    stepper.restore(restored.extras, done, left)
    stepper.mutate(restored.lr_scale, restored.weight_decay)
    return stepper, Clock(done, total, cfg.train.eval_every_n_steps)


@dataclass
class Clock:
    """Where the run stands in optimizer steps, and when it evaluates: every
    ``train.eval_every_n_steps`` steps (else at each epoch's end) and at the last step."""

    global_step: int
    total: int | None  # the run's last step (train.max_steps, or the epochs'; None: unknown)
    every: int | None

    @property
    def done(self) -> bool:
        return self.total is not None and self.global_step >= self.total

    def evaluates(self, epoch_ends: bool) -> bool:
        if self.done:
            return True
        return self.global_step % self.every == 0 if self.every else epoch_ends

    def evaluation(self, epoch: int) -> int:
        """The evaluation's number, from 1 (what checkpoint policies count)."""
        return math.ceil(self.global_step / self.every) if self.every else epoch


def with_ema(worker: Worker, parts: TorchParts) -> TorchParts:
    """``parts`` with the EMA of its weights (train.ema_decay; none without it), kept like the
    model (``loop.ema``), and where a resume checkpoint left it."""
    decay = worker.cfg.train.ema_decay
    if decay is None:
        return parts
    parts.ema = WeightsEma(parts.model if isinstance(parts.state, ShardedState)
                           else parts.plain, decay)
    saved = (worker.restored.extras or {}).get("ema")
    if saved is not None:
        parts.ema.load_state_dict(saved)
    return parts


def ema_checkpoints(parts: TorchParts) -> tuple[dict[str, Any], EmaState | None]:
    """The manager's kept objects (the schedule's; the EMA in resume checkpoints) and its
    reader of the EMA's weights (None without one)."""
    extras = parts.stepper.state_objects()
    if parts.ema is None:
        return extras, None
    return {**extras, "ema": parts.ema}, EmaState(parts.ema, parts.state)


def evaluate_both(worker: Worker, parts: TorchParts,
                  train_loss: Any) -> tuple[dict[str, float], Weights | None]:
    """``evaluate``, and with train.ema_decay the EMA's weights scored the same way (exactly,
    over the whole validation set, one more all-reduce); the better on tracker.monitor is the
    evaluation's model: its values under the usual names, both as ``<metric>_raw`` and
    ``<metric>_ema`` (``decisions.weights``), and which it is (None without an EMA)."""
    w, p = worker, parts
    values = evaluate(w, p, train_loss)
    if p.ema is None:
        return values, None
    with p.ema.swapped():
        ema = global_metrics([("val", score_val(w, p), p.metrics)], w.device)
    monitor = w.cfg.tracker.monitor
    winner = better_weights(monitor, monitor_mode(monitor, w.cfg.tracker.mode), values, ema)
    return with_both(values, ema, winner), winner


def evaluate(worker: Worker, parts: TorchParts, train_loss: Any) -> dict[str, float]:
    """The global metrics, identical on every rank: the training loss since the previous
    evaluation and the whole validation set's."""
    w, p = worker, parts
    values = global_metrics([("train", train_loss, []), ("val", score_val(w, p), p.metrics)],
                            w.device)
    return {**values, "lr": p.stepper.last_lr}


def score_val(worker: Worker, parts: TorchParts) -> MeanLoss:
    """The sufficient statistics of this rank's validation share, for the weights the model
    holds now."""
    w, p = worker, parts
    precision = w.cfg.autocast_precision
    # Evaluated: the model rank 0 saves, buffers included, on every rank; and the unwrapped
    # module, since DDP's forward would broadcast buffers, a collective that ranks with
    # different numbers of validation batches would never all reach. (A sharded model's
    # forward is a collective itself: every rank makes ``val_forwards`` calls.)
    broadcast_buffers(p.plain)
    loader: Iterable[Any] = p.val_loader
    if unsized(loader) and p.padding_input is not None:  # fsdp
        loader = joined(loader, w.device)
    val_loss = accumulate(p.plain, loader, p.batches, p.metrics, w.device,
                          precision, p.val_forwards, p.padding_input)
    p.model.train()  # training goes on after a mid-epoch evaluation
    return val_loss


def epoch_metrics(worker: Worker, parts: TorchParts, epoch: int) -> dict[str, float]:
    """One whole epoch trained, then its global metrics, reporting nothing: for loops that
    report and save themselves (the benchmark's baselines, ``bench/loops.py``)."""
    precision = worker.cfg.autocast_precision
    parts.train_loader.sampler.set_epoch(epoch)
    loss = train_epoch(parts.model, parts.train_loader, parts.batches, parts.stepper,
                       worker.device, precision)
    return evaluate(worker, parts, loss)


def run_epoch(worker: Worker, parts: TorchParts, manager: CheckpointManager, epoch: int,
              stops: StopRequests, running: MeanLoss) -> bool:
    """Train on this rank's shard, evaluating and reporting when the clock says; returns
    whether the run stops (the same on every rank). ``running``: the training loss since the
    last evaluation, which may have begun in an earlier epoch."""
    w, p, clock = worker, parts, parts.clock
    # Steps of this epoch trained before a mid-epoch resume.
    step = first = w.restored.step if epoch == w.restored.start_epoch else 0
    started = time.perf_counter()
    for done in train_steps(p.model, p.train_loader, p.batches, p.stepper, w.device,
                            w.cfg.autocast_precision, running):
        if p.ema is not None:
            p.ema.update()
        clock.global_step += 1
        step += 1
        at = position(p, clock, epoch, step, done)
        stop = False
        if clock.evaluates(done.epoch_ends):
            values, weights = evaluate_both(w, p, running)
            running.reset()
            # A stream's run without train.max_steps: its last epoch's end is its last step.
            final = clock.done or (clock.total is None and done.epoch_ends
                                   and epoch == w.cfg.train.epochs)
            stop = manager.report(epoch, values, started, at=at, final=final,
                                  weights=weights) or clock.done
            started = time.perf_counter()
        if not stop and stops.asked():  # a signal: save this step, then stop
            manager.preempt(epoch, at, running)
            stop = True
        if stop:
            return True
    if isinstance(p.train_loader, TrainStream) and step == first:
        refuse_empty_stream_epoch(epoch, w.world_size)
    return False


def position(parts: TorchParts, clock: Clock, epoch: int, step: int, done: Step) -> Position:
    """Where the run stands after an optimizer step: what a save of it resumes from."""
    loader = parts.train_loader
    return Position(step=step, global_step=clock.global_step,
                    consumed=None if done.epoch_ends else loader.sampler.position_after(
                        done.batches, loader.batch_size),
                    evaluation=clock.evaluation(epoch))


def refuse_empty_stream_epoch(epoch: int, world_size: int) -> None:
    """A stream's epoch that gave no step (the same on every rank: they agreed on none)."""
    raise UserInputError(
        f"workload.train_dataset: the IterableDataset's epoch {epoch} gave no batch to at "
        f"least one of the {world_size} workers; each needs one, at least (a stream of "
        f"at least {world_size} items)")


def train_loop(config: dict[str, Any]) -> None:
    worker = start_worker(config)
    parts = with_ema(worker, setup(worker))
    extras, ema_state = ema_checkpoints(parts)
    manager = worker.checkpoint_manager(parts.state, extras=extras, ema_state=ema_state)
    cfg, restored, clock = worker.cfg, worker.restored, parts.clock
    stops = StopRequests(worker.stop_queue, worker.rank, worker.device)
    running = MeanLoss()
    if restored.running_loss and worker.is_rank_zero:
        running.add_state(*restored.running_loss)  # a preempted stretch's, of every rank
    with unused_parameters_named(parts.plain):
        for epoch in worker.epochs(until=None if cfg.train.max_steps else cfg.train.epochs):
            if clock.done:
                break  # nothing left to train (a --resume of a finished run)
            if epoch != restored.start_epoch:
                parts.train_loader.sampler.set_epoch(epoch)
            if run_epoch(worker, parts, manager, epoch, stops, running):
                break
    manager.finish()
