"""Every epoch's record, kept in one place: a Ray Train callback in the controller process.

``after_report`` runs once per ``ray.train.report`` (after all ranks reported), with rank 0's
metrics and the persisted checkpoint, if any. It appends the epoch to ``history.json`` in the
run directory and prints one progress line. A restarted or resumed run re-trains epochs after
its checkpoint: their new records replace the old ones, so the history stays in epoch order.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ray.train import UserCallback

from orchestrator import storage

HISTORY_FILE = "history.json"
INTERNAL_KEYS = ("checkpoint_rank",)


def epoch_record(metrics: dict[str, Any], checkpoint_path: str | None) -> dict[str, Any]:
    record = {k: v for k, v in metrics.items() if k not in INTERNAL_KEYS}
    record["checkpoint"] = posixpath.basename(checkpoint_path) if checkpoint_path else None
    return record


def merge_history(history: list[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
    """Drop records at or after the new epoch (a re-trained stretch), then append."""
    return [r for r in history if r["epoch"] < record["epoch"]] + [record]


def progress_line(record: dict[str, Any], total_epochs: int, monitor: str) -> str:
    shown = [f"{k}={v:.4f}" for k, v in record.items()
             if k.startswith(("train_", "val_")) and isinstance(v, float)]
    mark = f"  * new best {monitor}" if record.get("is_best") else ""
    saved = "  (saved)" if record.get("checkpoint") else ""
    return f"epoch {record['epoch']}/{total_epochs}  " + "  ".join(shown) + mark + saved


class RunRecorder(UserCallback):
    """``events``: an optional ``ray.util.queue.Queue`` through which the driver receives each
    (record, persisted checkpoint path) as it happens, to log it to W&B from its own process."""

    def __init__(self, run_dir: str, total_epochs: int, monitor: str, events: Any = None) -> None:
        self.run_dir = run_dir
        self.total_epochs = total_epochs
        self.monitor = monitor
        self.events = events
        self._history: list[dict[str, Any]] | None = None

    @property
    def history_path(self) -> str:
        return storage.join(self.run_dir, HISTORY_FILE)

    def _load(self) -> list[dict[str, Any]]:
        if self._history is None:  # first report of this controller: continue a resumed run
            path = self.history_path
            self._history = storage.read_json(path)["history"] if storage.exists(path) else []
        return self._history

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        record = epoch_record(metrics[0], checkpoint.path if checkpoint else None)
        self._history = merge_history(self._load(), record)
        storage.write_json(self.history_path, {"history": self._history})
        if self.events is not None:
            path = storage.join(self.run_dir, record["checkpoint"]) if checkpoint else None
            self.events.put((record, path))
        print(progress_line(record, self.total_epochs, self.monitor), flush=True)
