"""The per-worker training loop for ``engine: fastai``: fastai's own fit on Ray Train workers.

fastai runs the epochs (``fit_one_cycle`` or ``fit``, its callbacks and schedules). The project
supplies what fastai's own distributed path cannot do here, and the same end of epoch as the
torch engine:

- Ray's ``prepare_model`` wraps the model in DDP (fastai's ``distrib_ctx`` fails on CPU under
  gloo) and ``RankShardDL`` gives each rank its share of the DataLoaders;
- validation runs in fastai's own loop on this rank's unpadded shard, with the unwrapped model;
  ``ReportToRay`` collects the project's sufficient statistics during it and all-reduces them
  once: the metrics are exact, identical on every rank, and written into the Recorder's row,
  so any tracker callback on the Learner decides on the global values;
- ``ReportToRay`` then hands the epoch to the shared ``CheckpointManager`` (rank-0 tracker,
  checkpoint policy, files, ``ray.train.report``); each model policy best keeps (the best,
  the top K, an also-monitor's best) also carries ``learner.pth``, the format of
  ``learn.save``, so that ``learn.load`` of a fresh Learner reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import fastai.callback.schedule  # noqa: F401 - registers Learner.fit_one_cycle
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback  # noqa: F401 - registers Learner.no_bar
from fastai.learner import Learner, Recorder
from fastai.torch_core import find_bs
from fastcore.foundation import L

from workers.checkpoint.manager import CheckpointManager
from workers.contract.names import LEARNER_FILE
from workers.decisions.tracker import require_monitor
from workers.engines.fastai.data import PlainOptimizerState, RankShardDL
from workers.engines.fastai.learner import MetricColumn, learner_from_workload
from workers.evaluation.collectives import broadcast_buffers
from workers.evaluation.metrics import MeanLoss, epoch_metric_names
from workers.loop.learner_splits import Bf16Autocast
from workers.loop.metric_setup import infer_num_classes, workload_metrics
from workers.loop.ray_data import engine_refuses, streamed_splits
from workers.loop.runtime import Worker, seed_epoch, start_worker
from workers.loop.scoring import global_metrics
from workers.loop.sharding import LocalState


class ReportToRay(Callback):
    """Per epoch: exact global metrics into the Recorder's row, then the shared end of epoch."""

    order = Recorder.order + 5  # after the Recorder writes its row, before trackers (60) read it

    def __init__(self, checkpoints: CheckpointManager, plain: torch.nn.Module,
                 metrics: list[Any], train_dl: RankShardDL, *, rank: int, seed: int,
                 first_epoch: int) -> None:
        self.checkpoints, self.plain, self.stats_metrics = checkpoints, plain, metrics
        self.train_dl, self.rank, self.seed = train_dl, rank, seed
        self.first_epoch = first_epoch  # fastai's index of the first epoch to train (resume)
        self.train_loss, self.val_loss = MeanLoss(), MeanLoss()
        self.skipped, self.started, self.wrapped = False, 0.0, None

    def before_epoch(self) -> None:
        self.skipped = self.epoch < self.first_epoch  # fit(start_epoch=) skips trained epochs
        if self.skipped:
            return
        epoch = self.epoch + 1  # the project counts epochs from 1
        seed_epoch(self.seed, self.rank, epoch)
        self.train_dl.set_epoch(epoch)
        self.train_loss.reset()
        self.started = time.perf_counter()

    def after_batch(self) -> None:
        if len(self.yb) == 0:
            return
        n = find_bs(self.yb)
        if self.training:
            self.train_loss.add_batch(self.loss.item(), n)
            return
        self.val_loss.add_batch(self.loss.item(), n)
        for metric in self.stats_metrics:
            metric.update(self.pred, *self.yb)

    def before_validate(self) -> None:
        self.val_loss.reset()
        for metric in self.stats_metrics:
            metric.reset()
        # The model rank 0 saves, buffers included, on every rank (see broadcast_buffers);
        # and the unwrapped module: DDP's forward may broadcast buffers, a collective that
        # ranks with different numbers of validation batches would never all reach.
        broadcast_buffers(self.plain)
        self.wrapped, self.learn.model = self.learn.model, self.plain

    def after_validate(self) -> None:
        self.learn.model = self.wrapped

    def after_epoch(self) -> None:
        if self.skipped:
            self._set_row({}, blank=True)
            return
        values = global_metrics(
            [("train", self.train_loss, []), ("val", self.val_loss, self.stats_metrics)],
            self.checkpoints.device,
        )
        self._set_row({"train_loss": values["train_loss"], "valid_loss": values["val_loss"],
                       **{m.name: values[f"val_{m.name}"] for m in self.stats_metrics}})
        if self.checkpoints.report(self.epoch + 1, values, self.started):
            raise CancelFitException()

    def _set_row(self, by_name: dict[str, float], blank: bool = False) -> None:
        """Overwrite the Recorder's per-rank values (fastai's smoothed train loss, its local
        validation averages) with the global ones; a skipped epoch's empty row becomes NaN, so
        that a tracker callback neither crashes nor improves on it."""
        recorder = getattr(self.learn, "recorder", None)
        if recorder is None or not recorder.values:
            return
        names = [n for n in recorder.metric_names[1:] if n != "time"]
        if blank:
            recorder.values[-1] = L([float("nan")] * len(names))
            return
        row = recorder.values[-1]  # the same object as learn.final_record
        for i, name in enumerate(names[: len(row)]):
            if name in by_name:
                row[i] = by_name[name]


