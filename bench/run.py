"""What best-model saving costs, against what users would do instead.

    python -m bench.run                     # both sizes, every variant, 10 epochs, 2 workers
    python -m bench.run --quick             # a smoke run: small model, 3 epochs
    python -m bench.run --pacing 2,0.1,0.02 # bare vs native per report-poll interval

Prints a table per model size and writes the raw runs and the table's numbers as JSON
(default ``bench/results/latest.json``, the printed tables next to it as ``.txt``).
See bench/README.md for what each variant and column is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.compat import (
    TRAIN_HEALTH_CHECK_INTERVAL_ENV,
    WORKER_NICENESS_ENV,
    quiet_ray_token_setup,
)

VARIANT_ORDER = ["native", "bare", "naive", "ray-default", "best", "every_n", "last"]
FSDP_VARIANTS = ["bare-fsdp", "best-fsdp"]  # on request (--variants): see README
LABELS = {"best": "ours: best", "every_n": "ours: every_n=2", "last": "ours: last",
          "bare-fsdp": "bare, fsdp", "best-fsdp": "ours: best, fsdp"}
MB = 1e6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,large", help="comma-separated: small, large")
    p.add_argument("--variants", default=",".join(VARIANT_ORDER),
                   help=f"comma-separated, run in this order: {', '.join(VARIANT_ORDER)}; "
                   f"also {', '.join(FSDP_VARIANTS)}")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each variant; rounds alternate forwards and backwards")
    p.add_argument("--interval", default=None,
                   help=f"{TRAIN_HEALTH_CHECK_INTERVAL_ENV} for the Ray variants "
                        "(default: the project's, or the variable if set)")
    p.add_argument("--pacing", default=None, metavar="S,S,...",
                   help="instead: native and bare on the small model at each poll interval")
    p.add_argument("--niceness", type=int, default=None,
                   help="run at this niceness (default: as started); every process of the "
                        "benchmark, Ray's workers and native's processes alike, runs at it")
    p.add_argument("--quick", action="store_true", help="small model, 3 epochs")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.epochs = "small", 3
    return args


def host_copy_seconds(size: str, repeats: int = 15) -> dict[str, float]:
    """The snapshot's host copy alone, in this process, one thread as in a 1-CPU worker:
    into the reused buffers (what the loop does) and into fresh memory (for comparison)."""
    import statistics

    import torch

    from bench.workload import build
    from workers.checkpoint.snapshot import HostBuffers, to_host

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = build(size).model.state_dict()
        buffers = HostBuffers()
        buffers.copy(weights)  # allocate once, as the first save does

        def timed(fn: Any) -> float:
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        return {"reused_buffers": timed(lambda: buffers.copy(weights)),
                "fresh_memory": timed(lambda: to_host(weights))}
    finally:
        torch.set_num_threads(threads)


def start_ray() -> None:
    import logging

    import ray

    from orchestrator.start.cluster import ray_env_vars

    # Read by the raylet when it starts: its workers' niceness, relative to its own (which is
    # this process's). Ray's default, 15, would put the Ray variants, and only them, behind
    # any other work on the machine.
    os.environ[WORKER_NICENESS_ENV] = "0"
    quiet_ray_token_setup()
    # As the project's init_ray, but the workers' and controller's output stays in Ray's logs.
    ray.init(runtime_env={"env_vars": ray_env_vars()}, include_dashboard=True,
             log_to_driver=False, logging_level=logging.WARNING)


def run_all(plan: list[tuple[str, str, str, str]], args: argparse.Namespace,
            root: Path) -> list[dict[str, Any]]:
    """``plan``: (size, variant, tag, interval) in the order to run."""
    from bench.variants import run_variant

    records = []
    for i, (size, variant, tag, interval) in enumerate(plan, start=1):
        load_before = os.getloadavg()[0]
        started = time.time()
        record = run_variant(variant, size, epochs=args.epochs, workers=args.workers,
                             root=root, tag=tag, interval_s=interval)
        record.update(interval=interval, load_before=load_before,
                      load_after=os.getloadavg()[0])
        records.append(record)
        print(f"[{i}/{len(plan)}] {size:5} {variant:11} {tag:8} "
              f"{time.time() - started:5.1f} s  load {load_before:.1f}", flush=True)
    return records


def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value / scale, spec)


def main_table(size: str, rows: dict[str, dict[str, Any]], weights: int) -> Any:
    from rich.table import Table

    table = Table(title=f"{size} model: {weights / MB:.1f} MB of float32 weights")
    for header in ("variant", "epoch s\nmedian", "x bare", "x native", "epoch s\nmean",
                   "x bare\nmean", "saves", "blocked/save ms\nmedian (max)", "host copy\nms",
                   "blocked\n/copy", "written MB\n(weights)", "peak held\nfiles / MB",
                   "peak RSS\nMB"):
        table.add_column(header, justify="left" if header == "variant" else "right")
    for variant, row in rows.items():
        blocked = ("" if row["blocked_s_median"] is None else
                   f"{row['blocked_s_median'] * 1e3:.1f} ({row['blocked_s_max'] * 1e3:.1f})")
        table.add_row(
            LABELS.get(variant, variant), fmt(row["epoch_s_median"], ".3f"),
            fmt(row.get("x_bare"), ".3f"), fmt(row.get("x_native"), ".3f"),
            fmt(row["epoch_s_mean"], ".3f"), fmt(row.get("x_bare_mean"), ".3f"),
            fmt(row["saves_per_run"], ".0f"), blocked, fmt(row["copy_s_median"], ".2f", 1e-3),
            fmt(row["blocked_over_copy"], ".2f"),
            f"{row['written_bytes'] / MB:.1f} ({row['written_weight_bytes'] / MB:.1f})",
            f"{row['peak_files']} / {row['peak_bytes'] / MB:.1f}",
            f"{row['peak_rss_bytes'] / MB:.0f}",
        )
    return table


def pacing_table(rows: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="Report pacing: small model, bare vs native, per poll interval")
    for header in ("interval s", "bare epoch s\nmedian", "native epoch s\nmedian",
                   "bare / native", "bare / native\nmean", "report call s\nmedian",
                   "controller\nCPU %", "worker CPU s\nper epoch"):
        table.add_column(header, justify="right")
    for interval, row in rows.items():
        table.add_row(interval, fmt(row["bare"]["epoch_s_median"], ".3f"),
                      fmt(row["native"]["epoch_s_median"], ".3f"),
                      fmt(row["bare"]["x_native"], ".3f"),
                      fmt(row["bare"]["x_native_mean"], ".3f"),
                      fmt(row["bare"]["plain_report_s_median"], ".4f"),
                      fmt(row["bare"]["controller_cpu_share"], ".1f", 0.01),
                      fmt(row["bare"]["worker_cpu_s_per_epoch"], ".3f"))
    return table


def niceness(records: list[dict[str, Any]]) -> str:
    """The training processes' niceness, which must be the same for every variant."""
    values = sorted({n for r in records for n in r["niceness"]})
    return str(values[0]) if len(values) == 1 else f"MIXED {values}"


