"""A finished (or stopped) run's record, built from what is in storage.

Everything here reads the run directory (``history.json`` and the checkpoint directories),
never a Ray ``Result``: a Tune trial stopped early by its scheduler, whose process is gone,
is summarised exactly like a run that ended normally.
"""

from __future__ import annotations

import sys
import tempfile
from typing import TYPE_CHECKING, Any, TypedDict, cast

from orchestrator import storage
from orchestrator.errors import user_error_among
from orchestrator.results.averaging import AveragedField, average_best
from orchestrator.results.checkpoints import kept_checkpoints, top_k_checkpoints
from orchestrator.results.epochs import epoch_record, nonfinite
from orchestrator.results.history import compact, read_history, segment_numbers
from orchestrator.tracking.staging import discard_staged
from workers.compat import TRAIN_SNAPSHOT_FILE, registered_checkpoint_names
from workers.contract.config import RunConfig
from workers.contract.names import (
    CHECKPOINT_PREFIX,
    PLOT_FILE,
    SUMMARY_FILE,
    point,
)
from workers.contract.records import (
    EpochRecord,
    KeptCheckpoint,
    MonitorBest,
    Summary,
    SummaryCheckpoint,
    TrialFields,
)
from workers.decisions.tracker import BestTracker

if TYPE_CHECKING:
    from orchestrator.start.context import RunContext


class _TestError(TypedDict, total=False):
    """``summary.json``'s ``test_error``, there only when the test split was not scored."""

    test_error: str


def repair_history(history: list[EpochRecord],
                   kept: list[KeptCheckpoint]) -> tuple[list[EpochRecord], bool]:
    """The history completed from the kept checkpoints' own metadata.

    A run stopped after Ray registered a checkpoint (and deleted the one it replaced) but
    before the recorder saw that report has a model in storage that history.json does not
    name; its metadata holds every metric of its epoch. Returns (history, whether it changed).
    """
    by_point = {point(record): record for record in history}
    missing = [c for c in kept if point(c["metadata"]) not in by_point
               and c["metadata"].get("saved_because") != "preempt"]  # not an evaluation
    for checkpoint in missing:
        by_point[point(checkpoint["metadata"])] = epoch_record(checkpoint["metadata"],
                                                               checkpoint["path"])
    return [by_point[at] for at in sorted(by_point)], bool(missing)


def repair_history_file(run_dir: str) -> tuple[list[EpochRecord], list[KeptCheckpoint]]:
    """The history completed from the kept checkpoints (``repair_history``) and compacted
    into history.json if anything was missing or segments were written since (once per run
    end, and before a resume). Before a resume too: Ray continues after its newest checkpoint,
    whose epoch a killed run may not have recorded, and which Ray deletes once a newer one
    replaces it. Returns (history, kept checkpoints)."""
    kept = kept_checkpoints(run_dir)
    history, repaired = repair_history(read_history(run_dir), kept)
    if repaired or segment_numbers(run_dir):
        compact(run_dir, history)
    return history, kept


def remove_unregistered_checkpoints(run_dir: str) -> list[str]:
    """Delete checkpoint directories Ray never registered: uploads that completed while their
    worker group was failing. Ray does not know them, so it would never delete them, and they
    would break "best and latest only". Skipped if Ray's snapshot cannot be read."""
    path = storage.join(run_dir, TRAIN_SNAPSHOT_FILE)
    try:
        tracked = registered_checkpoint_names(storage.read_json(path))
    except (OSError, KeyError, TypeError, ValueError):
        return []
    # ... nor any that a report registered (the recorder saw it), in case the snapshot lags.
    tracked |= {name for r in read_history(run_dir) if (name := r.get("checkpoint"))}
    orphans = [name for name in storage.list_dirs(run_dir)
               if name.startswith(CHECKPOINT_PREFIX) and name not in tracked]
    for name in orphans:
        storage.delete_dir(storage.join(run_dir, name))
    return orphans


