"""``checkpoint.average_top_k`` at a run's end, from the driver: the K best kept models
(``best_checkpoints``) averaged, scored and written in one Ray task next to the data
(``workers.loop.averaging``), so that the driver stays torch-free; the record of which won
(``summary.json``'s ``averaged``) and the checkpoint the test split is then scored with.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TypedDict

from orchestrator import storage
from orchestrator.errors import user_error_among
from orchestrator.results.checkpoints import top_k_checkpoints
from workers.contract.config import RunConfig
from workers.contract.records import AveragedRecord, EpochRecord, KeptCheckpoint
from workers.decisions.averaging import margin

AVERAGED_PREFIX = "averaged_top_"  # not a checkpoint_ directory: Ray never registers it


class AveragedField(TypedDict, total=False):
    """``summary.json``'s ``averaged``, there only with checkpoint.average_top_k."""

    averaged: AveragedRecord


def averaged_dir(run_dir: str, k: int) -> str:
    return storage.join(run_dir, f"{AVERAGED_PREFIX}{k}")


def _score(cfg: RunConfig, paths: list[str], best_value: float, target: str,
           use_gpu: bool) -> dict[str, Any]:
    import ray
    from ray.train import Checkpoint

    from workers.loop.averaging import average_checkpoints

    task = ray.remote(average_checkpoints).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    scored: dict[str, Any] = ray.get(task.remote(
        cfg.to_dict(), [Checkpoint(p) for p in paths], best_value, target))
    return scored


def average_best(cfg: RunConfig, run_dir: str, kept: list[KeptCheckpoint],
                 best: EpochRecord | None,
                 use_gpu: bool) -> tuple[AveragedField, KeptCheckpoint | None]:
    """The record (empty without average_top_k or a best) and, when the average won, the
    checkpoint it was written as. An average a previous end of this run wrote goes first: a
    resumed run decides again."""
    k = cfg.checkpoint.average_top_k
    if not k or best is None:
        return {}, None
    target = averaged_dir(run_dir, k)
    if storage.exists(target):
        storage.delete_dir(target)
    ranked = top_k_checkpoints(kept, cfg.checkpoint.keep_top_k, cfg.tracker.resolved_mode)[:k]
    record_of_best: dict[str, Any] = dict(best)  # the monitor's key is the open part
    best_value = float(record_of_best[cfg.tracker.monitor])
    record: AveragedRecord = {"k": k, "averaged_from": [r["path"] for r in ranked],
                              "value": None, "best_value": best_value, "won": False, "by": None}
    if len(ranked) < k:
        record["skipped"] = (f"{len(ranked)} of the {k} best models were kept (fewer "
                             "evaluations entered the best); nothing was averaged")
        return {"averaged": record}, None
    try:
        scored = _score(cfg, record["averaged_from"], best_value, target, use_gpu)
    except Exception as exc:
        message = user_error_among([exc])
        if message is None:
            raise
        print(f"warning: checkpoint.average_top_k: the average was not scored: {message}",
              file=sys.stderr)
        record["skipped"] = message
        return {"averaged": record}, None
    value = float(scored["value"])
    by = margin(value, best_value, cfg.tracker.resolved_mode)
    record.update({"value": value if math.isfinite(value) else None, "won": bool(scored["won"]),
                   "by": by if math.isfinite(by) else None,
                   "batch_norm_recomputed": bool(scored["batch_norm"]),
                   "metrics": scored["metrics"]})
    if not scored["won"]:
        return {"averaged": record}, None
    record["path"] = target
    metadata = scored["metadata"]
    return {"averaged": record}, {"epoch": int(metadata["epoch"]), "path": target,
                                  "is_best": True, "metadata": metadata}
