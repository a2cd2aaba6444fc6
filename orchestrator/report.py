"""Human-readable tables of a run's summary (rich), and the JSON form for scripts."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def summary_table(summary: dict[str, Any]) -> Table:
    best = summary.get("best_metrics") or {}
    test = summary.get("test_metrics") or {}
    title = (
        f"{summary['name']}: best epoch {summary['best_epoch']} of "
        f"{summary['epochs_completed']} ({summary['monitor']}, {summary['mode']})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("best epoch", justify="right")
    if test:
        table.add_column("test (best weights)", justify="right")
    names = [k for k in best if k.startswith(("train_", "val_"))]
    for name in names:
        row = [name, _fmt(best[name])]
        if test:
            test_name = "test_" + name.removeprefix("val_")
            row.append(_fmt(test[test_name]) if name.startswith("val_") and test_name in test
                       else "")
        table.add_row(*row)
    return table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if summary.get("best_epoch") is None:
        console.print(f"{summary['name']}: no epoch improved {summary['monitor']} (all NaN/inf?)")
    else:
        console.print(summary_table(summary))
    where = summary.get("best_checkpoint")
    console.print(f"best model: {where}" if where else
                  f"best model: not saved (checkpoint policy {summary['policy']!r})")
    console.print(f"summary:    {summary['run_dir']}/summary.json")