def evaluate_test_split(cfg: RunConfig, checkpoint_path: str,
                        use_gpu: bool) -> dict[str, Any] | None:
    """The test split, once, with the best weights, in one Ray task next to the data: its
    metrics (floats). A workload whose test split cannot be scored (its mistake) loses
    nothing of the run: the summary says why there are no test metrics (``test_error``, the
    one string), and so does a warning."""
    import ray
    from ray.train import Checkpoint

    from workers.loop.scoring import evaluate_checkpoint

    task = ray.remote(evaluate_checkpoint).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    try:
        scored: dict[str, float] | None = ray.get(
            task.remote(cfg.to_dict(), Checkpoint(checkpoint_path), "test"))
        return scored
    except Exception as exc:
        message = user_error_among([exc])
        if message is None:
            raise
        print(f"warning: the test split was not evaluated: {message}", file=sys.stderr)
        return {"test_error": message}


def best_of(history: list[EpochRecord],
            kept: list[KeptCheckpoint]) -> tuple[EpochRecord | None, KeptCheckpoint | None]:
    """The tracker's best record (improvements only ever get better) and its checkpoint, if
    the policy kept it: the one the record names, else one of that epoch (a repaired record)."""
    best = next((r for r in reversed(history) if r.get("is_best")), None)
    if best is None:
        return None, None
    candidates = [c for c in kept if point(c["metadata"]) == point(best)]
    named = next((c for c in candidates if c["path"].split("?")[0].rstrip("/")
                  .endswith("/" + str(best.get("checkpoint")))), None)
    return best, named or (candidates[-1] if candidates else None)


def summarize(cfg: RunConfig, run_dir: str, *, use_gpu: bool, start: str,
              status: str | None = None,
              mode_source: str = "set by tracker.mode") -> Summary:
    """``status``: ``interrupted`` or ``failed`` for a run that did not end by itself (no
    test split then: it is evaluated once, when the run ends); default: from the history."""
    remove_unregistered_checkpoints(run_dir)
    history, kept = repair_history_file(run_dir)
    best, best_ckpt = best_of(history, kept)
    by_monitor = bests_by_monitor(cfg, history, kept)
    if by_monitor:  # tracker.also_monitor: Ray kept every checkpoint (checkpoint.policy)
        kept = remove_superseded_bests(run_dir, cfg, kept, best_ckpt, by_monitor)
    last = history[-1] if history else None
    if cfg.train.max_steps:
        stopped_early = last is not None and (last.get("global_step") or 0) < cfg.train.max_steps
    else:
        stopped_early = last is not None and last["epoch"] < cfg.train.epochs
    status = status or ("stopped_early" if stopped_early else "completed")
    averaged: AveragedField = {}
    if status in ("completed", "stopped_early"):  # checkpoint.average_top_k: the winner
        averaged, winner = average_best(cfg, run_dir, kept, best, use_gpu)
        best_ckpt = winner or best_ckpt
    test_metrics, test_error = None, None
    # A checkpoint written before the metadata said whether there is a test split: try it.
    if (best_ckpt and status in ("completed", "stopped_early")
            and best_ckpt["metadata"].get("test_split", True)):
        test_metrics = evaluate_test_split(cfg, best_ckpt["path"], use_gpu)
        test_error = (test_metrics or {}).pop("test_error", None)
        test_metrics = test_metrics or None
    if by_monitor and status in ("completed", "stopped_early"):
        score_monitor_bests(cfg, by_monitor, kept, best_ckpt, test_metrics, use_gpu)
    error: _TestError = {"test_error": test_error} if test_error else {}
    return with_monitor_bests(by_monitor, with_best_checkpoints(cfg, kept, {
        "name": cfg.name,
        "run_dir": run_dir,
        "start": start,
        "status": status,
        "monitor": cfg.tracker.monitor,
        "mode": cfg.tracker.resolved_mode,
        "mode_source": mode_source,  # why that direction (contract.direction)
        "policy": cfg.checkpoint.policy,
        "best_checkpoint": best_ckpt["path"] if best_ckpt else None,
        "best_epoch": best["epoch"] if best else None,
        "best_step": best.get("step") if best else None,
        "best_global_step": best.get("global_step") if best else None,
        "best_metrics": (cast(EpochRecord, {k: v for k, v in best.items() if k != "checkpoint"})
                         if best else None),
        "test_metrics": test_metrics,
        **error,
        **averaged,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "global_step": history[-1].get("global_step") if history else None,
        "epochs_planned": cfg.train.epochs,
        "stopped_early": stopped_early,
        # Why the tracker stopped it (patience, tracker.stop_at, divergence, baseline).
        "stop_reason": last.get("stop_reason") if stopped_early and last else None,
        # A diverged last epoch (train.stop_on_nonfinite): what was not finite.
        "nonfinite": nonfinite(history[-1]) if history else [],
        "checkpoints": [_summary_checkpoint(c) for c in kept],
        "history": history,
        "config": cfg.to_dict(),
    }))


