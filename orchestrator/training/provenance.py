"""A run's provenance on the driver (``workers.loop.provenance`` computes it): what a
``--resume`` finds changed since the run started, said in one line and kept in
``summary.json`` (``provenance_changes``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator import storage
from workers.contract.names import SUMMARY_FILE
from workers.loop.provenance import change_line, changes


def earlier_provenance(run_dir: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The run's provenance as last recorded (its summary, else its newest checkpoint's
    metadata) and the changes recorded so far."""
    from orchestrator.results.checkpoints import kept_checkpoints

    path = storage.join(run_dir, SUMMARY_FILE)
    try:
        summary = storage.read_json(path) if storage.exists(path) else {}
    except (OSError, ValueError):
        summary = {}
    recorded = list(summary.get("provenance_changes") or [])
    if summary.get("provenance"):
        return summary["provenance"], recorded
    for kept in reversed(kept_checkpoints(run_dir)):
        if kept["metadata"].get("provenance"):
            return dict(kept["metadata"]["provenance"]), recorded
    return None, recorded


def resume_changes(run_dir: str, now: dict[str, Any] | None, epoch: int,
                   say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The changes to record for a resumed run: those recorded before, and what differs now
    (said in one line; ``epoch``: the last one trained before this resume)."""
    before, recorded = earlier_provenance(run_dir)
    found = changes(before, now)
    if found:
        say(change_line(found))
    return recorded + [{"epoch": epoch, **c} for c in found]
