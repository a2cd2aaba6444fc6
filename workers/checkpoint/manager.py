"""Checkpoints on the workers, owned in one place: the end of every evaluation, and the
preemption save, the same for every engine.

- when: rank 0's tracker and the checkpoint policy (``checkpoint.policy``) give one verdict,
  a ``SaveDecision``; its broadcast tells every rank whether to stop, to save, and whether
  the save holds the full state;
- what: the model's whole state read through ``checkpoint.state.ModelState`` (under fsdp
  every rank takes part in gathering it, and only then), the train state and the metadata
  each built by one function, for improvement, periodic, resume and preemption saves alike;
- writing: rank 0's snapshot in host memory goes to ``checkpoint.writer.AsyncSaver``, which
  writes it off the loop and reports it with ``ray.train.report``; the other ranks report
  the same metrics without a checkpoint;
- retention: Ray Train's, as ``checkpoint.policy`` says.

"Am I rank 0" is read once, when the manager is made (``rank_zero``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from workers.checkpoint.policy import (
    PREEMPTION,
    SaveDecision,
    decide_save,
    rank_score,
    top_k_score,
)
from workers.checkpoint.snapshot import Snapshot, snapshot, to_host
from workers.checkpoint.state import ModelState
from workers.checkpoint.writer import AsyncSaver
from workers.compat import train_fn_utils
from workers.contract.config import RunConfig
from workers.contract.names import CHECKPOINT_PREFIX, PREEMPT_KEY, RANK_KEY
from workers.contract.records import (
    CheckpointMetadata,
    LineageSegment,
    TrackerState,
    TrainState,
)
from workers.decisions.lineage import Lineage
from workers.decisions.tracker import (
    BestTracker,
    MonitorNotReportedError,
    require_monitor,
    tracker_of,
)
from workers.decisions.weights import chosen
from workers.evaluation.collectives import all_reduce_sum, broadcast_flags
from workers.evaluation.metrics import MeanLoss

NOT_SAVED = SaveDecision(False, "")  # what ranks other than 0 know before the broadcast


@dataclass(frozen=True)
class Position:
    """Where an evaluation falls: optimizer steps within the epoch and in all, the positions
    of the epoch's permutation trained (None at the epoch's end), the evaluation's number."""

    step: int
    global_step: int
    consumed: int | None
    evaluation: int