def with_best_checkpoints(cfg: RunConfig, kept: list[KeptCheckpoint],
                          summary: Summary) -> Summary:
    """``checkpoint.keep_top_k`` > 1: ``best_checkpoints``, the K kept models best first
    (the first is ``best_checkpoint``, unless ``checkpoint.average_top_k``'s average won:
    ``best_checkpoint`` is then ``averaged.path``, no single model, and these stay the K it
    was made of and beat). K = 1 adds no key: summary.json as it always was."""
    if cfg.checkpoint.keep_top_k > 1:
        summary["best_checkpoints"] = top_k_checkpoints(kept, cfg.checkpoint.keep_top_k,
                                                        cfg.tracker.resolved_mode)
    return summary


# -- tracker.also_monitor ----------------------------------------------------------------------
def bests_by_monitor(cfg: RunConfig, history: list[EpochRecord],
                     kept: list[KeptCheckpoint]) -> dict[str, MonitorBest]:
    """Each also-monitor's best evaluation, found in the history by the rule its tracker on
    rank 0 followed (``BestTracker``: the strictly best finite value, the first to reach it),
    with the kept model of that evaluation (None when there is none). Empty without
    ``tracker.also_monitor``."""
    out: dict[str, MonitorBest] = {}
    by_point = {point(c["metadata"]): c for c in kept
                if c["metadata"].get("saved_because") not in ("resume", "preempt")}
    for also in cfg.tracker.also_monitor:
        tracker = BestTracker(also.monitor, also.mode)
        best: EpochRecord | None = None
        for record in history:
            values: dict[str, Any] = dict(record)
            if also.monitor in values and tracker.update(
                    record["epoch"], {also.monitor: values[also.monitor]}).improved:
                best = record
        if best is None or tracker.best_value is None:
            continue
        ckpt = by_point.get(point(best))
        out[also.monitor] = {
            "mode": tracker.mode, "value": tracker.best_value,
            "checkpoint": ckpt["path"] if ckpt else None, "epoch": best["epoch"],
            "step": best.get("step"), "global_step": best.get("global_step"),
            "metrics": {k: v for k, v in best.items() if k != "checkpoint"},
            "test_metrics": None}
    return out


def remove_superseded_bests(run_dir: str, cfg: RunConfig, kept: list[KeptCheckpoint],
                            best_ckpt: KeptCheckpoint | None,
                            by_monitor: dict[str, MonitorBest]) -> list[KeptCheckpoint]:
    """``tracker.also_monitor``: Ray keeps every checkpoint (``checkpoint.policy`` says why);
    delete those that are neither a monitor's current best (the primary's K best included)
    nor the latest. Returns the checkpoints left."""
    keep = {c["path"] for c in kept[-1:]}
    keep |= {best_ckpt["path"]} if best_ckpt else set()
    keep |= {b["checkpoint"] for b in by_monitor.values() if b["checkpoint"]}
    if cfg.checkpoint.keep_top_k > 1:
        keep |= {c["path"] for c in top_k_checkpoints(kept, cfg.checkpoint.keep_top_k,
                                                      cfg.tracker.resolved_mode)}
    for c in kept:
        if c["path"] not in keep:
            storage.delete_dir(c["path"])
    return [c for c in kept if c["path"] in keep]


