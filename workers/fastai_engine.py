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
- ``ReportToRay`` then hands the epoch to the torch engine's ``EpochReporter`` (rank-0 tracker,
  checkpoint policy, files, ``ray.train.report``); improvements also carry ``learner.pth``,
  the format of ``learn.save``, so that ``learn.load`` of a fresh Learner reads the best model.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import fastai.callback.schedule  # noqa: F401 - registers Learner.fit_one_cycle
import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback  # noqa: F401 - registers Learner.no_bar
from fastai.data.core import TfmdDL
from fastai.data.load import _FakeLoader
from fastai.learner import Learner, Recorder
from fastai.torch_core import find_bs, to_detach
from fastcore.foundation import L

from workers.checkpointing import LEARNER_FILE, load_train_state, load_weights
from workers.config import RunConfig
from workers.evaluation import (
    as_float32,
    autocast,
    global_metrics,
    infer_num_classes,
    to_device,
    workload_metrics,
)
from workers.fastai_learner import MetricColumn, learner_from_workload
from workers.loop import (
    EpochReporter,
    check_precision,
    epoch_seed,
    quiet_ray_train_logs,
    require_monitor,
)
from workers.metrics import MeanLoss
from workers.workload import build_workload


class RankShardDL(TfmdDL):
    """This rank's share of a fastai DataLoader's indices; batches are made by that loader.

    The delegation is that of fastai's ``DistributedDL``, which cannot be used here: its module
    needs the ``accelerate`` package to import, and it broadcasts rank 0's order with a CUDA
    tensor (which fails under gloo on CPU). Instead every rank draws the same order from a seed,
    reseeded per epoch so that a resumed run shuffles as an uninterrupted one. Training
    (``pad``) wraps around to equal shard lengths, so every rank runs the same number of DDP
    steps; validation takes strided, unpadded slices (rank r: r, r+W, ...) as
    ``workers.evaluation.shard`` does, so every sample counts exactly once.
    """

    def __init__(self, dl: Any, rank: int, world_size: int, *, pad: bool, seed: int) -> None:
        # No TfmdDL.__init__: the wrapped loader keeps its own dataset, transforms and batching.
        self.dl, self.rank, self.world_size = dl, rank, world_size
        self.pad, self.seed, self.epoch = pad, seed, 0
        self.bs, self.drop_last, self.dataset = dl.bs, dl.drop_last, dl.dataset
        self.num_workers, self.offs, self.pin_memory = dl.num_workers, dl.offs, dl.pin_memory
        self.device = dl.device
        fake = dl.fake_l
        self.fake_l = _FakeLoader(self, fake.pin_memory, fake.num_workers, fake.timeout,
                                  persistent_workers=fake.persistent_workers,
                                  pin_memory_device=fake.pin_memory_device)

    @property
    def n_inp(self) -> int:
        return self.dl.n_inp

    def before_iter(self) -> None:
        self.dl.before_iter()

    def randomize(self) -> None:
        self.dl.randomize()

    def after_batch(self, b: Any) -> Any:
        return self.dl.after_batch(b)

    def after_iter(self) -> None:
        self.dl.after_iter()

    def create_batches(self, samps: Any) -> Any:
        return self.dl.create_batches(samps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get_idxs(self) -> list[int]:
        self.dl.rng = random.Random(epoch_seed(self.seed, 0, self.epoch))  # the same on all ranks
        idxs = list(self.dl.get_idxs())
        if self.pad and idxs:
            padded = -(-len(idxs) // self.world_size) * self.world_size
            idxs += (idxs * (padded // len(idxs) + 1))[: padded - len(idxs)]
        return idxs[self.rank :: self.world_size]

    def __len__(self) -> int:
        n, world = self.dl.n, self.world_size
        local = -(-n // world) if self.pad else len(range(self.rank, n, world))
        if self.dl.bs is None:
            return local
        return local // self.dl.bs + (0 if self.dl.drop_last or local % self.dl.bs == 0 else 1)

    def to_detach(self, b: Any, cpu: bool = True, gather: bool = True) -> Any:
        # Under WORLD_SIZE > 1 fastai all-gathers every batch's loss and metrics through this
        # (learn.to_detach): a collective per batch that uneven validation shards would leave
        # waiting forever. The engine computes the global values itself.
        return to_detach(b, cpu, gather=False)


class PlainOptimizerState:
    """``learn.opt``'s state in plain types: fastai keeps hyper-parameters in an ``L`` with
    numpy scalars, which ``torch.load(weights_only=True)`` refuses."""

    def __init__(self, learn: Learner) -> None:
        self.learn = learn

    def state_dict(self) -> dict[str, Any]:
        return _plain(self.learn.opt.state_dict())

    @staticmethod
    def load(learn: Learner, state: dict[str, Any], device: torch.device) -> None:
        if "hypers" in state:  # a fastai Optimizer (not an OptimWrapper around torch's)
            # Unlike torch's, fastai's optimizers do not move loaded state to the parameters'
            # device: the checkpoint's CPU tensors would meet CUDA gradients at the first step.
            state = {"state": to_device(state["state"], device), "hypers": L(state["hypers"])}
        learn.opt.load_state_dict(state)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (list, L)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class Bf16Autocast(Callback):
    """bf16 mixed precision for a Learner on any device: the forward pass and loss under
    autocast, the predictions in float32 for the loss and metrics. (fastai's MixedPrecision
    enters CUDA autocast only, which leaves a CPU run in float32.)"""

    order = 10  # as fastai's MixedPrecision: before the metrics read the predictions

    def __init__(self, device: torch.device) -> None:
        self.device, self.context = device, None

    def before_batch(self) -> None:
        self.context = autocast(self.device, "bf16")
        self.context.__enter__()

    def after_pred(self) -> None:
        self.learn.pred = as_float32(self.pred)

    def after_loss(self) -> None:
        self._leave()

    def after_cancel_batch(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None


class ReportToRay(Callback):
    """Per epoch: exact global metrics into the Recorder's row, then the shared end of epoch."""

    order = Recorder.order + 5  # after the Recorder writes its row, before trackers (60) read it

    def __init__(self, reporter: EpochReporter, plain: torch.nn.Module, metrics: list[Any],
                 train_dl: RankShardDL, *, rank: int, seed: int, first_epoch: int) -> None:
        self.reporter, self.plain, self.stats_metrics = reporter, plain, metrics
        self.train_dl, self.rank, self.seed = train_dl, rank, seed
        self.first_epoch = first_epoch  # fastai's index of the first epoch to train (resume)
        self.train_loss, self.val_loss = MeanLoss(), MeanLoss()
        self.skipped, self.started, self.wrapped = False, 0.0, None

    def before_epoch(self) -> None:
        self.skipped = self.epoch < self.first_epoch  # fit(start_epoch=) skips trained epochs
        if self.skipped:
            return
        epoch = self.epoch + 1  # the project counts epochs from 1
        seed = epoch_seed(self.seed, self.rank, epoch)
        torch.manual_seed(seed)  # dropout; fastai's augmentations draw from `random`
        random.seed(seed)
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
        # The unwrapped module: DDP's forward may broadcast buffers, a collective that ranks
        # with different numbers of validation batches would never all reach.
        self.wrapped, self.learn.model = self.learn.model, self.plain

    def after_validate(self) -> None:
        self.learn.model = self.wrapped

    def after_epoch(self) -> None:
        if self.skipped:
            self._set_row({}, blank=True)
            return
        values = global_metrics(
            [("train", self.train_loss, []), ("val", self.val_loss, self.stats_metrics)],
            self.reporter.device,
        )
        self._set_row({"train_loss": values["train_loss"], "valid_loss": values["val_loss"],
                       **{m.name: values[f"val_{m.name}"] for m in self.stats_metrics}})
        if self.reporter.report(self.epoch + 1, values, self.started):
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
class Setup:
    learn: Learner
    plain: torch.nn.Module
    metrics: list[Any]
    train_dl: RankShardDL
    device: torch.device
    start_epoch: int
    tracker_state: dict[str, Any] | None


def setup(cfg: RunConfig, rank: int, world_size: int) -> Setup:
    import ray.train
    import ray.train.torch

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    random.seed(cfg.seed)  # fastai DataLoaders seed their generators from `random`
    workload = build_workload(cfg.workload.entrypoint, cfg.workload.params)
    device = ray.train.torch.get_device()
    check_precision(cfg.train.precision, device)
    plain = workload.model.to(device)
    learn = getattr(workload, "extras", {}).get("learner")
    if learn is None:
        metrics = workload_metrics(workload, infer_num_classes(plain, workload.train_dataset,
                                                               device))
        learn = learner_from_workload(workload, cfg)
    else:
        metrics = workload.metrics  # the Learner's own, as mergeable sums
    require_monitor(cfg.tracker.monitor,
                    ["train_loss", "val_loss", *(f"val_{m.name}" for m in metrics)])
    learn.metrics = [MetricColumn(m.name) for m in metrics]

    start_epoch, tracker_state, optimizer_state = 1, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            plain.load_state_dict(load_weights(directory))
            state = load_train_state(directory)
        start_epoch = int(state["epoch"]) + 1
        tracker_state = state["tracker"]
        optimizer_state = state.get("optimizer")  # absent from weights-only checkpoints

    learn.model = plain
    learn.create_opt()  # on the unwrapped model: a Learner's splitter expects its own model
    if optimizer_state is not None:
        PlainOptimizerState.load(learn, optimizer_state, device)
    learn.model = ray.train.torch.prepare_model(
        plain, parallel_strategy="ddp" if world_size > 1 else None
    )

    shards = []
    for dl, pad in ((learn.dls.train, True), (learn.dls.valid, False)):
        inner = dl.new(bs=cfg.train.batch_size) if hasattr(dl, "new") else dl
        inner.to(device)
        shards.append(RankShardDL(inner, rank, world_size, pad=pad, seed=cfg.seed))
    learn.dls.loaders[:2] = shards
    learn.dls.device = device  # where fastai's TrainEvalCallback puts the model at fit start
    return Setup(learn, plain, metrics, shards[0], device, start_epoch, tracker_state)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    cfg = RunConfig.model_validate(config)
    quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()

    s = setup(cfg, rank, world_size)
    reporter = EpochReporter.create(cfg, rank == 0, s.tracker_state, model=s.plain,
                                    optimizer=PlainOptimizerState(s.learn), device=s.device,
                                    world_size=world_size, torch_weights_file=LEARNER_FILE)
    report = ReportToRay(reporter, s.plain, s.metrics, s.train_dl, rank=rank, seed=cfg.seed,
                         first_epoch=s.start_epoch - 1)
    cbs = [report] + ([Bf16Autocast(s.device)] if cfg.train.precision == "bf16" else [])
    fit_args = {"start_epoch": s.start_epoch - 1, "cbs": cbs}
    with s.learn.no_bar(), s.learn.no_logging():
        if cfg.schedule == "one_cycle":
            s.learn.fit_one_cycle(cfg.train.epochs, lr_max=cfg.train.lr, **fit_args)
        else:
            s.learn.fit(cfg.train.epochs, lr=cfg.train.lr, **fit_args)
    reporter.saver.wait()
