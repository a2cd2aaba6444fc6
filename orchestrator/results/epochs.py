"""An epoch's record, shaped once: what history.json, W&B and the terminal all receive.

Pure functions, no I/O: the controller (``recorder``) and a Tune trial's results (``tune``)
both pass through ``epoch_record``, so a trial's W&B run and a plain run's carry the same keys.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping
from typing import Any, cast

from workers.contract.names import INTERNAL_KEYS, point
from workers.contract.records import EpochRecord
from workers.decisions.weights import alternates

# Keys of a report that are the epoch's record besides the split metrics (train_*, val_*).
RECORD_KEYS = ("epoch", "step", "global_step", "lr", "is_best", "epoch_seconds",
               "gather_seconds", "snapshot_seconds", "save_blocked_seconds", "workers",
               "stop_reason", "weights")


def epoch_record(metrics: Mapping[str, Any], checkpoint_path: str | None) -> EpochRecord:
    """Rank 0's reported metrics without Ray's or the project's internal keys, plus the name
    of the checkpoint directory persisted with them (None: no model saved this epoch).
    ``metrics``: a report, or a checkpoint's metadata (``summary.repair_history``)."""
    # The split metrics are the record's open part (workers.contract.records): built as a
    # plain dict, then typed.
    record = cast(EpochRecord, {
        k: v for k, v in metrics.items()
        if k not in INTERNAL_KEYS and (k in RECORD_KEYS or k.startswith(("train_", "val_")))})
    record["checkpoint"] = (posixpath.basename(checkpoint_path.rstrip("/").split("?")[0])
                            if checkpoint_path else None)
    return record


def merge_into(history: list[EpochRecord], record: EpochRecord) -> None:
    """In place: drop the records at or after the new one's point (a re-trained stretch),
    then append it. A history is always in order, so only its end is looked at: replaying
    10,000 records costs 10,000 steps, not 10,000 squared."""
    at = point(record)
    while history and point(history[-1]) >= at:
        history.pop()
    history.append(record)


def merge_history(history: list[EpochRecord], record: EpochRecord) -> list[EpochRecord]:
    """``merge_into`` on a copy."""
    merged = list(history)
    merge_into(merged, record)
    return merged


def split_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The epoch's losses and metrics (``train_*``, ``val_*``); with ``train.ema_decay``, the
    chosen weights' only (the usual names): their ``_raw`` and ``_ema`` scorings are the
    history's and W&B's (``decisions.weights.alternates``)."""
    skip = alternates(record) if record.get("weights") in ("raw", "ema") else set()
    return {k: v for k, v in record.items() if k.startswith(("train_", "val_"))
            and isinstance(v, float) and k not in skip}


def nonfinite(record: Mapping[str, Any]) -> list[str]:
    """The epoch's losses and metrics that are NaN or infinite: what ``train.stop_on_nonfinite``
    stops on (the workers' ``CheckpointManager.report`` checks the same values)."""
    return [k for k, v in split_metrics(record).items() if not math.isfinite(v)]


def progress_line(record: EpochRecord, total_epochs: int, monitor: str,
                  by_steps: bool = False) -> str:
    """One line per evaluation: where, its losses and metrics, which weights won (with an
    EMA: ``[raw]`` or ``[ema]``), an improvement of the monitor, a save."""
    shown = [f"{k}={v:.4f}" for k, v in split_metrics(record).items()]
    if record.get("weights") in ("raw", "ema"):
        shown.append(f"[{record['weights']}]")
    mark = f"  * new best {monitor}" if record.get("is_best") else ""
    saved = "  (saved)" if record.get("checkpoint") else ""
    at = f"epoch {record['epoch']}/{total_epochs}"
    if by_steps and record.get("step") is not None:
        at += f"  step {record['step']} (global {record['global_step']})"
    return f"{at}  " + "  ".join(shown) + mark + saved
