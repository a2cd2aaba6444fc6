"""The checkpoints a run directory holds, read from storage: which are complete, which are
intact (their files match the sizes and sha256 recorded at writing), where a resume starts.

Light on purpose (no torch, no Ray): ``orchestrator best`` checks the best model with it.
"""

from __future__ import annotations

from orchestrator import storage
from orchestrator.errors import UserError
from workers.checkpoint.integrity import damage, newest_intact
from workers.contract.names import CHECKPOINT_PREFIX, METADATA_FILE, MODEL_FILE, point
from workers.contract.records import CheckpointMetadata, KeptCheckpoint


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
