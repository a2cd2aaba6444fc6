"""Checkpoint policy: which evaluations persist a model, and which checkpoints Ray Train keeps.
Pure functions, unit-tested directly.

Epochs are numbered from 1, as users count them and as they appear in metrics.

What Ray Train keeps or drops (this is the one place that says it). Rank 0 hands every
checkpoint it saves to ``ray.train.report``; Ray Train registers it and deletes the ones its
``CheckpointConfig`` does not keep, which the driver builds from ``ray_keep_settings``:

- ``best``: one checkpoint by score, plus the latest (Ray never drops the latest one, so a
  restart continues from the newest state). The score is not the monitored metric but
  ``rank_score``, reported under ``RANK_KEY``: the tracker's count of improvements, half a
  point lower for a checkpoint that is not an improvement (a resume or preemption save). So
  each improvement outranks every checkpoint before it, and a resume checkpoint whose
  monitored value is better by less than ``min_delta`` (not an improvement to the tracker)
  never evicts the real best. The driver keeps ``RANK_KEY`` out of the history.
- ``best`` with ``keep_top_k: K`` > 1: K checkpoints by score, plus the latest. The score
  (``top_k_score``) is the monitored value the tracker decided on, signed so that bigger is
  better; a checkpoint that did not enter the K best (a resume or preemption save) scores
  ``BELOW_TOP_K``, under every value. Rank 0 saves exactly the evaluations that enter the K
  (``decisions.top_k``), each strictly better than the K-th before it, so when one is
  registered the checkpoint Ray drops is the one that left the K (on equal scores Ray drops
  the earlier one, as ``TopK`` does); what remains is the K, and at most one resume
  checkpoint, the latest. Until K evaluations have entered, Ray may also hold resume
  checkpoints in the free places.
- ``best`` with ``tracker.also_monitor``: every checkpoint (``num_to_keep`` None), as Ray's
  single score cannot express it: each monitor's current best may be any of the saved ones,
  and which one it is changes with every monitor's improvement, while Ray scores a checkpoint
  once, when it is registered. Rank 0 saves an evaluation when it enters the primary's K best
  or improves any also-monitor's best (one checkpoint when several choose it; its metadata's
  ``best_for`` names them). The project cleans up itself at the run's end (and at each end of
  a resumed part): the driver's summary deletes every checkpoint that is neither a monitor's
  current best (the primary's K included) nor the latest
  (``orchestrator/results/summary.remove_superseded_bests``), so a run keeps the distinct
  bests and the latest, as ``best`` does for one monitor. Until then the superseded ones
  take disk space.
- ``last`` and ``none``: the latest only (``none`` saves resume and preemption checkpoints
  alone).
- ``every_n`` and ``all``: every checkpoint.

A checkpoint whose upload completed while its worker group was failing is never registered, so
Ray would never delete it: the driver's summary removes such directories at the run's end
(``orchestrator/results/summary.remove_unregistered_checkpoints``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class SaveDecision:
    """The verdict on one evaluation (or a preemption): save a checkpoint or not, why, and
    what it holds. Rank 0 makes it from the tracker's ``Decision``; every rank learns
    ``save`` and ``full_state`` from its broadcast."""

    save: bool
    reason: str  # "best", "every_n", "all", "last", "resume", "preempt"; "" when not saved
    # A resume epoch: the checkpoint also holds the optimizer state. Other saves hold what
    # the model needs (weights, metadata, epoch and tracker state), so that an improvement
    # blocks training only for the copy of the weights.
    full_state: bool = False
    improved: bool = False  # the tracker's verdict: ``is_best`` in the metrics and metadata
    # keep_top_k > 1: its rank among the K best when it entered them (``top_k_rank`` in its
    # metadata); None: it did not enter, or K is 1.
    top_k_rank: int | None = None
    # tracker.also_monitor: the also-monitors whose best this evaluation is (saved for them
    # too under policy best); empty otherwise.
    also_best: tuple[str, ...] = ()

    @property
    def keeps_a_model(self) -> bool:
        """A model policy best keeps for a user to load (the best, one of the K best, an
        also-monitor's best), whatever policy saved it."""
        return is_a_kept_model(self.improved, self.top_k_rank, self.also_best)


def is_a_kept_model(improved: bool, top_k_rank: int | None, also_best: tuple[str, ...]) -> bool:
    """What policy best saves: an improvement, an entry into the K best, an also-monitor's
    best."""
    return improved or top_k_rank is not None or bool(also_best)


# A resume checkpoint of the step the driver stopped the run at: never an improvement.
PREEMPTION = SaveDecision(True, "preempt", full_state=True)


def decide_save(
    policy: str,
    epoch: int,
    *,
    improved: bool,
    is_final: bool,
    every_n_epochs: int = 1,
    resume_every_n_epochs: int = 0,
    top_k_rank: int | None = None,
    also_best: tuple[str, ...] = (),
) -> SaveDecision:
    """``is_final``: the last epoch that will run (the configured end, or an early stop);
    ``top_k_rank``: the evaluation's rank when it enters the K best (keep_top_k > 1), which
    policy best saves; ``also_best``: the also-monitors (``tracker.also_monitor``) it
    improved, which policy best saves too."""
    wanted = {
        "best": is_a_kept_model(improved, top_k_rank, also_best),
        "every_n": epoch % every_n_epochs == 0,
        "all": True,
        "last": is_final,
        "none": False,
    }
    if policy not in wanted:
        raise ValueError(f"unknown checkpoint policy {policy!r}")
    resume = bool(resume_every_n_epochs) and epoch % resume_every_n_epochs == 0
    if wanted[policy]:
        best = policy == "best"
        return SaveDecision(True, policy, full_state=resume, improved=improved,
                            top_k_rank=top_k_rank if best else None,
                            also_best=also_best if best else ())
    if resume:
        return SaveDecision(True, "resume", full_state=True, improved=improved)
    return SaveDecision(False, "", improved=improved)


def rank_score(improvements: int, improved: bool) -> float:
    """The score Ray ranks a checkpoint by under ``best`` (``RANK_KEY``; see above)."""
    return improvements - (0.0 if improved else 0.5)


# Under every finite monitored value: the score of a checkpoint outside the K best. Finite,
# since Ray's checkpoint snapshot is JSON.
BELOW_TOP_K = -sys.float_info.max


def top_k_score(value: float, mode: str, entered: bool) -> float:
    """The score Ray ranks a checkpoint by under ``best`` with keep_top_k > 1 (see above)."""
    if not entered:
        return BELOW_TOP_K
    return value if mode == "max" else -value


def ray_keep_settings(policy: str, monitor_rank_key: str, keep_top_k: int = 1,
                      also_monitor: bool = False) -> dict:
    """Arguments for Ray's ``CheckpointConfig`` (what each policy keeps: see above)."""
    if policy == "best" and also_monitor:
        return {"num_to_keep": None}
    if policy == "best":
        return {
            "num_to_keep": keep_top_k,
            "checkpoint_score_attribute": monitor_rank_key,
            "checkpoint_score_order": "max",
        }
    if policy in ("last", "none"):
        return {"num_to_keep": 1}
    return {"num_to_keep": None}