def score_monitor_bests(cfg: RunConfig, by_monitor: dict[str, MonitorBest],
                        kept: list[KeptCheckpoint], best_ckpt: KeptCheckpoint | None,
                        test_metrics: dict[str, Any] | None, use_gpu: bool) -> None:
    """The test split scored once for each distinct best model (one Ray task each); the
    primary's best's scores are reused where an also-monitor chose the same model."""
    scored: dict[str, dict[str, Any] | None] = {}
    if best_ckpt is not None:
        scored[best_ckpt["path"]] = test_metrics
    has_test = {c["path"]: c["metadata"].get("test_split", True) for c in kept}
    for best in by_monitor.values():
        path = best["checkpoint"]
        if path is None or not has_test.get(path, False):
            continue
        if path not in scored:
            scored[path] = evaluate_test_split(cfg, path, use_gpu)
        best["test_metrics"] = scored[path]


def with_monitor_bests(by_monitor: dict[str, MonitorBest], summary: Summary) -> Summary:
    """``tracker.also_monitor``: ``best_by_monitor``; without it no key is added."""
    if by_monitor:
        summary["best_by_monitor"] = by_monitor
    return summary


def write_plot(summary: Summary, run_dir: str) -> str | None:
    """The training curves as a PNG in the run directory; returns a local path for W&B."""
    from orchestrator.results.plots import training_curves_png

    if not summary["history"]:
        return None
    by_steps = bool(summary["config"]["train"].get("eval_every_n_steps"))
    png = training_curves_png(summary["history"], summary["monitor"],
                              summary["best_global_step"] if by_steps else summary["best_epoch"],
                              by_steps)
    path = storage.join(run_dir, PLOT_FILE)
    storage.write_bytes(path, png)
    if storage.is_uri(path):  # W&B needs a local file
        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as local:
            local.write(png)
        return local.name
    return path


def finalize_run(ctx: RunContext, *, wandb_errors: list[str] | None = None,
                 extra: TrialFields | None = None,
                 status: str | None = None) -> Summary:
    """summary.json, the plot, the model card and the W&B run's last words, in that order of
    dependence."""
    from orchestrator.results.card import write_card_for

    run_dir, tracking = ctx.run_dir, ctx.tracking
    summary = summarize(ctx.cfg, run_dir, use_gpu=ctx.use_gpu, start=ctx.start.value,
                        status=status, mode_source=ctx.mode_source)
    if extra:
        summary = {**summary, **extra}
    # Where the model came from (workers/loop/provenance.py), and what a --resume changed.
    summary["provenance"] = ctx.provenance
    summary["provenance_changes"] = ctx.provenance_changes
    tracking.catch_up(summary["history"], run_dir)
    plot = write_plot(summary, run_dir)
    try:
        card: str | None = write_card_for(summary, run_dir)  # the numbers of summary.json
    except OSError:
        raise  # the storage: summary.json would not be written either (the caller says so)
    except Exception as exc:  # noqa: BLE001 - a card that cannot be written loses no record
        card = None
        print(f"warning: model_card.md was not written ({type(exc).__name__}: {exc}); "
              "`orchestrator card` writes it from summary.json", file=sys.stderr)
    summary["wandb"] = tracking.finish(summary, plot, exit_code=0 if status is None else 1,
                                       card_path=card)
    discard_staged(run_dir)  # models W&B never got (an aborted run)
    if wandb_errors:
        summary["wandb"]["errors"] = wandb_errors
        print(f"warning: {len(wandb_errors)} W&B logging call(s) failed; see summary.json",
              file=sys.stderr)
    if summary["wandb"].get("sync"):
        ctx.console.say(f"W&B offline run: {summary['wandb']['run']}  "
                        f"(upload: {summary['wandb']['sync']})")
    storage.write_json(storage.join(run_dir, SUMMARY_FILE), summary)
    return summary


def _summary_checkpoint(c: KeptCheckpoint) -> SummaryCheckpoint:
    """A kept checkpoint as ``summary.json`` lists it; with train.ema_decay, which weights
    its model is (``raw`` or ``ema``)."""
    entry: SummaryCheckpoint = {"epoch": c["epoch"], "global_step": c["metadata"].get(
        "global_step"), "path": c["path"], "is_best": c["is_best"]}
    if "weights" in c["metadata"]:
        entry["weights"] = c["metadata"]["weights"]
    return entry
