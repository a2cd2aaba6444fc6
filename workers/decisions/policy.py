"""Checkpoint policy: which epochs persist a model. Pure functions, unit-tested directly.

Epochs are numbered from 1, as users count them and as they appear in metrics.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveDecision:
    save: bool
    reason: str  # "best", "every_n", "all", "last", "resume" or "" when nothing is saved
    # A resume epoch: the checkpoint also holds the optimizer state. Other saves hold what
    # the model needs (weights, metadata, epoch and tracker state), so that an improvement
    # blocks training only for the copy of the weights.
    full_state: bool = False


def decide_save(
    policy: str,
    epoch: int,
    *,
    improved: bool,
    is_final: bool,
    every_n_epochs: int = 1,
    resume_every_n_epochs: int = 0,
) -> SaveDecision:
    """``is_final``: the last epoch that will run (the configured end, or an early stop)."""
    wanted = {
        "best": improved,
        "every_n": epoch % every_n_epochs == 0,
        "all": True,
        "last": is_final,
        "none": False,
    }
    if policy not in wanted:
        raise ValueError(f"unknown checkpoint policy {policy!r}")
    resume = bool(resume_every_n_epochs) and epoch % resume_every_n_epochs == 0
    if wanted[policy]:
        return SaveDecision(True, policy, full_state=resume)
    if resume:
        return SaveDecision(True, "resume", full_state=True)
    return SaveDecision(False, "")


def ray_keep_settings(policy: str, monitor_rank_key: str) -> dict:
    """Arguments for Ray's ``CheckpointConfig``.

    With ``best``, Ray keeps one checkpoint by score plus the latest. The score is not the
    monitored metric itself but the tracker's own ranking (``monitor_rank_key``), which grows
    with every improvement: a resume checkpoint whose monitored value is better by less than
    ``min_delta`` (not an improvement to the tracker) must never evict the real best.
    """
    if policy == "best":
        return {
            "num_to_keep": 1,
            "checkpoint_score_attribute": monitor_rank_key,
            "checkpoint_score_order": "max",
        }
    if policy in ("last", "none"):
        return {"num_to_keep": 1}
    return {"num_to_keep": None}
