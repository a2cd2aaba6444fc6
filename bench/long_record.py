"""Benchmark: what one evaluation costs the controller and the driver at the 10th and at the
10,000th evaluation of a long run (a tiny model's record: the few metrics rank 0 reports).

    .venv/bin/python -m bench.long_record [--evaluations 10000] [--out FILE]

In one process, side by side, 10,000 evaluations each are fed to:

- **controller: recorder**: ``RunRecorder.after_report``, as Ray Train calls it after each
  report, writing the history's newest segment into a local run directory
  (``orchestrator/results/history.py``);
- **controller: whole file**: the record written the way it was before segments (every
  record merged into one list, ``history.json`` rewritten whole each time), for comparison;
- **driver**: ``EpochHandler``, what the driver does with each record it receives (the
  progress line, to a console writing to memory here; the record to the tracking run, W&B off).

Ray's own share (the report through the controller's poll) does not depend on the history and
is left out. For each, the table gives the median time per evaluation over evaluations 1-64
("10th") and over the last 64 ("10,000th"), their ratio, and the mean bytes written to
storage per evaluation in both windows (64: one whole segment). The whole-file variant writes
the first and the last window only (in between, its list grows in memory without being
written: 10,000 rewrites of up to 3 MB would take a quarter of an hour and write 15 GB); what
a write costs depends only on the length of the list. Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console as RichConsole
from rich.table import Table

from orchestrator import storage
from orchestrator.results.epochs import merge_into
from orchestrator.start.console import Console
from orchestrator.tracking.wandb_run import NullRun
from orchestrator.training.driver import EpochHandler
from orchestrator.training.recorder import RunRecorder
from workers.contract.config import RunConfig
from workers.contract.names import RANK_KEY

WINDOW = 64  # evaluations per measuring window: one whole segment


def rank0_metrics(n: int, steps_per_epoch: int = 500) -> dict[str, Any]:
    """The n-th evaluation's report of a run evaluated every 50 steps."""
    global_step = 50 * n
    return {"epoch": 1 + (global_step - 1) // steps_per_epoch,
            "step": (global_step - 1) % steps_per_epoch + 1, "global_step": global_step,
            "train_loss": 1.0 / n, "val_loss": 1.0 / n + 0.01, "val_accuracy": 0.9,
            "lr": 1e-3, "workers": 2, "is_best": False, "epoch_seconds": 0.1,
            RANK_KEY: float(n)}


class Written:
    """Counts the bytes each evaluation writes through ``orchestrator.storage``."""

    def __init__(self) -> None:
        self.bytes = 0
        self._write = storage.write_bytes

    def __enter__(self) -> Written:
        def counted(path: str, data: bytes) -> None:
            self.bytes += len(data)
            self._write(path, data)

        storage.write_bytes = counted
        return self

    def __exit__(self, *exc: object) -> None:
        storage.write_bytes = self._write


def measure(evaluations: int, step: Callable[[int], None]) -> dict[str, list[float]]:
    seconds, written = [], []
    skip = getattr(step, "skip_to", None)  # grows its state to evaluation n without writing
    with Written() as counter:
        for n in range(1, evaluations + 1):
            if skip and WINDOW < n <= evaluations - WINDOW:
                if n == WINDOW + 1:
                    skip(evaluations - WINDOW)
                continue
            before = counter.bytes
            start = time.perf_counter()
            step(n)
            seconds.append(time.perf_counter() - start)
            written.append(counter.bytes - before)
    return {"seconds": seconds, "bytes": written}


def recorder_step(run_dir: str) -> Callable[[int], None]:
    recorder = RunRecorder(run_dir, "none")
    return lambda n: recorder.after_report(None, [rank0_metrics(n)] * 2, None)


def whole_file_step(run_dir: str) -> Callable[[int], None]:
    """The record before segments: one list in memory, history.json rewritten whole."""
    from orchestrator.results.epochs import epoch_record

    history: list[dict[str, Any]] = []

    def step(n: int) -> None:
        merge_into(history, epoch_record(rank0_metrics(n), None))
        storage.write_json(storage.join(run_dir, "history.json"), {"history": history})

    def skip_to(n: int) -> None:
        while len(history) < n:
            merge_into(history, epoch_record(rank0_metrics(len(history) + 1), None))

    step.skip_to = skip_to  # type: ignore[attr-defined]
    return step


def driver_step(evaluations: int) -> Callable[[int], None]:
    from orchestrator.results.epochs import epoch_record

    cfg = RunConfig.model_validate({
        "name": "long", "workload": {"entrypoint": "workers.workloads.digits:build"},
        "train": {"epochs": 1 + 50 * evaluations // 500, "eval_every_n_steps": 50},
        "wandb": {"mode": "disabled"}})
    handler = EpochHandler(SimpleNamespace(cfg=cfg, console=Console(stream=io.StringIO()),
                                           tracking=NullRun()))
    return lambda n: handler(epoch_record(rank0_metrics(n), None), None)


def summarize(name: str, out: dict[str, list[float]]) -> dict[str, Any]:
    first = statistics.median(out["seconds"][:WINDOW])
    last = statistics.median(out["seconds"][-WINDOW:])
    return {"name": name, "first_us": first * 1e6, "last_us": last * 1e6,
            "ratio": last / first, "first_bytes": statistics.mean(out["bytes"][:WINDOW]),
            "last_bytes": statistics.mean(out["bytes"][-WINDOW:])}


def table(rows: list[dict[str, Any]], evaluations: int) -> Table:
    t = Table(title=f"one evaluation's cost at the 10th and the {evaluations:,}th evaluation "
                    f"(medians and means of {WINDOW})")
    for column in ("", "µs at 10th", f"µs at {evaluations:,}th", "ratio", "bytes at 10th",
                   f"bytes at {evaluations:,}th"):
        t.add_column(column, justify="left" if not column else "right")
    for r in rows:
        t.add_row(r["name"], f"{r['first_us']:.0f}", f"{r['last_us']:.0f}",
                  f"{r['ratio']:.2f}", f"{r['first_bytes']:,.0f}", f"{r['last_bytes']:,.0f}")
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, step in (
            ("controller: recorder", recorder_step(str(Path(tmp) / "segments"))),
            ("controller: whole file (before)", whole_file_step(str(Path(tmp) / "whole"))),
            ("driver", driver_step(args.evaluations)),
        ):
            rows.append(summarize(name, measure(args.evaluations, step)))
    RichConsole(width=140).print(table(rows, args.evaluations))
    if args.out:
        args.out.write_text(json.dumps({"evaluations": args.evaluations, "rows": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
