"""From raw run records to the table's rows. Pure functions: no Ray, no I/O.

A run record (``bench.variants.run_variant``) holds, per epoch in order: the wall-clock
stamp of its report (``stamps``), rank 0's reported timings (``rank0``), how long rank 0's
``ray.train.report`` call took (``report_s``) and whether the epoch saved (``saved``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

# Keys in rank 0's metrics: the project loop's, and the baselines' own (bench.probes).
COPY_KEY = "snapshot_seconds"
PROJECT_BLOCKED_KEY = "save_blocked_seconds"
BASELINE_SAVE_KEY = "bench_save_seconds"


def intervals(stamps: Sequence[float]) -> list[float]:
    """Seconds between consecutive epoch stamps (epoch 1's own time, which includes warm-up
    and, for the Ray variants, cannot be told from start-up, is left out)."""
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def blocked_per_save(record: dict[str, Any], plain_report_s: float) -> list[float]:
    """Per saving epoch, how long the save held rank 0's loop: the save's own work before
    its report (the project's ``save_blocked_seconds``: waiting for the previous write plus
    the host copy; a baseline's ``torch.save``) plus whatever that epoch's
    ``ray.train.report`` call took beyond ``plain_report_s``, a report without a checkpoint
    (which every variant pays every epoch; a synchronous upload is in the excess)."""
    out = []
    reports = record["report_s"]
    for i, (metrics, saved) in enumerate(zip(record["rank0"], record["saved"], strict=True)):
        if not saved:
            continue
        own = metrics.get(PROJECT_BLOCKED_KEY, metrics.get(BASELINE_SAVE_KEY, 0.0))
        report = reports[i] if i < len(reports) else plain_report_s
        out.append(own + max(0.0, report - plain_report_s))
    return out


def copies(record: dict[str, Any]) -> list[float]:
    return [m[COPY_KEY] for m, saved in zip(record["rank0"], record["saved"], strict=True)
            if saved and COPY_KEY in m]


def plain_reports(record: dict[str, Any]) -> list[float]:
    """``ray.train.report`` call times on epochs that did not save."""
    return [r for r, saved in zip(record["report_s"], record["saved"], strict=False)
            if not saved]


def controller_cpu_share(record: dict[str, Any]) -> float | None:
    """The controller's CPU seconds per wall second, from the first to the last report."""
    cpu, stamps = record["controller_cpu_s"], record["stamps"]
    if len(cpu) < 2 or stamps[-1] <= stamps[0]:
        return None
    return (cpu[-1] - cpu[0]) / (stamps[-1] - stamps[0])


def plain_report_median(records: Sequence[dict[str, Any]]) -> float | None:
    return median([p for r in records for p in plain_reports(r)])


def summarize(records: Sequence[dict[str, Any]], plain_report_s: float) -> dict[str, Any]:
    """One row for the runs of one variant at one size (one run per round);
    ``plain_report_s``: the reference cost of a report without a checkpoint (bare's)."""
    pooled = [d for r in records for d in intervals(r["stamps"])]
    means = [(r["stamps"][-1] - r["stamps"][0]) / (len(r["stamps"]) - 1) for r in records
             if len(r["stamps"]) > 1]
    blocked = [b for r in records for b in blocked_per_save(r, plain_report_s)]
    copy = [c for r in records for c in copies(r)]
    shares = [s for s in map(controller_cpu_share, records) if s is not None]
    return {
        "runs": len(records),
        "epoch_s_median": median(pooled),
        "epoch_s_mean": median(means),
        "saves_per_run": median([sum(r["saved"]) for r in records]),
        "blocked_s_median": median(blocked),
        "blocked_s_max": max(blocked) if blocked else None,
        "copy_s_median": median(copy),
        "blocked_over_copy": ratio(median(blocked), median(copy)),
        "plain_report_s_median": plain_report_median(records),
        "written_bytes": median([r["written_bytes"] for r in records]),
        "written_weight_bytes": median([r["written_weight_bytes"] for r in records]),
        "peak_files": max(r["peak_files"] for r in records),
        "peak_bytes": max(r["peak_bytes"] for r in records),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in records),
        "controller_cpu_share": median(shares),
        "worker_cpu_s_per_epoch": median([r["worker_cpu_s"] / r["epochs"] for r in records]),
    }


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Each row's epoch time over bare's and over native's (median and mean), in place."""
    for base in ("bare", "native"):
        if base not in rows:
            continue
        for row in rows.values():
            row[f"x_{base}"] = ratio(row["epoch_s_median"], rows[base]["epoch_s_median"])
            row[f"x_{base}_mean"] = ratio(row["epoch_s_mean"], rows[base]["epoch_s_mean"])


def round_orders(variants: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of the variants in each round: forwards, then backwards, and so on, so
    that a drift of the machine over the run weighs on every variant alike."""
    return [list(variants) if r % 2 == 0 else list(reversed(variants)) for r in range(rounds)]
