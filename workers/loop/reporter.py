"""The end of every epoch, the same for every engine.

Rank 0's tracker decides (improved? save? stop?); its decisions are broadcast; if the
checkpoint policy saves the epoch, rank 0 snapshots the model (under fsdp every rank first
takes part in gathering it, and only then); every rank calls ``ray.train.report`` (rank 0 with
the checkpoint, the others with none).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from workers.checkpoint.snapshot import Snapshot, snapshot, to_host
from workers.checkpoint.writer import AsyncSaver
from workers.contract.config import RunConfig
from workers.contract.names import CHECKPOINT_PREFIX, PREEMPT_KEY, RANK_KEY
from workers.decisions.lineage import Lineage
from workers.decisions.metrics import MeanLoss, reported_names
from workers.decisions.policy import decide_save
from workers.decisions.tracker import BestTracker, MonitorNotReportedError
from workers.loop.runtime import Worker
from workers.loop.sharding import LocalState, ShardedState
from workers.loop.steps import all_reduce_sum, distributed


def broadcast_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Rank 0's decisions, made identical on every rank (one broadcast)."""
    if not distributed():
        return flags
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return [bool(v) for v in t.tolist()]


def epoch_metric_names(metrics: Iterable[Any]) -> list[str]:
    """The names every epoch reports, given the validation metric objects."""
    return ["train_loss", "val_loss", *(f"val_{n}" for m in metrics for n in reported_names(m))]


def tracker_of(cfg: RunConfig) -> BestTracker:
    """The run's tracker, as ``tracker.*`` sets it."""
    t = cfg.tracker
    return BestTracker(t.monitor, t.mode, t.min_delta, t.patience, stop_at=t.stop_at,
                       divergence=t.divergence, baseline=t.baseline,
                       start_from_epoch=t.start_from_epoch, initial_best=t.initial_best,
                       smoothing=t.smoothing.model_dump(exclude_none=True) if t.smoothing
                       else None)


def require_monitor(monitor: str, reported: Iterable[str]) -> None:
    names = sorted(reported)
    if monitor not in names:
        raise MonitorNotReportedError(
            f"tracker.monitor: {monitor!r} is not reported by this run; "
            f"it reports: {', '.join(names)}"
        )


@dataclass(frozen=True)
class Position:
    """Where an evaluation falls: optimizer steps within the epoch and in all, the positions
    of the epoch's permutation trained (None at the epoch's end), the evaluation's number."""

    step: int
    global_step: int
    consumed: int | None
    evaluation: int


@dataclass
class SavePlan:
    """Rank 0's verdict on an epoch it saves."""

    improved: bool
    reason: str
    full_state: bool  # with the optimizer (a resume checkpoint)


