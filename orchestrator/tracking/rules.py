"""What goes to W&B and when: pure decisions, no wandb import, no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from workers.contract.names import point
from workers.contract.records import CheckpointMetadata, KeptCheckpoint


def should_log_model(log_model: str, saved_because: str, is_best: bool) -> bool:
    """``policy`` mirrors the checkpoint policy (resume-only checkpoints, and those a signal
    asked for, are not models the policy asked for); ``best`` logs improvements only;
    ``none`` logs no model; ``end`` chooses among the policy's models, after training."""
    if log_model == "none":
        return False
    if log_model == "best":
        return is_best
    return saved_because not in ("resume", "preempt")


LIVE = "live"  # each model logged as the run saves it (``WandbRun.handle``)
AT_END = "at_end"  # the kept models logged once the run ended, from its checkpoints


def model_logging(log_model: str, keep: str, mode: str, model_files: str = "copy") -> str:
    """Which of the two paths a run's models take to W&B: ``LIVE`` or ``AT_END``.

    Live: online (a superseded version is deleted once a newer one is committed, by
    ``VersionPruner``), or offline with ``keep: all``. At the end: ``log_model: end``; offline
    otherwise, since nothing can be deleted from the run ``wandb sync`` uploads; and
    ``model_files: reference``, since only the kept checkpoints outlive the run."""
    if model_files == "reference":
        return AT_END
    live = log_model in ("policy", "best") and (mode == "online" or keep == "all")
    return LIVE if live else AT_END


def version_alias(metadata: Mapping[str, Any], by_steps: bool) -> str:
    """A model version's own alias: ``epoch-N``, or ``step-N`` (its global step) in a run
    that evaluates by steps."""
    if by_steps and metadata.get("global_step") is not None:
        return f"step-{metadata['global_step']}"
    return f"epoch-{metadata['epoch']}"


def rank_aliases(ranked: list[str], average_won: bool = False) -> dict[str, str]:
    """Each of the K best models' alias (``checkpoint.keep_top_k``), by its final rank:
    ``best``, ``top-2``, ``top-3``, ...; ``ranked``: their paths, best first. Where the
    average of the K won (``checkpoint.average_top_k``), ``best`` is the average's
    (``averaged_aliases``) and the single models are ``top-1``, ``top-2``, ..."""
    return {path: "best" if rank == 1 and not average_won else f"top-{rank}"
            for rank, path in enumerate(ranked, start=1)}


def averaged_aliases(k: int) -> list[str]:
    """The average of the K best, when it won: its own alias ``averaged-top-K`` (not
    ``epoch-N``: it is no evaluation's model, and that alias stays the single best's) and
    ``best``."""
    return [f"averaged-top-{k}", "best"]


def average_won(summary: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint.average_top_k``'s average won: it is then ``best_checkpoint``."""
    averaged = summary.get("averaged") or {}
    return bool(averaged.get("won")) and summary.get("best_checkpoint") == averaged.get("path")


def averaged_record(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The averaged version's ``averaged`` metadata: K, the models averaged (their checkpoint
    names, epochs and global steps, best first, from ``best_checkpoints``), the average's
    monitored value on validation, the single best's, and by how much the average is better."""
    averaged = summary["averaged"]
    by_path = {r["path"]: r for r in summary.get("best_checkpoints", [])}
    models = [by_path.get(path, {}) for path in averaged["averaged_from"]]
    return {"k": averaged["k"],
            "averaged_from": [path.rstrip("/").rsplit("/", 1)[-1]
                              for path in averaged["averaged_from"]],
            "epochs": [m.get("epoch") for m in models],
            "global_steps": [m.get("global_step") for m in models],
            "value": averaged["value"], "best_value": averaged["best_value"],
            "by": averaged["by"]}


def kept_at_end(log_model: str, keep: str, best_checkpoint: str | None,
                checkpoints: list[KeptCheckpoint], by_steps: bool = False,
                ranked: list[str] | None = None, average_won: bool = False,
                ) -> list[tuple[str, CheckpointMetadata, list[str]]]:
    """The models a run keeps in W&B once it ended, oldest first, with their aliases: the best
    checkpoint (``best``; with keep_top_k, each of the K best, ``ranked`` best first, by
    ``rank_aliases``) and, unless ``keep: best``, the last one ``log_model`` chooses
    (``last``; the same version when it is one of those). ``average_won``: the K keep their
    ranks' aliases, ``top-1`` first; the average, no checkpoint of the run, is logged apart
    (``averaged_aliases``)."""
    chosen = [c for c in checkpoints if should_log_model(
        log_model, c["metadata"]["saved_because"], c["is_best"])]
    out: dict[str, tuple[str, CheckpointMetadata, list[str]]] = {}
    if keep != "best" and chosen:
        last = chosen[-1]
        out[last["path"]] = (last["path"], last["metadata"],
                             [version_alias(last["metadata"], by_steps), "last"])
    by_path = {c["path"]: c for c in checkpoints}
    for path, alias in rank_aliases(ranked or ([best_checkpoint] if best_checkpoint
                                               else []), average_won).items():
        if (best := by_path.get(path)) is None:
            continue
        aliases = out.get(path, (None, None, [version_alias(best["metadata"], by_steps)]))[2]
        out[path] = (path, best["metadata"], [*aliases, alias])
    return sorted(out.values(), key=lambda item: point(item[1]))


def artifact_name(run_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{run_name}-model")


def best_summary(best: Mapping[str, Any], test: Mapping[str, Any] | None) -> dict[str, Any]:
    """``best_<metric>`` for every metric of the best epoch, ``best_epoch``, ``test_*``."""
    out = {f"best_{k}": v for k, v in best.items() if k.startswith(("train_", "val_"))}
    out["best_epoch"] = best.get("epoch")
    if best.get("weights"):  # train.ema_decay: raw | ema, which weights the model is
        out["best_weights"] = best["weights"]
    if best.get("global_step") is not None:
        out["best_step"], out["best_global_step"] = best.get("step"), best["global_step"]
    out.update(test or {})
    return out


def monitor_aliases(by_monitor: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """``tracker.also_monitor``: each kept best model's aliases ``best-<metric>`` (one version
    carries several when monitors chose the same model), by its path."""
    out: dict[str, list[str]] = {}
    for metric, best in by_monitor.items():
        if best.get("checkpoint"):
            out.setdefault(best["checkpoint"], []).append(f"best-{metric}")
    return out


def monitors_summary(by_monitor: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``tracker.also_monitor``: the W&B run summary's ``best_<metric>_*`` keys: epoch, value,
    checkpoint, and the test metrics of that model (``best_<metric>_test_*``)."""
    out: dict[str, Any] = {}
    for metric, best in by_monitor.items():
        prefix = f"best_{metric}_"
        out[prefix + "epoch"], out[prefix + "value"] = best["epoch"], best["value"]
        out[prefix + "checkpoint"] = best.get("checkpoint")
        if best.get("global_step") is not None:
            out[prefix + "global_step"] = best["global_step"]
        for name, value in (best.get("test_metrics") or {}).items():
            out[prefix + name] = value
    return out


def reference_uri(path: str) -> str:
    """A checkpoint file's address as W&B's S3/GCS handlers take it (no pyarrow query)."""
    uri = path.split("?", 1)[0]
    return "gs://" + uri.removeprefix("gcs://") if uri.startswith("gcs://") else uri