@dataclass
class FastaiParts:
    """What the fastai loop trains with, on one rank."""

    learn: Learner  # its model DDP-wrapped, its first two DataLoaders sharded
    plain: torch.nn.Module  # the unwrapped model whose weights are saved
    metrics: list[Any]  # mergeable statistics behind the Learner's metric columns
    train_dl: RankShardDL


def setup(worker: Worker) -> FastaiParts:
    from workers.loop.sharding import learner_probe, wrap_ddp

    cfg, workload, device = worker.cfg, worker.workload, worker.device
    if streamed_splits(workload):
        raise engine_refuses("fastai", streamed_splits(workload))
    plain = workload.model
    learn = getattr(workload, "extras", {}).get("learner")
    if learn is None:
        metrics = workload_metrics(workload, infer_num_classes(plain, workload.train_dataset,
                                                               device))
        learn = learner_from_workload(workload, cfg)
    else:
        metrics = workload.metrics  # the Learner's own, as mergeable sums
    require_monitor(cfg.tracker.monitor, epoch_metric_names(metrics))
    learn.metrics = [MetricColumn(m.name) for m in metrics]

    learn.model = plain
    learn.create_opt()  # on the unwrapped model: a Learner's splitter expects its own model
    if worker.restored.optimizer_state is not None:
        PlainOptimizerState.load(learn, worker.restored.optimizer_state, device)
    learn.model = wrap_ddp(plain, worker, learner_probe(learn))
    shards = []
    for dl, pad in ((learn.dls.train, True), (learn.dls.valid, False)):
        inner = dl.new(bs=cfg.train.batch_size) if hasattr(dl, "new") else dl
        inner.to(device)
        shards.append(RankShardDL(inner, worker.rank, worker.world_size, pad=pad,
                                  seed=cfg.seed))
    learn.dls.loaders[:2] = shards
    learn.dls.device = device  # where fastai's TrainEvalCallback puts the model at fit start
    return FastaiParts(learn, plain, metrics, shards[0])


def train_loop(config: dict[str, Any]) -> None:
    worker = start_worker(config)
    cfg, parts = worker.cfg, setup(worker)
    checkpoints = worker.checkpoint_manager(
        LocalState(parts.plain, PlainOptimizerState(parts.learn)), torch_weights_file=LEARNER_FILE)
    start = worker.restored.start_epoch - 1  # fastai counts epochs from 0
    report = ReportToRay(checkpoints, parts.plain, parts.metrics, parts.train_dl,
                         rank=worker.rank, seed=cfg.seed, first_epoch=start)
    cbs = [report] + ([Bf16Autocast(worker.device)] if cfg.train.precision == "bf16" else [])
    with parts.learn.no_bar(), parts.learn.no_logging():
        if cfg.schedule == "one_cycle":
            parts.learn.fit_one_cycle(cfg.train.epochs, lr_max=cfg.train.lr, start_epoch=start,
                                      cbs=cbs)
        else:
            parts.learn.fit(cfg.train.epochs, lr=cfg.train.lr, start_epoch=start, cbs=cbs)
    checkpoints.finish()
