"""Names that are part of the public contract, defined once: files on disk, reported keys.

The driver (``orchestrator``) and the workers both read them from here, so a file or key can
never be spelled two ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A checkpoint directory (see workers.checkpoint).
MODEL_FILE = "model.safetensors"  # the unwrapped model's weights
METADATA_FILE = "metadata.json"  # the epoch, every metric of it, monitor, mode, config
STATE_FILE = "train_state.pt"  # epoch, tracker, seed (+ optimizer in resume checkpoints)
LEARNER_FILE = "learner.pth"  # fastai engine: the weights in learn.save's format
CHECKPOINT_PREFIX = "checkpoint_"

# A run directory, <storage_path>/<name>/.
RUN_MARKER = ".orchestrator-run.json"  # written at its creation: only such may be deleted
RUN_LOCK = ".orchestrator-lock.json"  # while a driver runs it: pid, host, start time
HISTORY_FILE = "history.json"  # every evaluation's record, compacted (results/history.py)
HISTORY_SEGMENTS_DIR = "history"  # the records written since, in segments NNNNNNNN.json
SUMMARY_FILE = "summary.json"  # the finished (or stopped) run's record
CARD_FILE = "model_card.md"  # beside summary.json (or leaderboard.json): results/card.py
PLOT_FILE = "training_curves.png"
EXPORT_DIR = "export"  # `orchestrator export`: model.pt2 / model.onnx, <format>.json
# Models waiting to be logged to W&B: Ray may delete a checkpoint (num_to_keep) before the
# driver gets to it, so the controller sets a copy aside (a hard link where storage is local).
STAGING_DIR = "wandb_staging"
STAGED_FILES = (MODEL_FILE, METADATA_FILE)
FAILURE_LOG = "failure.log"  # a failed run's worker tracebacks (the terminal gets one line)

# A search directory (orchestrator tune).
SEARCH_FILE = "search.json"  # the trials, drawn or proposed so far: resume reads it
PBT_FILE = "pbt.json"  # a population-based search's exploits, in the order they were made
EXPLOIT_PREFIX = "exploit_"  # in a trial's directory: the copy of the checkpoint it continued from
SEARCHER_FILE = "searcher.json"  # an adaptive search's sampler records (optuna's own trials)
DONE_FILE = "trial_done.json"  # in a trial's run directory, the moment Tune reports its end
LEADERBOARD_FILE = "leaderboard.json"
BEST_DIR = "best_model"  # the overall best model
TRIALS_DIR = "trials"
TUNE_DIR = "_tune"  # Ray Tune's own bookkeeping

# Reported every epoch besides the split metrics: the tracker's ranking, which Ray uses as the
# checkpoint score (see policy.ray_keep_settings). Internal: not part of the epoch's record.
RANK_KEY = "checkpoint_rank"
# Reported with the resume checkpoint a signal asked for (``failure.preempt_grace_s``): not an
# evaluation, so not a record of the history, never an improvement.
PREEMPT_KEY = "preempted"
INTERNAL_KEYS = (RANK_KEY, PREEMPT_KEY)
# In the workers' train_loop_config beside the run's config: the queue through which the
# driver asks them to save the step in flight and stop.
STOP_QUEUE_KEY = "_stop_requests"
# ... and what the driver learned of the workload's Ray Dataset splits (``loop.ray_data``):
# each one's row count and first rows.
RAY_DATASETS_KEY = "_streams"
# ... and, in a population-based search, the trial's place in it (``decisions.lineage``): its
# id, the epoch its leg ends at, and the copy of another trial's checkpoint it continues from.
PBT_KEY = "_pbt"
# ... and why tracker.mode (pinned to min or max by the driver) is what it is: each saved
# model's metadata says so (``contract.direction``).
MODE_SOURCE_KEY = "_mode_source"
# ... and the run's provenance (``loop.provenance``), computed once on the driver: each saved
# model's metadata holds it.
PROVENANCE_KEY = "_provenance"


def point(record: Mapping[str, Any]) -> tuple[int, int]:
    """Where a record (or a checkpoint's metadata) falls in its run: (epoch, global step).
    An engine that evaluates at epoch ends only records no global step (0)."""
    return int(record["epoch"]), int(record.get("global_step") or 0)


def where(record: Mapping[str, Any], by_steps: bool) -> str:
    """``epoch 3``, or in a run that evaluates by steps ``epoch 3, step 40 (global step
    240)``."""
    if not by_steps or record.get("step") is None:
        return f"epoch {record['epoch']}"
    return f"epoch {record['epoch']}, step {record['step']} (global step {record['global_step']})"