def environment() -> dict[str, Any]:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "driver_niceness": os.nice(0)}


def plan_runs(args: argparse.Namespace, interval: str) -> list[tuple[str, str, str, str]]:
    """(size, variant, round label, poll interval) of every run, orders alternated by round."""
    from bench import stats

    if args.pacing:
        return [("small", v, f"i{interval}-r{r}", interval)
                for interval in args.pacing.split(",") for r in range(args.rounds)
                for v in (["native", "bare"] if r % 2 == 0 else ["bare", "native"])]
    return [(size, v, f"r{r}", interval) for size in args.sizes.split(",")
            for r, order in enumerate(stats.round_orders(args.variants.split(","), args.rounds))
            for v in order]


def report_pacing(console: Any, out: dict[str, Any], records: list[dict[str, Any]],
                  args: argparse.Namespace) -> None:
    from bench import stats

    out["pacing"] = {}
    for iv in args.pacing.split(","):
        rows = {v: stats.summarize([r for r in records
                                    if r["variant"] == v and r["interval"] == iv], 0.0)
                for v in ("native", "bare")}
        stats.add_ratios(rows)
        out["pacing"][iv] = rows
    console.print(pacing_table(out["pacing"]))


def report_sizes(console: Any, out: dict[str, Any], records: list[dict[str, Any]],
                 args: argparse.Namespace, interval: str) -> None:
    from bench import stats
    from bench.workload import build, weights_bytes

    variants = args.variants.split(",")
    out["weights_bytes"], out["host_copy_s"], out["summary"] = {}, {}, {}
    for size in args.sizes.split(","):
        out["weights_bytes"][size] = weights_bytes(build(size).model)
        out["host_copy_s"][size] = host_copy_seconds(size)
        runs = {v: [r for r in records if r["variant"] == v and r["size"] == size]
                for v in variants}
        plain = stats.plain_report_median(runs.get("bare", [])) or 0.0
        rows = {v: stats.summarize(runs[v], plain) for v in variants}
        stats.add_ratios(rows)
        out["summary"][size] = rows
        console.print(main_table(size, rows, out["weights_bytes"][size]))
        if "best" in rows:
            expected = len(out["improving_epochs"]) * out["weights_bytes"][size]
            rows["best"]["expected_weight_bytes"] = expected
            written = rows["best"]["written_weight_bytes"]
            console.print(f"ours (best): weights written {written:,.0f} bytes; "
                          f"improvements x weights = {expected:,} bytes")
        copy = out["host_copy_s"][size]
        console.print(f"host copy of the weights alone (this process, 1 thread): into "
                      f"reused buffers {copy['reused_buffers'] * 1e3:.2f} ms, into fresh "
                      f"memory {copy['fresh_memory'] * 1e3:.2f} ms; plain report "
                      f"(bare, median) {plain * 1e3:.1f} ms\n")
    console.print(f"{args.workers} workers, {args.epochs} epochs, improving epochs "
                  f"{out['improving_epochs']}, poll interval {interval} s, "
                  f"{args.rounds} round(s), niceness {niceness(records)}; load average "
                  f"{min(r['load_before'] for r in records):.1f}-"
                  f"{max(r['load_after'] for r in records):.1f}")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from bench.variants import HEALTH_CHECK_ENV
    from bench.workload import improving_epochs
    from orchestrator.start.cluster import DEFAULT_HEALTH_CHECK_S

    args = parse_args(argv)
    interval = args.interval or os.environ.get(HEALTH_CHECK_ENV, DEFAULT_HEALTH_CHECK_S)
    plan = plan_runs(args, interval)
    if args.niceness is not None:
        os.setpriority(os.PRIO_PROCESS, 0, args.niceness)
    start_ray()
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    console = Console(record=True, width=170)
    records = run_all(plan, args, root)

    out: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "environment": environment(), "interval_s": interval,
        "improving_epochs": improving_epochs(args.epochs), "runs": records,
    }
    if args.pacing:
        report_pacing(console, out, records, args)
    else:
        report_sizes(console, out, records, args, interval)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(console.export_text())
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
