"""The checkpoints a run directory holds, read from storage: which are complete, which are
intact (their files match the sizes and sha256 recorded at writing), where a resume starts.

Light on purpose (no torch, no Ray): ``orchestrator best`` checks the best model with it.
"""

from __future__ import annotations

from typing import Any

from orchestrator import storage
from orchestrator.errors import UserError
from workers.checkpoint.integrity import damage, newest_intact
from workers.contract.names import CHECKPOINT_PREFIX, METADATA_FILE, MODEL_FILE, point
from workers.contract.records import (
    CheckpointMetadata,
    KeptCheckpoint,
    Mode,
    RankedCheckpoint,
    TopKEntry,
)
from workers.decisions.top_k import top_k_of


def kept_checkpoints(run_dir: str, unreadable: list[str] | None = None) -> list[KeptCheckpoint]:
    """Complete checkpoints in storage, oldest first: epoch, path, is_best and metadata.
    One whose metadata.json cannot be read is left out (and named in ``unreadable``)."""
    kept: list[KeptCheckpoint] = []
    for name in storage.list_dirs(run_dir):
        path = storage.join(run_dir, name)
        if not name.startswith(CHECKPOINT_PREFIX) or not (
            storage.exists(storage.join(path, METADATA_FILE))
            and storage.exists(storage.join(path, MODEL_FILE))
        ):
            continue  # not a checkpoint, or an upload that never finished
        try:
            metadata: CheckpointMetadata = storage.read_json(storage.join(path, METADATA_FILE))
            kept.append({"epoch": int(metadata["epoch"]), "path": path,
                         "is_best": bool(metadata["is_best"]), "metadata": metadata})
        except (ValueError, KeyError, TypeError):
            if unreadable is not None:
                unreadable.append(f"{path}/{METADATA_FILE} is damaged")
    return sorted(kept, key=lambda c: point(c["metadata"]))


def decided_value(metadata: CheckpointMetadata) -> float:
    """The monitored value the tracker decided on: smoothed, where the run smooths it."""
    record: dict[str, Any] = dict(metadata)  # the monitor's keys are the open part of the record
    return float(record.get(f"{metadata['monitor']}_smoothed", record[metadata["monitor"]]))


def top_k_checkpoints(kept: list[KeptCheckpoint], k: int, mode: Mode) -> list[RankedCheckpoint]:
    """``checkpoint.keep_top_k``: the kept models of the K best evaluations, best first, by
    the rule the tracker and Ray's retention follow (``decisions.top_k``): those saved as one
    of the K (their metadata has ``top_k_rank``), of which Ray keeps exactly the K."""
    saved = {point(c["metadata"]): c for c in kept if "top_k_rank" in c["metadata"]}
    entries: list[TopKEntry] = [
        {"value": decided_value(c["metadata"]), "epoch": at[0], "global_step": at[1]}
        for at, c in saved.items()]
    ranked: list[RankedCheckpoint] = []
    for rank, entry in enumerate(top_k_of(entries, k, mode), start=1):
        c = saved[(entry["epoch"], entry["global_step"] or 0)]
        ranked.append({"rank": rank, "path": c["path"], "epoch": c["epoch"],
                       "step": c["metadata"].get("step"),
                       "global_step": c["metadata"].get("global_step"),
                       "value": entry["value"], "is_best": c["is_best"]})
    return ranked


def verify_checkpoint(path: str) -> str | None:
    """What is damaged in the checkpoint at ``path`` (naming the file), or None."""
    try:
        metadata = storage.read_json(storage.join(path, METADATA_FILE))
    except (OSError, ValueError):
        return f"{METADATA_FILE} is missing or not JSON"
    return damage(metadata, lambda name: storage.read_bytes(storage.join(path, name)))


def resume_point(run_dir: str) -> tuple[str | None, list[str]]:
    """The checkpoint a resume continues from (the newest intact one; None when the run
    has none yet), and the damaged newer ones it skips. Only damaged ones: a user error."""
    unreadable: list[str] = []
    kept = [(point(c["metadata"]), c["path"]) for c in kept_checkpoints(run_dir, unreadable)]
    chosen, damaged = newest_intact(kept, verify_checkpoint)
    damaged = [*unreadable, *damaged]
    if (kept or unreadable) and chosen is None:
        raise UserError(f"--resume: no intact checkpoint in {run_dir} ({'; '.join(damaged)});"
                        " start afresh with --overwrite")
    return chosen, damaged