@dataclass
class CheckpointManager:
    cfg: RunConfig
    rank_zero: bool  # rank 0 decides, snapshots and writes; the others follow its broadcast
    tracker: BestTracker | None  # rank 0's (None on the other ranks)
    saver: AsyncSaver
    state: ModelState  # how a save reads the whole model and optimizer
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
    mode_source: str = "set by tracker.mode"  # why the tracker's mode (contract.direction)
    # train.ema_decay: how a save reads the EMA's weights, saved when they won the evaluation
    # (``report(weights="ema")``); None: the run keeps no EMA.
    ema_state: ModelState | None = None
    # tracker.also_monitor: rank 0's tracker of each (empty elsewhere, and without them).
    also: list[BestTracker] = field(default_factory=list)
    # The run's provenance (the driver's, ``loop.provenance``): in every metadata.json.
    provenance: dict[str, Any] | None = None

    @property
    def _tracker(self) -> BestTracker:
        """Rank 0's tracker: only rank 0 decides and builds a checkpoint."""
        assert self.tracker is not None, "the tracker is rank 0's"
        return self.tracker

    @classmethod
    def create(cls, cfg: RunConfig, state: ModelState, *, rank_zero: bool,
               device: torch.device, world_size: int,
               tracker_state: dict[str, Any] | None = None,
               torch_weights_file: str | None = None, extras: dict[str, Any] | None = None,
               test_split: bool = True, lineage: Lineage | None = None,
               mode_source: str = "set by tracker.mode",
               ema_state: ModelState | None = None,
               provenance: dict[str, Any] | None = None) -> CheckpointManager:
        """This rank's manager; ``tracker_state``: the restored tracker's (rank 0 loads it).
        A runtime's ``Worker.checkpoint_manager`` fills these in from the worker."""
        tracker = None
        if rank_zero:
            tracker = tracker_of(cfg)
            if tracker_state is not None:
                tracker.load_state_dict(tracker_state)
        saver = AsyncSaver()
        if rank_zero and not state.collective and (
                cfg.checkpoint.policy != "none" or cfg.checkpoint.resume_every_n_epochs):
            # The snapshot's memory, allocated now rather than during the first save (a
            # sharded model's whole state exists only once gathered: its first save does it).
            saver.buffers.prepare(state.weights())
        return cls(cfg, rank_zero, tracker, saver, state, device, world_size,
                   torch_weights_file, extras if extras is not None else {},
                   test_split=test_split, lineage=lineage, mode_source=mode_source,
                   ema_state=ema_state,
                   also=also_trackers(cfg, tracker_state) if rank_zero else [],
                   provenance=provenance)

    def report(self, epoch: int, values: dict[str, float], started: float, *,
               at: Position | None = None, final: bool | None = None,
               weights: str | None = None) -> bool:
        """Report one evaluation's global metrics (an epoch's, or ``at`` a step); returns
        whether to stop (the same on all ranks). ``final``: the run's last evaluation
        (default: the epoch is train.epochs). ``weights``: with train.ema_decay, which
        weights ``values`` are (``raw`` or ``ema``, the same on every rank): in the record,
        and the ones a save of this evaluation writes."""
        record = self._record(epoch, values, at)
        metrics = dict(record, workers=self.world_size)  # an elastic run's may change
        require_monitor(self.cfg.tracker.monitor, values)  # the same on all ranks: all raise
        require_also_monitors(self.cfg, values)
        # Identical values on every rank, so every rank decides the same. With an EMA, only
        # what training and the decision use: a NaN of the EMA still warming up (its
        # ``_ema`` scoring, which lost) is no divergence while the raw weights train on.
        checked = chosen(values) if weights is not None else values
        diverged = self.cfg.train.stop_on_nonfinite and not all(
            math.isfinite(v) for v in checked.values())
        verdict, stop = NOT_SAVED, diverged
        if self.rank_zero:
            verdict, stop = self._decide(epoch, record, metrics, diverged, at, final)
        if weights is not None:  # after the tracker's update, which takes numbers only
            record["weights"] = metrics["weights"] = weights
        stop, save, full_state = broadcast_flags(
            [stop, verdict.save, verdict.full_state], self.device)
        snap = None
        if save and (self.rank_zero or self.state.collective):
            snap, costs = self._snapshot(replace(verdict, save=save, full_state=full_state),
                                         epoch, record, at)
            metrics.update(costs)
        metrics["epoch_seconds"] = time.perf_counter() - started
        if snap is not None:
            self.saver.report(metrics, snap, self._directory(epoch, at, preempted=False))
        else:
            train_fn_utils().report(metrics)
        return stop

    def preempt(self, epoch: int, at: Position, running_loss: MeanLoss) -> None:
        """A resume checkpoint of this step, because the driver asked the run to stop: the
        model, the optimizer and the kept state, where the data stream stands, and the
        training loss since the last evaluation (summed over the ranks: rank 0 carries it).
        Not an evaluation: no record in the history, never an improvement. Every rank calls
        it (a sharded model is gathered by all of them)."""
        total, count = all_reduce_sum(running_loss.state(), self.device).tolist()
        metrics: dict[str, Any] = {"epoch": epoch, "step": at.step,
                                   "global_step": at.global_step, PREEMPT_KEY: 1,
                                   "workers": self.world_size}
        snap = None
        if self.rank_zero or self.state.collective:
            snap, _ = self._snapshot(PREEMPTION, epoch, self._record(epoch, {}, at), at,
                                     running_loss=[total, count])
        if snap is None:
            train_fn_utils().report(metrics)
            return
        metrics[RANK_KEY] = self._ray_score(PREEMPTION, math.nan)
        self.saver.report(metrics, snap, self._directory(epoch, at, preempted=True))

    def finish(self) -> None:
        """Wait for the last save in flight."""
        self.saver.wait()

    # -- when ------------------------------------------------------------------------------
    def _decide(self, epoch: int, record: dict[str, Any], metrics: dict[str, Any],
                diverged: bool, at: Position | None,
                final: bool | None) -> tuple[SaveDecision, bool]:
        """Rank 0: the tracker's verdict, and whether the policy saves this evaluation."""
        cfg, tracker = self.cfg, self._tracker
        decision = tracker.update(epoch, record)
        stop = decision.should_stop or diverged
        if tracker.smoother is not None:  # the record keeps both values
            record[f"{tracker.monitor}_smoothed"] = decision.value
            metrics[f"{tracker.monitor}_smoothed"] = decision.value
        if decision.stop_reason:  # one line: the driver says it and the summary keeps it
            metrics["stop_reason"] = decision.stop_reason
        verdict = decide_save(
            cfg.checkpoint.policy, at.evaluation if at else epoch, improved=decision.improved,
            is_final=stop or (final if final is not None else epoch == cfg.train.epochs),
            every_n_epochs=cfg.checkpoint.every_n_epochs,
            resume_every_n_epochs=cfg.checkpoint.resume_every_n_epochs,
            top_k_rank=decision.top_k_rank,
            also_best=tuple(t.monitor for t in self.also if t.update(epoch, record).improved),
        )
        metrics["is_best"] = verdict.improved
        metrics[RANK_KEY] = self._ray_score(verdict, decision.value)
        return verdict, stop

    def _ray_score(self, verdict: SaveDecision, value: float) -> float:
        """What Ray keeps checkpoints by (``checkpoint.policy``): the tracker's count of
        improvements, or with keep_top_k > 1 the value of one that entered the K best."""
        if self.cfg.checkpoint.keep_top_k > 1:
            return top_k_score(value, self._tracker.mode, verdict.top_k_rank is not None)
        return rank_score(self._tracker.improvements, verdict.improved)

    def _tracker_state(self) -> TrackerState:
        """The tracker's state, with the also-monitors' (``also_monitor``) where there are."""
        state = self._tracker.state_dict()
        if self.also:
            state["also_monitor"] = [t.state_dict() for t in self.also]
        return state

    # -- what ------------------------------------------------------------------------------
    def _snapshot(self, verdict: SaveDecision, epoch: int, record: dict[str, Any],
                  at: Position | None,
                  running_loss: list[float] | None = None) -> tuple[Snapshot | None,
                                                                     dict[str, float]]:
        """The checkpoint in host memory, on rank 0 (None elsewhere), and what taking it cost
        the loop: the gather (fsdp), the host copy, and waiting for the previous save's write
        if it had not finished (the write itself runs off the loop). Called on rank 0, and
        under fsdp on every rank: all take part in gathering the state, rank 0 alone keeps it.
        """
        costs: dict[str, float] = {}
        save_started = time.perf_counter()
        if self.rank_zero:
            self.saver.wait()  # the previous save must finish before its memory is reused
        gather_started = time.perf_counter()
        saved_ema = record.get("weights") == "ema"
        weights = self._weights_state(saved_ema).weights()
        optimizer = self.state.optimizer_state() if verdict.full_state else None
        extras = self._extras_state() if verdict.full_state else None
        raw_weights = self._raw_weights(verdict.full_state and saved_ema)
        if self.state.collective:
            costs["gather_seconds"] = time.perf_counter() - gather_started
        if not self.rank_zero:
            return None, costs
        copy_started = time.perf_counter()
        snap = snapshot(
            weights, optimizer,
            self._with_raw_weights(self._train_state(epoch, at, extras, running_loss),
                                   raw_weights),
            self._metadata(epoch, record, verdict),
            torch_weights_file=self.torch_weights_file if verdict.keeps_a_model else None,
            buffers=self.saver.buffers,
        )
        costs["snapshot_seconds"] = time.perf_counter() - copy_started
        costs["save_blocked_seconds"] = time.perf_counter() - save_started
        return snap, costs

    def _weights_state(self, saved_ema: bool) -> ModelState:
        """The reader of the weights a save writes: the EMA's when they won, else the raw."""
        if saved_ema:
            assert self.ema_state is not None, "weights: ema without train.ema_decay"
            return self.ema_state
        return self.state

    def _raw_weights(self, needed: bool) -> dict[str, Any] | None:
        """A resume checkpoint whose model file holds the EMA also keeps the raw weights,
        which training continues from (``loop.runtime.restore_from``): in host memory on rank
        0 (under fsdp gathered, every rank taking part); None otherwise."""
        if not needed:
            return None
        raw = self.state.weights()
        return to_host(raw) if self.rank_zero else None

    @staticmethod
    def _with_raw_weights(train_state: TrainState,
                          raw_weights: dict[str, Any] | None) -> TrainState:
        if raw_weights is not None:
            train_state["raw_weights"] = raw_weights
        return train_state

    @staticmethod
    def _record(epoch: int, values: dict[str, float], at: Position | None) -> dict[str, Any]:
        """An evaluation's record: its epoch, its values, and ``at`` a step, where it falls."""
        record: dict[str, Any] = {"epoch": epoch, **values}
        if at is not None:
            record.update(step=at.step, global_step=at.global_step)
        return record

    def _train_state(self, epoch: int, at: Position | None, extras: dict[str, Any] | None,
                     running_loss: list[float] | None) -> TrainState:
        """``train_state.pt`` (less the optimizer's, which ``snapshot`` adds): where a resume
        continues, and the tracker that goes on deciding there."""
        train_state: TrainState = {
            "epoch": epoch, "tracker": self._tracker_state(),
            "seed": self.cfg.seed}
        if at is not None:  # consumed: None at the epoch's end (the next one starts afresh)
            train_state["step"] = at.step
            train_state["global_step"] = at.global_step
            train_state["consumed"] = at.consumed
        if running_loss is not None:  # a preempted stretch's [total, count] since evaluating
            train_state["running_loss"] = running_loss
        if extras is not None:
            train_state["extras"] = extras
        if self.lineage:
            train_state["lineage"] = [cast(LineageSegment, dict(a))
                                      for a in self.lineage.ancestors]
        return train_state

    def _metadata(self, epoch: int, record: dict[str, Any],
                  verdict: SaveDecision) -> CheckpointMetadata:
        """``metadata.json``: the evaluation's record, and what the driver, ``best`` and a
        resume read about the model (why it was saved, how the run was set up)."""
        tracker = self._tracker
        # The record's split metrics are the open part a TypedDict cannot name (records.py).
        metadata = cast(CheckpointMetadata, {
            **record, "monitor": tracker.monitor, "mode": tracker.mode,
            "mode_source": self.mode_source, "is_best": verdict.improved,
            "saved_because": verdict.reason,
            "world_size": self.world_size, "workers": self.world_size,  # as in the record
            "seed": self.cfg.seed, "config": self.cfg.to_dict()})
        if verdict.top_k_rank is not None:  # keep_top_k > 1: its rank among the K, when saved
            metadata["top_k_rank"] = verdict.top_k_rank
        if self.also:  # tracker.also_monitor: the monitors whose best it is
            metadata["best_for"] = best_for(tracker.monitor, verdict)
        if verdict != PREEMPTION:  # only the best model's note is read: never a preemption's
            metadata["test_split"] = self.test_split
        if self.lineage:
            metadata["lineage"] = cast(list[LineageSegment], self.lineage.through(epoch))
        if self.provenance is not None:
            metadata["provenance"] = self.provenance
        return metadata

    def _extras_state(self) -> dict[str, Any] | None:
        """The kept objects' states in host memory, on rank 0 (None elsewhere, and when there
        are none). Under fsdp an optimizer's is gathered whole, every rank taking part, as the
        run's own optimizer's is."""
        if not self.extras or not (self.rank_zero or self.state.collective):
            return None
        out = {name: self.state.optimizer_state(obj) if isinstance(obj, torch.optim.Optimizer)
               else obj.state_dict() for name, obj in self.extras.items()}
        return to_host(out) if self.rank_zero else None

    # -- writing ---------------------------------------------------------------------------
    def _directory(self, epoch: int, at: Position | None, *, preempted: bool) -> str:
        """The checkpoint's directory name (unique: the time is in it): by step where the run
        evaluates by steps, and for a preemption."""
        if at is not None and (preempted or self.cfg.train.eval_every_n_steps):
            where = f"step{at.global_step:08d}" + ("_preempt" if preempted else "")
        else:
            where = f"epoch{epoch:04d}"
        return f"{CHECKPOINT_PREFIX}{where}_{time.time_ns()}"


