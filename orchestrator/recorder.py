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
# Models waiting to be logged to W&B: Ray may delete a checkpoint (num_to_keep) before the
# driver gets to it, so the callback sets a copy aside (a hard link where storage is local).
STAGING_DIR = "wandb_staging"
STAGED_FILES = ("model.safetensors", "metadata.json")


def stage_checkpoint(run_dir: str, checkpoint_name: str) -> str:
    source = storage.join(run_dir, checkpoint_name)
    target = storage.join(run_dir, STAGING_DIR, checkpoint_name)
    for name in STAGED_FILES:
        storage.link_or_copy(storage.join(source, name), storage.join(target, name))
    return target
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

    def __init__(self, run_dir: str, total_epochs: int, monitor: str, events: Any = None,
                 label: str | None = None, log_model: str | None = None) -> None:
        self.run_dir = run_dir
        self.label = label
        self.log_model = log_model  # the wandb.log_model choice; None: W&B is off
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

    def _stage(self, checkpoint_name: str) -> str | None:
        from orchestrator.wandb_run import should_log_model

        if self.log_model is None:
            return None
        path = storage.join(self.run_dir, checkpoint_name, "metadata.json")
        metadata = storage.read_json(path)
        if not should_log_model(self.log_model, metadata["saved_because"], metadata["is_best"]):
            return None
        return stage_checkpoint(self.run_dir, checkpoint_name)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        record = epoch_record(metrics[0], checkpoint.path if checkpoint else None)
        self._history = merge_history(self._load(), record)
        storage.write_json(self.history_path, {"history": self._history})
        staged = self._stage(record["checkpoint"]) if checkpoint else None
        if self.events is not None:
            self.events.put((record, staged))
        line = progress_line(record, self.total_epochs, self.monitor)
        print(f"[{self.label}] {line}" if self.label else line, flush=True)
