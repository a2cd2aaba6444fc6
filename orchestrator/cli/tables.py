"""Human-readable tables of a run's summary (rich), and the JSON form for scripts."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from workers.contract.records import AveragedRecord, Summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def won_average(summary: Summary) -> AveragedRecord | None:
    """``checkpoint.average_top_k``'s record where the average won (it is then
    ``best_checkpoint``), else None."""
    averaged = summary.get("averaged")
    return averaged if averaged and averaged["won"] and averaged.get("path") else None


def _averaged_name(averaged: AveragedRecord) -> str:
    return f"average of the {averaged['k']} best"


def summary_table(summary: Summary) -> Table:
    """The best evaluation's metrics; where the average of the K won, its validation metrics
    beside them; the test split's, scored with ``best_checkpoint``."""
    best: Mapping[str, Any] = summary.get("best_metrics") or {}  # its metrics: open keys
    test = summary.get("test_metrics") or {}
    averaged = won_average(summary)
    scored: Mapping[str, Any] = (averaged.get("metrics") or {}) if averaged else {}
    title = (
        f"{summary['name']}: best epoch {summary['best_epoch']} of "
        f"{summary['epochs_completed']} ({summary['monitor']}, {summary['mode']})"
    )
    if summary.get("best_step") is not None and (summary.get("config") or {}).get(
            "train", {}).get("eval_every_n_steps"):
        title = (f"{summary['name']}: best at epoch {summary['best_epoch']}, step "
                 f"{summary['best_step']} (global step {summary['best_global_step']} of "
                 f"{summary['global_step']}) ({summary['monitor']}, {summary['mode']})")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("best epoch", justify="right")
    if averaged:
        table.add_column(f"{_averaged_name(averaged)} (the best model)", justify="right")
    if test:
        table.add_column(f"test ({_averaged_name(averaged) if averaged else 'best weights'})",
                         justify="right")
    names = [k for k in best if k.startswith(("train_", "val_"))]
    for name in names:
        row = [name, _fmt(best[name])]
        if averaged:
            row.append(_fmt(scored[name]) if name in scored else "")
        if test:
            test_name = "test_" + name.removeprefix("val_")
            row.append(_fmt(test[test_name]) if name.startswith("val_") and test_name in test
                       else "")
        table.add_row(*row)
    return table


