"""A run directory's files made by hand, in the shapes the project writes them: checkpoint
directories through the project's own snapshot and writer (real safetensors, train state and
a metadata.json shaped as ``workers.checkpoint.manager`` shapes it), history.json as the recorder
writes it, and Ray Train's checkpoint manager snapshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from workers.checkpoint.snapshot import snapshot
from workers.checkpoint.writer import write_checkpoint
from workers.compat import TRAIN_SNAPSHOT_FILE as RAY_SNAPSHOT_FILE
from workers.contract.names import CHECKPOINT_PREFIX, HISTORY_FILE


def epoch_metrics(epoch: int, val_loss: float) -> dict[str, Any]:
    """An epoch's record as rank 0 reports it (without the timings)."""
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": val_loss,
            "val_accuracy": 0.5 + epoch / 100, "workers": 2}


def write_checkpoint_dir(run_dir: Path, epoch: int, val_loss: float, *, is_best: bool,
                         saved_because: str = "best", config: dict[str, Any] | None = None,
                         **extra: Any) -> Path:
    """``checkpoint_epochNNNN_<ns>`` with model.safetensors, train_state.pt, metadata.json."""
    torch.manual_seed(epoch)
    model = torch.nn.Linear(4, 2)
    record = epoch_metrics(epoch, val_loss)
    metadata = {**record, "monitor": "val_loss", "mode": "min", "is_best": is_best,
                "saved_because": saved_because, "world_size": 2, "seed": 0,
                "config": config or {}, **extra}
    tracker = {"best_epoch": epoch if is_best else None}
    snap = snapshot(model.state_dict(), None, {"epoch": epoch, "tracker": tracker, "seed": 0},
                    metadata)
    path = run_dir / f"{CHECKPOINT_PREFIX}epoch{epoch:04d}_{1_700_000_000_000_000_000 + epoch}"
    write_checkpoint(snap, pafs.LocalFileSystem(), str(path))
    return path


def history_record(epoch: int, val_loss: float, is_best: bool,
                   checkpoint: Path | None = None) -> dict[str, Any]:
    """A history.json record, as ``results.epochs.epoch_record`` makes it."""
    return {**epoch_metrics(epoch, val_loss), "is_best": is_best, "epoch_seconds": 0.1,
            "checkpoint": checkpoint.name if checkpoint else None}


def write_history(run_dir: Path, records: list[dict[str, Any]]) -> None:
    (run_dir / HISTORY_FILE).write_text(json.dumps({"history": records}))


def read_history_file(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / HISTORY_FILE).read_text())["history"]


def write_ray_snapshot(run_dir: Path, registered: list[Path], latest: Path | None) -> None:
    """Ray Train's ``checkpoint_manager_snapshot.json``: the checkpoints it tracks."""
    def result(path: Path) -> dict[str, Any]:
        return {"version": 0, "checkpoint_dir_name": path.name, "metrics": {}}

    (run_dir / RAY_SNAPSHOT_FILE).write_text(json.dumps({
        "ray_version": "2.60.0",
        "checkpoint_results": [result(p) for p in registered],
        "checkpoint_report_indices": list(range(len(registered))),
        "latest_checkpoint_result": result(latest) if latest else None,
        "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": len(registered),
        "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }))
