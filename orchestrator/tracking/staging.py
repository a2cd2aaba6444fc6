"""Models set aside for W&B while a run goes. ``stage_checkpoint`` runs in the Ray Train
controller (the recorder), the others in the driver."""

from __future__ import annotations

from orchestrator import storage
from workers.contract.names import STAGED_FILES, STAGING_DIR


def stage_checkpoint(run_dir: str, checkpoint_name: str) -> str:
    source = storage.join(run_dir, checkpoint_name)
    target = storage.join(run_dir, STAGING_DIR, checkpoint_name)
    for name in STAGED_FILES:
        storage.link_or_copy(storage.join(source, name), storage.join(target, name))
    return target


def staged_path(run_dir: str, checkpoint_name: str | None) -> str | None:
    """Where ``stage_checkpoint`` put that checkpoint's model, if it is (still) there."""
    if not checkpoint_name:
        return None
    path = storage.join(run_dir, STAGING_DIR, checkpoint_name)
    return path if storage.exists(path) else None


def discard_staged(run_dir: str) -> None:
    """Drop models set aside for W&B that it never got (a run stopped before logging them)."""
    storage.delete_dir(storage.join(run_dir, STAGING_DIR))