def best_checkpoints_table(summary: Summary) -> Table:
    """``checkpoint.keep_top_k``: the K kept models, best first (``best_checkpoints``). Where
    ``checkpoint.average_top_k``'s average won, it is the first row (``avg``: the best model,
    ``best_checkpoint``), above rank 1 (``average_verdict`` says by how much)."""
    ranked = summary.get("best_checkpoints") or []
    by_steps = bool((summary.get("config") or {}).get("train", {}).get("eval_every_n_steps"))
    table = Table(title=f"the {len(ranked)} best models kept ({summary['monitor']}, "
                  f"{summary['mode']})", title_justify="left")
    for column in ("rank", "epoch", *(["global step"] if by_steps else []),
                   summary["monitor"], "checkpoint"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    if averaged := won_average(summary):
        by_path = {c["path"]: c for c in ranked}
        of = [by_path[p] for p in averaged["averaged_from"] if p in by_path]
        table.add_row("avg", ", ".join(str(c["epoch"]) for c in of),
                      *([", ".join(_fmt(c["global_step"]) for c in of)] if by_steps else []),
                      _fmt(averaged["value"]), averaged["path"].rstrip("/").rsplit("/", 1)[-1],
                      end_section=True)
    for c in ranked:
        table.add_row(str(c["rank"]), str(c["epoch"]),
                      *([_fmt(c["global_step"])] if by_steps else []), _fmt(c["value"]),
                      c["path"].rsplit("/", 1)[-1])
    return table


def average_verdict(summary: Summary) -> str | None:
    """One line: how the average of the K did against rank 1 and what became of it; None
    without ``checkpoint.average_top_k``."""
    averaged = summary.get("averaged")
    if not averaged:
        return None
    name = _averaged_name(averaged)
    if averaged.get("skipped"):
        return f"{name}: not averaged ({averaged['skipped']})"
    by, monitor = averaged["by"], summary["monitor"]
    if averaged["value"] is None or by is None:
        against = f"{monitor} not finite"
    else:
        than = ("better than" if by > 0 else "worse than" if by < 0 else "no better than")
        against = (f"{monitor} {_fmt(averaged['value'])}, {than} rank 1"
                   + (f" by {_fmt(abs(by))}" if by else ""))
    if averaged["won"]:
        return (f"{name} (avg): {against}; it is the best model (best_checkpoint; the test "
                "split is scored with it)")
    return f"{name}: {against}; not kept, rank 1 is the best model"


def monitors_table(summary: Summary) -> Table:
    """``tracker.also_monitor``: a row per monitor, the primary first (``best_by_monitor``):
    its best evaluation, value, model and test loss."""
    by_monitor = summary.get("best_by_monitor") or {}
    table = Table(title="the best model of each monitor", title_justify="left")
    for column in ("monitor", "mode", "epoch", "value", "test_loss", "checkpoint"):
        table.add_column(column, justify="left" if column in ("monitor", "checkpoint")
                         else "right")
    best: Mapping[str, Any] = summary.get("best_metrics") or {}
    averaged = won_average(summary)  # then the primary's best model is the average
    rows: list[tuple[str, str, Any, Any, Any, str | None]] = [(
        summary["monitor"], summary["mode"], "avg" if averaged else summary.get("best_epoch"),
        averaged["value"] if averaged else best.get(summary["monitor"]),
        summary.get("test_metrics"), summary.get("best_checkpoint"))]
    rows += [(name, b["mode"], b["epoch"], b["value"], b["test_metrics"], b["checkpoint"])
             for name, b in by_monitor.items()]
    for name, mode, epoch, value, test, path in rows:
        table.add_row(name, mode, _fmt(epoch), _fmt(value) if value is not None else "",
                      _fmt((test or {}).get("test_loss", "")),
                      path.rsplit("/", 1)[-1] if path else "not kept")
    return table


def make_console() -> Console:
    # Logs and CI are not terminals: rich would squeeze tables into 80 columns there.
    return Console() if sys.stdout.isatty() else Console(width=160)


def print_summary(summary: Summary, console: Console | None = None) -> None:
    console = console or make_console()
    if summary.get("best_epoch") is None:
        console.print(f"{summary['name']}: no epoch improved {summary['monitor']} (all NaN/inf?)")
    else:
        console.print(summary_table(summary))
    if summary.get("best_checkpoints"):
        console.print(best_checkpoints_table(summary))
    if verdict := average_verdict(summary):
        console.print(verdict)
    if summary.get("best_by_monitor"):
        console.print(monitors_table(summary))
    where = summary.get("best_checkpoint")
    averaged = won_average(summary)
    console.print(f"best model: {where}" + (f" ({_averaged_name(averaged)})" if averaged
                                            else "") if where else
                  f"best model: not saved (checkpoint policy {summary['policy']!r})")
    console.print(f"summary:    {summary['run_dir']}/summary.json")


def leaderboard_table(board: dict[str, Any]) -> Table:
    monitor = board["monitor"]
    rows = board["trials"]
    keys = sorted({k for r in rows for k in r["hyperparameters"]})
    others = sorted({k for r in rows for k in (r["best_metrics"] or {})
                     if k.startswith("val_") and k != monitor})[:3]
    table = Table(title=f"{board['name']}: trials by best {monitor} ({board['mode']})",
                  title_justify="left")
    for column in ["#", "trial", *keys, "best epoch", f"best {monitor}", *others, "status"]:
        table.add_column(column, justify="left" if column in ("trial", "status") else "right")
    for r in rows:
        best = r["best_metrics"] or {}
        table.add_row(str(r["rank"]), r["trial_id"],
                      *(_fmt(r["hyperparameters"].get(k, "")) for k in keys),
                      _fmt(r["best_epoch"]), _fmt(best.get(monitor, "")),
                      *(_fmt(best.get(k, "")) for k in others), r["status"])
    return table


def print_leaderboard(board: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    console.print(leaderboard_table(board))
    console.print(f"best model: {board['best_model']}" if board.get("best_model")
                  else "best model: none (no trial saved one)")
    console.print(f"leaderboard: {board['experiment_dir']}/leaderboard.json")
