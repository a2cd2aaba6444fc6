"""Every epoch's record, kept in one place: a Ray Train callback in the controller process.

``after_report`` runs once per ``ray.train.report`` (after all ranks reported), with rank 0's
metrics and the persisted checkpoint, if any. It appends the record to the run's history
(``results/history.HistoryLog``: a segment of at most 64 records, so each write is small),
sets aside a model that W&B is to log (``wandb_staging``), and sends both to the driver, which
prints the epoch and logs it (``training.events``: the typed news the driver receives). A
restarted or resumed run re-trains epochs after its checkpoint: their new records replace the
old ones when the history is read.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from orchestrator import storage
from orchestrator.errors import one_line, user_error_among
from orchestrator.results.epochs import epoch_record
from orchestrator.results.history import HistoryLog
from orchestrator.tracking.rules import should_log_model
from orchestrator.tracking.staging import stage_checkpoint
from orchestrator.training.events import (
    ControllerStarted,
    EpochEvent,
    Preempted,
    UserErrorEvent,
    WorkerFailed,
)
from workers.compat import train_controller_handle
from workers.contract.names import METADATA_FILE, PREEMPT_KEY


class RunRecorder(UserCallback):
    """``events``: an optional queue of the run channel (``workers.loop.channel``) through
    which the driver receives each record (an ``EpochEvent``, with the staged model's path)
    and the run's other news (``training.events``) as they happen.
    ``log_model``: the ``wandb.log_model`` choice (``none`` when W&B is off: nothing is
    staged)."""

    def __init__(self, run_dir: str, log_model: str, events: Any = None) -> None:
        self.run_dir = run_dir
        self.log_model = log_model
        self.events = events
        self._history = HistoryLog(run_dir)
        self._introduced = False

    def _stage(self, checkpoint_name: str) -> str | None:
        if self.log_model == "none":
            return None
        metadata = storage.read_json(storage.join(self.run_dir, checkpoint_name, METADATA_FILE))
        if not should_log_model(self.log_model, metadata["saved_because"], metadata["is_best"]):
            return None
        return stage_checkpoint(self.run_dir, checkpoint_name)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics[0].get(PREEMPT_KEY):  # a resume checkpoint a signal asked for: no record
            if self.events is not None:
                self.events.put(Preempted(checkpoint.path if checkpoint else None))
            return
        record = epoch_record(metrics[0], checkpoint.path if checkpoint else None)
        self._history.append(record)
        name = record["checkpoint"]  # the checkpoint's directory, None without one
        staged = self._stage(name) if name else None
        if self.events is None:
            return
        self._introduce()
        self.events.put(EpochEvent(record, staged))

    def _introduce(self) -> None:
        if not self._introduced:  # once: the driver may have to stop this controller
            self.events.put(ControllerStarted(train_controller_handle()))
            self._introduced = True

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]):
        """A user's mistake is never retried (``failure.max_failures`` is for faults): the
        driver is told at once and stops the run."""
        if self.events is None:
            return
        message = user_error_among(worker_exceptions.values())
        self._introduce()
        if message:
            self.events.put(UserErrorEvent(message))
        elif worker_exceptions:  # a fault: the driver says so, then that Ray restarted
            rank, exc = min(worker_exceptions.items())
            self.events.put(WorkerFailed(f"worker {rank}: {one_line(exc)[:200]}"))