# -- tracker.also_monitor ----------------------------------------------------------------------
def also_trackers(cfg: RunConfig, tracker_state: dict[str, Any] | None) -> list[BestTracker]:
    """A tracker per ``tracker.also_monitor`` (its best only: no patience, no thresholds),
    each restored from the saved state of the same monitor and mode (a state saved without
    them, or one that watched something else, starts afresh)."""
    saved = {(s["monitor"], s["mode"]): s
             for s in (tracker_state or {}).get("also_monitor") or []}
    trackers = []
    for also in cfg.tracker.also_monitor:
        tracker = BestTracker(also.monitor, also.mode)
        if (state := saved.get((tracker.monitor, tracker.mode))) is not None:
            tracker.load_state_dict(state)
        trackers.append(tracker)
    return trackers


def require_also_monitors(cfg: RunConfig, reported: dict[str, Any]) -> None:
    """Refuse an also-monitor the run does not report (the same on all ranks: all raise)."""
    for also in cfg.tracker.also_monitor:
        if also.monitor not in reported:
            raise MonitorNotReportedError(
                f"tracker.also_monitor: {also.monitor!r} is not reported by this run; "
                f"it reports: {', '.join(sorted(reported))}")


def best_for(monitor: str, verdict: SaveDecision) -> list[str]:
    """The monitors a saved model is the best of: the primary's when it improved, then the
    also-monitors' it improved (``best_for`` in its metadata)."""
    return [*([monitor] if verdict.improved else []), *verdict.also_best]