@dataclass
class EpochReporter:
    cfg: RunConfig
    tracker: BestTracker | None  # rank 0 only
    saver: AsyncSaver
    state: LocalState | ShardedState  # how a save reads the whole model and optimizer
    device: torch.device
    world_size: int
    # Also write the weights as a torch.save'd state dict under this name in checkpoints that
    # hold an improvement (the fastai engine's file for ``learn.load``).
    torch_weights_file: str | None = None
    # Objects with ``state_dict`` that resume checkpoints also keep (the lr scheduler, a
    # custom loop's ``ctx.keep``), restored from ``Restored.extras``; rank 0's are saved.
    extras: dict[str, Any] = field(default_factory=dict)
    # Whether the workload has a test split, in each checkpoint's metadata: the driver scores
    # it with the best weights once the run ends, and skips that Ray task where there is none.
    test_split: bool = True
    # A population-based search's trial: every saved model's metadata says which trials and
    # epochs its weights came through; resume checkpoints keep the ancestors.
    lineage: Lineage | None = None
    mode_source: str = "set by tracker.mode"  # why the tracker's mode (decisions.direction)

    @classmethod
    def create(cls, worker: Worker, state: LocalState | ShardedState,
               torch_weights_file: str | None = None,
               extras: dict[str, Any] | None = None) -> EpochReporter:
        cfg = worker.cfg
        tracker = None
        if worker.is_rank_zero:
            tracker = tracker_of(cfg)
            if worker.restored.tracker_state is not None:
                tracker.load_state_dict(worker.restored.tracker_state)
        saver = AsyncSaver()
        if tracker is not None and not state.collective and (
                cfg.checkpoint.policy != "none" or cfg.checkpoint.resume_every_n_epochs):
            # The snapshot's memory, allocated now rather than during the first save (a
            # sharded model's whole state exists only once gathered: its first save does it).
            saver.buffers.prepare(state.weights().state_dict())
        return cls(cfg, tracker, saver, state, worker.device, worker.world_size,
                   torch_weights_file, extras if extras is not None else {},
                   test_split=getattr(worker.workload, "test_dataset", None) is not None,
                   lineage=worker.lineage, mode_source=worker.mode_source)

    def report(self, epoch: int, values: dict[str, float], started: float, *,
               at: Position | None = None, final: bool | None = None) -> bool:
        """Report one evaluation's global metrics (an epoch's, or ``at`` a step); returns
        whether to stop (the same on all ranks). ``final``: the run's last evaluation
        (default: the epoch is train.epochs)."""
        import ray.train

        record: dict[str, Any] = {"epoch": epoch, **values}
        if at is not None:
            record.update(step=at.step, global_step=at.global_step)
        metrics = dict(record, workers=self.world_size)  # an elastic run's may change
        require_monitor(self.cfg.tracker.monitor, values)  # the same on all ranks: all raise
        # Identical values on every rank, so every rank decides the same.
        diverged = self.cfg.train.stop_on_nonfinite and not all(
            math.isfinite(v) for v in values.values())
        plan, stop = None, diverged
        if self.tracker is not None:
            plan, stop = self._decide(epoch, record, metrics, diverged, at, final)
        stop, save, full_state = broadcast_flags(
            [stop, plan is not None, plan is not None and plan.full_state], self.device)
        snap = None
        if save and (self.tracker is not None or self.state.collective):
            snap = self._snapshot(epoch, record, metrics, plan, full_state, at)
        metrics["epoch_seconds"] = time.perf_counter() - started
        if snap is not None:
            where = (f"step{at.global_step:08d}" if self.cfg.train.eval_every_n_steps and at
                     else f"epoch{epoch:04d}")
            self.saver.report(metrics, snap, f"{CHECKPOINT_PREFIX}{where}_{time.time_ns()}")
        else:
            ray.train.report(metrics)
        return stop

    def _decide(self, epoch: int, record: dict[str, Any], metrics: dict[str, Any],
                diverged: bool, at: Position | None,
                final: bool | None) -> tuple[SavePlan | None, bool]:
        """Rank 0: the tracker's verdict, and whether the policy saves this evaluation."""
        cfg, tracker = self.cfg, self.tracker
        decision = tracker.update(epoch, record)
        stop = decision.should_stop or diverged
        if tracker.smoother is not None:  # the record keeps both values
            record[f"{tracker.monitor}_smoothed"] = decision.value
            metrics[f"{tracker.monitor}_smoothed"] = decision.value
        if decision.stop_reason:  # one line: the driver says it and the summary keeps it
            metrics["stop_reason"] = decision.stop_reason
        save = decide_save(
            cfg.checkpoint.policy, at.evaluation if at else epoch, improved=decision.improved,
            is_final=stop or (final if final is not None else epoch == cfg.train.epochs),
            every_n_epochs=cfg.checkpoint.every_n_epochs,
            resume_every_n_epochs=cfg.checkpoint.resume_every_n_epochs,
        )
        metrics["is_best"] = decision.improved
        metrics[RANK_KEY] = tracker.improvements - (0.0 if decision.improved else 0.5)
        if not save.save:
            return None, stop
        return SavePlan(decision.improved, save.reason, save.full_state), stop

    def _snapshot(self, epoch: int, record: dict[str, Any], metrics: dict[str, Any],
                  plan: SavePlan | None, full_state: bool,
                  at: Position | None = None) -> Snapshot | None:
        """The epoch's state in host memory, on rank 0 (None elsewhere). Under fsdp every rank
        takes part in gathering it, rank 0 alone keeps it."""
        save_started = time.perf_counter()
        if self.tracker is not None:
            self.saver.wait()  # the previous save must finish before its memory is reused
        gather_started = time.perf_counter()
        weights = self.state.weights()
        optimizer = self.state.optimizer_state() if full_state else None
        extras = self._extras_state() if full_state else None
        if self.state.collective:
            metrics["gather_seconds"] = time.perf_counter() - gather_started
        if self.tracker is None:
            return None
        cfg, tracker = self.cfg, self.tracker
        copy_started = time.perf_counter()
        train_state = {"epoch": epoch, "tracker": tracker.state_dict(), "seed": cfg.seed}
        if at is not None:  # consumed: None at the epoch's end (the next one starts afresh)
            train_state.update(step=at.step, global_step=at.global_step, consumed=at.consumed)
        if extras is not None:
            train_state["extras"] = extras
        snap = snapshot(
            weights, optimizer, self._with_ancestors(train_state),
            {**record, "monitor": tracker.monitor, "mode": tracker.mode,
             "mode_source": self.mode_source, "is_best": plan.improved,
             "saved_because": plan.reason,
             "world_size": self.world_size, "workers": self.world_size,  # as in the record
             "seed": cfg.seed, "config": cfg.to_dict(), "test_split": self.test_split,
             **self._lineage(epoch)},
            torch_weights_file=self.torch_weights_file if plan.improved else None,
            buffers=self.saver.buffers,
        )
        # What this save cost the loop: the gather (fsdp), the host copy, and waiting for the
        # previous save's write if it had not finished (the write itself runs off the loop).
        metrics["snapshot_seconds"] = time.perf_counter() - copy_started
        metrics["save_blocked_seconds"] = time.perf_counter() - save_started
        return snap

    def preempt(self, epoch: int, at: Position, running_loss: MeanLoss) -> None:
        """A resume checkpoint of this step, because the driver asked the run to stop: the
        model, the optimizer and the kept state, where the data stream stands, and the
        training loss since the last evaluation (summed over the ranks: rank 0 carries it).
        Not an evaluation: no record in the history, never an improvement. Every rank calls
        it (a sharded model is gathered by all of them)."""
        import ray.train

        total, count = all_reduce_sum(running_loss.state(), self.device).tolist()
        metrics: dict[str, Any] = {"epoch": epoch, "step": at.step,
                                   "global_step": at.global_step, PREEMPT_KEY: 1,
                                   "workers": self.world_size}
        if self.tracker is not None:
            self.saver.wait()
        weights, optimizer = self.state.weights(), self.state.optimizer_state()
        extras = self._extras_state()
        if self.tracker is None:
            ray.train.report(metrics)
            return
        metrics[RANK_KEY] = self.tracker.improvements - 0.5  # below the best: never kept as it
        train_state: dict[str, Any] = {
            "epoch": epoch, "tracker": self.tracker.state_dict(), "seed": self.cfg.seed,
            "step": at.step, "global_step": at.global_step, "consumed": at.consumed,
            "running_loss": [total, count]}
        if extras is not None:
            train_state["extras"] = extras
        snap = snapshot(weights, optimizer, self._with_ancestors(train_state), {
            "epoch": epoch, "step": at.step, "global_step": at.global_step,
            "monitor": self.tracker.monitor, "mode": self.tracker.mode,
            "mode_source": self.mode_source, "is_best": False, "saved_because": "preempt",
            "world_size": self.world_size, "workers": self.world_size, "seed": self.cfg.seed,
            "config": self.cfg.to_dict(),
            **self._lineage(epoch)},
            buffers=self.saver.buffers)
        self.saver.report(metrics, snap, f"{CHECKPOINT_PREFIX}step{at.global_step:08d}_"
                          f"preempt_{time.time_ns()}")

    def _lineage(self, epoch: int) -> dict[str, Any]:
        return {"lineage": self.lineage.through(epoch)} if self.lineage else {}

    def _with_ancestors(self, train_state: dict[str, Any]) -> dict[str, Any]:
        if self.lineage:
            train_state["lineage"] = [dict(a) for a in self.lineage.ancestors]
        return train_state

    def _extras_state(self) -> dict[str, Any] | None:
        """The kept objects' states in host memory, on rank 0 (None elsewhere, and when there
        are none). Under fsdp an optimizer's is gathered whole, every rank taking part, as the
        run's own optimizer's is."""
        if not self.extras or (self.tracker is None and not self.state.collective):
            return None
        out = {}
        for name, obj in self.extras.items():
            if self.state.collective and isinstance(obj, torch.optim.Optimizer):
                out[name] = self.state.optimizer_state(obj).state_dict()
            else:
                out[name] = obj.state_dict()
        return to_host(out) if self.tracker is not None else None

    def finish(self) -> None:
        """Wait for the last save in flight."""
        self.saver.wait()
