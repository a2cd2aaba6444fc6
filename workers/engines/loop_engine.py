"""``engine: loop``: the workload's own ``loop(ctx)`` on every Ray Train rank.

The loop trains however it likes (two optimizers, several losses, a teacher); the project
gives it what the built-in loops have: this rank's data, the model prepared for DDP, exact
global metrics (``ctx.evaluate``), the rank-0 tracker, the checkpoint policy and saving off
the loop (``ctx.report``), and the state to continue from on a restart or ``--resume``
(the weights, the epoch, and whatever the loop registers with ``ctx.keep``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from workers.contract.user_errors import UserInputError
from workers.evaluation.collectives import broadcast_buffers, most_on_any_rank
from workers.loop.batches import Batches, blamed_on, check_first_batch
from workers.loop.devices import model_device, to_device
from workers.loop.iterable import is_iterable
from workers.loop.loaders import collate_of, first_batch, loader_workers, make_loader, shard
from workers.loop.metric_setup import check_metrics, classes_from, workload_metrics
from workers.loop.runtime import Worker, seed_epoch, start_worker
from workers.loop.scoring import accumulate, global_metrics
from workers.loop.sharding import (
    LocalState,
    ShardedState,
    fully_shard_model,
    load_full_optimizer_state,
    loader_first_batch,
    loss_probe,
    unused_parameters_error,
    wrap_ddp,
)


def loop_name(workload: Any) -> str:
    loop = workload.loop
    return f"{getattr(loop, '__module__', '?')}.{getattr(loop, '__qualname__', repr(loop))}"


def as_number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise UserInputError(f"ctx.report: metric {name!r} is a {type(value).__name__}, not a "
                         "number (report floats, ints or one-element tensors)")


class LoopContext:
    """What ``loop(ctx)`` gets, on every rank. See ``docs/workloads.md`` (your own loop)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.rank, self.world_size, self.device = worker.rank, worker.world_size, worker.device
        self.workload, self.config = worker.workload, worker.cfg
        self._batches = Batches.of(self.workload)
        self._collate = collate_of(self.workload)
        self._kept: dict[str, Any] = {}
        self._sharded = self.config.scaling.strategy == "fsdp"
        state = (ShardedState(self.workload.model, None) if self._sharded
                 else LocalState(self.workload.model, None))
        self._checkpoints = worker.checkpoint_manager(state, extras=self._kept)
        self._model: torch.nn.Module | None = None
        self._loaders: dict[int, Any] = {}
        self._forwards: dict[int, tuple[int, Any]] = {}  # fsdp: forwards per evaluation
        self._train_loader: Any = None
        self._wrapped: list[torch.nn.Module] = []  # the modules prepared for DDP
        self._metrics: list[Any] | None = None
        self._epoch: int | None = None  # the epoch ctx.epochs() is in
        self._last_reported = worker.restored.start_epoch - 1
        self._started = time.perf_counter()

    # -- what the loop trains with ------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The workload's model, prepared for DDP (wrapped when there is more than one rank)
        or sharded in place under fsdp (``scaling.fsdp_blocks`` or the workload's
        ``fsdp_blocks`` as units); its weights restored on a restart. Prepared on first use:
        a loop that prepares its sub-networks itself (``ctx.prepare``) never wraps the whole.
        Under fsdp, create the optimizers after this."""
        if self._model is None:
            self._model = self._prepare(self.workload.model, whole=True)
        return self._model

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on this rank's device, DDP-wrapped when there is more than one rank, or
        sharded in place under fsdp: for a loop that steps parts of the model on their own
        (a generator and a discriminator)."""
        return self._prepare(module, whole=False)

    def _prepare(self, module: torch.nn.Module, whole: bool) -> torch.nn.Module:
        if self._sharded:
            cfg = self.config
            blocks = (cfg.scaling.fsdp_blocks or getattr(self.workload, "fsdp_blocks", None)
                      if whole else None)
            return fully_shard_model(module, blocks, self.device, self.world_size,
                                     cfg.train.precision)
        probe = None
        workload = self.workload
        dataset = getattr(workload, "train_dataset", None)
        if (whole and getattr(workload, "loss_fn", None) is not None and dataset is not None
                and not is_iterable(dataset)):
            # auto: the workload's loss on this rank's first batch says whether a step may
            # leave parameters without a gradient (a module the loop prepares itself, whose
            # forward and loss only the loop knows, is not probed)
            probe = loss_probe(self._batches, lambda: loader_first_batch(self.train_loader),
                               self.config.autocast_precision)
        self._wrapped.append(module)
        return wrap_ddp(module, self._worker, probe)

    def wrapped(self) -> torch.nn.Module | None:
        """The one module DDP-wrapped (whose parameter indices DDP's errors give), if one."""
        return self._wrapped[0] if len(self._wrapped) == 1 else None

    @property
    def train_loader(self) -> Any:
        """This rank's shard of the training set (``train.batch_size``, the workload's
        collate_fn and loader_options), reshuffled each epoch by ``ctx.epochs()``."""
        if self._train_loader is None:
            from torch.utils.data import DistributedSampler

            dataset = self.workload.train_dataset
            sampler: DistributedSampler[Any] = DistributedSampler(
                dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                seed=self.config.seed)
            self._train_loader = self._loader(dataset, sampler)
        return self._train_loader

    def _loader(self, dataset: Any, sampler: Any = None) -> Any:
        workers = loader_workers(self.config.train.loader_workers, dataset,
                                 self.config.scaling.cpus_per_worker)
        return make_loader(dataset, self.config.train.batch_size, self._collate,
                           workers=workers, device=self.device, sampler=sampler,
                           options=getattr(self.workload, "loader_options", None))

    def keep(self, name: str, obj: Any) -> Any:
        """Keep ``obj`` (anything with ``state_dict`` and ``load_state_dict``: an optimizer, a
        scheduler, a scaler) in resume checkpoints; restored into it now on a restart or
        ``--resume``. Returns ``obj``."""
        if not (callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))):
            raise UserInputError(f"ctx.keep({name!r}, ...): a {type(obj).__name__} has no "
                                 "state_dict/load_state_dict; keep optimizers, schedulers, "
                                 "modules or objects that have them")
        if name in self._kept:
            raise UserInputError(f"ctx.keep: {name!r} is kept already; give each object its "
                                 "own name")
        saved = (self._worker.restored.extras or {}).get(name)
        if saved is not None:
            with blamed_on(f"ctx.keep({name!r}, ...): its saved state does not load"):
                if self._sharded and isinstance(obj, torch.optim.Optimizer):
                    # saved whole: each rank takes its own shard (every rank keeps it)
                    load_full_optimizer_state(self.workload.model, obj, saved)
                else:
                    obj.load_state_dict(saved)
        self._kept[name] = obj
        return obj

    @property
    def restored_epoch(self) -> int:
        """The last epoch already trained (0 on a fresh start)."""
        return self._worker.restored.start_epoch - 1

    # -- epochs, evaluation, reports ----------------------------------------------------
    def epochs(self) -> Iterator[int]:
        """The epochs still to train, from the restored one; each reshuffles the loader and
        sets this rank's random streams."""
        for epoch in range(self._worker.restored.start_epoch, self.config.train.epochs + 1):
            if self._epoch is not None:
                self._require_report(self._epoch)
            seed_epoch(self.config.seed, self.rank, epoch)
            if self._train_loader is not None:
                self._train_loader.sampler.set_epoch(epoch)
            self._epoch, self._started = epoch, time.perf_counter()
            yield epoch
        if self._epoch is not None:
            self._require_report(self._epoch)

    def _require_report(self, epoch: int) -> None:
        if self._last_reported < epoch:
            raise UserInputError(f"workload.loop {loop_name(self.workload)}: epoch {epoch} "
                                 "ended without ctx.report(metrics); report once per epoch, "
                                 "after ctx.evaluate(...)")

    def evaluate(self, model: torch.nn.Module | None = None, dataset: Any = None,
                 split: str = "val") -> dict[str, float]:
        """Exact global metrics of ``model`` (default: the workload's) over the whole of
        ``dataset`` (default: the workload's ``<split>_dataset``), every sample counted once
        across ranks, with the workload's loss and metrics: keys ``<split>_loss``,
        ``<split>_<metric>``. Identical on every rank; every rank must call it."""
        plain = getattr(model, "module", model) if model is not None else self.workload.model
        dataset = dataset if dataset is not None else getattr(self.workload, f"{split}_dataset",
                                                              None)
        if dataset is None:
            raise UserInputError(f"ctx.evaluate: the workload has no {split}_dataset; pass "
                                 "dataset=...")
        metrics = self._metric_objects(plain)
        loader = self._loaders.get(id(dataset))
        if loader is None:
            loader = self._loader(shard(dataset, self.rank, self.world_size))
            self._loaders[id(dataset)] = loader
        forwards, padding = self._fsdp_forwards(loader, dataset)
        was_training = plain.training
        broadcast_buffers(plain)  # rank 0's running statistics: the model it saves
        # Under fsdp a forward is a collective: every rank makes as many, the extra ones on a
        # padding input (counted nowhere).
        loss = accumulate(plain, loader, self._batches, metrics, self.device,
                          self.config.autocast_precision, forwards, padding)
        plain.train(was_training)
        return global_metrics([(split, loss, metrics)], self.device)

    def _fsdp_forwards(self, loader: Any, dataset: Any) -> tuple[int, Any]:
        if not self._sharded:
            return 0, None
        if id(dataset) not in self._forwards:
            padding, _ = self._batches.split(first_batch(dataset, self._collate))
            self._forwards[id(dataset)] = (most_on_any_rank(len(loader), self.device), padding)
        return self._forwards[id(dataset)]

    def _metric_objects(self, model: torch.nn.Module) -> list[Any]:
        if self._metrics is None:
            logits, target = check_first_batch(
                model, self._batches, first_batch(self.workload.train_dataset, self._collate),
                model_device(model), to_device)
            self._metrics = workload_metrics(self.workload, classes_from(logits, target))
            check_metrics(self._metrics, logits, target)
        return self._metrics

    def report(self, metrics: dict[str, Any], model: torch.nn.Module | None = None) -> bool:
        """One epoch's record: rank 0's tracker decides on it, the checkpoint policy saves
        the model (the workload's; ``model`` may be it or its DDP wrapper), off the loop.
        Returns True when the run should stop (tracker.patience, a non-finite value); the
        same on every rank. Every rank must call it, once per epoch."""
        if model is not None and getattr(model, "module", model) is not self.workload.model:
            raise UserInputError("ctx.report(model=...): the model saved is the workload's "
                                 "model (workload.model, or ctx.model); put the parts to keep "
                                 "in it")
        epoch = self._epoch if self._epoch is not None else self._last_reported + 1
        if epoch <= self._last_reported:
            raise UserInputError(f"ctx.report: called twice in epoch {epoch}; report once per "
                                 "epoch")
        if epoch > self.config.train.epochs:
            raise UserInputError(f"ctx.report: epoch {epoch} is past train.epochs "
                                 f"({self.config.train.epochs}); loop over ctx.epochs()")
        values = {str(k): as_number(str(k), v) for k, v in metrics.items()}
        stop = self._checkpoints.report(epoch, values, self._started)
        self._last_reported = epoch
        self._started = time.perf_counter()
        return stop

    def finish(self) -> None:
        start = self._worker.restored.start_epoch
        if start <= self.config.train.epochs and self._last_reported < start:
            raise UserInputError(f"workload.loop {loop_name(self.workload)}: returned without "
                                 "calling ctx.report(metrics); report once per epoch, after "
                                 "ctx.evaluate(...)")
        self._checkpoints.finish()


def train_loop(config: dict[str, Any]) -> None:
    worker = start_worker(config)
    loop = getattr(worker.workload, "loop", None)
    if not callable(loop):
        raise UserInputError("workload.loop: engine loop needs the workload to give "
                             "loop(ctx), a function run on every worker")
    ctx = LoopContext(worker)
    try:
        loop(ctx)
    except RuntimeError as exc:  # DDP's unused-parameter error: one line naming the setting
        error = unused_parameters_error(exc, ctx.wrapped())
        if error is None:
            raise
        raise error from None
    ctx.finish()
